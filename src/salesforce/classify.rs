//! What a request is and how many units it costs against the org's daily API limit.
//!
//! [`classify`] looks at the method and path only: it runs on every request, so it splits the
//! path in place and allocates nothing. Two kinds cannot be costed from the path alone
//! (`CallKind::needs_body_prefix`): a Composite Batch costs one unit per subrequest, and a SOAP
//! request is free when it is a `login()` or carries a `DebuggingHeader`. For those the proxy
//! buffers up to [`BODY_PREFIX_LIMIT`] bytes of the request body and passes them to
//! [`counted_units`] (and to [`refine`], to learn whether a SOAP call is really a login, or one
//! counted apart).
//!
//! The rules follow "What counts as one call" in `salesforce-metering.md`; where that table
//! leaves a choice open the choice and its reason are written beside the code.

use std::borrow::Cow;

use http::Method;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::xml::{self, Step, TagKind};

/// The API family label used in metrics: rest, soap, bulk, composite, apex, oauth, other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    Rest,
    Soap,
    Bulk,
    Composite,
    Apex,
    Oauth,
    Other,
}

impl Api {
    /// Every family, in `index()` order, for pre-resolving one metric handle per label.
    pub const ALL: [Api; 7] = [
        Api::Rest,
        Api::Soap,
        Api::Bulk,
        Api::Composite,
        Api::Apex,
        Api::Oauth,
        Api::Other,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Rest => "rest",
            Api::Soap => "soap",
            Api::Bulk => "bulk",
            Api::Composite => "composite",
            Api::Apex => "apex",
            Api::Oauth => "oauth",
            Api::Other => "other",
        }
    }

    /// Position in [`Api::ALL`] (0..7), for indexing per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Api::Rest => 0,
            Api::Soap => 1,
            Api::Bulk => 2,
            Api::Composite => 3,
            Api::Apex => 4,
            Api::Oauth => 5,
            Api::Other => 6,
        }
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request is, by method and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `GET /services/data[/]`: the list of API versions. Free.
    VersionsList,
    /// Any other REST resource under `/services/data/vXX.X/` (sobjects, query, search, ui-api,
    /// tooling, connect, `limits/recordCount`, …).
    Rest,
    /// `/services/data/vXX.X/limits`: whether calling it counts is unconfirmed.
    Limits,
    /// `composite`, `composite/tree/…`, `composite/sobjects…`, `composite/graph`: one unit for
    /// the whole request (the docs say so for each, graph included).
    Composite,
    /// `composite/batch`: one unit per subrequest.
    CompositeBatch,
    /// A SOAP call: `/services/Soap/{u,c,m,T,…}/VER/ORGID` (and Apex web services).
    Soap,
    /// SOAP `login()`: `/services/Soap/{u,c}/VER` without an org id, or any SOAP request whose
    /// first body element is `login` (see [`refine`]).
    SoapLogin,
    /// A SOAP call whose header carries a `DebuggingHeader` (see [`refine`]): it draws on a
    /// separate allocation of 1,000 per 24 h, counted apart from the daily limit.
    SoapDebugging,
    /// Bulk API 1.0: `/services/async/VER/…`.
    BulkV1,
    /// Bulk API 2.0: `/services/data/vXX.X/jobs/ingest…` and `…/jobs/query…`.
    BulkV2,
    /// Apex REST: `/services/apexrest/…`.
    ApexRest,
    /// OAuth endpoints (`/services/oauth2/token`, `authorize`, `revoke`, `userinfo`, …) and
    /// `/id/…` identity URLs. The token endpoint is the OAuth login.
    OAuth,
    /// CometD streaming: `/cometd/…`. Has its own allocations.
    Streaming,
    /// Anything else: forwarded, never counted.
    Other,
}

impl CallKind {
    /// The metrics family of this kind.
    pub fn api(self) -> Api {
        match self {
            CallKind::VersionsList | CallKind::Rest | CallKind::Limits => Api::Rest,
            CallKind::Composite | CallKind::CompositeBatch => Api::Composite,
            CallKind::Soap | CallKind::SoapLogin | CallKind::SoapDebugging => Api::Soap,
            CallKind::BulkV1 | CallKind::BulkV2 => Api::Bulk,
            CallKind::ApexRest => Api::Apex,
            CallKind::OAuth => Api::Oauth,
            // Streaming has no label of its own in the metrics contract.
            CallKind::Streaming | CallKind::Other => Api::Other,
        }
    }

    /// True for SOAP calls other than `login()`: their responses carry the usage figure in
    /// the envelope.
    pub fn is_soap_call(self) -> bool {
        matches!(self, CallKind::Soap | CallKind::SoapDebugging)
    }

    /// True for logins: SOAP `login()` and OAuth. Their responses may carry the instance URL
    /// and go through the login rewriters.
    ///
    /// All of `OAuth` answers true, not only `/services/oauth2/token`: every OAuth endpoint
    /// (identity URLs included) is served by the login host, and the rewriter leaves a
    /// response without an `instance_url` as it is.
    pub fn is_login(self) -> bool {
        matches!(self, CallKind::SoapLogin | CallKind::OAuth)
    }

    /// True when the cost depends on the request body: the proxy should buffer up to
    /// [`BODY_PREFIX_LIMIT`] bytes and pass them to [`counted_units`] and [`refine`].
    ///
    /// `SoapLogin` is included because a path without an org id is only a hint: a session
    /// holder may post any call there, and that one counts.
    pub fn needs_body_prefix(self) -> bool {
        matches!(
            self,
            CallKind::CompositeBatch | CallKind::Soap | CallKind::SoapLogin
        )
    }
}

/// The unconfirmed rows of the counting table, configurable; defaults per
/// `salesforce-metering.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountingRules {
    /// Count OAuth endpoints (`/services/oauth2/*`, `/id/*`). Default: no.
    pub oauth: bool,
    /// Count `GET /services/data/vXX.X/limits`. Default: yes (the cautious choice while
    /// unconfirmed: over-counting one call beats running the org dry).
    pub limits_endpoint: bool,
    /// Count CometD streaming requests. Default: no (they have their own allocations).
    pub streaming: bool,
    // SOAP requests carrying a `DebuggingHeader` are not counted here: they draw on a separate
    // 1,000 per 24 h allocation, and the org meter counts them apart (`CallKind::SoapDebugging`).
    // Not a field so that the rules stay a plain three-flag literal.
}

