//! Header handling between the client and Salesforce: what a proxy must drop, add or set.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must not be forwarded;
//! `X-Forwarded-*` tell Salesforce's logs who the client was; `Sforce-Call-Options: client=`
//! makes Salesforce's Event Monitoring attribute the call to the same integration we do.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use hyper::body::Body;

use super::ProxyError;

/// The header an integration may send to identify itself with a secret key.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("x-callmeter-key");
pub const CALL_OPTIONS: HeaderName = HeaderName::from_static("sforce-call-options");
pub const LIMIT_INFO: HeaderName = HeaderName::from_static("sforce-limit-info");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Client-supplied forwarding fields beside `X-Forwarded-For`/`-Proto`: passed on only from a
/// trusted load balancer, like those two.
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that belong to one connection only (RFC 9110 7.6.1). Not `Trailer`: it names the
/// fields that follow the body and travels with the message.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::UPGRADE || HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers, including any the `Connection` header names. `Upgrade` goes
/// too: the proxy does not tunnel protocol upgrades (Salesforce APIs need none). Called when a
/// pass over the names found one: most messages carry none, and comparing standard names is
/// comparing small integers, cheaper than eight hashed removals that find nothing.
fn remove_hop_by_hop_present(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Refuses what a reverse proxy must not forward, before the request is routed: a tunnel
/// (CONNECT), a Host header missing from an HTTP/1.1 request or given twice (RFC 9112 §3.2:
/// routing by host and a load balancer in front could each read another line), and a
/// transfer coding other than chunked (hyper decodes only that one; the other would reach
/// Salesforce undeclared).
pub fn check_request(parts: &http::request::Parts, body: &impl Body) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::Tunnel);
    }
    if parts.version != Version::HTTP_2 {
        let lines = parts.headers.get_all(header::HOST).iter().count();
        if lines > 1 || (lines == 0 && parts.version == Version::HTTP_11) {
            return Err(ProxyError::HostLines { lines });
        }
    }
    // Only a body of unknown length can have come with a transfer coding.
    if body.size_hint().exact().is_none() {
        if let Some(coding) = other_coding(&parts.headers) {
            return Err(ProxyError::RequestCoding { coding });
        }
    }
    Ok(())
}

/// The first transfer coding other than `chunked` the message declares.
fn other_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"))
        .map(|coding| String::from_utf8_lossy(coding).into_owned())
}

/// Where the request came from and how, for the `X-Forwarded-*` headers.
pub struct ClientInfo<'a> {
    /// The client's IP (see `Peer::ip_header`).
    pub ip: &'a HeaderValue,
    pub tls: bool,
    /// Keep an incoming `X-Forwarded-For` and append to it (the proxy is behind a trusted load
    /// balancer), or replace it (the client could have forged it); `Forwarded`,
    /// `X-Forwarded-Host` and `X-Real-IP` are kept or removed alike.
    pub trust_forwarded: bool,
}

