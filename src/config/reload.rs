//! What a reload (SIGHUP) cannot apply: the changes between the running config and a new one
//! that wait for a restart, named so the operator is told rather than left to believe
//! "config reloaded" covered them.
//!
//! A reload applies the budgets (an org's `daily_limit`, `reserve`, `probe_interval`,
//! `max_in_flight`; an integration's `quota`, `rate`, `priority`, `max_in_flight`) and the
//! orgs' `[org.threshold]`. Every other key is listed here; the structs are destructured
//! without `..`, so a new key does not compile until it is sorted into one kind or the other.

use super::{Config, IntegrationConfig, OrgConfig};

/// The changes from `running` to `new` that take effect only at the next restart, each named
/// by its key (`org "acme".connect_timeout`, `[proxy]`). New orgs and integrations are not
/// listed: the reload reports them itself. A changed `window` neither (the reload compares it
/// with the meter's).
pub fn restart_needed(running: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    let sections = [
        ("[admin]", running.admin != new.admin),
        ("[store]", running.store != new.store),
        ("[log]", running.log != new.log),
        ("[proxy]", running.proxy != new.proxy),
        ("[[listener]]", running.listeners != new.listeners),
        ("[smtp]", running.smtp != new.smtp),
        ("[history]", running.history != new.history),
    ];
    changes.extend(
        sections
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(section, _)| section.to_owned()),
    );
    for old in &running.orgs {
        let key = format!("org \"{}\"", old.id);
        match new.orgs.iter().find(|o| o.id == old.id) {
            Some(new) => changes.extend(org_changes(old, new).map(|k| format!("{key}.{k}"))),
            None => changes.push(format!("{key} removed (it is still served)")),
        }
    }
    for old in &running.integrations {
        // Ids are unique within an org only.
        let key = format!("org \"{}\" integration \"{}\"", old.org, old.id);
        let same = |i: &&IntegrationConfig| i.id == old.id && i.org == old.org;
        match new.integrations.iter().find(same) {
            Some(new) => {
                changes.extend(integration_changes(old, new).map(|k| format!("{key}.{k}")))
            }
            None => changes.push(format!("{key} removed (it is still matched and counted)")),
        }
    }
    changes
}

/// The keys of an org that differ and wait for a restart.
fn org_changes<'a>(
    old: &'a OrgConfig,
    new: &'a OrgConfig,
) -> impl Iterator<Item = &'static str> + 'a {
    let OrgConfig {
        id: _,
        instance_url,
        login_url,
        upstream_ca,
        allow_plain_http,
        unmatched,
        connect_timeout,
        response_timeout,
        counting,
        // Applied by the reload (or, for `window`, reported by it).
        daily_limit: _,
        window: _,
        reserve: _,
        probe_interval: _,
        threshold: _,
        max_in_flight: _,
    } = old;
    [
        ("instance_url", *instance_url != new.instance_url),
        ("login_url", *login_url != new.login_url),
        ("upstream_ca", *upstream_ca != new.upstream_ca),
        (
            "allow_plain_http",
            *allow_plain_http != new.allow_plain_http,
        ),
        ("unmatched", *unmatched != new.unmatched),
        ("connect_timeout", *connect_timeout != new.connect_timeout),
        (
            "response_timeout",
            *response_timeout != new.response_timeout,
        ),
        ("counting", *counting != new.counting),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key)
}

/// The keys of an integration that differ and wait for a restart.
fn integration_changes<'a>(
    old: &'a IntegrationConfig,
    new: &'a IntegrationConfig,
) -> impl Iterator<Item = &'static str> + 'a {
    let IntegrationConfig {
        id: _,
        org: _,
        matcher,
        on_limit,
        reject_style,
        queue,
        defer,
        ratelimit_headers,
        call_options_client,
        // Applied by the reload.
        quota: _,
        rate: _,
        priority: _,
        max_in_flight: _,
    } = old;
    [
        ("match", *matcher != new.matcher),
        ("on_limit", *on_limit != new.on_limit),
        ("reject_style", *reject_style != new.reject_style),
        ("queue", *queue != new.queue),
        ("defer", *defer != new.defer),
        (
            "ratelimit_headers",
            *ratelimit_headers != new.ratelimit_headers,
        ),
        (
            "call_options_client",
            *call_options_client != new.call_options_client,
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key)
}
