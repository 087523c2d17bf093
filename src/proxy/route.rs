//! Attribution: which integration (and so which org) a request belongs to.
//!
//! Each listener gets a `RouteTable` built once from the config. A rule lands in the index of
//! its most selective condition — secret key, then Host name, then path prefix, then the
//! listener alone — and a lookup tries them in that order, checking the rule's other
//! conditions, so a request costs a few hash lookups whatever the number of integrations.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use http::request::Parts;
use http::HeaderValue;

use super::error::ProxyError;
use super::headers::KEY_HEADER;
use super::OrgRoute;
use crate::config::MatchRule;
use crate::meter::IntegrationMeter;
use crate::metrics::IntegrationMetrics;

/// Everything the request path needs about one integration, resolved at start-up.
pub struct Route {
    pub org: Arc<OrgRoute>,
    pub meter: Arc<IntegrationMeter>,
    pub metrics: IntegrationMetrics,
    /// Stripped from the path before forwarding; kept in rewritten login URLs.
    pub path_prefix: Option<Box<str>>,
    /// `client=<id>` for `Sforce-Call-Options`, or `None` when the integration opted out.
    pub call_options: Option<HeaderValue>,
    /// The integration is recognised by its Host name: login URLs keep the request's Host
    /// (not the listener's public host), or the client would lose its attribution.
    pub keep_host: bool,
    /// How held-back calls are answered.
    pub reject_style: crate::config::RejectStyle,
    /// Where calls wait for budget when `on_limit = "queue"`.
    pub queue: Option<Arc<crate::queue::WaitQueue>>,
    /// Where calls are stored when `on_limit = "defer"`.
    pub defer: Option<super::DeferRoute>,
    /// The `RateLimit` response headers; `None` when the integration turned them off.
    pub ratelimit: Option<super::RateLimitHeaders>,
}

impl Route {
    pub fn id(&self) -> &str {
        self.meter.id().as_str()
    }
}

struct Candidate {
    route: Arc<Route>,
    rule: MatchRule,
}

impl Candidate {
    /// Rules that hold for the same request are tried in this order, highest first: the most
    /// conditions (a listener counts too), then the longest prefix; equals in file order.
    fn specificity(&self) -> (usize, usize) {
        let r = &self.rule;
        let conditions = [
            r.key.is_some(),
            r.host.is_some(),
            r.path_prefix.is_some(),
            r.listener.is_some(),
        ];
        (
            conditions.iter().filter(|&&c| c).count(),
            r.path_prefix.as_ref().map_or(0, String::len),
        )
    }

    fn matches(&self, req: &RequestFacts<'_>) -> bool {
        let r = &self.rule;
        r.key
            .as_deref()
            .is_none_or(|k| req.key == Some(k.as_bytes()))
            && r.host
                .as_deref()
                .is_none_or(|h| req.host.as_deref() == Some(h))
            && r.path_prefix
                .as_deref()
                .is_none_or(|p| has_prefix(req.path, p))
    }
}

/// `path` starts with `prefix` at a segment boundary: "/sl" matches "/sl" and "/sl/x", not "/slx".
fn has_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first segment, for the map of path-prefix rules. Empty segments are not skipped: a rule
/// for `/sl` must not take `//sl`, which `has_prefix` would refuse anyway.
fn first_segment(path: &str) -> &str {
    let path = path.strip_prefix('/').unwrap_or(path);
    let end = path.bytes().position(|b| b == b'/').unwrap_or(path.len());
    &path[..end]
}

/// What routing looks at, read once from the request.
struct RequestFacts<'a> {
    /// Bytes, not text: a key that is not ASCII is still a key (an unknown one).
    key: Option<&'a [u8]>,
    host: Option<std::borrow::Cow<'a, str>>,
    path: &'a str,
}

impl<'a> RequestFacts<'a> {
    /// `host`: whether any rule looks at the host (most listeners route by path or key only).
    fn of(parts: &'a Parts, host: bool) -> Self {
        RequestFacts {
            key: parts.headers.get(KEY_HEADER).map(HeaderValue::as_bytes),
            host: if host { Self::host(parts) } else { None },
            path: parts.uri.path(),
        }
    }

