//! An incremental scanner over a response body as it streams to the client: it finds the org's
//! usage in a SOAP `LimitInfoHeader` and tells whether Salesforce answered
//! `REQUEST_LIMIT_EXCEEDED`, and if so which limit (the daily one or the concurrent
//! long-running one).
//!
//! The body is never held back: the proxy forwards each chunk and also feeds it here. The
//! scanner copies at most [`SCAN_LIMIT`] bytes and re-reads only complete tags and tokens, so a
//! tag split across chunks is seen whole and any chunking gives the same answer.
//!
//! It understands the bodies that carry these facts: a SOAP envelope (usage in the header, a
//! fault in the body), a REST JSON error list (`[{"message":…,"errorCode":…}]`) and the REST
//! XML error list (`<Errors><Error><errorCode>…`). It looks only where Salesforce puts them
//! (header entries before the SOAP body, fields of a fault or of a top-level error object), so
//! record data that happens to contain the same words is not mistaken for them.

use super::json;
use super::usage::{parse_decimal, UsageReport};
use super::xml::{self, Step, Tag, TagKind};

/// Bytes of a body the scanner keeps and looks at.
///
/// What it looks for sits at the start: the `LimitInfoHeader` is in the SOAP header, before
/// the body, and Salesforce's error bodies are well under 1 KiB. 64 KiB leaves ample room for
/// long headers and pretty-printing while bounding the memory one response can pin.
pub const SCAN_LIMIT: usize = 64 * 1024;

/// The error code Salesforce uses for both the daily and the concurrency limit.
const LIMIT_CODE: &[u8] = b"REQUEST_LIMIT_EXCEEDED";

/// The message that tells the concurrency limit apart (`ConcurrentPerOrgLongTxn Limit
/// exceeded.`); the daily limit says `TotalRequests Limit exceeded.`.
const CONCURRENT_MARKER: &[u8] = b"ConcurrentPerOrgLongTxn";

/// Which limit a `REQUEST_LIMIT_EXCEEDED` answer is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitExceeded {
    /// `TotalRequests Limit exceeded.`: the org's rolling 24 h allocation is spent.
    Daily,
    /// `ConcurrentPerOrgLongTxn Limit exceeded.`: too many requests of 20 s or more at once.
    ConcurrentLongRunning,
}

/// Incremental scanner over one response body; see the module docs.
#[derive(Debug, Default)]
pub struct BodyScanner {
    /// The body so far, at most `SCAN_LIMIT` bytes.
    buf: Vec<u8>,
    /// Everything before this offset has been interpreted.
    pos: usize,
    format: Format,
    /// Nothing more to learn: the body ended, the limit was reached or the answer is final.
    done: bool,
    report: Option<UsageReport>,
    /// `REQUEST_LIMIT_EXCEEDED` seen as an error code.
    limit_code: bool,
    /// An error message named the concurrency limit.
    concurrent_message: bool,
}

#[derive(Debug, Default)]
enum Format {
    /// Only whitespace (or nothing) so far.
    #[default]
    Unknown,
    Xml(XmlState),
    Json(JsonState),
}

