//! Login response rewriting. An integration learns where to send API calls from its login
//! response (OAuth `instance_url`, SOAP `serverUrl`) and then talks to that host directly; to
//! keep it on the proxy, those URLs get the proxy's public base in place of their scheme and
//! host, keeping their path.
//!
//! The token endpoint answers in JSON, XML or form encoding, as the client asked (`format=` or
//! `Accept`); each is rewritten in its own syntax. The rewriters splice the new URL into the
//! original bytes and leave every other byte as it was: key order, formatting, numbers and the
//! `id` URL (which points at the login host and is covered by the response's signature) stay
//! untouched.

use serde::de::IgnoredAny;

use super::json;
use super::xml::{self, Step};

/// OAuth token response fields that name the instance to call.
const OAUTH_URL_KEYS: [&[u8]; 3] = [b"instance_url", b"api_instance_url", b"sfdc_community_url"];

/// SOAP `loginResponse` elements that name the endpoint to call.
const SOAP_URL_ELEMENTS: [&[u8]; 2] = [b"serverUrl", b"metadataServerUrl"];

/// Rewrites `instance_url`, `api_instance_url` and `sfdc_community_url` (when present and
/// holding an http(s) URL) of an OAuth token response so they start with `public_base` (e.g.
/// `http://127.0.0.1:8080/salesloft`; a trailing slash is ignored) instead of the Salesforce
/// origin. `content_type` (the response's) picks the syntax: XML, form encoding, or JSON.
/// `None` if the body is not of that syntax or nothing needed rewriting.
pub fn rewrite_oauth_token(
    body: &[u8],
    content_type: Option<&[u8]>,
    public_base: &str,
) -> Option<Vec<u8>> {
    let essence = content_type.map(|ct| {
        let end = memchr::memchr(b';', ct).unwrap_or(ct.len());
        ct[..end].trim_ascii().to_ascii_lowercase()
    });
    match essence.as_deref() {
        Some(b"application/xml" | b"text/xml") => {
            rewrite_xml_urls(body, public_base, &OAUTH_URL_KEYS)
        }
        Some(b"application/x-www-form-urlencoded") => rewrite_form_urls(body, public_base),
        _ => rewrite_json_urls(body, public_base),
    }
}

