//! Validation of each section and of the references between them (an integration's org, a
//! match rule's listener, clashing addresses), with the documented defaults applied.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

use super::raw::*;
use super::values::*;
use super::*;

impl Ctx<'_> {
    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let admin = self.admin(raw.admin.as_ref())?;
        let store = self.store(raw.store.as_ref())?;
        let log = self.log(raw.log.as_ref())?;
        let proxy = self.proxy(raw.proxy.as_ref())?;

        if raw.org.is_empty() {
            return Err(self.err("org", None, Problem::NoOrg));
        }
        let mut orgs: Vec<Located<OrgConfig>> = Vec::with_capacity(raw.org.len());
        for (i, org) in raw.org.iter().enumerate() {
            let org = self.org(i, org)?;
            if let Some(first) = orgs.iter().find(|o| o.value.id == org.value.id) {
                return Err(self.err_at(
                    &org,
                    "id",
                    None,
                    Problem::Duplicate {
                        value: format!("id {:?}", org.value.id.as_str()),
                        first: first.where_(),
                        rule: "org ids must be unique",
                    },
                ));
            }
            orgs.push(org);
        }
        let org_ids: Vec<OrgId> = orgs.iter().map(|o| o.value.id.clone()).collect();

        if raw.listener.is_empty() {
            return Err(self.err("listener", None, Problem::NoListener));
        }
        let mut listeners: Vec<Located<ListenerConfig>> = Vec::with_capacity(raw.listener.len());
        for (i, listener) in raw.listener.iter().enumerate() {
            let listener = self.listener(i, listener, &org_ids)?;
            if let Some(first) = listeners
                .iter()
                .find(|l| l.value.name == listener.value.name)
            {
                return Err(self.err_at(
                    &listener,
                    "name",
                    None,
                    Problem::Duplicate {
                        value: format!("name {:?}", listener.value.name),
                        first: first.where_(),
                        rule: "listener names must be unique",
                    },
                ));
            }
            listeners.push(listener);
        }
        self.check_addresses(&admin, raw.admin.as_ref(), &listeners, &raw.listener)?;

        let mut integrations: Vec<Located<IntegrationConfig>> =
            Vec::with_capacity(raw.integration.len() + orgs.len());
        // Maps rather than pairwise scans: start-up stays fast with thousands of integrations.
        let mut by_id: HashMap<(OrgId, IntegrationId), usize> = HashMap::new();
        let mut by_rule: HashMap<MatchRule, usize> = HashMap::new();
        for (i, raw_integration) in raw.integration.iter().enumerate() {
            let integration = self.integration(i, raw_integration, &orgs, &listeners)?;
            let id_key = (integration.value.org.clone(), integration.value.id.clone());
            if let Some(first) = by_id.get(&id_key).map(|&n| &integrations[n]) {
                return Err(self.err_at(
                    &integration,
                    "id",
                    None,
                    Problem::Duplicate {
                        value: format!(
                            "id {:?} in org {:?}",
                            integration.value.id.as_str(),
                            integration.value.org.as_str()
                        ),
                        first: first.where_(),
                        rule: "integration ids must be unique within an org",
                    },
                ));
            }
            // The unattributed integration's empty rule matches nothing by itself; it is the
            // fallback of its org, so two orgs' fallbacks do not collide.
            let rule = &integration.value.matcher;
            let same_rule = if rule.is_empty() {
                None
            } else {
                by_rule.get(rule).map(|&n| &integrations[n])
            };
            if let Some(first) = same_rule {
                let match_span = raw_integration.get_ref().matcher.as_ref().map(|m| m.span());
                return Err(self.err_at(
                    &integration,
                    "match",
                    match_span,
                    Problem::DuplicateMatch {
                        first: first.where_(),
                    },
                ));
            }
            by_id.insert(id_key, integrations.len());
            if !rule.is_empty() {
                by_rule.insert(rule.clone(), integrations.len());
            }
            integrations.push(integration);
        }

        let mut integrations: Vec<IntegrationConfig> =
            integrations.into_iter().map(|i| i.value).collect();
        for org in &orgs {
            let org = &org.value;
            let defined = integrations
                .iter()
                .any(|i| i.org == org.id && i.id.as_str() == UNATTRIBUTED);
            if org.unmatched == Unmatched::Unattributed && !defined {
                integrations.push(unattributed_integration(&org.id));
            }
        }

        let smtp = raw.smtp.as_ref().map(|s| self.smtp(s)).transpose()?;
        let history = self.history(raw.history.as_ref())?;

        Ok(Config {
            source: self.file.to_path_buf(),
            admin,
            store,
            log,
            proxy,
            listeners: listeners.into_iter().map(|l| l.value).collect(),
            orgs: orgs.into_iter().map(|o| o.value).collect(),
            integrations,
            smtp,
            history,
        })
    }

    /// An error about `field` of an already validated item, on the line of `span` when the
    /// field was written, else on the item's own line.
    fn err_at<T>(
        &self,
        item: &Located<T>,
        field: &str,
        span: Option<Range<usize>>,
        problem: Problem,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line: span.map(|s| self.line(&s)).or(item.line),
            key: format!("{}.{field}", item.key),
            problem: Box::new(problem),
        }
    }

    fn admin(&self, raw: Option<&S<RawAdmin>>) -> Result<AdminConfig, ConfigError> {
        let raw = raw.map(|r| r.get_ref());
        let listen = match raw.and_then(|r| r.listen.as_ref()) {
            Some(listen) => self.socket_addr(listen, "admin.listen")?,
            None => DEFAULT_ADMIN_LISTEN,
        };
        let token_env = match raw.and_then(|r| r.token_env.as_ref()) {
            Some(name) => self.env_name(name, "admin.token_env")?,
            None => DEFAULT_ADMIN_TOKEN_ENV.to_owned(),
        };
        // An unset token is not an error: read-only endpoints still work (see `warnings`).
        let token = self.secret(&token_env);
        Ok(AdminConfig {
            listen,
            token_env,
            token,
        })
    }

    fn store(&self, raw: Option<&S<RawStore>>) -> Result<StoreConfig, ConfigError> {
        let path = match raw.and_then(|r| r.get_ref().path.as_ref()) {
            Some(path) => PathBuf::from(self.non_empty(path, "store.path")?),
            None => PathBuf::from(DEFAULT_STORE_PATH),
        };
        let retention = self.duration(
            &raw.and_then(|r| r.get_ref().retention.clone()),
            "store.retention",
            DEFAULT_DEFERRED_RETENTION,
            false,
        )?;
        Ok(StoreConfig { path, retention })
    }

    fn log(&self, raw: Option<&S<RawLog>>) -> Result<LogConfig, ConfigError> {
        let raw = raw.map(|r| r.get_ref());
        let level = match raw.and_then(|r| r.level.as_ref()) {
            Some(level) => {
                let text = self.non_empty(level, "log.level")?;
                check_log_level(&text).map_err(|reason| {
                    self.err_on(
                        "log.level",
                        level,
                        Problem::BadLogLevel {
                            value: text.clone(),
                            reason,
                        },
                    )
                })?;
                text
            }
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };
        Ok(LogConfig {
            format: raw.and_then(|r| r.format).unwrap_or(LogFormat::Text),
            level,
        })
    }

    fn proxy(&self, raw: Option<&S<RawProxy>>) -> Result<ProxySettings, ConfigError> {
        let raw = raw.map(|r| r.get_ref());
        let shutdown_grace = self.duration(
            &raw.and_then(|r| r.shutdown_grace.clone()),
            "proxy.shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
            true,
        )?;
        let header_timeout = self.duration(
            &raw.and_then(|r| r.header_timeout.clone()),
            "proxy.header_timeout",
            DEFAULT_HEADER_TIMEOUT,
            false,
        )?;
        let max_header_bytes = match raw.and_then(|r| r.max_header_bytes.as_ref()) {
            Some(v) => {
                let n = *v.get_ref();
                if !(MIN_MAX_HEADER_BYTES..=MAX_MAX_HEADER_BYTES).contains(&n) {
                    return Err(self.err_on(
                        "proxy.max_header_bytes",
                        v,
                        Problem::OutOfRange {
                            value: n.to_string(),
                            expected: format!(
                                "{MIN_MAX_HEADER_BYTES} to {MAX_MAX_HEADER_BYTES} bytes"
                            ),
                        },
                    ));
                }
                n
            }
            None => DEFAULT_MAX_HEADER_BYTES,
        };
        let worker_threads = match raw.and_then(|r| r.worker_threads.as_ref()) {
            None => None,
            Some(v) if (1..=1024).contains(v.get_ref()) => Some(*v.get_ref() as usize),
            Some(v) => {
                return Err(self.err_on(
                    "proxy.worker_threads",
                    v,
                    Problem::OutOfRange {
                        value: v.get_ref().to_string(),
                        expected: "1 to 1024 threads".into(),
                    },
                ))
            }
        };
        Ok(ProxySettings {
            worker_threads,
            shutdown_grace,
            header_timeout,
            // In range of usize on every supported target (at most 16 MiB).
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            trust_forwarded_for: raw.and_then(|r| r.trust_forwarded_for).unwrap_or(false),
        })
    }

    fn org(&self, index: usize, raw: &S<RawOrg>) -> Result<Located<OrgConfig>, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let at = format!("org[{index}]");
        let id_value = self.required(&r.id, &format!("{at}.id"), &span, "id = \"acme\"")?;
        let id = self.id(id_value, &format!("{at}.id"), OrgId::new)?;
        // From here on the id is valid, and a name reads better than an index.
        let at = format!("org {:?}", id.as_str());
        let key = |k: &str| format!("{at}.{k}");

        let allow_plain_http = r.allow_plain_http.unwrap_or(false);
        let instance = self.required(
            &r.instance_url,
            &key("instance_url"),
            &span,
            "instance_url = \"https://acme.my.salesforce.com\"",
        )?;
        let instance_url = self.upstream_url(
            instance,
            &key("instance_url"),
            allow_plain_http,
            "https://acme.my.salesforce.com",
        )?;
        let login_url = r
            .login_url
            .as_ref()
            .map(|v| {
                self.upstream_url(
                    v,
                    &key("login_url"),
                    allow_plain_http,
                    "https://login.salesforce.com",
                )
            })
            .transpose()?;
        let upstream_ca = r
            .upstream_ca
            .as_ref()
            .map(|v| self.readable_file(v, &key("upstream_ca"), "CA certificate file"))
            .transpose()?;

        let daily_limit = match &r.daily_limit {
            None => DailyLimit::Auto,
            Some(v) => self.daily_limit(v, &key("daily_limit"))?,
        };

        let window = self.duration(&r.window, &key("window"), DEFAULT_WINDOW, false)?;
        if let Some(v) = &r.window {
            let whole = window.subsec_nanos() == 0 && window.as_secs() % 60 == 0;
            if !whole || window < Duration::from_secs(60) || window > MAX_WINDOW {
                return Err(self.err_on(
                    key("window"),
                    v,
                    Problem::BadWindow {
                        value: v.get_ref().clone(),
                    },
                ));
            }
        }

        let reserve = match &r.reserve {
            None => Amount::Calls(0),
            Some(v) => {
                let reserve = self.amount(v, &key("reserve"))?;
                let problem = match (reserve, daily_limit) {
                    (Amount::Calls(n), DailyLimit::Calls(limit)) if n >= limit => {
                        Some(Problem::ReserveTooLarge { reserve: n, limit })
                    }
                    // A 100 % reserve leaves nothing for normal integrations whatever the limit.
                    (Amount::Percent(p), _) if p >= 100.0 => Some(Problem::OutOfRange {
                        value: format!("{:?}", reserve.to_string()),
                        expected: "a reserve below 100% of the daily limit".to_owned(),
                    }),
                    _ => None,
                };
                if let Some(problem) = problem {
                    return Err(self.err_on(key("reserve"), v, problem));
                }
                reserve
            }
        };

        let probe_interval = self.duration(
            &r.probe_interval,
            &key("probe_interval"),
            DEFAULT_PROBE_INTERVAL,
            false,
        )?;
        let connect_timeout = self.duration(
            &r.connect_timeout,
            &key("connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
            false,
        )?;
        let response_timeout = self.duration(
            &r.response_timeout,
            &key("response_timeout"),
            DEFAULT_RESPONSE_TIMEOUT,
            false,
        )?;

        let defaults = Counting::default();
        let counting = r.counting.as_ref().map_or(defaults, |c| Counting {
            oauth: c.oauth.unwrap_or(defaults.oauth),
            limits_endpoint: c.limits_endpoint.unwrap_or(defaults.limits_endpoint),
            streaming: c.streaming.unwrap_or(defaults.streaming),
        });

        let threshold = r
            .threshold
            .as_ref()
            .map(|t| self.threshold(t, &key("threshold")))
            .transpose()?;
        let max_in_flight = self.in_flight(&r.max_in_flight, &key("max_in_flight"))?;

        Ok(Located {
            key: at.clone(),
            line: Some(self.line(&id_value.span())),
            value: OrgConfig {
                id,
                instance_url,
                login_url,
                upstream_ca,
                allow_plain_http,
                daily_limit,
                window,
                reserve,
                unmatched: r.unmatched.unwrap_or(Unmatched::Reject),
                probe_interval,
                connect_timeout,
                response_timeout,
                counting,
                threshold,
                max_in_flight,
            },
        })
    }

    fn daily_limit(&self, v: &S<IntOrStr>, key: &str) -> Result<DailyLimit, ConfigError> {
        const EXPECTED: &str = "\"auto\" or a number of calls of at least 1";
        let bad = |value: String| {
            self.err_on(
                key,
                v,
                Problem::BadAmount {
                    value,
                    expected: EXPECTED,
                },
            )
        };
        let calls = match v.get_ref() {
            IntOrStr::Str(s) if s.trim() == "auto" => return Ok(DailyLimit::Auto),
            IntOrStr::Str(s) => s.trim().parse::<u64>().map_err(|_| bad(format!("{s:?}")))?,
            IntOrStr::Int(n) => u64::try_from(*n).map_err(|_| bad(n.to_string()))?,
        };
        if calls == 0 {
            return Err(bad("0".to_owned()));
        }
        Ok(DailyLimit::Calls(calls))
    }

    fn threshold(&self, raw: &S<RawThreshold>, at: &str) -> Result<ThresholdConfig, ConfigError> {
        let r = raw.get_ref();
        let levels_key = format!("{at}.levels");
        let levels_value = self.required(
            &r.levels,
            &levels_key,
            &raw.span(),
            "levels = [\"80%\", \"90%\"]",
        )?;
        if levels_value.get_ref().is_empty() {
            return Err(self.err_on(&levels_key, levels_value, Problem::Empty));
        }
        let mut levels = Vec::with_capacity(levels_value.get_ref().len());
        for (i, level) in levels_value.get_ref().iter().enumerate() {
            let key = format!("{levels_key}[{i}]");
            let amount = self.amount(level, &key)?;
            if amount == Amount::Calls(0) {
                return Err(self.err_on(
                    key,
                    level,
                    Problem::OutOfRange {
                        value: "0".to_owned(),
                        expected: "at least 1 call or a percentage".to_owned(),
                    },
                ));
            }
            levels.push(amount);
        }
        let mut notify = Vec::new();
        for (i, address) in r.notify.iter().flatten().enumerate() {
            let text = address.get_ref().trim();
            if !is_email(text) {
                return Err(self.err_on(
                    format!("{at}.notify[{i}]"),
                    address,
                    Problem::BadEmail {
                        value: address.get_ref().clone(),
                    },
                ));
            }
            notify.push(text.to_owned());
        }
        let min_interval = self.duration(
            &r.min_interval,
            &format!("{at}.min_interval"),
            DEFAULT_THRESHOLD_MIN_INTERVAL,
            false,
        )?;
        Ok(ThresholdConfig {
            levels,
            notify,
            min_interval,
        })
    }

    fn listener(
        &self,
        index: usize,
        raw: &S<RawListener>,
        orgs: &[OrgId],
    ) -> Result<Located<ListenerConfig>, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let at = format!("listener[{index}]");
        let key = |k: &str| format!("{at}.{k}");

        let name_value = self.required(&r.name, &key("name"), &span, "name = \"main\"")?;
        check_id(name_value.get_ref())
            .map_err(|e| self.err_on(key("name"), name_value, Problem::BadId(e)))?;
        let listen_value = self.required(
            &r.listen,
            &key("listen"),
            &span,
            "listen = \"127.0.0.1:8080\"",
        )?;
        let listen = self.socket_addr(listen_value, &key("listen"))?;
        let public_url = r
            .public_url
            .as_ref()
            .map(|v| {
                self.url(
                    v,
                    &key("public_url"),
                    true,
                    "https://sfproxy.example.com:8443",
                )
            })
            .transpose()?;
        let tls = match &r.tls {
            None => None,
            Some(tls) => {
                let t = tls.get_ref();
                // Both keys first, then the files: a missing key is the likelier slip.
                let cert = self.required(
                    &t.cert,
                    &key("tls.cert"),
                    &tls.span(),
                    "cert = \"config/tls/cert.pem\"",
                )?;
                let key_file = self.required(
                    &t.key,
                    &key("tls.key"),
                    &tls.span(),
                    "key = \"config/tls/key.pem\"",
                )?;
                let cert = self.readable_file(cert, &key("tls.cert"), "TLS certificate file")?;
                let key_file = self.readable_file(key_file, &key("tls.key"), "TLS key file")?;
                Some(TlsFiles {
                    cert,
                    key: key_file,
                })
            }
        };
        let org = match &r.org {
            Some(v) => Some(self.org_ref(v, &key("org"), orgs)?),
            None if orgs.len() == 1 => orgs.first().cloned(),
            None => None,
        };
        Ok(Located {
            key: at,
            line: Some(self.line(&name_value.span())),
            value: ListenerConfig {
                name: name_value.get_ref().clone(),
                listen,
                public_url,
                tls,
                org,
            },
        })
    }

    fn org_ref(&self, v: &S<String>, key: &str, orgs: &[OrgId]) -> Result<OrgId, ConfigError> {
        orgs.iter()
            .find(|o| o.as_str() == v.get_ref())
            .cloned()
            .ok_or_else(|| {
                self.err_on(
                    key,
                    v,
                    Problem::UndefinedOrg {
                        org: v.get_ref().clone(),
                    },
                )
            })
    }

    /// Two sockets conflict when they share a port and an address, counting the unspecified
    /// address (0.0.0.0 / ::) as every address of its family. Port 0 (ephemeral, used by tests)
    /// never conflicts.
    fn check_addresses(
        &self,
        admin: &AdminConfig,
        raw_admin: Option<&S<RawAdmin>>,
        listeners: &[Located<ListenerConfig>],
        raw_listeners: &[S<RawListener>],
    ) -> Result<(), ConfigError> {
        let admin_line = raw_admin
            .and_then(|a| a.get_ref().listen.as_ref())
            .map(|l| self.line(&l.span()));
        let mut seen: Vec<(String, Option<usize>, SocketAddr)> =
            vec![("admin.listen".to_owned(), admin_line, admin.listen)];
        for (listener, raw) in listeners.iter().zip(raw_listeners) {
            let addr = listener.value.listen;
            let listen_span = raw.get_ref().listen.as_ref().map(|l| l.span());
            // On Linux `[::]` also takes the port on every IPv4 address (net.ipv6.bindv6only
            // is 0 by default), so it clashes across the families too.
            let dual_stack = |a: &SocketAddr| a.is_ipv6() && a.ip().is_unspecified();
            let clash = seen.iter().find(|(_, _, other)| {
                addr.port() != 0
                    && addr.port() == other.port()
                    && (dual_stack(&addr)
                        || dual_stack(other)
                        || (addr.is_ipv4() == other.is_ipv4()
                            && (addr.ip() == other.ip()
                                || addr.ip().is_unspecified()
                                || other.ip().is_unspecified())))
            });
            if let Some((key, line, _)) = clash {
                return Err(self.err_at(
                    listener,
                    "listen",
                    listen_span.clone(),
                    Problem::Duplicate {
                        value: format!("address {addr}"),
                        first: describe(key, *line),
                        rule: "each listener needs its own address and port",
                    },
                ));
            }
            seen.push((
                format!("{}.listen", listener.key),
                listen_span.map(|s| self.line(&s)),
                listener.value.listen,
            ));
        }
        Ok(())
    }

    fn integration(
        &self,
        index: usize,
        raw: &S<RawIntegration>,
        orgs: &[Located<OrgConfig>],
        listeners: &[Located<ListenerConfig>],
    ) -> Result<Located<IntegrationConfig>, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let at = format!("integration[{index}]");
        let key = |k: &str| format!("{at}.{k}");

        let id_value = self.required(&r.id, &key("id"), &span, "id = \"salesloft\"")?;
        let id = self.id(id_value, &key("id"), IntegrationId::new)?;
        let org_value = self.required(&r.org, &key("org"), &span, "org = \"acme\"")?;
        let org = orgs
            .iter()
            .map(|o| &o.value)
            .find(|o| o.id.as_str() == org_value.get_ref())
            .ok_or_else(|| {
                self.err_on(
                    key("org"),
                    org_value,
                    Problem::UndefinedOrg {
                        org: org_value.get_ref().clone(),
                    },
                )
            })?;

        let matcher = if id.as_str() == UNATTRIBUTED {
            if org.unmatched != Unmatched::Unattributed {
                return Err(self.err_on(
                    key("id"),
                    id_value,
                    Problem::UnattributedNotEnabled {
                        org: org.id.to_string(),
                    },
                ));
            }
            let rule = match &r.matcher {
                Some(m) => self.match_rule(m, &key("match"), listeners)?,
                None => MatchRule::default(),
            };
            if !rule.is_empty() {
                let span = r.matcher.as_ref().map(|m| m.span());
                return Err(self.err(key("match"), span, Problem::UnattributedMatch));
            }
            rule
        } else {
            let m = self.required(
                &r.matcher,
                &key("match"),
                &span,
                "match = { path_prefix = \"/salesloft\" }",
            )?;
            let rule = self.match_rule(m, &key("match"), listeners)?;
            if rule.is_empty() {
                return Err(self.err_on(key("match"), m, Problem::EmptyMatch));
            }
            rule
        };

        let quota = match &r.quota {
            None => None,
            Some(v) => {
                let quota = self.amount(v, &key("quota"))?;
                if let (Amount::Calls(q), DailyLimit::Calls(limit)) = (quota, org.daily_limit) {
                    if q > limit {
                        return Err(self.err_on(
                            key("quota"),
                            v,
                            Problem::QuotaTooLarge {
                                quota: q,
                                limit,
                                org: org.id.to_string(),
                            },
                        ));
                    }
                }
                Some(quota)
            }
        };

        let rate = r
            .rate
            .as_ref()
            .map(|v| self.rate(v, &key("rate")))
            .transpose()?;

        let queue = match &r.queue {
            None => QueueConfig::default(),
            Some(q) => {
                let max_depth = match &q.max_depth {
                    None => DEFAULT_QUEUE_MAX_DEPTH,
                    Some(v) => {
                        let n = *v.get_ref();
                        if !(1..=MAX_QUEUE_MAX_DEPTH).contains(&n) {
                            return Err(self.err_on(
                                key("queue.max_depth"),
                                v,
                                Problem::OutOfRange {
                                    value: n.to_string(),
                                    expected: format!("1 to {MAX_QUEUE_MAX_DEPTH} waiting calls"),
                                },
                            ));
                        }
                        n
                    }
                };
                QueueConfig {
                    // At most a million: fits usize on every target.
                    max_depth: usize::try_from(max_depth).unwrap_or(usize::MAX),
                    max_wait: self.duration(
                        &q.max_wait,
                        &key("queue.max_wait"),
                        DEFAULT_QUEUE_MAX_WAIT,
                        false,
                    )?,
                }
            }
        };

        let bounded =
            |value: &Option<S<u64>>, name: &str, default: u64, max: u64, unit: &str| match value {
                None => Ok(default),
                Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(self.err_on(
                    key(name),
                    v,
                    Problem::OutOfRange {
                        value: v.get_ref().to_string(),
                        expected: format!("1 to {max} {unit}"),
                    },
                )),
            };
        let max_in_flight = self.in_flight(&r.max_in_flight, &key("max_in_flight"))?;
        let defer = match &r.defer {
            None => DeferConfig::default(),
            Some(d) => DeferConfig {
                max_body_bytes: bounded(
                    &d.max_body_bytes,
                    "defer.max_body_bytes",
                    DEFAULT_DEFER_MAX_BODY,
                    MAX_DEFER_MAX_BODY,
                    "bytes",
                )? as usize,
                max_attempts: bounded(
                    &d.max_attempts,
                    "defer.max_attempts",
                    DEFAULT_DEFER_MAX_ATTEMPTS,
                    MAX_DEFER_MAX_ATTEMPTS,
                    "attempts",
                )? as u32,
            },
        };

        Ok(Located {
            key: at,
            line: Some(self.line(&id_value.span())),
            value: IntegrationConfig {
                id,
                org: org.id.clone(),
                matcher,
                quota,
                rate,
                priority: r.priority.unwrap_or(Priority::Normal),
                on_limit: r.on_limit.unwrap_or(OnLimit::Reject),
                reject_style: r.reject_style.unwrap_or(RejectStyle::Salesforce),
                queue,
                defer,
                max_in_flight,
                ratelimit_headers: r.ratelimit_headers.unwrap_or(true),
                call_options_client: r.call_options_client.unwrap_or(true),
            },
        })
    }

    fn match_rule(
        &self,
        raw: &S<RawMatch>,
        at: &str,
        listeners: &[Located<ListenerConfig>],
    ) -> Result<MatchRule, ConfigError> {
        let r = raw.get_ref();
        let key = |k: &str| format!("{at}.{k}");
        let listener = match &r.listener {
            None => None,
            Some(v) => {
                let name = v.get_ref();
                if !listeners.iter().any(|l| &l.value.name == name) {
                    return Err(self.err_on(
                        key("listener"),
                        v,
                        Problem::UndefinedListener { name: name.clone() },
                    ));
                }
                Some(name.clone())
            }
        };
        let host = match &r.host {
            None => None,
            Some(v) => Some(normalize_host(v.get_ref()).map_err(|reason| {
                self.err_on(
                    key("host"),
                    v,
                    Problem::BadHost {
                        value: v.get_ref().clone(),
                        reason,
                    },
                )
            })?),
        };
        let path_prefix = match &r.path_prefix {
            None => None,
            Some(v) => Some(normalize_path_prefix(v.get_ref()).map_err(|reason| {
                self.err_on(
                    key("path_prefix"),
                    v,
                    Problem::BadPathPrefix {
                        value: v.get_ref().clone(),
                        reason,
                    },
                )
            })?),
        };
        let key_secret = match &r.key_env {
            None => None,
            Some(v) => Some(self.env_secret(v, &key("key_env"))?.1),
        };
        Ok(MatchRule {
            listener,
            host,
            path_prefix,
            key: key_secret,
        })
    }

    fn rate(&self, raw: &S<RawRate>, at: &str) -> Result<Rate, ConfigError> {
        let r = raw.get_ref();
        let per_second_key = format!("{at}.per_second");
        let per_second_value = self.required(
            &r.per_second,
            &per_second_key,
            &raw.span(),
            "per_second = 20",
        )?;
        let per_second = *per_second_value.get_ref();
        // Above a billion per second a bucket is no limit at all and the f64 arithmetic of the
        // refill loses meaning; refuse rather than accept a silent no-op.
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e9) {
            return Err(self.err_on(
                per_second_key,
                per_second_value,
                Problem::OutOfRange {
                    value: per_second.to_string(),
                    expected: "a number of calls per second above 0 and at most 1e9".to_owned(),
                },
            ));
        }
        let burst = match &r.burst {
            // Default: one second's worth of calls, so a steady caller never waits.
            None => (per_second.ceil() as u32).max(1),
            Some(v) => {
                let n = *v.get_ref();
                u32::try_from(n).ok().filter(|b| *b >= 1).ok_or_else(|| {
                    self.err_on(
                        format!("{at}.burst"),
                        v,
                        Problem::OutOfRange {
                            value: n.to_string(),
                            expected: format!("1 to {} calls", u32::MAX),
                        },
                    )
                })?
            }
        };
        Ok(Rate { per_second, burst })
    }

    fn smtp(&self, raw: &S<RawSmtp>) -> Result<SmtpConfig, ConfigError> {
        let span = raw.span();
        let r = raw.get_ref();
        let host_value =
            self.required(&r.host, "smtp.host", &span, "host = \"smtp.example.com\"")?;
        let host = self.non_empty(host_value, "smtp.host")?;
        let security = r.security.unwrap_or(SmtpSecurity::Starttls);
        let port = match &r.port {
            None if security == SmtpSecurity::Tls => DEFAULT_SMTPS_PORT,
            None => DEFAULT_SMTP_PORT,
            Some(v) => u16::try_from(*v.get_ref())
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    self.err_on(
                        "smtp.port",
                        v,
                        Problem::OutOfRange {
                            value: v.get_ref().to_string(),
                            expected: "a port from 1 to 65535".to_owned(),
                        },
                    )
                })?,
        };
        let username = r
            .username
            .as_ref()
            .map(|u| self.non_empty(u, "smtp.username"))
            .transpose()?;
        let (password_env, password) = match (&username, &r.password_env) {
            (Some(_), None) => {
                return Err(self.err(
                    "smtp.username",
                    r.username.as_ref().map(|u| u.span()),
                    Problem::MissingPasswordEnv,
                ))
            }
            (None, Some(v)) => {
                return Err(self.err_on("smtp.password_env", v, Problem::PasswordWithoutUser))
            }
            (None, None) => (None, None),
            (Some(_), Some(v)) => {
                let (name, secret) = self.env_secret(v, "smtp.password_env")?;
                (Some(name), Some(secret))
            }
        };
        let from_value = self.required(
            &r.from,
            "smtp.from",
            &span,
            "from = \"callmeter <callmeter@example.com>\"",
        )?;
        let from = from_value.get_ref().trim();
        // "Name <addr>" or a bare address, as the mailer will read it.
        if from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(self.err_on(
                "smtp.from",
                from_value,
                Problem::BadEmail {
                    value: from_value.get_ref().clone(),
                },
            ));
        }
        let ca =
            r.ca.as_ref()
                .map(|v| self.readable_file(v, "smtp.ca", "CA certificate file"))
                .transpose()?;
        Ok(SmtpConfig {
            host,
            port,
            security,
            username,
            password_env,
            password,
            from: from.to_owned(),
            ca,
        })
    }

    fn history(&self, raw: Option<&S<RawHistory>>) -> Result<HistoryConfig, ConfigError> {
        let Some(value) = raw.and_then(|r| r.get_ref().time_zone.as_ref()) else {
            return Ok(HistoryConfig::default());
        };
        let name = value.get_ref().trim();
        let time_zone = parse_time_zone(name).map_err(|reason| {
            self.err_on(
                "history.time_zone",
                value,
                Problem::BadTimeZone {
                    value: value.get_ref().clone(),
                    reason,
                },
            )
        })?;
        Ok(HistoryConfig {
            time_zone_name: name.to_owned(),
            time_zone,
        })
    }
}