/// Prepares the client's headers for the upstream request. `Host` stays: the upstream
/// connection replaces it with its own (HTTP/1.1) or drops it (HTTP/2), see `pool.rs`.
pub fn to_upstream(
    headers: &mut HeaderMap,
    client: &ClientInfo<'_>,
    call_options_client: Option<&HeaderValue>,
) {
    let mut present = Present::scan(headers);
    if present.hop_by_hop {
        remove_hop_by_hop_present(headers);
        // `Connection` may have named any of the others.
        present = Present::scan(headers);
    }
    if present.key {
        headers.remove(KEY_HEADER);
    }
    if present.other_forwarding && !client.trust_forwarded {
        headers.remove(FORWARDED);
        headers.remove(X_FORWARDED_HOST);
        headers.remove(X_REAL_IP);
    }

    let forwarded_for = if present.forwarded_for && client.trust_forwarded {
        // Every line of it, in order: a chain of proxies may have sent more than one.
        let mut joined = Vec::new();
        for prior in headers.get_all(&X_FORWARDED_FOR) {
            joined.extend_from_slice(prior.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(client.ip.as_bytes());
        HeaderValue::from_bytes(&joined).ok()
    } else {
        Some(client.ip.clone())
    };
    if let Some(v) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !(client.trust_forwarded && present.forwarded_proto) {
        let proto = if client.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }

    if let Some(client_option) = call_options_client {
        set_call_options_client(headers, client_option);
    }
}

/// Joins the `Cookie` fields of an HTTP/2 request into one: HTTP/2 lets a client send its
/// cookies as separate fields, and a request going on over HTTP/1.1 must carry them as one
/// header joined with "; " (RFC 9113 §8.2.3). The upstream's protocol is only known once a
/// connection is chosen; the joined form is valid over HTTP/2 as well.
pub fn join_cookies(headers: &mut HeaderMap) {
    let crumbs = headers.get_all(header::COOKIE);
    if crumbs.iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in crumbs {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Which of the headers `to_upstream` edits a request carries: one pass over the names, so the
/// common request (none of them) costs no hashed lookups for them.
struct Present {
    hop_by_hop: bool,
    key: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
    /// `Forwarded`, `X-Forwarded-Host` or `X-Real-IP`.
    other_forwarding: bool,
}

impl Present {
    fn scan(headers: &HeaderMap) -> Self {
        let mut p = Present {
            hop_by_hop: false,
            key: false,
            forwarded_for: false,
            forwarded_proto: false,
            other_forwarding: false,
        };
        for name in headers.keys() {
            p.hop_by_hop |= is_hop_by_hop(name);
            p.key |= name == KEY_HEADER;
            p.forwarded_for |= name == X_FORWARDED_FOR;
            p.forwarded_proto |= name == X_FORWARDED_PROTO;
            p.other_forwarding |=
                name == FORWARDED || name == X_FORWARDED_HOST || name == X_REAL_IP;
        }
        p
    }
}

/// Adds `client=<id>` to `Sforce-Call-Options` unless the caller named a client already, on
/// any of its lines. Options on several lines (the same as one comma-joined line, RFC 9110
/// §5.3) are joined into the one line the client is added to, so none is lost.
/// `client_option` is the precomputed `client=<id>` value.
fn set_call_options_client(headers: &mut HeaderMap, client_option: &HeaderValue) {
    let lines = headers.get_all(&CALL_OPTIONS);
    if lines.iter().next().is_none() {
        headers.insert(CALL_OPTIONS, client_option.clone());
        return;
    }
    // Salesforce separates options with `,` or `;` (`client=x; defaultNamespace=y`).
    let has_client = lines.iter().any(|line| {
        line.as_bytes()
            .split(|&b| b == b',' || b == b';')
            .any(|opt| {
                opt.trim_ascii_start()
                    .to_ascii_lowercase()
                    .starts_with(b"client=")
            })
    });
    if !has_client {
        let mut combined = Vec::new();
        for line in lines {
            combined.extend_from_slice(line.as_bytes());
            combined.push(b',');
        }
        combined.extend_from_slice(client_option.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&combined) {
            headers.insert(CALL_OPTIONS, v);
        }
    }
}

/// Headers for a log line, with credential values replaced (see `salesforce::is_secret_header`).
pub struct Redacted<'a>(pub &'a HeaderMap);

impl std::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (name, value) in self.0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            if crate::salesforce::is_secret_header(name) {
                write!(f, "{name}: {}", crate::salesforce::REDACTED)?;
            } else {
                write!(f, "{name}: {}", String::from_utf8_lossy(value.as_bytes()))?;
            }
        }
        Ok(())
    }
}

/// Why an upstream response cannot go on to the client as it is.
#[derive(Debug, thiserror::Error)]
pub enum Unpassable {
    #[error(
        "answered with Transfer-Encoding \"{0}\", which callmeter cannot pass on (only chunked)"
    )]
    Coding(String),
    /// The proxy asks for no upgrade (it removes `Upgrade` from every request).
    #[error("switched protocols (101) though no upgrade was asked for")]
    Upgrade,
}