impl BodyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at the next chunk of the body. Cheap once `is_done()`.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.done {
            return;
        }
        // A tag or token still open at a chunk's end is re-read from its start with the next
        // chunk; chunks are kilobytes in practice and the copy is bounded, so this stays cheap.
        let room = SCAN_LIMIT - self.buf.len();
        let take = chunk.len().min(room);
        self.buf.extend_from_slice(&chunk[..take]);
        self.scan();
        if take < chunk.len() {
            // Past the limit: what is not found by now is not looked for.
            self.stop();
        }
    }

    /// The body ended.
    pub fn finish(&mut self) {
        self.stop();
    }

    /// Usage from a `limitInfo` entry of type `API REQUESTS`, if one was seen.
    pub fn report(&self) -> Option<UsageReport> {
        self.report
    }

    /// Whether the body is a `REQUEST_LIMIT_EXCEEDED` error, and for which limit. An error whose
    /// message names neither limit is taken as the daily one, the meaning of the code itself.
    /// Final once `is_done()`.
    pub fn limit_exceeded(&self) -> Option<LimitExceeded> {
        self.limit_code.then_some(if self.concurrent_message {
            LimitExceeded::ConcurrentLongRunning
        } else {
            LimitExceeded::Daily
        })
    }

    /// True when feeding more of the body cannot change the answers.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn stop(&mut self) {
        self.done = true;
        // The copy is no longer needed; give the memory back while the response streams on.
        self.buf = Vec::new();
        self.pos = 0;
    }

    fn scan(&mut self) {
        if let Format::Unknown = self.format {
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                // Could still become a byte-order mark: wait for the rest.
                return;
            }
            let start = skip_bom_and_ws(&self.buf);
            self.format = match self.buf.get(start) {
                None => return,
                Some(b'<') => Format::Xml(XmlState::default()),
                Some(b'[' | b'{') => Format::Json(JsonState::default()),
                // Plain text, HTML error pages and the like carry nothing we look for.
                Some(_) => return self.stop(),
            };
            self.pos = start;
        }
        let finished = match &mut self.format {
            Format::Unknown => false,
            Format::Xml(state) => state.scan(
                &self.buf,
                &mut self.pos,
                &mut Facts {
                    report: &mut self.report,
                    limit_code: &mut self.limit_code,
                    concurrent_message: &mut self.concurrent_message,
                },
            ),
            Format::Json(state) => state.scan(
                &self.buf,
                &mut self.pos,
                &mut Facts {
                    report: &mut self.report,
                    limit_code: &mut self.limit_code,
                    concurrent_message: &mut self.concurrent_message,
                },
            ),
        };
        if finished {
            self.stop();
        }
    }
}

/// Where the format-specific scanners record what they find.
struct Facts<'a> {
    report: &'a mut Option<UsageReport>,
    limit_code: &'a mut bool,
    concurrent_message: &'a mut bool,
}

impl Facts<'_> {
    fn error_code(&mut self, code: &[u8]) {
        if code.trim_ascii() == LIMIT_CODE {
            *self.limit_code = true;
        }
    }

    fn error_message(&mut self, message: &[u8]) {
        if memchr::memmem::find(message, CONCURRENT_MARKER).is_some() {
            *self.concurrent_message = true;
        }
    }
}

/// UTF-8 byte-order mark, which some servers put before a body.
const BOM: &[u8] = b"\xEF\xBB\xBF";

fn skip_bom_and_ws(buf: &[u8]) -> usize {
    let start = if buf.starts_with(BOM) { BOM.len() } else { 0 };
    json::skip_ws(buf, start)
}

// --- XML -----------------------------------------------------------------------------------

/// The text content some elements are read for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Current,
    Limit,
    Type,
    /// `faultcode`: `sf:REQUEST_LIMIT_EXCEEDED`, compared without its prefix.
    FaultCode,
    /// `exceptionCode` (SOAP) or `errorCode` (REST XML).
    Code,
    /// `faultstring`, `exceptionMessage` (SOAP) or `message` (REST XML).
    Message,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Root {
    #[default]
    None,
    Envelope,
    /// REST XML error list.
    Errors,
    Other,
}

/// One `limitInfo` entry being read.
#[derive(Debug, Default)]
struct LimitInfo {
    current: Option<u64>,
    limit: Option<u64>,
    api_requests: bool,
}

#[derive(Debug, Default)]
struct XmlState {
    /// Open elements.
    depth: usize,
    root: Root,
    in_body: bool,
    /// Inside a SOAP `Fault`, or anywhere in a REST `<Errors>` document.
    in_error: bool,
    entry: Option<LimitInfo>,
    /// Element whose text is being read, and where the text starts.
    capture: Option<(Field, usize)>,
}