/// The levels a log filter directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A `[log] level` (or `RUST_LOG`) as tracing's filter reads it: comma-separated directives,
/// each a level, a target (a crate or module path, with span filters in `[...]`), or
/// `target=level`. The filter takes a lone word that is no level (`"warning"`) as a target name
/// and then logs nothing of callmeter, errors included: a lone word that reads as a level
/// (spelt in capitals, sharing a prefix with a level, or a level of another logger:
/// `fatal`, `verbose`, ...) is refused here. Crate names (`callmeter`, `hyper`) pass, as
/// long as some directive sets a level for callmeter's own lines.
pub fn check_log_level(text: &str) -> Result<(), String> {
    const OTHER_LEVELS: [&str; 8] = [
        "fatal", "critical", "crit", "verbose", "notice", "all", "none", "silent",
    ];
    // tracing also reads the digits 0 (off) to 5 (trace) as levels.
    let is_level = |l: &str| {
        LOG_LEVELS.iter().any(|level| level.eq_ignore_ascii_case(l))
            || matches!(l, "0" | "1" | "2" | "3" | "4" | "5")
    };
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `=` inside a span filter (`callmeter[{org=acme}]`) is not the level's.
        let after_spans = directive.rfind(']').map_or(0, |at| at + 1);
        let level = match directive[after_spans..].rfind('=') {
            Some(at) => directive[after_spans + at + 1..].trim(),
            None if directive.contains("::") || directive.contains('[') => continue,
            None if is_level(directive) => continue,
            None => {
                let lower = directive.to_ascii_lowercase();
                let looks_like_a_level = directive != lower
                    || OTHER_LEVELS.contains(&lower.as_str())
                    || LOG_LEVELS
                        .iter()
                        .any(|l| lower.starts_with(&l[..3]) || l.starts_with(&lower));
                if looks_like_a_level {
                    return Err(format!("{directive:?} is not a level"));
                }
                continue;
            }
        };
        if !is_level(level) {
            return Err(format!("{level:?} is not a level"));
        }
    }
    // With no level for every target and none for callmeter's, the filter turns callmeter's
    // own lines off, errors included (`level = "loud"` read as a target named "loud").
    let mut directives = text.split(',').map(str::trim).filter(|d| !d.is_empty());
    // A directive for a module of callmeter's only (`callmeter::proxy=debug`) leaves the
    // others off, the start's and the reload's errors among them.
    let covers_callmeter = |d: &str| {
        let target = d.split(['[', '=']).next().unwrap_or_default().trim();
        is_level(d) || (!target.is_empty() && "callmeter".starts_with(target))
    };
    if !directives.any(covers_callmeter) {
        return Err(format!(
            "it gives callmeter's own lines no level ({text:?} names crates or modules to \
             log, a lone word among them), so they are off, errors included; name a level \
             (error, warn, info, debug, trace, off), or add one: \"info,{text}\""
        ));
    }
    Ok(())
}

