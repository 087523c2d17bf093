//! Redaction for logs: which headers are never logged, and how to blank credentials in a body
//! snippet before it is logged. A snippet may be cut anywhere, may be XML, JSON or a form, and
//! may even be JSON quoted inside another string; so secrets are found by their name and the
//! punctuation around it rather than by parsing, and a value cut short is blanked to the end.

use std::borrow::Cow;

use http::HeaderName;

/// What a secret value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Header names (lower case, as `http` stores them) whose values are never logged.
/// `x-sfdc-session` carries the session id on Bulk API 1.0 calls.
const SECRET_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-callmeter-key",
    "x-sfdc-session",
];

/// XML elements holding credentials: the session of every SOAP call, the password of
/// `login()`, and the tokens of an OAuth token response asked for as XML (`format=xml`).
const XML_ELEMENTS: [&[u8]; 5] = [
    b"sessionId",
    b"password",
    b"access_token",
    b"refresh_token",
    b"id_token",
];

/// JSON keys holding credentials (OAuth token responses, REST password resources).
const JSON_KEYS: [&[u8]; 4] = [
    b"access_token",
    b"refresh_token",
    b"client_secret",
    b"password",
];

/// Form fields and query parameters holding credentials: OAuth token requests (`assertion`,
/// `client_assertion`, `code`, `code_verifier`), OAuth revoke (`token`), `frontdoor.jsp`
/// (`sid`).
const FORM_FIELDS: [&[u8]; 10] = [
    b"access_token",
    b"refresh_token",
    b"client_secret",
    b"password",
    b"assertion",
    b"client_assertion",
    b"code",
    b"code_verifier",
    b"token",
    b"sid",
];

/// True for headers whose values must never be logged: authorization, proxy-authorization,
/// cookie, set-cookie, x-callmeter-key and x-sfdc-session.
pub fn is_secret_header(name: &HeaderName) -> bool {
    SECRET_HEADERS.contains(&name.as_str())
}