impl Default for CountingRules {
    fn default() -> Self {
        CountingRules {
            oauth: false,
            limits_endpoint: true,
            streaming: false,
        }
    }
}

/// At most this many request-body bytes are buffered for costing.
///
/// It bounds the memory a request can pin while it is costed (in-flight requests × 1 MiB) yet
/// holds any realistic Composite Batch (25 subrequests of sObject JSON are kilobytes to a few
/// hundred kilobytes) and any SOAP header, which comes before the body. A longer body is costed
/// conservatively (see [`counted_units`]) and still streams through unchanged.
pub const BODY_PREFIX_LIMIT: usize = 1 << 20;

/// Salesforce's cap on subrequests in one Composite Batch request.
pub const COMPOSITE_BATCH_MAX: u32 = 25;

/// The first bytes of a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyPrefix<'a> {
    pub bytes: &'a [u8],
    /// True when `bytes` is the whole body.
    pub complete: bool,
}

/// Whether a request's path (as it came, with any prefix or site) is a SOAP API call's, for
/// the shape of the proxy's own error answers when the call was not (or could not be)
/// classified: a SOAP toolkit reads nothing but a fault.
pub fn is_soap_path(path: &str) -> bool {
    const SOAP: &[u8] = b"/services/soap/";
    path.as_bytes()
        .windows(SOAP.len())
        .any(|w| w.eq_ignore_ascii_case(SOAP))
}

/// Classifies a request by method and path (any proxy prefix already stripped, no query).
///
/// Segment names are matched ASCII-case-insensitively and empty segments are skipped, so
/// `/services/data/` and `/services//Data` classify alike: if Salesforce accepts a spelling, the
/// meter must not take it for an unknown (free) path.
pub fn classify(method: &Method, path: &str) -> CallKind {
    // A CORS preflight carries no credentials, so Salesforce cannot charge it to an org.
    if method == Method::OPTIONS {
        return CallKind::Other;
    }
    let path = decoded(path);
    let mut segs = Segments::of(&path);
    let Some(first) = segs.next() else {
        return CallKind::Other;
    };
    if is(first, "cometd") {
        return CallKind::Streaming;
    }
    if is(first, "id") {
        return CallKind::OAuth;
    }
    let Some(area) = services_area(first, &mut segs) else {
        return CallKind::Other;
    };
    if is(area, "data") {
        classify_data(segs)
    } else if is(area, "Soap") {
        classify_soap(segs)
    } else if is(area, "async") {
        // Bulk 1.0 paths are `/services/async/VER/job…`; anything without a version is a 404.
        match segs.next() {
            Some(version) if is_dotted_version(version.as_bytes()) => CallKind::BulkV1,
            _ => CallKind::Other,
        }
    } else if is(area, "apexrest") {
        match segs.next() {
            Some(_) => CallKind::ApexRest,
            None => CallKind::Other,
        }
    } else if is(area, "oauth2") {
        CallKind::OAuth
    } else {
        CallKind::Other
    }
}

/// `/services/data/…`, after `data`.
fn classify_data<'a>(mut segs: impl Iterator<Item = &'a str>) -> CallKind {
    let Some(version) = segs.next() else {
        return CallKind::VersionsList;
    };
    // `/services/data/foo` is Salesforce's 404, not an API call.
    let Some(number) = version.strip_prefix(['v', 'V']) else {
        return CallKind::Other;
    };
    if !is_dotted_version(number.as_bytes()) {
        return CallKind::Other;
    }
    let Some(resource) = segs.next() else {
        // `GET /services/data/vXX.X`: the resource list of one version, an ordinary call.
        return CallKind::Rest;
    };
    if is_resource(resource, "limits") {
        // `limits/recordCount` is a different resource and an ordinary call.
        return match segs.next() {
            None => CallKind::Limits,
            Some(_) => CallKind::Rest,
        };
    }
    if is_resource(resource, "composite") {
        return classify_composite(segs);
    }
    if is(resource, "tooling") {
        // The Tooling API mirrors the composite resources (`tooling/composite/batch` included),
        // costed the same way.
        return match segs.next() {
            Some(next) if is(next, "composite") => classify_composite(segs),
            _ => CallKind::Rest,
        };
    }
    if is(resource, "jobs") {
        return match segs.next() {
            Some(job) if is_resource(job, "ingest") || is_resource(job, "query") => {
                CallKind::BulkV2
            }
            _ => CallKind::Rest,
        };
    }
    CallKind::Rest
}

/// `…/composite/…`, after `composite`.
fn classify_composite<'a>(mut segs: impl Iterator<Item = &'a str>) -> CallKind {
    match (segs.next(), segs.next()) {
        (Some(sub), None) if is_resource(sub, "batch") => CallKind::CompositeBatch,
        // composite, composite/tree/…, composite/sobjects…, composite/graph: one unit each.
        _ => CallKind::Composite,
    }
}

/// `/services/Soap/…`, after `Soap`.
fn classify_soap<'a>(mut segs: impl Iterator<Item = &'a str>) -> CallKind {
    let (Some(flavor), Some(_version)) = (segs.next(), segs.next()) else {
        return CallKind::Other;
    };
    // login() lives on the partner and enterprise endpoints, which are then used with the org
    // id appended (the serverUrl of the login response).
    if has_login(flavor) && segs.next().is_none() {
        CallKind::SoapLogin
    } else {
        CallKind::Soap
    }
}

/// The non-empty `/`-separated segments of a path. A byte scan: paths are a few dozen bytes,
/// too short for `str::split`'s memchr set-up to pay, and this runs on every request.
struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Segments<'a> {
    fn of(path: &'a str) -> Self {
        Segments { rest: path }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.rest.as_bytes();
        let start = bytes.iter().position(|&b| b != b'/')?;
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(bytes.len(), |n| start + n);
        // Both ends sit next to an ASCII '/' or at the ends: char boundaries.
        let segment = &self.rest[start..end];
        self.rest = &self.rest[end..];
        Some(segment)
    }
}