/// `"UTC"`, a fixed offset `"+HH:MM"` / `"-HH:MM"`, or a name of the system's tz database
/// (`/usr/share/zoneinfo`, Debian's `tzdata`), which follows daylight saving time.
pub(super) fn parse_time_zone(name: &str) -> Result<tz::TimeZone, String> {
    if name.eq_ignore_ascii_case("utc") || name == "Z" {
        return Ok(tz::TimeZone::utc());
    }
    if let Some(rest) = name.strip_prefix('+').or_else(|| name.strip_prefix('-')) {
        let sign = if name.starts_with('-') { -1 } else { 1 };
        let (h, m) = rest
            .split_once(':')
            .ok_or("a fixed offset needs hours and minutes, like +02:00")?;
        let two_digits = |t: &str| t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit());
        if !two_digits(h) || !two_digits(m) {
            return Err("a fixed offset needs hours and minutes, like +02:00".to_owned());
        }
        let (h, m): (i32, i32) = (h.parse().unwrap_or(99), m.parse().unwrap_or(99));
        if h > 14 || m > 59 {
            return Err("offsets range from -14:00 to +14:00".to_owned());
        }
        return tz::TimeZone::fixed(sign * (h * 3600 + m * 60)).map_err(|e| e.to_string());
    }
    let plausible = !name.is_empty()
        && !name.starts_with('/')
        && !name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'));
    if !plausible {
        return Err("not a tz database name".to_owned());
    }
    // The leading ':' makes tz-rs read the zone file and never fall back to a POSIX TZ rule.
    tz::TimeZone::from_posix_tz(&format!(":{name}")).map_err(|e| {
        format!("no such zone in the system's tz database ({e}); is the tzdata package installed?")
    })
}