impl XmlState {
    /// Interprets complete tags from `*pos`; returns true when nothing more is to be learnt.
    fn scan(&mut self, buf: &[u8], pos: &mut usize, facts: &mut Facts<'_>) -> bool {
        loop {
            match xml::next_tag(buf, *pos) {
                Step::Tag(tag) => {
                    *pos = tag.end;
                    if self.on_tag(buf, tag, facts) {
                        return true;
                    }
                }
                Step::Incomplete(at) => {
                    *pos = at;
                    return false;
                }
                Step::NoMore => {
                    // Text without markup: nothing to interpret, but a capture keeps its start.
                    *pos = buf.len();
                    return false;
                }
            }
        }
    }

    fn on_tag(&mut self, buf: &[u8], tag: Tag<'_>, facts: &mut Facts<'_>) -> bool {
        if tag.kind == TagKind::Other {
            return false;
        }
        // Any tag ends the text of the element being captured.
        if let Some((field, from)) = self.capture.take() {
            self.on_text(field, &buf[from..tag.start], facts);
        }
        let name = tag.local_name();
        if tag.kind == TagKind::End {
            self.depth = self.depth.saturating_sub(1);
            if name == b"limitInfo" {
                if let Some(LimitInfo {
                    current: Some(used),
                    limit: Some(limit),
                    api_requests: true,
                }) = self.entry.take()
                {
                    if facts.report.is_none() && limit > 0 {
                        *facts.report = Some(UsageReport { used, limit });
                    }
                }
            }
            // The fault, the body or the document is over: nothing follows that we want.
            return self.depth == 0
                || (self.in_error && self.root == Root::Envelope && name == b"Fault")
                || (self.in_body && name == b"Body");
        }

        let depth = self.depth;
        if tag.kind == TagKind::Start {
            self.depth += 1;
        }
        if depth == 0 {
            self.root = match name {
                b"Envelope" => Root::Envelope,
                b"Errors" => Root::Errors,
                _ => Root::Other,
            };
            self.in_error = self.root == Root::Errors;
            return false;
        }
        if self.root == Root::Envelope && depth == 1 && name == b"Body" {
            self.in_body = true;
            return false;
        }
        if self.in_body && depth == 2 {
            // The body's first element: a fault to read, or a result after which nothing
            // (the header is already behind us) can tell us more.
            if name == b"Fault" {
                self.in_error = true;
                return false;
            }
            return true;
        }

        let field = if self.in_error {
            match name {
                b"faultcode" => Some(Field::FaultCode),
                b"exceptionCode" | b"errorCode" => Some(Field::Code),
                b"faultstring" | b"exceptionMessage" | b"message" => Some(Field::Message),
                _ => None,
            }
        } else if !self.in_body {
            match name {
                b"limitInfo" => {
                    self.entry = Some(LimitInfo::default());
                    None
                }
                b"current" if self.entry.is_some() => Some(Field::Current),
                b"limit" if self.entry.is_some() => Some(Field::Limit),
                b"type" if self.entry.is_some() => Some(Field::Type),
                _ => None,
            }
        } else {
            None
        };
        if let (Some(field), TagKind::Start) = (field, tag.kind) {
            self.capture = Some((field, tag.end));
        }
        false
    }

    fn on_text(&mut self, field: Field, text: &[u8], facts: &mut Facts<'_>) {
        let text = text.trim_ascii();
        match field {
            Field::Current | Field::Limit => {
                let value = parse_decimal(text).ok();
                if let Some(entry) = self.entry.as_mut() {
                    if field == Field::Current {
                        entry.current = value;
                    } else {
                        entry.limit = value;
                    }
                }
            }
            Field::Type => {
                if let Some(entry) = self.entry.as_mut() {
                    entry.api_requests = text == b"API REQUESTS";
                }
            }
            Field::FaultCode => facts.error_code(xml::local_name(text)),
            Field::Code => facts.error_code(text),
            Field::Message => facts.error_message(text),
        }
    }
}

// --- JSON ----------------------------------------------------------------------------------

/// A key whose string value matters, awaiting that value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    ErrorCode,
    Message,
}

#[derive(Debug, Default)]
struct JsonState {
    /// Open arrays and objects.
    depth: usize,
    /// The last token was this key and its colon.
    pending: Option<Key>,
}