/// Replaces credential values in a text snippet with `[redacted]`: SOAP `<sessionId>` and
/// `<password>` (any prefix), an XML token response's `<access_token>`, `<refresh_token>` and
/// `<id_token>`, JSON `"access_token"`, `"refresh_token"`, `"client_secret"` and
/// `"password"` string values (also when the JSON is itself escaped inside a string), and the
/// same in form-encoded bodies and query strings (plus OAuth and frontdoor fields). Borrows
/// when there is nothing to redact.
pub fn redact_body(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut collect = |names: &[&[u8]], value_at: ValueFinder| {
        for name in names {
            for at in memchr::memmem::find_iter(bytes, name) {
                spans.extend(value_at(bytes, at, name.len()).filter(|(start, end)| start < end));
            }
        }
    };
    collect(&XML_ELEMENTS, xml_value);
    collect(&JSON_KEYS, json_value);
    collect(&FORM_FIELDS, form_value);
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    spans.sort_unstable();

    // Every span starts and ends at an ASCII delimiter or the end, so slicing is on char
    // boundaries.
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in spans {
        if start < copied {
            // Overlaps a span already blanked: blank its tail too.
            copied = copied.max(end);
            continue;
        }
        out.push_str(&text[copied..start]);
        out.push_str(REDACTED);
        copied = end;
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Finds the value belonging to a name found at an offset: `(bytes, name_start, name_len)` to
/// the value's span.
type ValueFinder = fn(&[u8], usize, usize) -> Option<(usize, usize)>;

/// The text of the element whose name starts at `at`, if that is a start tag
/// (`<name …>` or `<prefix:name …>`).
fn xml_value(bytes: &[u8], at: usize, len: usize) -> Option<(usize, usize)> {
    let lt = match bytes[..at].last()? {
        b'<' => at - 1,
        b':' => {
            let prefix_len = bytes[..at - 1]
                .iter()
                .rev()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                .count();
            (at - 1 - prefix_len).checked_sub(1)?
        }
        _ => return None,
    };
    if bytes.get(lt) != Some(&b'<') {
        return None;
    }
    match bytes.get(at + len)? {
        b'>' => {}
        b if b.is_ascii_whitespace() => {}
        _ => return None,
    }
    let gt = at + len + memchr::memchr(b'>', &bytes[at + len..])?;
    if bytes[gt - 1] == b'/' {
        return None; // empty element
    }
    let start = gt + 1;
    let end = memchr::memchr(b'<', &bytes[start..]).map_or(bytes.len(), |n| start + n);
    Some((start, end))
}

/// The string value of the JSON key whose name starts at `at`; the quotes may be escaped
/// (`\"key\":\"value\"`) when the JSON sits inside another JSON string.
fn json_value(bytes: &[u8], at: usize, len: usize) -> Option<(usize, usize)> {
    if at == 0 || bytes[at - 1] != b'"' {
        return None;
    }
    let mut i = quote_end(bytes, at + len)?;
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    if bytes.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let start = quote_end(bytes, i)?;
    // Tokens hold neither quotes nor backslashes, so the first of either ends the value.
    let end = memchr::memchr2(b'"', b'\\', &bytes[start..]).map_or(bytes.len(), |n| start + n);
    Some((start, end))
}

/// Offset past a quote (`"` or `\"`) at `i`.
fn quote_end(bytes: &[u8], i: usize) -> Option<usize> {
    match bytes.get(i..)? {
        [b'"', ..] => Some(i + 1),
        [b'\\', b'"', ..] => Some(i + 2),
        _ => None,
    }
}

/// The value of the form field whose name starts at `at` (`name=value`, at the start of the
/// text or after `&`, `?` or whitespace).
fn form_value(bytes: &[u8], at: usize, len: usize) -> Option<(usize, usize)> {
    if at > 0 && !matches!(bytes[at - 1], b'&' | b'?' | b' ' | b'\t' | b'\n' | b'\r') {
        return None;
    }
    if bytes.get(at + len) != Some(&b'=') {
        return None;
    }
    let start = at + len + 1;
    let end = bytes[start..]
        .iter()
        .position(|&b| b == b'&' || b.is_ascii_whitespace())
        .map_or(bytes.len(), |n| start + n);
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn secret_headers() {
        for name in [
            "authorization",
            "Proxy-Authorization",
            "COOKIE",
            "set-cookie",
            "X-Callmeter-Key",
            "x-sfdc-session",
        ] {
            assert!(
                is_secret_header(&HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name}"
            );
        }
        for name in [
            "content-type",
            "sforce-limit-info",
            "sforce-call-options",
            "host",
        ] {
            assert!(!is_secret_header(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn soap_session_and_password_any_prefix() {
        let text = r#"<soapenv:Header><urn:SessionHeader><urn:sessionId>00Dx!AQ4AQ.abc</urn:sessionId></urn:SessionHeader></soapenv:Header><sessionId attr="1">raw</sessionId><urn:login><urn:username>u</urn:username><urn:password>hunter2</urn:password></urn:login>"#;
        let out = redact_body(text);
        assert_eq!(
            out,
            r#"<soapenv:Header><urn:SessionHeader><urn:sessionId>[redacted]</urn:sessionId></urn:SessionHeader></soapenv:Header><sessionId attr="1">[redacted]</sessionId><urn:login><urn:username>u</urn:username><urn:password>[redacted]</urn:password></urn:login>"#
        );
    }

    #[test]
    fn soap_stray_lt_does_not_hide_a_session() {
        let out = redact_body("a < b <sessionId>secret</sessionId>");
        assert_eq!(out, "a < b <sessionId>[redacted]</sessionId>");
    }

    #[test]
    fn json_tokens() {
        let text = r#"{"access_token" : "00Dx!AR8AQ.tok","instance_url":"https://x","refresh_token":"5Aep861","token_type":"Bearer"}"#;
        assert_eq!(
            redact_body(text),
            r#"{"access_token" : "[redacted]","instance_url":"https://x","refresh_token":"[redacted]","token_type":"Bearer"}"#
        );
    }

    #[test]
    fn json_escaped_inside_a_string() {
        let text = r#"{"log":"{\"access_token\":\"00Dx!secret\"}"}"#;
        assert_eq!(
            redact_body(text),
            r#"{"log":"{\"access_token\":\"[redacted]\"}"}"#
        );
    }

    #[test]
    fn form_encoded_credentials() {
        let text = "grant_type=password&client_id=abc&client_secret=s3&username=u&password=p%40ss\nrefresh_token=r1";
        assert_eq!(
            redact_body(text),
            "grant_type=password&client_id=abc&client_secret=[redacted]&username=u&password=[redacted]\nrefresh_token=[redacted]"
        );
    }

    #[test]
    fn truncated_snippets_are_blanked_to_the_end() {
        assert_eq!(
            redact_body(r#"{"access_token":"00Dx!AR8"#),
            r#"{"access_token":"[redacted]"#
        );
        assert_eq!(redact_body("<sessionId>00Dx!AQ"), "<sessionId>[redacted]");
        // Cut inside the key or tag: no value in the snippet, nothing to blank.
        assert_eq!(redact_body(r#"{"access_tok"#), r#"{"access_tok"#);
        assert_eq!(redact_body("<sessionId"), "<sessionId");
    }

    #[test]
    fn nothing_to_redact_borrows() {
        for text in [
            "",
            "plain",
            r#"{"id":"https://login.salesforce.com/id/00D/005","token_type":"Bearer"}"#,
            "<sessionId/></sessionId><x:sessionIdFoo>v</x:sessionIdFoo>",
            r#"{"access_token":null,"password_hint":"x"}"#,
            "mycode=1&errorcode=2",
        ] {
            assert!(matches!(redact_body(text), Cow::Borrowed(_)), "{text}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_and_keeps_no_token(
            text in r#"[a-z<>/:"=& \\é]{0,40}"#,
            secret in "[A-Z0-9!]{8}",
        ) {
            let _ = redact_body(&text);
            let planted = format!("{text}<s:sessionId>{secret}</s:sessionId>{text}");
            let redacted = redact_body(&planted);
            prop_assert!(!redacted.contains(&secret));
        }
    }

    #[test]
    fn non_ascii_text_survives() {
        let text = "é<sessionId>ü€</sessionId>☃";
        assert_eq!(redact_body(text), "é<sessionId>[redacted]</sessionId>☃");
    }

    /// An OAuth token response asked for as XML (`format=xml`) keeps its tokens out of the
    /// logs too (only the JSON and form spellings were redacted).
    #[test]
    fn an_xml_token_response_is_redacted() {
        let text = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><OAuth><access_token>00Dx!AQ.access</access_token><refresh_token>5Aep861.refresh</refresh_token><instance_url>https://x.my.salesforce.com</instance_url></OAuth>";
        let out = redact_body(text);
        assert!(!out.contains("00Dx!AQ.access"), "{out}");
        assert!(!out.contains("5Aep861.refresh"), "{out}");
        assert!(out.contains("https://x.my.salesforce.com"), "{out}");
    }
}