/// Validates a threshold given on its own, as the table `[threshold]` of a TOML document
/// (`levels`, `notify`, `min_interval`), with exactly the rules of `[org.threshold]`. This is
/// what the admin API's `PUT /api/v1/orgs/{org}/threshold` accepts. The key of an error is
/// relative to the table (`levels[1]`), and `source` names where the text came from.
pub fn parse_threshold(text: &str, source: &Path) -> Result<ThresholdConfig, ConfigError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        threshold: Option<S<RawThreshold>>,
    }
    let ctx = Ctx {
        text,
        file: source,
        env: &process_env,
        newlines: text.match_indices('\n').map(|(at, _)| at).collect(),
    };
    let relative = |e: ConfigError| match e {
        ConfigError::Invalid {
            file,
            line,
            key,
            problem,
        } => ConfigError::Invalid {
            file,
            line,
            key: key
                .strip_prefix("threshold.")
                .map(str::to_owned)
                .unwrap_or(key),
            problem,
        },
        other => other,
    };
    let tree = DeTable::parse(text).map_err(|e| ctx.syntax_error(&e))?;
    let doc: Doc =
        toml::from_str(text).map_err(|e| relative(ctx.serde_error(&e, tree.get_ref())))?;
    let Some(raw) = doc.threshold else {
        return Err(ctx.err(
            "levels",
            None,
            Problem::Missing {
                example: "\"levels\": [\"80%\", \"90%\"]".to_owned(),
            },
        ));
    };
    ctx.threshold(&raw, "threshold").map_err(relative)
}