/// Deepest nesting at which error fields are read: a top-level error object (depth 1) or an
/// object in a top-level error list (depth 2). Deeper ones belong to record data or to
/// composite subresponses, which are not the response's own status.
const MAX_ERROR_DEPTH: usize = 2;

impl JsonState {
    /// Interprets complete tokens from `*pos`; returns true when the top-level value closed.
    fn scan(&mut self, buf: &[u8], pos: &mut usize, facts: &mut Facts<'_>) -> bool {
        loop {
            let i = json::skip_ws(buf, *pos);
            *pos = i;
            let Some(&byte) = buf.get(i) else {
                return false;
            };
            match byte {
                b'{' | b'[' => {
                    self.depth += 1;
                    self.pending = None;
                    *pos = i + 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.pending = None;
                    *pos = i + 1;
                    if self.depth == 0 {
                        return true;
                    }
                }
                b',' | b':' => *pos = i + 1,
                b'"' => {
                    let Some(end) = json::string_end(buf, i) else {
                        return false;
                    };
                    // Key or value? Only the next significant byte can tell.
                    let next = json::skip_ws(buf, end + 1);
                    let Some(&after) = buf.get(next) else {
                        return false;
                    };
                    let text = &buf[i + 1..end];
                    if after == b':' {
                        self.pending = match text {
                            _ if self.depth > MAX_ERROR_DEPTH => None,
                            b"errorCode" => Some(Key::ErrorCode),
                            b"message" => Some(Key::Message),
                            _ => None,
                        };
                        *pos = next + 1;
                    } else {
                        match self.pending.take() {
                            Some(Key::ErrorCode) => facts.error_code(text),
                            Some(Key::Message) => facts.error_message(text),
                            None => {}
                        }
                        *pos = end + 1;
                    }
                }
                _ => {
                    // A number or literal (or garbage): skip it; it is no string value. It ends
                    // at any byte the arms above handle, so where a chunk ends cannot matter.
                    self.pending = None;
                    let len = buf[i..]
                        .iter()
                        .position(|&b| {
                            matches!(
                                b,
                                b'{' | b'['
                                    | b'}'
                                    | b']'
                                    | b','
                                    | b':'
                                    | b'"'
                                    | b' '
                                    | b'\t'
                                    | b'\n'
                                    | b'\r'
                            )
                        })
                        .unwrap_or(buf.len() - i);
                    *pos = i + len.max(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The doc's `LimitInfoHeader`, in a full response envelope.
    const SOAP_OK: &str = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com"><soapenv:Header><LimitInfoHeader><limitInfo><current>1032097</current><limit>6597200</limit><type>API REQUESTS</type></limitInfo></LimitInfoHeader></soapenv:Header><soapenv:Body><queryResponse><result><done>true</done><size>0</size></result></queryResponse></soapenv:Body></soapenv:Envelope>"#;

    const SOAP_LIMIT_FAULT: &str = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>sf:REQUEST_LIMIT_EXCEEDED</faultcode><faultstring>REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.</faultstring><detail><sf:ApiFault xsi:type="sf:ApiFault"><sf:exceptionCode>REQUEST_LIMIT_EXCEEDED</sf:exceptionCode><sf:exceptionMessage>TotalRequests Limit exceeded.</sf:exceptionMessage></sf:ApiFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;

    /// The doc's REST 403 body, verbatim.
    const REST_DAILY: &str =
        r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;

    const REST_CONCURRENT: &str = r#"[{"message":"ConcurrentPerOrgLongTxn Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;

    /// What a scanner concluded, for comparing runs.
    type Outcome = (Option<UsageReport>, Option<LimitExceeded>, bool);

    fn scan_whole(body: &[u8]) -> Outcome {
        let mut s = BodyScanner::new();
        s.feed(body);
        let done_early = s.is_done();
        s.finish();
        (s.report(), s.limit_exceeded(), done_early)
    }

    fn scan_chunks(body: &[u8], sizes: &[usize]) -> Outcome {
        let mut s = BodyScanner::new();
        let mut rest = body;
        let mut sizes = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
            s.feed(&rest[..n]);
            rest = &rest[n..];
        }
        let done_early = s.is_done();
        s.finish();
        (s.report(), s.limit_exceeded(), done_early)
    }

    fn usage(used: u64, limit: u64) -> Option<UsageReport> {
        Some(UsageReport { used, limit })
    }

    #[test]
    fn soap_limit_info_doc_example() {
        let (report, exceeded, done_early) = scan_whole(SOAP_OK.as_bytes());
        assert_eq!(report, usage(1032097, 6597200));
        assert_eq!(exceeded, None);
        assert!(
            done_early,
            "a success body is done at its first body element"
        );
    }

    #[test]
    fn picks_the_api_requests_entry_among_several_with_any_prefix() {
        let body = r#"<s:Envelope xmlns:s="e" xmlns:sf="p"><s:Header><sf:LimitInfoHeader>
            <sf:limitInfo><sf:current>5</sf:current><sf:limit>10</sf:limit><sf:type>API LOGINS</sf:type></sf:limitInfo>
            <sf:limitInfo><sf:type> API REQUESTS </sf:type><sf:limit> 700 </sf:limit><sf:current>42</sf:current></sf:limitInfo>
            </sf:LimitInfoHeader></s:Header><s:Body><sf:x/></s:Body></s:Envelope>"#;
        assert_eq!(scan_whole(body.as_bytes()).0, usage(42, 700));
    }

    #[test]
    fn limit_info_in_the_body_is_ignored() {
        let body = r#"<s:Envelope xmlns:s="e"><s:Body><r><limitInfo><current>1</current><limit>2</limit><type>API REQUESTS</type></limitInfo></r></s:Body></s:Envelope>"#;
        assert_eq!(scan_whole(body.as_bytes()).0, None);
    }

    #[test]
    fn incomplete_limit_info_gives_no_report() {
        for body in [
            "<E><H><limitInfo><current>1</current><type>API REQUESTS</type></limitInfo></H></E>",
            "<E><H><limitInfo><current>x</current><limit>2</limit><type>API REQUESTS</type></limitInfo></H></E>",
            "<E><H><limitInfo><current>1</current><limit>0</limit><type>API REQUESTS</type></limitInfo></H></E>",
            "<E><H><limitInfo><current>1</current><limit>2</limit><type>API REQUESTS</type>",
        ] {
            assert_eq!(scan_whole(body.as_bytes()).0, None, "{body}");
        }
    }

    #[test]
    fn soap_fault_daily() {
        let (report, exceeded, done_early) = scan_whole(SOAP_LIMIT_FAULT.as_bytes());
        assert_eq!(report, None);
        assert_eq!(exceeded, Some(LimitExceeded::Daily));
        assert!(done_early);
    }

    #[test]
    fn soap_fault_concurrent() {
        let body = SOAP_LIMIT_FAULT.replace("TotalRequests", "ConcurrentPerOrgLongTxn");
        assert_eq!(
            scan_whole(body.as_bytes()).1,
            Some(LimitExceeded::ConcurrentLongRunning)
        );
    }

    #[test]
    fn soap_fault_with_only_faultcode_or_only_exception_code() {
        let only_faultcode = r#"<e:Envelope xmlns:e="x"><e:Body><e:Fault><faultcode>sf:REQUEST_LIMIT_EXCEEDED</faultcode><faultstring>REQUEST_LIMIT_EXCEEDED: ConcurrentPerOrgLongTxn Limit exceeded.</faultstring></e:Fault></e:Body></e:Envelope>"#;
        assert_eq!(
            scan_whole(only_faultcode.as_bytes()).1,
            Some(LimitExceeded::ConcurrentLongRunning)
        );
        let only_exception = r#"<e:Envelope xmlns:e="x"><e:Body><e:Fault><faultcode>soapenv:Server</faultcode><detail><sf:ApiFault><sf:exceptionCode>REQUEST_LIMIT_EXCEEDED</sf:exceptionCode></sf:ApiFault></detail></e:Fault></e:Body></e:Envelope>"#;
        assert_eq!(
            scan_whole(only_exception.as_bytes()).1,
            Some(LimitExceeded::Daily)
        );
    }

    #[test]
    fn other_soap_faults_are_not_limit_errors() {
        let body = SOAP_LIMIT_FAULT.replace("REQUEST_LIMIT_EXCEEDED", "INVALID_SESSION_ID");
        assert_eq!(scan_whole(body.as_bytes()), (None, None, true));
    }

    #[test]
    fn fault_words_in_record_data_are_ignored() {
        let body = r#"<e:Envelope xmlns:e="x"><e:Body><queryResponse><faultcode>sf:REQUEST_LIMIT_EXCEEDED</faultcode></queryResponse></e:Body></e:Envelope>"#;
        assert_eq!(scan_whole(body.as_bytes()).1, None);
    }

    #[test]
    fn rest_json_daily_doc_example() {
        assert_eq!(
            scan_whole(REST_DAILY.as_bytes()),
            (None, Some(LimitExceeded::Daily), true)
        );
    }

    #[test]
    fn rest_json_concurrent_and_field_order() {
        assert_eq!(
            scan_whole(REST_CONCURRENT.as_bytes()).1,
            Some(LimitExceeded::ConcurrentLongRunning)
        );
        let reordered = r#" [ { "errorCode" : "REQUEST_LIMIT_EXCEEDED" , "fields" : [ ] , "message" : "ConcurrentPerOrgLongTxn Limit exceeded." } ] "#;
        assert_eq!(
            scan_whole(reordered.as_bytes()).1,
            Some(LimitExceeded::ConcurrentLongRunning)
        );
        let object =
            r#"{"errorCode":"REQUEST_LIMIT_EXCEEDED","message":"TotalRequests Limit exceeded."}"#;
        assert_eq!(scan_whole(object.as_bytes()).1, Some(LimitExceeded::Daily));
    }

    #[test]
    fn rest_json_other_errors_and_nested_codes_are_ignored() {
        let other =
            r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
        assert_eq!(scan_whole(other.as_bytes()).1, None);
        let nested = r#"{"compositeResponse":[{"body":[{"errorCode":"REQUEST_LIMIT_EXCEEDED","message":"x"}],"httpStatusCode":403}]}"#;
        assert_eq!(scan_whole(nested.as_bytes()).1, None);
        let escaped = r#"[{"message":"\"errorCode\":\"REQUEST_LIMIT_EXCEEDED\"","errorCode":"X"}]"#;
        assert_eq!(scan_whole(escaped.as_bytes()).1, None);
        let not_string = r#"[{"errorCode":["REQUEST_LIMIT_EXCEEDED"]}]"#;
        assert_eq!(scan_whole(not_string.as_bytes()).1, None);
        let key_as_value = r#"[{"x":"errorCode","y":"REQUEST_LIMIT_EXCEEDED"}]"#;
        assert_eq!(scan_whole(key_as_value.as_bytes()).1, None);
    }

    #[test]
    fn rest_xml_errors() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?><Errors><Error><errorCode>REQUEST_LIMIT_EXCEEDED</errorCode><message>TotalRequests Limit exceeded.</message></Error></Errors>"#;
        assert_eq!(
            scan_whole(body.as_bytes()),
            (None, Some(LimitExceeded::Daily), true)
        );
    }

    #[test]
    fn other_bodies_carry_nothing() {
        for body in [
            &b""[..],
            b"   ",
            b"<html><body>503</body></html>",
            b"plain text",
            b"\xEF\xBB\xBF",
        ] {
            assert_eq!(scan_whole(body).0, None);
            assert_eq!(scan_whole(body).1, None);
        }
        let mut s = BodyScanner::new();
        s.feed(b"Service Unavailable");
        assert!(s.is_done(), "a non-JSON, non-XML body is done at once");
    }

    #[test]
    fn bom_and_leading_whitespace_are_skipped() {
        let body = format!("\u{FEFF}\n  {REST_DAILY}");
        assert_eq!(scan_whole(body.as_bytes()).1, Some(LimitExceeded::Daily));
    }

    #[test]
    fn stops_at_scan_limit() {
        // The entry sits just past the limit, behind a long comment.
        let padding = "x".repeat(SCAN_LIMIT);
        let body = format!(
            "<E><H><!--{padding}--><limitInfo><current>1</current><limit>2</limit><type>API REQUESTS</type></limitInfo></H></E>"
        );
        let mut s = BodyScanner::new();
        s.feed(body.as_bytes());
        assert!(s.is_done());
        assert_eq!(s.report(), None);
        // Feeding after done is harmless.
        s.feed(b"more");
        s.finish();
        assert_eq!(s.report(), None);

        // Just inside the limit it is still found.
        let inside = format!(
            "<E><H><limitInfo><current>1</current><limit>2</limit><type>API REQUESTS</type></limitInfo></H><!--{}",
            "x".repeat(SCAN_LIMIT)
        );
        assert_eq!(scan_whole(inside.as_bytes()).0, usage(1, 2));
    }

    #[test]
    fn byte_at_a_time_gives_the_same_result() {
        let samples: Vec<String> = vec![
            SOAP_OK.to_owned(),
            SOAP_LIMIT_FAULT.to_owned(),
            SOAP_LIMIT_FAULT.replace("TotalRequests", "ConcurrentPerOrgLongTxn"),
            REST_DAILY.to_owned(),
            REST_CONCURRENT.to_owned(),
            r#" [ { "errorCode" : "REQUEST_LIMIT_EXCEEDED" , "message" : "ConcurrentPerOrgLongTxn" } ] "#.to_owned(),
        ];
        for body in samples {
            let whole = scan_whole(body.as_bytes());
            for sizes in [&[1usize][..], &[2], &[3, 7], &[13, 1, 5]] {
                assert_eq!(
                    scan_chunks(body.as_bytes(), sizes),
                    whole,
                    "{sizes:?} {body}"
                );
            }
        }
    }

    #[test]
    fn tags_split_across_chunk_boundaries() {
        let mut s = BodyScanner::new();
        for part in [
            "<soapenv:Envelope xmlns:soapenv=\"e\"><soapenv:Header><Limit",
            "InfoHeader><limi",
            "tInfo><cur",
            "rent>10",
            "18</current><limit>100000</li",
            "mit><type>API REQ",
            "UESTS</type></limitInfo",
            "></LimitInfoHeader></soapenv:Header><soapenv:Bo",
            "dy><queryResponse>",
        ] {
            assert!(!s.is_done());
            s.feed(part.as_bytes());
        }
        assert!(s.is_done());
        assert_eq!(s.report(), usage(1018, 100000));
    }

    /// Bodies the properties draw from: the samples above, lightly mutated.
    fn sample_body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(SOAP_OK.as_bytes().to_vec()),
            Just(SOAP_LIMIT_FAULT.as_bytes().to_vec()),
            Just(REST_DAILY.as_bytes().to_vec()),
            Just(REST_CONCURRENT.as_bytes().to_vec()),
        ]
        .prop_flat_map(|body| {
            let len = body.len();
            (Just(body), 0..len, any::<u8>(), any::<bool>())
        })
        .prop_map(|(mut body, at, byte, mutate)| {
            if mutate {
                body[at] = byte;
            }
            body
        })
    }

    proptest! {
        #[test]
        fn arbitrary_chunking_gives_the_same_result(
            body in sample_body(),
            sizes in proptest::collection::vec(1usize..64, 1..16),
        ) {
            prop_assert_eq!(scan_chunks(&body, &sizes), scan_whole(&body));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_chunk_alike(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            sizes in proptest::collection::vec(1usize..32, 1..8),
        ) {
            let whole = scan_whole(&body);
            prop_assert_eq!(scan_chunks(&body, &sizes), whole);
        }

        #[test]
        fn arbitrary_markup_never_panics_and_chunks_alike(
            body in "[<>/a-zA-Z:\"'={}\\[\\], !?-]{0,300}",
            sizes in proptest::collection::vec(1usize..16, 1..8),
        ) {
            let whole = scan_whole(body.as_bytes());
            prop_assert_eq!(scan_chunks(body.as_bytes(), &sizes), whole);
        }
    }
}