    /// The request's host name, lowercase, without the port or a trailing dot (config
    /// normalises rules the same way: `crm.example.com.` is the same host).
    fn host(parts: &'a Parts) -> Option<std::borrow::Cow<'a, str>> {
        let raw = parts.uri.host().or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })?;
        let h = strip_port(raw);
        let h = h.strip_suffix('.').unwrap_or(h);
        Some(if h.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(h.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(h)
        })
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: "[::1]:8080"
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn first_match<'a>(list: &'a [Candidate], facts: &RequestFacts<'_>) -> Option<&'a Candidate> {
    list.iter().find(|c| c.matches(facts))
}

/// The routes of one listener. The maps are looked up with request data but only ever filled
/// from the config, so a fast hash (foldhash) serves; SipHash was a measurable share of routing.
pub struct RouteTable {
    listener: String,
    /// Whether any rule has a host condition; if none, requests' hosts are not looked at.
    uses_host: bool,
    /// Whether any of its integrations queues calls at its limit (`on_limit = "queue"`).
    queues: bool,
    by_key: HashMap<String, Vec<Candidate>>,
    by_host: HashMap<String, Vec<Candidate>>,
    by_segment: HashMap<String, Vec<Candidate>>,
    listener_only: Option<Arc<Route>>,
    /// Where unmatched traffic goes: the org's `unattributed` integration, or nowhere.
    unmatched: Option<Arc<Route>>,
}

/// A matched request: its route and how many leading path bytes to strip.
pub struct Matched {
    pub route: Arc<Route>,
    pub strip: usize,
}

impl RouteTable {
    pub fn new(listener: &str) -> Self {
        RouteTable {
            listener: listener.to_owned(),
            uses_host: false,
            queues: false,
            by_key: HashMap::new(),
            by_host: HashMap::new(),
            by_segment: HashMap::new(),
            listener_only: None,
            unmatched: None,
        }
    }

    /// Adds an integration whose rule applies to this listener.
    pub fn add(&mut self, route: Arc<Route>, rule: &MatchRule) {
        let candidate = Candidate {
            route: route.clone(),
            rule: rule.clone(),
        };
        self.uses_host |= rule.host.is_some();
        self.queues |= route.queue.is_some();
        let list = if let Some(key) = &rule.key {
            self.by_key.entry(key.clone()).or_default()
        } else if let Some(host) = &rule.host {
            self.by_host.entry(host.clone()).or_default()
        } else if let Some(prefix) = &rule.path_prefix {
            self.by_segment
                .entry(first_segment(prefix).to_owned())
                .or_default()
        } else {
            // Only the listener is left to match on (rules without any condition are the
            // unattributed integrations, which `set_unmatched` places).
            self.listener_only = Some(route);
            return;
        };
        list.push(candidate);
        // Most specific first, so a host + prefix rule wins over a host-only rule.
        list.sort_by_key(|c| std::cmp::Reverse(c.specificity()));
    }

    /// Sends unmatched traffic to `route` (the org's unattributed integration).
    pub fn set_unmatched(&mut self, route: Arc<Route>) {
        self.queues |= route.queue.is_some();
        self.unmatched = Some(route);
    }

    /// Whether a call on this listener may wait in a queue for budget: then the listener has
    /// to notice a client that hangs up meanwhile (see `ConnOptions::watch_hangups`).
    pub fn queues(&self) -> bool {
        self.queues
    }

    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Finds the integration a request belongs to.
    pub fn route(&self, parts: &Parts) -> Result<Matched, ProxyError> {
        let facts = RequestFacts::of(parts, self.uses_host);
        // A key decides alone: a call with one is its integration's or refused, never charged
        // to whichever integration its host or path names.
        let candidate = if let Some(key) = facts.key {
            let list = std::str::from_utf8(key)
                .ok()
                .and_then(|key| self.by_key.get(key));
            Some(
                list.and_then(|l| first_match(l, &facts))
                    .ok_or(ProxyError::UnknownKey)?,
            )
        } else {
            facts
                .host
                .as_deref()
                .and_then(|h| self.by_host.get(h))
                .and_then(|l| first_match(l, &facts))
                .or_else(|| {
                    self.by_segment
                        .get(first_segment(facts.path))
                        .and_then(|l| first_match(l, &facts))
                })
        };
        if let Some(c) = candidate {
            let strip = c.rule.path_prefix.as_ref().map_or(0, String::len);
            return Ok(Matched {
                route: c.route.clone(),
                strip,
            });
        }
        match self.listener_only.as_ref().or(self.unmatched.as_ref()) {
            Some(route) => Ok(Matched {
                route: route.clone(),
                strip: 0,
            }),
            None => Err(ProxyError::Unmatched {
                listener: self.listener.clone(),
                hint: "use the integration's path prefix, Host name or X-Callmeter-Key header",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(has_prefix("/sl/services/data", "/sl"));
        assert!(has_prefix("/sl", "/sl"));
        assert!(!has_prefix("/slx/services", "/sl"));
        assert!(has_prefix("/a/b/c", "/a/b"));
        assert_eq!(first_segment("/a/b"), "a");
        assert_eq!(first_segment("/"), "");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("crm.example.com:8443"), "crm.example.com");
        assert_eq!(strip_port("crm.example.com"), "crm.example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }

    #[test]
    fn a_fully_qualified_host_matches_its_rule() {
        for host in [
            "CRM.example.com.",
            "crm.example.com.:8443",
            "crm.example.com",
        ] {
            let req = http::Request::get("/services/data/")
                .header(http::header::HOST, host)
                .body(())
                .expect("request");
            let (parts, ()) = req.into_parts();
            let facts = RequestFacts::of(&parts, true);
            assert_eq!(facts.host.as_deref(), Some("crm.example.com"), "{host}");
        }
    }
}