pub(super) fn unattributed_integration(org: &OrgId) -> IntegrationConfig {
    IntegrationConfig {
        id: IntegrationId(Arc::from(UNATTRIBUTED)),
        org: org.clone(),
        matcher: MatchRule::default(),
        quota: None,
        rate: None,
        priority: Priority::Normal,
        on_limit: OnLimit::Reject,
        reject_style: RejectStyle::Salesforce,
        queue: QueueConfig::default(),
        defer: DeferConfig::default(),
        max_in_flight: None,
        ratelimit_headers: true,
        call_options_client: true,
    }
}

pub(super) fn normalize_host(raw: &str) -> Result<String, &'static str> {
    let host = raw.trim().to_ascii_lowercase();
    // A trailing dot (fully qualified form) names the same host; Host headers rarely carry it.
    let host = host.strip_suffix('.').unwrap_or(&host);
    if host.is_empty() {
        return Err("it is empty");
    }
    if host.contains("://") || host.contains('/') {
        return Err("give the host only, not a URL");
    }
    if host.contains(':') {
        return Err("give the host without a port");
    }
    let charset_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !charset_ok || host.starts_with('.') || host.contains("..") {
        return Err("use letters, digits, '-', '_' and dots between labels");
    }
    Ok(host.to_owned())
}

