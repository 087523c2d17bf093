//! Error bodies in Salesforce's own shapes, for the answers the proxy gives itself (a call
//! refused at a quota, an upstream that failed). Integrations already handle these shapes from
//! Salesforce, so a refusal by the proxy needs no new handling on their side.

use bytes::Bytes;

use super::json;

/// A REST error list: `[{"message":"…","errorCode":"…"}]`, as Salesforce answers, e.g.
/// `[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]`.
pub fn rest_error_body(message: &str, error_code: &str) -> Bytes {
    let mut out = Vec::with_capacity(32 + message.len() + error_code.len());
    out.extend_from_slice(b"[{\"message\":");
    json::push_string(&mut out, message);
    out.extend_from_slice(b",\"errorCode\":");
    json::push_string(&mut out, error_code);
    out.extend_from_slice(b"}]");
    Bytes::from(out)
}

/// A SOAP 1.1 fault as Salesforce sends it: `faultcode` (e.g. `sf:REQUEST_LIMIT_EXCEEDED`),
/// `faultstring` as `CODE: message`, and a `detail` holding an `sf:ApiFault` (namespace
/// `urn:fault.partner.soap.sforce.com`, bound to `sf` so the fault code's prefix resolves)
/// with `exceptionCode` and `exceptionMessage`.
pub fn soap_fault_body(fault_code: &str, message: &str, exception_code: &str) -> Bytes {
    let mut out = String::with_capacity(640 + 2 * message.len());
    out.push_str(concat!(
        r#"<?xml version="1.0" encoding="UTF-8"?>"#,
        r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/""#,
        r#" xmlns:sf="urn:fault.partner.soap.sforce.com""#,
        r#" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
        "<soapenv:Body><soapenv:Fault><faultcode>",
    ));
    crate::markup::push_escaped(&mut out, fault_code);
    out.push_str("</faultcode><faultstring>");
    crate::markup::push_escaped(&mut out, exception_code);
    out.push_str(": ");
    crate::markup::push_escaped(&mut out, message);
    out.push_str(concat!(
        "</faultstring><detail>",
        r#"<sf:ApiFault xsi:type="sf:ApiFault"><sf:exceptionCode>"#,
    ));
    crate::markup::push_escaped(&mut out, exception_code);
    out.push_str("</sf:exceptionCode><sf:exceptionMessage>");
    crate::markup::push_escaped(&mut out, message);
    out.push_str(concat!(
        "</sf:exceptionMessage></sf:ApiFault></detail>",
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>",
    ));
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::super::scan::{BodyScanner, LimitExceeded};
    use super::*;

    #[test]
    fn rest_body_matches_the_doc_example() {
        assert_eq!(
            rest_error_body("TotalRequests Limit exceeded.", "REQUEST_LIMIT_EXCEEDED"),
            Bytes::from_static(
                br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#
            )
        );
    }

    #[test]
    fn rest_body_escapes_json() {
        let message = "quota \"salesloft\" reached\\\n\u{7}é";
        let body = rest_error_body(message, "REQUEST_LIMIT_EXCEEDED");
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed[0]["message"], message);
        assert_eq!(parsed[0]["errorCode"], "REQUEST_LIMIT_EXCEEDED");
    }

    #[test]
    fn soap_fault_has_salesforce_shape() {
        let body = soap_fault_body(
            "sf:REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
            "REQUEST_LIMIT_EXCEEDED",
        );
        let text = std::str::from_utf8(&body).unwrap();
        for part in [
            "<faultcode>sf:REQUEST_LIMIT_EXCEEDED</faultcode>",
            "<faultstring>REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.</faultstring>",
            r#"xmlns:sf="urn:fault.partner.soap.sforce.com""#,
            r#"<sf:ApiFault xsi:type="sf:ApiFault">"#,
            "<sf:exceptionCode>REQUEST_LIMIT_EXCEEDED</sf:exceptionCode>",
            "<sf:exceptionMessage>TotalRequests Limit exceeded.</sf:exceptionMessage>",
        ] {
            assert!(text.contains(part), "missing {part} in {text}");
        }
    }

    #[test]
    fn soap_fault_escapes_xml() {
        let body = soap_fault_body("sf:X", "a <b> & \"c\"", "X");
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
        assert!(!text.contains("<b>"));
    }

    #[test]
    fn our_own_bodies_read_back_as_limit_errors() {
        for (body, expected) in [
            (
                rest_error_body("TotalRequests Limit exceeded.", "REQUEST_LIMIT_EXCEEDED"),
                LimitExceeded::Daily,
            ),
            (
                soap_fault_body(
                    "sf:REQUEST_LIMIT_EXCEEDED",
                    "ConcurrentPerOrgLongTxn Limit exceeded.",
                    "REQUEST_LIMIT_EXCEEDED",
                ),
                LimitExceeded::ConcurrentLongRunning,
            ),
        ] {
            let mut scanner = BodyScanner::new();
            scanner.feed(&body);
            scanner.finish();
            assert_eq!(scanner.limit_exceeded(), Some(expected));
        }
    }
}
