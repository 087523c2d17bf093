//! Small helpers the simulator needs and its allowed crates do not provide: Salesforce record ids
//! (with their case-safe checksum), session tokens, timestamps in Salesforce's formats, form and
//! query decoding, SOQL's `FROM` object, base64, XML escaping and response builders. Kept apart
//! so the protocol modules read as protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Every answer of the sim is a complete body: they are small, and a known length keeps them
/// simple for both HTTP/1.1 and HTTP/2.
pub(super) type Resp = Response<Full<Bytes>>;

pub(super) const JSON: &str = "application/json;charset=UTF-8";
pub(super) const XML: &str = "text/xml;charset=UTF-8";
pub(super) const CSV: &str = "text/csv";

pub(super) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(super) fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    respond(status, JSON, value.to_string())
}

/// An answer without a body (204, or 201 for a Bulk upload).
pub(super) fn empty(status: StatusCode) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// The 3-character key prefix Salesforce gives ids of an object type (custom objects: `a00`).
pub(super) fn key_prefix(sobject: &str) -> &'static str {
    const PREFIXES: [(&str, &str); 14] = [
        ("Account", "001"),
        ("Contact", "003"),
        ("User", "005"),
        ("Opportunity", "006"),
        ("Lead", "00Q"),
        ("Task", "00T"),
        ("Event", "00U"),
        ("Case", "500"),
        ("Campaign", "701"),
        ("Contract", "800"),
        ("Order", "801"),
        ("Product2", "01t"),
        ("ApexClass", "01p"),
        ("AsyncApexJob", "707"),
    ];
    PREFIXES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(sobject))
        .map(|(_, prefix)| *prefix)
        .unwrap_or("a00")
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `n` in base 62, left-padded with `0` to `width` digits (higher digits beyond it are dropped).
fn base62(mut n: u64, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits.into_iter().map(char::from).collect()
}

/// Appends Salesforce's 3-character suffix to a 15-character id: for each 5-character chunk, a
/// bit per upper-case letter, read as an index into `A–Z0–5`. It makes ids case-insensitively
/// unique, and clients (and the proxy) may check it.
pub(super) fn with_checksum(id15: &str) -> String {
    const SUFFIX: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    let mut id = String::with_capacity(18);
    id.push_str(id15);
    for chunk in id15.as_bytes().chunks(5) {
        let bits = chunk
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_ascii_uppercase())
            .fold(0usize, |bits, (i, _)| bits | 1 << i);
        id.push(char::from(SUFFIX[bits & 31]));
    }
    id
}

/// The 18-character id number `n` of a key prefix, e.g. `001000000000001AAA`.
pub(super) fn record_id(prefix: &str, n: u64) -> String {
    let mut id15 = String::with_capacity(15);
    id15.push_str(prefix);
    id15.push_str(&base62(n, 15usize.saturating_sub(prefix.len())));
    with_checksum(&id15)
}

/// The simulated user every session belongs to.
pub(super) fn user_id() -> String {
    record_id("005", 1)
}

/// New ids and tokens for one org. Ids count up (so they are unique and easy to read in test
/// output); tokens mix a per-process seed in, so they look like real opaque tokens.
pub(super) struct IdGen {
    next: AtomicU64,
    seed: u64,
}