pub(super) fn normalize_path_prefix(raw: &str) -> Result<String, String> {
    let text = raw.trim();
    if !text.starts_with('/') {
        return Err("it must start with '/'".into());
    }
    let prefix = text.trim_end_matches('/');
    if prefix.is_empty() {
        return Err("\"/\" alone would match every request".into());
    }
    if prefix.contains("//") {
        return Err("it has an empty segment (\"//\")".into());
    }
    if prefix
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || matches!(b, b'?' | b'#'))
    {
        return Err("it must not contain spaces, '?' or '#'".into());
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("it must not contain \".\" or \"..\" segments".into());
    }
    // Matched against the path as clients send it, which HTTP has percent-encoded: a prefix
    // in any other spelling would never match.
    if !prefix.is_ascii() {
        let encoded: String = prefix
            .bytes()
            .map(|b| match b {
                b if b.is_ascii() => char::from(b).to_string(),
                b => format!("%{b:02X}"),
            })
            .collect();
        return Err(format!(
            "clients send it percent-encoded, so it would never match: write {encoded:?}"
        ));
    }
    let bytes = prefix.as_bytes();
    let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    let pchar = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b);
    if bad_escape || !bytes.iter().all(|&b| pchar(b)) {
        return Err(
            "it may hold only characters a URL path holds as they are (letters, digits, \
             \"-._~!$&'()*+,;=:@\") and %XX escapes"
                .into(),
        );
    }
    // The prefix is stripped before forwarding, so "/services" would swallow Salesforce's own
    // paths and send them upstream without their first segment.
    if prefix == "/services" || prefix.starts_with("/services/") {
        return Err("it would capture Salesforce's own /services/... paths".into());
    }
    Ok(prefix.to_owned())
}

/// An address the mailer can send to: lettre's own parser decides, so that no address the
/// config accepts makes a threshold email impossible to build for all its recipients.
pub(super) fn is_email(text: &str) -> bool {
    text.parse::<lettre::Address>().is_ok()
}