/// The path as Salesforce's servers read it, so that a request is costed as the resource it
/// reaches (else an integration could slip past its quota by spelling a path differently):
/// each segment's `;parameters` dropped (as Java servlet containers do), percent-decoded, and
/// `.` and `..` segments resolved. Borrowed, with no work beyond one byte scan (paths are too
/// short for memchr's set-up to pay), for the usual path with none of `%`, `;` or `/.`.
fn decoded(path: &str) -> std::borrow::Cow<'_, str> {
    let mut after_slash = false;
    let plain = path.bytes().all(|b| {
        let special = b == b'%' || b == b';' || (b == b'.' && after_slash);
        after_slash = b == b'/';
        !special
    });
    if plain {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut segments: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    for raw in path.split('/') {
        let raw = raw.split(';').next().unwrap_or("");
        match raw {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(percent_encoding::percent_decode_str(raw).decode_utf8_lossy()),
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    std::borrow::Cow::Owned(normal)
}

fn is(segment: &str, name: &str) -> bool {
    segment.eq_ignore_ascii_case(name)
}

/// A REST resource's segment: its name, or its name with the `.json` / `.xml` suffix that picks
/// the format on any resource (`limits.json`, `composite/batch.xml`).
fn is_resource(segment: &str, name: &str) -> bool {
    is(segment, name)
        || segment
            .split_at_checked(name.len())
            .is_some_and(|(head, suffix)| {
                is(head, name) && (is(suffix, ".json") || is(suffix, ".xml"))
            })
}

/// Whether `path` is a SOAP endpoint that has `login()`: the partner (`u`) and enterprise (`c`)
/// APIs. An Apex web service (`/services/Soap/class/…`) may have a method named `login` of its
/// own, an ordinary call.
fn has_soap_login(path: &str) -> bool {
    let path = decoded(path);
    let mut segs = Segments::of(&path);
    let area = segs
        .next()
        .and_then(|first| services_area(first, &mut segs));
    area.is_some_and(|area| is(area, "Soap")) && segs.next().is_some_and(has_login)
}

/// The SOAP API flavors with `login()`: partner (`u`) and enterprise (`c`).
fn has_login(flavor: &str) -> bool {
    is(flavor, "u") || is(flavor, "c")
}

/// The API area after `/services/` (`data`, `Soap`, `async`, ...), given the path's `first`
/// segment and the rest; Experience Cloud sites serve the same APIs under
/// `/{site}/services/…`. `None` for any other path.
fn services_area<'a>(first: &'a str, segs: &mut Segments<'a>) -> Option<&'a str> {
    if !is(first, "services") && !segs.next().is_some_and(|s| is(s, "services")) {
        return None;
    }
    segs.next()
}

/// `60.0`-style: digits, a dot, digits.
fn is_dotted_version(s: &[u8]) -> bool {
    let Some(dot) = memchr::memchr(b'.', s) else {
        return false;
    };
    let (major, minor) = (&s[..dot], &s[dot + 1..]);
    !major.is_empty()
        && !minor.is_empty()
        && major.iter().all(u8::is_ascii_digit)
        && minor.iter().all(u8::is_ascii_digit)
}

/// Refines a path-based kind with the request body: a SOAP request to the partner or enterprise
/// API whose first body element is `login` is a `SoapLogin` whatever the rest of its path (the
/// org id may be there), and one whose first body element is anything else is a plain `Soap`
/// call even on a login path. Other kinds, and bodies whose first body element is not in the
/// prefix, keep the path's answer.
pub fn refine(kind: CallKind, path: &str, body: BodyPrefix<'_>) -> CallKind {
    match kind {
        CallKind::Soap | CallKind::SoapLogin => {
            let soap = inspect_soap(body.bytes);
            match soap.first_body_element {
                Some(b"login") if has_soap_login(path) => CallKind::SoapLogin,
                _ if soap.debugging_header => CallKind::SoapDebugging,
                Some(_) => CallKind::Soap,
                None => kind,
            }
        }
        other => other,
    }
}

/// Units counted against the daily limit for one request.
///
/// `body_prefix` matters only for kinds where [`CallKind::needs_body_prefix`]:
/// - Composite Batch: the number of entries in `batchRequests`. When the body was truncated, or
///   not given, the count is [`COMPOSITE_BATCH_MAX`], the most Salesforce will run:
///   over-counting a rare huge batch is cheaper than letting the org overshoot. A complete body
///   that is not a JSON object with a `batchRequests` array, has an empty one, or one of more
///   than [`COMPOSITE_BATCH_MAX`] entries counts 1: Salesforce refuses it as one request.
/// - SOAP: 0 for a `login()` (separate login rate limit; `kind` as [`refine`] found it) and for
///   a request whose header carries `DebuggingHeader` (separate allocation); else 1.
pub fn counted_units(
    kind: CallKind,
    rules: &CountingRules,
    body_prefix: Option<BodyPrefix<'_>>,
) -> u32 {
    match kind {
        CallKind::VersionsList | CallKind::Other => 0,
        CallKind::Rest
        | CallKind::Composite
        | CallKind::BulkV1
        | CallKind::BulkV2
        | CallKind::ApexRest => 1,
        CallKind::Limits => u32::from(rules.limits_endpoint),
        CallKind::OAuth => u32::from(rules.oauth),
        CallKind::Streaming => u32::from(rules.streaming),
        CallKind::CompositeBatch => match body_prefix {
            Some(BodyPrefix {
                bytes,
                complete: true,
            }) => batch_size(bytes)
                .filter(|n| (1..=COMPOSITE_BATCH_MAX).contains(n))
                // Malformed, empty, or over the maximum: Salesforce refuses it as one request.
                .unwrap_or(1),
            // A multipart batch whose JSON part (the first) is whole in the prefix: the files
            // after it do not change the count.
            Some(BodyPrefix {
                bytes,
                complete: false,
            }) => multipart_prefix_batch_size(bytes)
                .filter(|n| (1..=COMPOSITE_BATCH_MAX).contains(n))
                .unwrap_or(COMPOSITE_BATCH_MAX),
            None => COMPOSITE_BATCH_MAX,
        },
        CallKind::SoapLogin | CallKind::SoapDebugging => 0,
        CallKind::Soap => {
            let debugging =
                body_prefix.is_some_and(|body| inspect_soap(body.bytes).debugging_header);
            u32::from(!debugging)
        }
    }
}

/// The number of subrequests in a Composite Batch body, in any of the forms Salesforce takes:
/// JSON, XML, or multipart with the JSON as its first part (subrequests with binary parts).
fn batch_size(body: &[u8]) -> Option<u32> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let start = super::json::skip_ws(body, 0);
    match body.get(start)? {
        b'{' => json_batch_size(body),
        b'<' => xml_batch_size(body),
        b'-' => multipart_batch_size(&body[start..], true),
        _ => None,
    }
}

/// `<batch><batchRequests><batchRequest>…</batchRequest>…`: the `batchRequest` elements
/// under the root's `batchRequests`; `None` unless the root element is `batch`.
fn xml_batch_size(body: &[u8]) -> Option<u32> {
    let (mut depth, mut in_requests, mut count, mut at) = (0usize, false, None, 0);
    while let Step::Tag(tag) = xml::next_tag(body, at) {
        at = tag.end;
        match tag.kind {
            TagKind::Other => continue,
            TagKind::End => {
                depth = depth.saturating_sub(1);
                in_requests &= depth > 1;
                continue;
            }
            TagKind::Start | TagKind::SelfClosing => {}
        }
        let name = tag.local_name();
        match depth {
            0 if name != b"batch" => return None,
            0 => count = Some(0u32),
            1 => in_requests = name == b"batchRequests",
            2 if in_requests && name == b"batchRequest" => {
                count = count.map(|n| n.saturating_add(1))
            }
            _ => {}
        }
        depth += usize::from(tag.kind == TagKind::Start);
    }
    count
}

/// The subrequests of a multipart batch of which only the start is known, when its first part
/// (the JSON) ends within that start; `None` otherwise.
fn multipart_prefix_batch_size(prefix: &[u8]) -> Option<u32> {
    let prefix = prefix.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(prefix);
    let start = super::json::skip_ws(prefix, 0);
    match prefix.get(start)? {
        b'-' => multipart_batch_size(&prefix[start..], false),
        _ => None,
    }
}

/// A `multipart/form-data` batch: the first line is the delimiter, the first part (after its
/// headers) the JSON body. `whole`: `body` is the whole body; else the JSON part counts only
/// if its closing delimiter is in `body`.
fn multipart_batch_size(body: &[u8], whole: bool) -> Option<u32> {
    let delimiter_end = memchr::memmem::find(body, b"\r\n")?;
    // RFC 2046 allows white space after the boundary.
    let delimiter = body[..delimiter_end].trim_ascii_end();
    if !delimiter.starts_with(b"--") || delimiter.len() < 3 {
        return None;
    }
    let headers_end =
        delimiter_end + memchr::memmem::find(&body[delimiter_end..], b"\r\n\r\n")? + 4;
    let part = &body[headers_end..];
    let part_end = match memchr::memmem::find_iter(part, delimiter)
        .find(|&at| part[..at].ends_with(b"\r\n"))
    {
        Some(at) => at - 2,
        None if whole => part.len(),
        None => return None,
    };
    json_batch_size(&part[..part_end])
}

/// The number of entries in a JSON Composite Batch body's `batchRequests` array, saturating at
/// `u32::MAX`; `None` unless the body is a JSON object with such an array. Of a key given
/// twice, the longest array counts: which one Salesforce's parser keeps is not documented (the
/// last, for `serde_json::Value` and Jackson's default), and counting the longest never counts
/// less than it runs. A derived struct would refuse such a body, and cost a batch that runs 25
/// calls as 1.
fn json_batch_size(body: &[u8]) -> Option<u32> {
    struct Batch(Option<u32>);
    impl<'de> Deserialize<'de> for Batch {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Fields;
            impl<'de> Visitor<'de> for Fields {
                type Value = Batch;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Batch, A::Error> {
                    let mut size: Option<u32> = None;
                    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                        if key == "batchRequests" {
                            if let Some(n) = map.next_value::<SeqLen>()?.0 {
                                size = Some(size.map_or(n, |m| m.max(n)));
                            }
                        } else {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(Batch(size))
                }
            }
            // Only a map: a derived struct would also take a JSON array of fields.
            deserializer.deserialize_map(Fields)
        }
    }
    serde_json::from_slice::<Batch>(body).ok()?.0
}

/// The length of a JSON array, counted without keeping its elements; `None` for any other
/// JSON value (read and dropped).
struct SeqLen(Option<u32>);

impl<'de> Deserialize<'de> for SeqLen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> Visitor<'de> for Count {
            type Value = SeqLen;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SeqLen, A::Error> {
                let mut n = 0u32;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n = n.saturating_add(1);
                }
                Ok(SeqLen(Some(n)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SeqLen, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(SeqLen(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<SeqLen, E> {
                Ok(SeqLen(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<SeqLen, E> {
                Ok(SeqLen(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<SeqLen, E> {
                Ok(SeqLen(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<SeqLen, E> {
                Ok(SeqLen(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<SeqLen, E> {
                Ok(SeqLen(None))
            }
            fn visit_unit<E>(self) -> Result<SeqLen, E> {
                Ok(SeqLen(None))
            }
        }
        deserializer.deserialize_any(Count)
    }
}

/// What the costing needs to know about a SOAP request body.
#[derive(Debug, Default, PartialEq, Eq)]
struct SoapInfo<'a> {
    /// A `DebuggingHeader` element appears before the body.
    debugging_header: bool,
    /// Local name of the first element inside `Body`, if the prefix reaches it.
    first_body_element: Option<&'a [u8]>,
}

/// Walks the envelope up to the first body element (the header comes first in SOAP, so by then
/// any `DebuggingHeader` has been seen). Stops quietly at the end of a truncated prefix.
fn inspect_soap(body: &[u8]) -> SoapInfo<'_> {
    let mut info = SoapInfo::default();
    let mut in_body = false;
    let mut at = 0;
    while let Step::Tag(tag) = xml::next_tag(body, at) {
        at = tag.end;
        if !matches!(tag.kind, TagKind::Start | TagKind::SelfClosing) {
            continue;
        }
        let name = tag.local_name();
        if in_body {
            info.first_body_element = Some(name);
            break;
        }
        match name {
            b"Body" => in_body = true,
            b"DebuggingHeader" => info.debugging_header = true,
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn get(path: &str) -> CallKind {
        classify(&Method::GET, path)
    }

    fn post(path: &str) -> CallKind {
        classify(&Method::POST, path)
    }

    fn units(kind: CallKind) -> u32 {
        counted_units(kind, &CountingRules::default(), None)
    }

    fn complete(bytes: &[u8]) -> Option<BodyPrefix<'_>> {
        Some(BodyPrefix {
            bytes,
            complete: true,
        })
    }

    /// What the proxy finds for a whole POST body: the path's kind refined by the body, and its
    /// units.
    fn cost(path: &str, body: &[u8]) -> (CallKind, u32) {
        let prefix = BodyPrefix {
            bytes: body,
            complete: true,
        };
        let kind = refine(post(path), path, prefix);
        (
            kind,
            counted_units(kind, &CountingRules::default(), Some(prefix)),
        )
    }

    fn soap_units(body: &str) -> u32 {
        cost("/services/Soap/u/60.0/00D000000000001", body.as_bytes()).1
    }

    const SOAP_QUERY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com">
  <soapenv:Header><urn:SessionHeader><urn:sessionId>00D!AQ0</urn:sessionId></urn:SessionHeader></soapenv:Header>
  <soapenv:Body><urn:query><urn:queryString>SELECT Id FROM Account</urn:queryString></urn:query></soapenv:Body>
</soapenv:Envelope>"#;

    const SOAP_LOGIN: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com">
  <soapenv:Body><urn:login><urn:username>u@example.com</urn:username><urn:password>pw</urn:password></urn:login></soapenv:Body>
</soapenv:Envelope>"#;

    const SOAP_DEBUG: &str = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:apex="http://soap.sforce.com/2006/08/apex">
  <soapenv:Header>
    <apex:DebuggingHeader><apex:debugLevel>DEBUGONLY</apex:debugLevel></apex:DebuggingHeader>
    <apex:SessionHeader><apex:sessionId>00D!AQ0</apex:sessionId></apex:SessionHeader>
  </soapenv:Header>
  <soapenv:Body><apex:executeAnonymous><apex:String>System.debug(1);</apex:String></apex:executeAnonymous></soapenv:Body>
</soapenv:Envelope>"#;

    // --- Api -------------------------------------------------------------------------------

    #[test]
    fn api_labels_and_indices_are_consistent() {
        let labels: Vec<_> = Api::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(
            labels,
            [
                "rest",
                "soap",
                "bulk",
                "composite",
                "apex",
                "oauth",
                "other"
            ]
        );
        for (i, api) in Api::ALL.iter().enumerate() {
            assert_eq!(api.index(), i);
            assert_eq!(api.to_string(), api.as_str());
        }
    }

    // --- one test per row of "What counts as one call" --------------------------------------

    #[test]
    fn row_versions_list_is_free() {
        assert_eq!(get("/services/data"), CallKind::VersionsList);
        assert_eq!(get("/services/data/"), CallKind::VersionsList);
        assert_eq!(units(CallKind::VersionsList), 0);
        assert_eq!(CallKind::VersionsList.api(), Api::Rest);
    }

    #[test]
    fn row_rest_counts_one_per_request() {
        for path in [
            "/services/data/v60.0/sobjects/Account/001000000000001",
            "/services/data/v60.0/query",
            "/services/data/v60.0/search",
            "/services/data/v60.0/ui-api/records/001000000000001",
            "/services/data/v60.0/tooling/query",
            "/services/data/v60.0/connect/communities",
            "/services/data/v60.0",
            "/services/data/v60.0/limits/recordCount",
            "/services/data/v60.0/jobs",
        ] {
            assert_eq!(get(path), CallKind::Rest, "{path}");
        }
        assert_eq!(units(CallKind::Rest), 1);
        assert_eq!(CallKind::Rest.api(), Api::Rest);
    }

    #[test]
    fn row_composite_tree_and_collections_count_one() {
        for path in [
            "/services/data/v60.0/composite",
            "/services/data/v60.0/composite/",
            "/services/data/v60.0/composite/tree/Account",
            "/services/data/v60.0/composite/sobjects",
            "/services/data/v60.0/composite/sobjects/Account/ExtId__c",
            "/services/data/v60.0/composite/graph",
            "/services/data/v60.0/tooling/composite",
        ] {
            assert_eq!(post(path), CallKind::Composite, "{path}");
        }
        assert_eq!(units(CallKind::Composite), 1);
        assert_eq!(CallKind::Composite.api(), Api::Composite);
        assert!(!CallKind::Composite.needs_body_prefix());
    }

    #[test]
    fn row_composite_batch_counts_each_subrequest() {
        let kind = post("/services/data/v60.0/composite/batch");
        assert_eq!(kind, CallKind::CompositeBatch);
        assert_eq!(post("/services/data/v60.0/tooling/composite/batch"), kind);
        assert!(kind.needs_body_prefix());
        assert_eq!(kind.api(), Api::Composite);
        let body = br#"{"haltOnError":false,"batchRequests":[
            {"method":"GET","url":"v60.0/sobjects/Account/001"},
            {"method":"PATCH","url":"v60.0/sobjects/Account/002","richInput":{"Name":"x"}},
            {"method":"GET","url":"v60.0/query?q=SELECT+Id+FROM+Contact"}]}"#;
        assert_eq!(
            counted_units(kind, &CountingRules::default(), complete(body)),
            3
        );
    }

    #[test]
    fn row_soap_counts_one_per_request() {
        for path in [
            "/services/Soap/u/60.0/00D000000000001",
            "/services/Soap/c/60.0/00D000000000001",
            "/services/Soap/m/60.0/00D000000000001",
            "/services/Soap/T/60.0/00D000000000001",
            "/services/Soap/m/60.0",
            "/services/Soap/T/60.0",
            "/services/Soap/class/MyWebService",
        ] {
            assert_eq!(post(path), CallKind::Soap, "{path}");
        }
        assert!(CallKind::Soap.needs_body_prefix());
        assert_eq!(CallKind::Soap.api(), Api::Soap);
        assert!(!CallKind::Soap.is_login());
        assert_eq!(units(CallKind::Soap), 1);
        assert_eq!(soap_units(SOAP_QUERY), 1);
    }

    #[test]
    fn row_soap_login_is_not_counted() {
        for path in [
            "/services/Soap/u/60.0",
            "/services/Soap/u/60.0/",
            "/services/Soap/c/34.0",
        ] {
            assert_eq!(post(path), CallKind::SoapLogin, "{path}");
        }
        assert!(CallKind::SoapLogin.is_login());
        assert_eq!(CallKind::SoapLogin.api(), Api::Soap);
        assert_eq!(units(CallKind::SoapLogin), 0);
        let rules = CountingRules::default();
        let kind = post("/services/Soap/u/60.0");
        assert_eq!(
            counted_units(kind, &rules, complete(SOAP_LOGIN.as_bytes())),
            0
        );
    }

    #[test]
    fn row_bulk_v1_and_v2_count_one_per_request() {
        for path in [
            "/services/async/60.0/job",
            "/services/async/60.0/job/750000000000001/batch",
            "/services/async/60.0/job/750000000000001/batch/751000000000001/result",
        ] {
            assert_eq!(post(path), CallKind::BulkV1, "{path}");
        }
        for path in [
            "/services/data/v60.0/jobs/ingest",
            "/services/data/v60.0/jobs/ingest/750000000000001/batches",
            "/services/data/v60.0/jobs/query/750000000000001/results",
        ] {
            assert_eq!(post(path), CallKind::BulkV2, "{path}");
        }
        assert_eq!(units(CallKind::BulkV1), 1);
        assert_eq!(units(CallKind::BulkV2), 1);
        assert_eq!(CallKind::BulkV1.api(), Api::Bulk);
        assert_eq!(CallKind::BulkV2.api(), Api::Bulk);
    }

    #[test]
    fn row_apex_rest_counts_one_per_request() {
        assert_eq!(post("/services/apexrest/MyService"), CallKind::ApexRest);
        assert_eq!(
            get("/services/apexrest/ns/v1/things/42"),
            CallKind::ApexRest
        );
        assert_eq!(units(CallKind::ApexRest), 1);
        assert_eq!(CallKind::ApexRest.api(), Api::Apex);
    }

    #[test]
    fn row_oauth_is_not_counted_by_default() {
        for path in [
            "/services/oauth2/token",
            "/services/oauth2/token/",
            "/services/oauth2/authorize",
            "/services/oauth2/revoke",
            "/services/oauth2/userinfo",
            "/services/oauth2/introspect",
            "/id/00D000000000001/005000000000001",
        ] {
            assert_eq!(get(path), CallKind::OAuth, "{path}");
        }
        assert!(CallKind::OAuth.is_login());
        assert_eq!(CallKind::OAuth.api(), Api::Oauth);
        assert_eq!(units(CallKind::OAuth), 0);
        let counting = CountingRules {
            oauth: true,
            ..CountingRules::default()
        };
        assert_eq!(counted_units(CallKind::OAuth, &counting, None), 1);
    }

    #[test]
    fn row_streaming_is_not_counted_by_default() {
        assert_eq!(post("/cometd/60.0"), CallKind::Streaming);
        assert_eq!(post("/cometd/60.0/handshake"), CallKind::Streaming);
        assert_eq!(units(CallKind::Streaming), 0);
        assert_eq!(CallKind::Streaming.api(), Api::Other);
        let counting = CountingRules {
            streaming: true,
            ..CountingRules::default()
        };
        assert_eq!(counted_units(CallKind::Streaming, &counting, None), 1);
    }

    #[test]
    fn row_debugging_header_is_counted_apart() {
        assert_eq!(soap_units(SOAP_DEBUG), 0);
        assert_eq!(
            cost(
                "/services/Soap/u/60.0/00D000000000001",
                SOAP_DEBUG.as_bytes()
            )
            .0,
            CallKind::SoapDebugging,
            "a kind of its own, which the proxy tallies apart"
        );
        // Without the header the same call counts.
        let plain = SOAP_DEBUG.replace("DebuggingHeader", "CallOptions");
        assert_eq!(soap_units(&plain), 1);
        // Also self-closing and with a default namespace.
        let body =
            r#"<Envelope><Header><DebuggingHeader/></Header><Body><query/></Body></Envelope>"#;
        assert_eq!(soap_units(body), 0);
    }

    // --- the unconfirmed limits row and defaults ----------------------------------------------

    #[test]
    fn limits_endpoint_counts_by_default_and_is_configurable() {
        assert_eq!(get("/services/data/v60.0/limits"), CallKind::Limits);
        assert_eq!(get("/services/data/v60.0/limits/"), CallKind::Limits);
        assert_eq!(units(CallKind::Limits), 1);
        assert_eq!(CallKind::Limits.api(), Api::Rest);
        let counting = CountingRules {
            limits_endpoint: false,
            ..CountingRules::default()
        };
        assert_eq!(counted_units(CallKind::Limits, &counting, None), 0);
    }

    #[test]
    fn default_rules_match_the_metering_doc() {
        assert_eq!(
            CountingRules::default(),
            CountingRules {
                oauth: false,
                limits_endpoint: true,
                streaming: false,
            }
        );
    }

    // --- edge cases -------------------------------------------------------------------------

    #[test]
    fn unknown_paths_are_other_and_free() {
        for path in [
            "",
            "/",
            "/favicon.ico",
            "/services",
            "/services/wsdl/partner",
            "/services/data/foo",
            "/services/data/v60",
            "/services/data/vX.Y/sobjects",
            "/services/Soap",
            "/services/Soap/u",
            "/services/async",
            "/services/async/job",
            "/services/apexrest",
            "/servicesdata/v60.0",
            "/a/b/services",
        ] {
            assert_eq!(get(path), CallKind::Other, "{path:?}");
        }
        assert_eq!(units(CallKind::Other), 0);
        assert_eq!(CallKind::Other.api(), Api::Other);
    }

    #[test]
    fn segments_match_case_insensitively_and_ignore_empty_segments() {
        assert_eq!(get("/Services/Data/V60.0/Limits"), CallKind::Limits);
        assert_eq!(post("/services/soap/U/60.0"), CallKind::SoapLogin);
        assert_eq!(get("//services//data//v60.0//query"), CallKind::Rest);
        assert_eq!(
            post("/services/data/v60.0/COMPOSITE/Batch"),
            CallKind::CompositeBatch
        );
    }

    #[test]
    fn experience_cloud_site_prefix_is_understood() {
        assert_eq!(get("/partners/services/data/v60.0/query"), CallKind::Rest);
        assert_eq!(post("/partners/services/oauth2/token"), CallKind::OAuth);
        assert_eq!(get("/partners/services/data"), CallKind::VersionsList);
    }

    #[test]
    fn cors_preflight_is_free() {
        assert_eq!(
            classify(&Method::OPTIONS, "/services/data/v60.0/query"),
            CallKind::Other
        );
    }

    #[test]
    fn composite_batch_truncated_body_counts_the_maximum() {
        let rules = CountingRules::default();
        let prefix = Some(BodyPrefix {
            bytes: br#"{"batchRequests":[{"method":"GET","url":"v60.0/limits"}"#,
            complete: false,
        });
        assert_eq!(counted_units(CallKind::CompositeBatch, &rules, prefix), 25);
        assert_eq!(counted_units(CallKind::CompositeBatch, &rules, None), 25);
    }

    #[test]
    fn composite_batch_malformed_body_counts_one() {
        let rules = CountingRules::default();
        for body in [
            &b""[..],
            b"not json",
            b"{}",
            br#"{"batchRequests":{}}"#,
            br#"{"batchRequests":[]}"#,
            br#"[[{"method":"GET"}]]"#,
            br#"{"batchRequests":[{"method":"GET"}]"#,
        ] {
            assert_eq!(
                counted_units(CallKind::CompositeBatch, &rules, complete(body)),
                1,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Salesforce refuses a batch of more than 25 subrequests whole, as one request that runs
    /// none of them.
    #[test]
    fn composite_batch_over_salesforce_maximum_counts_one() {
        let rules = CountingRules::default();
        for (n, units) in [(25, 25), (26, 1), (40, 1)] {
            let entries = vec![r#"{"method":"GET","url":"v60.0/limits"}"#; n].join(",");
            let body = format!(r#"{{"batchRequests":[{entries}]}}"#);
            assert_eq!(
                counted_units(CallKind::CompositeBatch, &rules, complete(body.as_bytes())),
                units,
                "{n} subrequests"
            );
        }
    }

    /// Of a `batchRequests` key given twice, the last is the batch Salesforce runs (its parser,
    /// like `serde_json::Value`, keeps the last value).
    #[test]
    fn composite_batch_with_a_repeated_key_counts_the_last_array() {
        let sub = r#"{"method":"GET","url":"v60.0/limits"}"#;
        let body = format!(
            r#"{{"batchRequests":[],"batchRequests":[{}]}}"#,
            vec![sub; 25].join(",")
        );
        let seen: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(seen["batchRequests"].as_array().map(Vec::len), Some(25));
        assert_eq!(
            cost("/services/data/v60.0/composite/batch", body.as_bytes()),
            (CallKind::CompositeBatch, 25)
        );
        // Whichever Salesforce keeps, the longest is never less than it runs.
        let longer_first = format!(r#"{{"batchRequests":[{sub},{sub}],"batchRequests":[{sub}]}}"#);
        assert_eq!(
            cost(
                "/services/data/v60.0/composite/batch",
                longer_first.as_bytes()
            ),
            (CallKind::CompositeBatch, 2)
        );
        // A first value that is no array at all does not hide the array after it.
        let subs = vec![sub; 25].join(",");
        for first in ["null", "{}", r#"{"a":[1]}"#, "0", "1.5", "true", "\"x\""] {
            let body = format!(r#"{{"batchRequests":{first},"batchRequests":[{subs}]}}"#);
            assert_eq!(
                cost("/services/data/v60.0/composite/batch", body.as_bytes()),
                (CallKind::CompositeBatch, 25),
                "first value {first}"
            );
        }
        let no_array = r#"{"batchRequests":{"method":"GET"}}"#;
        assert_eq!(
            cost("/services/data/v60.0/composite/batch", no_array.as_bytes()),
            (CallKind::CompositeBatch, 1)
        );
    }

    /// Composite Batch in XML and as multipart (the JSON first, then binary parts) costs one
    /// unit per subrequest too; a nested element of the same name is not a subrequest.
    #[test]
    fn xml_and_multipart_composite_batches_count_each_subrequest() {
        let path = "/services/data/v60.0/composite/batch";
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<batch><haltOnError>false</haltOnError><batchRequests>
  <batchRequest><method>GET</method><url>v60.0/sobjects/Account/001</url></batchRequest>
  <batchRequest><method>PATCH</method><url>v60.0/sobjects/Account/002</url>
    <richInput><batchRequest>not one</batchRequest></richInput></batchRequest>
  <batchRequest><method>GET</method><url>v60.0/limits</url></batchRequest>
</batchRequests></batch>"#;
        assert_eq!(cost(path, xml), (CallKind::CompositeBatch, 3));
        let multipart = b"--bnd\r\nContent-Disposition: form-data; name=\"json\"\r\n\
            Content-Type: application/json\r\n\r\n{\"batchRequests\":[{\"method\":\"POST\",\
            \"url\":\"v60.0/sobjects/ContentVersion\",\"binaryPartName\":\"f1\"},\
            {\"method\":\"GET\",\"url\":\"v60.0/limits\"}]}\r\n--bnd\r\n\
            Content-Disposition: form-data; name=\"f1\"; filename=\"a.txt\"\r\n\r\nhello\r\n--bnd--\r\n";
        assert_eq!(cost(path, multipart), (CallKind::CompositeBatch, 2));
        // Not a batch in any form: Salesforce refuses it as one request.
        assert_eq!(cost(path, b"<other><batchRequests/></other>").1, 1);
        assert_eq!(cost(path, b"--bnd\r\n\r\nnot json\r\n--bnd--").1, 1);
    }

    /// A multipart batch larger than the prefix read (a ContentVersion upload with its files)
    /// costs its subrequests when its JSON part is whole in the prefix; 25 when it is not.
    #[test]
    fn a_truncated_multipart_batch_with_its_json_part_whole_counts_its_subrequests() {
        let rules = CountingRules::default();
        let json = r#"{"batchRequests":[{"method":"POST","url":"v60.0/sobjects/ContentVersion","binaryPartName":"f1"},{"method":"GET","url":"v60.0/limits"}]}"#;
        let body = format!(
            "--bnd\r\ncontent-type: application/json\r\n\r\n{json}\r\n--bnd\r\n\
             Content-Disposition: form-data; name=\"f1\"; filename=\"a\"\r\n\r\nxxxxxxxx"
        );
        let cut = |n: usize| {
            Some(BodyPrefix {
                bytes: &body.as_bytes()[..n],
                complete: false,
            })
        };
        assert_eq!(
            counted_units(CallKind::CompositeBatch, &rules, cut(body.len())),
            2
        );
        // The JSON part cut short: unknown, the maximum.
        assert_eq!(counted_units(CallKind::CompositeBatch, &rules, cut(60)), 25);
        // A truncated JSON batch stays at the maximum.
        let plain = Some(BodyPrefix {
            bytes: json.as_bytes(),
            complete: false,
        });
        assert_eq!(counted_units(CallKind::CompositeBatch, &rules, plain), 25);
    }

    /// A percent-encoded path is costed as the decoded path Salesforce serves.
    #[test]
    fn percent_encoded_paths_are_costed_as_decoded() {
        assert_eq!(get("/services/%64ata/v60.0/query"), CallKind::Rest);
        assert_eq!(
            post("/services/data/v60.0/composite/%62atch"),
            CallKind::CompositeBatch
        );
        assert_eq!(post("/services/Soap/%75/60.0"), CallKind::SoapLogin);
        assert_eq!(
            cost(
                "/services/Soap/%75/60.0/00D000000000001",
                SOAP_LOGIN.as_bytes()
            ),
            (CallKind::SoapLogin, 0)
        );
        assert_eq!(get("/services/data/v60.0/%ZZ"), CallKind::Rest);
    }

    /// A login() through an Experience Cloud site (`/{site}/services/Soap/u/…`) is a login.
    #[test]
    fn a_soap_login_through_a_site_is_a_login() {
        let path = "/partners/services/Soap/u/60.0";
        assert_eq!(post(path), CallKind::SoapLogin);
        assert_eq!(cost(path, SOAP_LOGIN.as_bytes()), (CallKind::SoapLogin, 0));
    }

    /// Path parameters and dot segments are resolved as a servlet container would.
    #[test]
    fn paths_are_costed_as_the_server_resolves_them() {
        assert_eq!(get("/cometd/../services/data/v60.0/query"), CallKind::Rest);
        assert_eq!(get("/services/data;x=1/v60.0/query"), CallKind::Rest);
        assert_eq!(get("/services/./data/v60.0/./limits"), CallKind::Limits);
        assert_eq!(
            get("/services/data/v60.0/x/../../../../.."),
            CallKind::Other
        );
    }

    /// A multipart batch may start with a blank line, and its boundary line may carry padding.
    #[test]
    fn multipart_batch_framing_variants() {
        let path = "/services/data/v60.0/composite/batch";
        let json = r#"{"batchRequests":[{"method":"GET","url":"v60.0/limits"},{"method":"GET","url":"v60.0/limits"}]}"#;
        for (lead, pad) in [("\r\n", ""), ("", " \t")] {
            let body = format!(
                "{lead}--bnd{pad}\r\ncontent-type: application/json\r\n\r\n{json}\r\n--bnd--\r\n"
            );
            assert_eq!(
                cost(path, body.as_bytes()),
                (CallKind::CompositeBatch, 2),
                "{body:?}"
            );
        }
    }

    /// `.json` / `.xml` after a resource picks the format, not another resource.
    #[test]
    fn a_format_suffix_keeps_the_resource() {
        assert_eq!(
            post("/services/data/v60.0/composite/batch.json"),
            CallKind::CompositeBatch
        );
        assert_eq!(
            post("/services/data/v60.0/composite/batch.XML"),
            CallKind::CompositeBatch
        );
        assert_eq!(get("/services/data/v60.0/limits.json"), CallKind::Limits);
        assert_eq!(
            post("/services/data/v60.0/jobs/ingest.json"),
            CallKind::BulkV2
        );
        assert_eq!(
            post("/services/data/v60.0/composite.json"),
            CallKind::Composite
        );
        assert_eq!(get("/services/data/v60.0/limits.jsonx"), CallKind::Rest);
        assert_eq!(get("/services/data/v60.0/limitsé"), CallKind::Rest);
    }

    #[test]
    fn soap_login_body_on_org_path_is_a_login() {
        let path = "/services/Soap/u/60.0/00D000000000001";
        assert_eq!(post(path), CallKind::Soap);
        assert_eq!(cost(path, SOAP_LOGIN.as_bytes()), (CallKind::SoapLogin, 0));
    }

    #[test]
    fn non_login_body_on_login_path_counts() {
        assert_eq!(
            cost("/services/Soap/u/60.0", SOAP_QUERY.as_bytes()),
            (CallKind::Soap, 1)
        );
    }

    /// An Apex web service may have a method named `login`: an ordinary call to the instance.
    #[test]
    fn an_apex_soap_method_named_login_is_not_a_login() {
        let body = SOAP_LOGIN.replace(
            "urn:partner.soap.sforce.com",
            "http://soap.sforce.com/schemas/class/Acc",
        );
        assert_eq!(
            cost("/services/Soap/class/Acc", body.as_bytes()),
            (CallKind::Soap, 1)
        );
        assert_eq!(
            cost("/services/Soap/c/60.0", SOAP_LOGIN.as_bytes()),
            (CallKind::SoapLogin, 0)
        );
    }

    #[test]
    fn refine_keeps_the_path_answer_without_a_body_element() {
        let empty = BodyPrefix {
            bytes: b"",
            complete: true,
        };
        let cut = BodyPrefix {
            bytes: &SOAP_LOGIN.as_bytes()[..60],
            complete: false,
        };
        for body in [empty, cut] {
            let path = "/services/Soap/u/60.0";
            assert_eq!(refine(CallKind::SoapLogin, path, body), CallKind::SoapLogin);
            assert_eq!(refine(CallKind::Soap, path, body), CallKind::Soap);
        }
        assert_eq!(refine(CallKind::Rest, "/", empty), CallKind::Rest);
    }

    #[test]
    fn soap_body_tricks_do_not_fool_inspection() {
        // `login` mentioned in a comment or CDATA, or as a header child, is not the body element.
        let body = r#"<e:Envelope xmlns:e="x"><e:Header><login/><!-- <e:Body><login> --></e:Header>
            <e:Body><![CDATA[<login>]]><query/></e:Body></e:Envelope>"#;
        assert_eq!(soap_units(body), 1);
        assert_eq!(
            inspect_soap(body.as_bytes()).first_body_element,
            Some(&b"query"[..])
        );
    }

    proptest! {
        #[test]
        fn arbitrary_paths_and_bodies_never_panic(
            path in "(/[a-zA-Z0-9.%é]{0,6}){0,7}/?",
            body in proptest::collection::vec(any::<u8>(), 0..256),
            complete in any::<bool>(),
        ) {
            let kind = classify(&Method::POST, &path);
            let prefix = BodyPrefix { bytes: &body, complete };
            let units = counted_units(kind, &CountingRules::default(), Some(prefix));
            prop_assert!(units <= COMPOSITE_BATCH_MAX);
            let _ = refine(kind, &path, prefix);
        }

        #[test]
        fn segments_are_the_non_empty_pieces_between_slashes(path in "[/aé.]{0,24}") {
            let expected: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            prop_assert_eq!(Segments::of(&path).collect::<Vec<_>>(), expected);
        }
    }

    #[test]
    fn is_dotted_version_accepts_only_digits_dot_digits() {
        assert!(is_dotted_version(b"60.0"));
        assert!(is_dotted_version(b"9.10"));
        for bad in [&b"60"[..], b".0", b"60.", b"6a.0", b"", b"60.0.1"] {
            assert!(!is_dotted_version(bad), "{bad:?}");
        }
    }
}