/// The JSON token response (the default format).
fn rewrite_json_urls(body: &[u8], public_base: &str) -> Option<Vec<u8>> {
    // The walk below assumes valid JSON; this check makes that so.
    serde_json::from_slice::<IgnoredAny>(body).ok()?;
    let base = public_base.trim_end_matches('/');
    let mut out = Vec::new();
    let mut copied = 0;

    let mut i = json::skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = json::skip_ws(body, i);
        if body.get(i) != Some(&b'"') {
            break; // `}` of an empty object
        }
        let key_end = json::string_end(body, i)?;
        let key = &body[i + 1..key_end];
        i = json::skip_ws(body, key_end + 1) + 1; // past the colon
        let value_start = json::skip_ws(body, i);
        let value_end = json::value_end(body, value_start)?;
        if OAUTH_URL_KEYS.contains(&key) && body[value_start] == b'"' {
            // Decode escapes (`https:\/\/…` is valid JSON) before looking at the URL.
            let url: String = serde_json::from_slice(&body[value_start..value_end]).ok()?;
            if let Some(rebased) = rebase(&url, base) {
                out.extend_from_slice(&body[copied..value_start]);
                json::push_string(&mut out, &rebased);
                copied = value_end;
            }
        }
        i = json::skip_ws(body, value_end);
        if body.get(i) != Some(&b',') {
            break;
        }
        i += 1;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

/// The form-encoded token response (`format=urlencoded`): each URL's value is decoded, rebased
/// and encoded again; every other pair keeps its bytes.
fn rewrite_form_urls(body: &[u8], public_base: &str) -> Option<Vec<u8>> {
    let base = public_base.trim_end_matches('/');
    let mut out = Vec::new();
    let mut copied = 0;
    let mut start = 0;
    for pair in body.split(|&b| b == b'&') {
        let (pair_start, pair_end) = (start, start + pair.len());
        start = pair_end + 1;
        let Some((key, value)) = form_urlencoded::parse(pair).next() else {
            continue;
        };
        if !OAUTH_URL_KEYS.contains(&key.as_bytes()) {
            continue;
        }
        let Some(rebased) = rebase(&value, base) else {
            continue;
        };
        let value_start = pair_start + memchr::memchr(b'=', pair)? + 1;
        out.extend_from_slice(&body[copied..value_start]);
        out.extend(form_urlencoded::byte_serialize(rebased.as_bytes()).flat_map(str::bytes));
        copied = pair_end;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

/// Rewrites `<serverUrl>` and `<metadataServerUrl>` (any namespace prefix) of a SOAP
/// `loginResponse` the same way. `None` if there is no such element with an http(s) URL.
pub fn rewrite_soap_login(body: &[u8], public_base: &str) -> Option<Vec<u8>> {
    rewrite_xml_urls(body, public_base, &SOAP_URL_ELEMENTS)
}

/// Rebases the text of the `elements` (local names, any namespace prefix) holding an http(s)
/// URL: a SOAP `loginResponse`, or the XML token response (`format=xml`).
fn rewrite_xml_urls(body: &[u8], public_base: &str, elements: &[&[u8]]) -> Option<Vec<u8>> {
    let mut escaped_base = String::new();
    crate::markup::push_escaped(&mut escaped_base, public_base.trim_end_matches('/'));
    let mut out = Vec::new();
    let mut copied = 0;
    let mut at = 0;
    while let Step::Tag(tag) = xml::next_tag(body, at) {
        at = tag.end;
        if tag.kind != xml::TagKind::Start || !elements.contains(&tag.local_name()) {
            continue;
        }
        let Some(text_len) = memchr::memchr(b'<', &body[tag.end..]) else {
            break;
        };
        let text = &body[tag.end..tag.end + text_len];
        let url = text.trim_ascii();
        // The path is spliced back as it was written (already escaped); only the base is new.
        let Some(path) = std::str::from_utf8(url).ok().and_then(path_after_origin) else {
            continue;
        };
        let url_start = tag.end + (text.len() - text.trim_ascii_start().len());
        out.extend_from_slice(&body[copied..url_start]);
        out.extend_from_slice(escaped_base.as_bytes());
        out.extend_from_slice(path.as_bytes());
        copied = url_start + url.len();
        at = tag.end + text_len;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

/// `url` with its scheme and authority replaced by `base`; `None` unless it is http(s).
fn rebase(url: &str, base: &str) -> Option<String> {
    path_after_origin(url).map(|path| format!("{base}{path}"))
}

/// What follows `scheme://authority` in an http(s) URL: path, query and fragment, maybe empty.
fn path_after_origin(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http")) {
        return None;
    }
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if authority_len == 0 {
        return None;
    }
    Some(&rest[authority_len..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "http://127.0.0.1:8080/salesloft";

    /// The doc's example token response, verbatim.
    const TOKEN: &str = r#"{"id":"https://login.salesforce.com/id/00Dx…/005x…","issued_at":"1278448832702","instance_url":"https://yourInstance.salesforce.com/","signature":"…","access_token":"00Dx…!AR8AQ…","token_type":"Bearer"}"#;

    fn rewrite_json(body: &str) -> Option<String> {
        rewrite_oauth_token(body.as_bytes(), None, BASE).map(|b| String::from_utf8(b).unwrap())
    }

    fn rewrite_xml(body: &str) -> Option<String> {
        rewrite_soap_login(body.as_bytes(), BASE).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn oauth_doc_example_rewrites_instance_url_only() {
        let expected = TOKEN.replace(
            "https://yourInstance.salesforce.com/",
            "http://127.0.0.1:8080/salesloft/",
        );
        assert_eq!(rewrite_json(TOKEN), Some(expected));
    }

    #[test]
    fn oauth_rewrites_all_three_urls_and_keeps_everything_else() {
        let body = r#"{
  "access_token" : "00D!x",
  "instance_url" : "https://acme.my.salesforce.com",
  "api_instance_url":"https://api.salesforce.com:443/x?y=1",
  "id":"https://login.salesforce.com/id/00D/005",
  "nested":{"instance_url":"https://keep.example.com"},
  "sfdc_community_url":"https://acme.my.site.com/partners",
  "expires_in": 7200.50
}"#;
        let out = rewrite_json(body).unwrap();
        let expected = body
            .replace(
                "\"https://acme.my.salesforce.com\"",
                "\"http://127.0.0.1:8080/salesloft\"",
            )
            .replace(
                "https://api.salesforce.com:443/x?y=1",
                "http://127.0.0.1:8080/salesloft/x?y=1",
            )
            .replace(
                "https://acme.my.site.com/partners",
                "http://127.0.0.1:8080/salesloft/partners",
            );
        assert_eq!(out, expected);
    }

    #[test]
    fn oauth_decodes_escaped_urls_and_ignores_trailing_slash_on_base() {
        let body = r#"{"instance_url":"https:\/\/na1.salesforce.com\/"}"#;
        let out = rewrite_oauth_token(body.as_bytes(), None, "https://proxy.example.com/").unwrap();
        assert_eq!(out, br#"{"instance_url":"https://proxy.example.com/"}"#);
    }

    #[test]
    fn oauth_nothing_to_rewrite_is_none() {
        for body in [
            r#"{"id":"https://login.salesforce.com/id/00D/005","access_token":"x"}"#,
            r#"{"instance_url":null}"#,
            r#"{"instance_url":42}"#,
            r#"{"instance_url":"not a url"}"#,
            r#"{"instance_url":"ftp://host/x"}"#,
            r#"{}"#,
            r#"[{"instance_url":"https://x.com"}]"#,
            r#"{"error":"invalid_grant","error_description":"authentication failure"}"#,
            "not json",
            r#"{"instance_url":"https://x.com""#,
        ] {
            assert_eq!(rewrite_json(body), None, "{body}");
        }
    }

    /// `format=xml`: the same three elements, in the token response's XML.
    #[test]
    fn oauth_xml_rewrites_the_urls_and_keeps_the_id() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?><OAuth><access_token>00Dx!AQ</access_token><instance_url>https://acme.my.salesforce.com</instance_url><id>https://login.salesforce.com/id/00Dx/005x</id><sfdc_community_url>https://acme.my.site.com/help</sfdc_community_url></OAuth>"#;
        let xml = Some(&b"application/xml;charset=UTF-8"[..]);
        let out = rewrite_oauth_token(body.as_bytes(), xml, BASE).expect("rewritten");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            body.replace("https://acme.my.salesforce.com", BASE)
                .replace("https://acme.my.site.com/help", &format!("{BASE}/help"))
        );
    }

    /// `format=urlencoded`: the URL values are decoded, rebased and encoded again; the other
    /// pairs (the signed `id` among them) keep their bytes.
    #[test]
    fn oauth_form_rewrites_the_urls_and_keeps_the_other_pairs() {
        let body = "access_token=00Dx%21AQ&instance_url=https%3A%2F%2Facme.my.salesforce.com%2F&id=https%3A%2F%2Flogin.salesforce.com%2Fid%2F00Dx%2F005x&issued_at=1";
        let form = Some(&b"application/x-www-form-urlencoded"[..]);
        let out = rewrite_oauth_token(body.as_bytes(), form, BASE).expect("rewritten");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "access_token=00Dx%21AQ&instance_url=http%3A%2F%2F127.0.0.1%3A8080%2Fsalesloft%2F&id=https%3A%2F%2Flogin.salesforce.com%2Fid%2F00Dx%2F005x&issued_at=1"
        );
        assert_eq!(rewrite_oauth_token(b"a=b&c", form, BASE), None);
    }

    #[test]
    fn soap_doc_example_rewrites_server_and_metadata_urls() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com"><soapenv:Body><loginResponse><result><metadataServerUrl>https://cs18.salesforce.com/services/Soap/m/34.0/00D11000000DMaw</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>true</sandbox><serverUrl>https://cs18.salesforce.com/services/Soap/u/34.0/00D11000000DMaw</serverUrl><sessionId>00D!AQ</sessionId></result></loginResponse></soapenv:Body></soapenv:Envelope>"#;
        let expected = body.replace("https://cs18.salesforce.com", BASE);
        assert_eq!(rewrite_xml(body), Some(expected));
    }

    #[test]
    fn soap_any_prefix_whitespace_and_escaped_base() {
        let body = "<r><p:serverUrl>\n  https://x.my.salesforce.com/services/Soap/u/60.0/00D?a=1&amp;b=2 </p:serverUrl><urlx>https://keep.com</urlx></r>";
        let out = rewrite_soap_login(body.as_bytes(), "https://proxy.example.com/a&b").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<r><p:serverUrl>\n  https://proxy.example.com/a&amp;b/services/Soap/u/60.0/00D?a=1&amp;b=2 </p:serverUrl><urlx>https://keep.com</urlx></r>"
        );
    }

    #[test]
    fn soap_nothing_to_rewrite_is_none() {
        for body in [
            "<r><serverUrl></serverUrl></r>",
            "<r><serverUrl/></r>",
            "<r><serverUrl>relative/path</serverUrl></r>",
            "<r><serverUrl>https://x.com/unterminated",
            "<r><!-- <serverUrl>https://x.com</serverUrl> --></r>",
            "",
        ] {
            assert_eq!(rewrite_xml(body), None, "{body}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            for ct in [None, Some(&b"application/xml"[..]), Some(&b"application/x-www-form-urlencoded"[..])] {
                let _ = rewrite_oauth_token(&body, ct, BASE);
            }
            let _ = rewrite_soap_login(&body, BASE);
        }

        /// A form body's pairs other than the URLs come out as they went in.
        #[test]
        fn form_rewrites_touch_only_the_url_values(
            pairs in proptest::collection::vec(("[a-z_]{1,12}", "[A-Za-z0-9%.:/+-]{0,20}"), 0..6),
            host in "[a-z]{1,10}",
        ) {
            let mut body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            body.push(format!("instance_url=https%3A%2F%2F{host}.my.salesforce.com"));
            let body = body.join("&");
            let form = Some(&b"application/x-www-form-urlencoded"[..]);
            let out = String::from_utf8(rewrite_oauth_token(body.as_bytes(), form, BASE).unwrap()).unwrap();
            let (before, after) = out.rsplit_once("&instance_url=").unwrap_or(("", &out));
            let expected_before = body.rsplit_once("&instance_url=").map_or("", |(b, _)| b);
            prop_assert_eq!(before, expected_before);
            prop_assert_eq!(after.trim_start_matches("instance_url="), "http%3A%2F%2F127.0.0.1%3A8080%2Fsalesloft");
        }

        #[test]
        fn arbitrary_markup_never_panics(body in "[<>/a-zA-Z:\"{},= ]{0,120}") {
            let _ = rewrite_soap_login(body.as_bytes(), BASE);
            let _ = rewrite_oauth_token(body.as_bytes(), None, BASE);
        }
    }

    #[test]
    fn path_after_origin_cases() {
        assert_eq!(path_after_origin("https://h.com"), Some(""));
        assert_eq!(
            path_after_origin("HTTPS://h.com:8443/p?q#f"),
            Some("/p?q#f")
        );
        assert_eq!(path_after_origin("http://u@h.com?q"), Some("?q"));
        assert_eq!(path_after_origin("https:///p"), None);
        assert_eq!(path_after_origin("mailto:x@y"), None);
    }
}