impl IdGen {
    pub(super) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        IdGen {
            // Starts above the small numbers used for the canned records of GET answers.
            next: AtomicU64::new(1000),
            seed: nanos ^ 0x5eed_5a1e_5f0c_e000,
        }
    }

    /// A new record id of the given key prefix.
    pub(super) fn id(&self, prefix: &str) -> String {
        record_id(prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// `len` characters of base-62 noise.
    pub(super) fn token(&self, len: usize) -> String {
        let mut state = self.seed ^ self.next.fetch_add(1, Ordering::Relaxed).rotate_left(17);
        (0..len)
            .map(|_| char::from(BASE62[(splitmix64(&mut state) % 62) as usize]))
            .collect()
    }

    /// A session id / access token shaped like Salesforce's: `ORGID!AQ…`.
    pub(super) fn session(&self, org_id: &str) -> String {
        let org15: String = org_id.chars().take(15).collect();
        format!("{org15}!AQ{}", self.token(94))
    }

    /// 32 pseudo-random bytes, base64-encoded (the OAuth `signature`).
    pub(super) fn signature(&self) -> String {
        let mut state = self.seed ^ self.next.fetch_add(1, Ordering::Relaxed).rotate_left(29);
        let bytes: Vec<u8> = (0..4)
            .flat_map(|_| splitmix64(&mut state).to_le_bytes())
            .collect();
        base64(&bytes)
    }
}

/// Sebastiano Vigna's SplitMix64: enough randomness for tokens that only need to look opaque.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard base64 with padding.
pub(super) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Milliseconds since the Unix epoch (OAuth's `issued_at`).
pub(super) fn epoch_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Now in Salesforce's REST format, `2025-01-31T12:34:56.000+0000`.
pub(super) fn rest_timestamp() -> String {
    let (date, time, millis) = civil_now();
    format!("{date}T{time}.{millis:03}+0000")
}

/// Now in XML Schema's format as SOAP and Bulk 1.0 use it, `2025-01-31T12:34:56.000Z`.
pub(super) fn xml_timestamp() -> String {
    let (date, time, millis) = civil_now();
    format!("{date}T{time}.{millis:03}Z")
}

fn civil_now() -> (String, String, u128) {
    let millis = epoch_millis();
    let secs = (millis / 1000) as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!(
            "{:02}:{:02}:{:02}",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        ),
        millis % 1000,
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Decodes `application/x-www-form-urlencoded` text (also a URL query): `+` is a space, `%XX` a
/// byte, and the result must be UTF-8.
pub(super) fn parse_form(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(key)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| format!("invalid percent-encoding in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

/// The first value of query parameter `name`.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, String> {
    Ok(parse_form(query.unwrap_or(""))?
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value))
}

/// The object a SOQL query reads: the name after the top-level `FROM` (not a subquery's).
pub(super) fn soql_object(query: &str) -> Option<&str> {
    let mut depth = 0i32;
    let mut tokens = query.split_whitespace();
    while let Some(token) = tokens.next() {
        let opens = token.matches('(').count() as i32;
        let closes = token.matches(')').count() as i32;
        if depth == 0 && token.eq_ignore_ascii_case("from") {
            let object = tokens.next()?.trim_end_matches([',', ')', ';']);
            let valid = !object.is_empty()
                && object
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            return valid.then_some(object);
        }
        depth += opens - closes;
    }
    None
}

/// Escapes text for an XML element or attribute.
pub(super) fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Undoes XML's predefined and numeric character references; an unknown one is kept as written.
pub(super) fn xml_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let decoded = rest.find(';').and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => name
                    .strip_prefix("#x")
                    .or_else(|| name.strip_prefix("#X"))
                    .map(|hex| u32::from_str_radix(hex, 16).ok())
                    .unwrap_or_else(|| name.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_salesforce() {
        // Salesforce's documented example: 001A0000006Vm9r → 001A0000006Vm9rIAC.
        assert_eq!(with_checksum("001A0000006Vm9r"), "001A0000006Vm9rIAC");
        assert_eq!(record_id("001", 1), "001000000000001AAA");
        assert_eq!(record_id("00Q", 62).len(), 18);
    }

    #[test]
    fn ids_are_unique_and_tokens_opaque() {
        let ids = IdGen::new();
        assert_ne!(ids.id("001"), ids.id("001"));
        let session = ids.session("00D000000000001AAA");
        assert!(session.starts_with("00D000000000001!AQ"));
        assert_eq!(session.len(), 15 + 3 + 94);
        assert_eq!(ids.signature().len(), 44);
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        let stamp = rest_timestamp();
        assert_eq!(stamp.len(), "2025-01-31T12:34:56.000+0000".len());
    }

    #[test]
    fn forms_decode_or_fail() {
        assert_eq!(
            parse_form("grant_type=password&username=a%40b.com&x=one+two&flag").unwrap(),
            vec![
                ("grant_type".into(), "password".into()),
                ("username".into(), "a@b.com".into()),
                ("x".into(), "one two".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert!(parse_form("a=%zz").is_err());
        assert!(parse_form("a=%4").is_err());
        assert!(parse_form("a=%ff").is_err());
        assert_eq!(
            query_param(Some("n=5&m=6"), "m").unwrap().as_deref(),
            Some("6")
        );
        assert_eq!(query_param(None, "n").unwrap(), None);
    }

    #[test]
    fn soql_object_skips_subqueries() {
        assert_eq!(soql_object("SELECT Id FROM Account"), Some("Account"));
        assert_eq!(
            soql_object("select Id, (SELECT Id FROM Contacts) from Account where Name = 'x'"),
            Some("Account")
        );
        assert_eq!(
            soql_object("SELECT Id FROM Custom__c LIMIT 5"),
            Some("Custom__c")
        );
        assert_eq!(soql_object("SELECT Id"), None);
        assert_eq!(soql_object("SELECT Id FROM"), None);
    }

    #[test]
    fn xml_escaping_round_trips() {
        let text = "a<b>&\"c\"'d'";
        assert_eq!(xml_unescape(&xml_escape(text)), text);
        assert_eq!(xml_unescape("&#65;&#x42;&bogus;&"), "AB&bogus;&");
    }
}