/// Prepares the upstream response's head for the client.
pub fn to_client(head: &mut http::response::Parts) -> Result<(), Unpassable> {
    if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(Unpassable::Upgrade);
    }
    // The proxy's own version, whatever the upstream spoke (RFC 9110 §6.2): an HTTP/1.0
    // status line would tell an HTTP/1.1 client its connection is not kept.
    head.version = Version::HTTP_11;
    let headers = &mut head.headers;
    if headers.keys().any(is_hop_by_hop) {
        // A response framed by Transfer-Encoding ignores any Content-Length beside it, and a
        // proxy forwarding it must drop that (RFC 9112 §6.3): the client gets the decoded body,
        // which the stale length would cut short or run past. hyper decodes only chunked: a
        // body in another coding cannot go on as what it says it is.
        if headers.contains_key(header::TRANSFER_ENCODING) {
            if let Some(coding) = other_coding(headers) {
                return Err(Unpassable::Coding(coding));
            }
            headers.remove(header::CONTENT_LENGTH);
        }
        remove_hop_by_hop_present(headers);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    static CLIENT_IP: HeaderValue = HeaderValue::from_static("10.1.2.3");

    fn client(trust: bool) -> ClientInfo<'static> {
        ClientInfo {
            ip: &CLIENT_IP,
            tls: true,
            trust_forwarded: trust,
        }
    }

    #[test]
    fn drops_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("proxy.local"));
        h.insert(KEY_HEADER, HeaderValue::from_static("secret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 00D"),
        );
        to_upstream(&mut h, &client(false), None);
        assert_eq!(h.len(), 4, "{h:?}");
        assert!(h.contains_key(header::AUTHORIZATION));
        assert!(
            h.contains_key(header::HOST),
            "replaced by the upstream connection"
        );
        assert_eq!(h[X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
    }

    /// `to_client` on a 200 response with these headers.
    fn client_headers(h: &mut HeaderMap) -> Result<(), Unpassable> {
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.headers = std::mem::take(h);
        let passed = to_client(&mut head);
        *h = head.headers;
        passed
    }

    #[test]
    fn each_hop_by_hop_header_goes_even_alone() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            let mut h = HeaderMap::new();
            let value = if name == header::TRANSFER_ENCODING {
                "chunked"
            } else {
                "x"
            };
            h.insert(name.clone(), HeaderValue::from_static(value));
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            client_headers(&mut h).expect("chunked only");
            assert!(!h.contains_key(name), "{name} kept");
            assert!(h.contains_key(header::ACCEPT));
        }
    }

    #[test]
    fn credentials_are_redacted_in_logs() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 00Dx!secret"),
        );
        h.insert(header::COOKIE, HeaderValue::from_static("sid=00Dx!secret"));
        h.insert(KEY_HEADER, HeaderValue::from_static("key-secret"));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let line = Redacted(&h).to_string();
        assert!(!line.contains("secret"), "{line}");
        assert!(line.contains("accept: application/json"), "{line}");
        assert!(line.contains("authorization: [redacted]"), "{line}");
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        let mut replaced = h.clone();
        to_upstream(&mut replaced, &client(false), None);
        assert_eq!(replaced[X_FORWARDED_FOR], "10.1.2.3");
        to_upstream(&mut h, &client(true), None);
        assert_eq!(h[X_FORWARDED_FOR], "1.1.1.1, 10.1.2.3");
    }

    #[test]
    fn trusted_forwarded_for_on_several_lines_keeps_every_address() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        to_upstream(&mut h, &client(true), None);
        let lines: Vec<_> = h.get_all(X_FORWARDED_FOR).iter().collect();
        assert_eq!(lines, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3"]);
    }

    /// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and the body the client gets
    /// is the decoded one, so the length must not reach it.
    #[test]
    fn a_response_with_transfer_encoding_loses_its_content_length() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        client_headers(&mut h).expect("chunked only");
        assert!(!h.contains_key(header::CONTENT_LENGTH), "{h:?}");
        assert!(!h.contains_key(header::TRANSFER_ENCODING), "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));

        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        client_headers(&mut plain).expect("no coding");
        assert_eq!(plain[header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2; c=3"));
        join_cookies(&mut h);
        let lines: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(lines, ["a=1; b=2; c=3"]);

        let mut one = HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut one);
        assert_eq!(one[header::COOKIE], "a=1");
        let mut none = HeaderMap::new();
        join_cookies(&mut none);
        assert!(none.is_empty());
    }

    /// A trusted `X-Forwarded-Proto` that `Connection` names is hop-by-hop: it goes, and the
    /// proxy's own takes its place.
    #[test]
    fn forwarded_proto_named_by_connection_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-forwarded-proto"),
        );
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        to_upstream(&mut h, &client(true), None);
        assert_eq!(h[X_FORWARDED_PROTO], "https");
    }

    /// Salesforce documents `;` as a separator too (`client=caseSensitiveToken;
    /// defaultNamespace=battle`): a client named after a `;` is the caller's own, and must not
    /// get a second `client=` appended.
    #[test]
    fn a_client_named_after_a_semicolon_is_kept() {
        let id = HeaderValue::from_static("client=salesloft");
        let mut h = HeaderMap::new();
        h.insert(
            CALL_OPTIONS,
            HeaderValue::from_static("defaultNamespace=acme; client=theirs"),
        );
        to_upstream(&mut h, &client(false), Some(&id));
        assert_eq!(h[CALL_OPTIONS], "defaultNamespace=acme; client=theirs");
    }

    #[test]
    fn call_options_client_is_added_only_when_absent() {
        let id = HeaderValue::from_static("client=salesloft");
        let mut h = HeaderMap::new();
        to_upstream(&mut h, &client(false), Some(&id));
        assert_eq!(h[CALL_OPTIONS], "client=salesloft");

        let mut h = HeaderMap::new();
        h.insert(
            CALL_OPTIONS,
            HeaderValue::from_static("defaultNamespace=acme"),
        );
        to_upstream(&mut h, &client(false), Some(&id));
        assert_eq!(h[CALL_OPTIONS], "defaultNamespace=acme,client=salesloft");

        let mut h = HeaderMap::new();
        h.insert(
            CALL_OPTIONS,
            HeaderValue::from_static("defaultNamespace=acme, Client=theirs"),
        );
        to_upstream(&mut h, &client(false), Some(&id));
        assert_eq!(h[CALL_OPTIONS], "defaultNamespace=acme, Client=theirs");
    }

    /// A client may send `Sforce-Call-Options` on several lines (RFC 9110 §5.3: the same as one
    /// comma-joined line). A client named on any line is kept, and no line is lost: the second
    /// line (`client=theirs`) was dropped and replaced by the integration's id.
    #[test]
    fn call_options_on_several_lines_lose_nothing() {
        let id = HeaderValue::from_static("client=salesloft");
        let lines = |h: &HeaderMap| -> Vec<String> {
            h.get_all(CALL_OPTIONS)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_owned())
                .collect()
        };
        let mut h = HeaderMap::new();
        h.append(
            CALL_OPTIONS,
            HeaderValue::from_static("defaultNamespace=acme"),
        );
        h.append(CALL_OPTIONS, HeaderValue::from_static("client=theirs"));
        to_upstream(&mut h, &client(false), Some(&id));
        assert_eq!(lines(&h), ["defaultNamespace=acme", "client=theirs"]);

        let mut h = HeaderMap::new();
        h.append(
            CALL_OPTIONS,
            HeaderValue::from_static("defaultNamespace=acme"),
        );
        h.append(CALL_OPTIONS, HeaderValue::from_static("batchSize=200"));
        to_upstream(&mut h, &client(false), Some(&id));
        assert_eq!(
            lines(&h),
            ["defaultNamespace=acme,batchSize=200,client=salesloft"]
        );
    }
}
