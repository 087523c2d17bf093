//! Salesforce's own figure for the org's API usage, read from a REST response header
//! (`Sforce-Limit-Info`) or from the body of the `limits` resource. (SOAP responses carry the
//! same figure in a header element; the streaming `BodyScanner` reads that one.) These figures
//! include calls made outside the proxy, which is why the meter prefers them to its own count.

use serde::Deserialize;

/// Usage reported by Salesforce: `used` calls of `limit` in the rolling 24 hours.
///
/// `used` may exceed `limit`: the daily limit is soft for paid orgs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageReport {
    pub used: u64,
    pub limit: u64,
}

/// Why a `Sforce-Limit-Info` value yielded no usage. Callers log it at debug level and go on:
/// a malformed header never fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsageParseError {
    #[error("no api-usage field")]
    MissingApiUsage,
    #[error("api-usage is not of the form USED/LIMIT with decimal numbers")]
    Malformed,
    #[error("api-usage number does not fit in 64 bits")]
    OutOfRange,
    #[error("api-usage limit is zero")]
    ZeroLimit,
}

/// The usage a response's `Sforce-Limit-Info` lines report: several lines are one list (RFC
/// 9110 §5.3), so the first line with an `api-usage` field counts. `None` without the header;
/// the first line's error when no line has a figure.
pub fn limit_info_lines<'a>(
    lines: impl IntoIterator<Item = &'a [u8]>,
) -> Option<Result<UsageReport, UsageParseError>> {
    let mut first_error = None;
    for line in lines {
        match parse_limit_info(line) {
            Ok(report) => return Some(Ok(report)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map(Err)
}

/// Parses a `Sforce-Limit-Info` value such as `api-usage=10018/100000; api-bursts=1/750` or
/// `api-usage=25/5000; per-app-api-usage=17/250(appName=x)`.
///
/// Fields may come in any order, with whitespace around separators and names in any case;
/// unknown fields are ignored. Fields are split on `;` (and on `,`, in case an intermediary
/// folded two header lines into one), but not inside parentheses, where an app name might hold
/// either. The first `api-usage` field wins.
pub fn parse_limit_info(value: &[u8]) -> Result<UsageReport, UsageParseError> {
    for field in Fields(value) {
        let Some(eq) = memchr::memchr(b'=', field) else {
            continue;
        };
        if field[..eq].trim_ascii().eq_ignore_ascii_case(b"api-usage") {
            return parse_used_of_limit(field[eq + 1..].trim_ascii());
        }
    }
    Err(UsageParseError::MissingApiUsage)
}

/// `USED/LIMIT`, whitespace tolerated around the slash.
fn parse_used_of_limit(value: &[u8]) -> Result<UsageReport, UsageParseError> {
    let slash = memchr::memchr(b'/', value).ok_or(UsageParseError::Malformed)?;
    let used = parse_decimal(value[..slash].trim_ascii())?;
    let limit = parse_decimal(value[slash + 1..].trim_ascii())?;
    if limit == 0 {
        // Nothing downstream can work with a zero limit (percentages divide by it).
        return Err(UsageParseError::ZeroLimit);
    }
    Ok(UsageReport { used, limit })
}

/// A non-empty run of ASCII digits as a `u64`.
pub(super) fn parse_decimal(digits: &[u8]) -> Result<u64, UsageParseError> {
    if digits.is_empty() {
        return Err(UsageParseError::Malformed);
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        if !d.is_ascii_digit() {
            return Err(UsageParseError::Malformed);
        }
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(d - b'0')))
            .ok_or(UsageParseError::OutOfRange)
    })
}

/// Iterator over `;`/`,`-separated fields, ignoring separators inside parentheses.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let mut depth = 0usize;
        let end = self
            .0
            .iter()
            .position(|&b| match b {
                b'(' => {
                    depth += 1;
                    false
                }
                b')' => {
                    depth = depth.saturating_sub(1);
                    false
                }
                b';' | b',' => depth == 0,
                _ => false,
            })
            .unwrap_or(self.0.len());
        let field = &self.0[..end];
        self.0 = self.0.get(end + 1..).unwrap_or(&[]);
        Some(field)
    }
}

/// Reads `DailyApiRequests` from the body of `GET /services/data/vXX.X/limits`:
/// `used = Max - Remaining`. Keys other than `Max` and `Remaining` (per-app entries, other
/// limits) are ignored. `Remaining` is read as signed in case an org past its soft limit reports
/// it below zero; the subtraction saturates. `None` when the body lacks the entry or `Max` is 0.
pub fn parse_limits_body(body: &[u8]) -> Option<UsageReport> {
    #[derive(Deserialize)]
    struct Limits {
        #[serde(rename = "DailyApiRequests")]
        daily: Daily,
    }
    #[derive(Deserialize)]
    struct Daily {
        #[serde(rename = "Max")]
        max: u64,
        #[serde(rename = "Remaining")]
        remaining: i64,
    }
    let limits: Limits = serde_json::from_slice(body).ok()?;
    let Daily { max, remaining } = limits.daily;
    if max == 0 {
        return None;
    }
    let used = (i128::from(max) - i128::from(remaining)).clamp(0, i128::from(u64::MAX));
    Some(UsageReport {
        used: u64::try_from(used).ok()?,
        limit: max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several `Sforce-Limit-Info` lines: the first with a figure counts; none, the first
    /// line's error; no line, nothing.
    #[test]
    fn limit_info_lines_take_the_first_line_with_a_figure() {
        let lines = |l: &[&'static str]| limit_info_lines(l.iter().map(|s| s.as_bytes()));
        let used = |r: Option<Result<UsageReport, UsageParseError>>| r.map(|r| r.map(|r| r.used));
        assert_eq!(
            used(lines(&["api-bursts=1/750", "api-usage=9/10"])),
            Some(Ok(9))
        );
        assert_eq!(
            used(lines(&["api-usage=8/10", "api-usage=9/10"])),
            Some(Ok(8))
        );
        assert!(matches!(lines(&["api-bursts=1/750"]), Some(Err(_))));
        assert!(lines(&[]).is_none());
    }
    use proptest::prelude::*;

    fn report(used: u64, limit: u64) -> Result<UsageReport, UsageParseError> {
        Ok(UsageReport { used, limit })
    }

    #[test]
    fn doc_examples_parse() {
        assert_eq!(
            parse_limit_info(b"api-usage=10018/100000; api-bursts=1/750"),
            report(10018, 100000)
        );
        assert_eq!(
            parse_limit_info(
                b"api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)"
            ),
            report(25, 5000)
        );
        assert_eq!(
            parse_limit_info(b"api-usage=110018/100000"),
            report(110018, 100000)
        );
    }

    #[test]
    fn any_order_whitespace_case_and_unknown_fields() {
        assert_eq!(
            parse_limit_info(b"per-app-api-usage=17/250(appName=a;b,c); API-Usage = 7 / 9 ;x"),
            report(7, 9)
        );
        assert_eq!(parse_limit_info(b"  api-usage=1/2  "), report(1, 2));
        assert_eq!(parse_limit_info(b"foo, api-usage=3/4"), report(3, 4));
        assert_eq!(
            parse_limit_info(b"api-usage=1/2; api-usage=5/6"),
            report(1, 2),
            "first field wins"
        );
    }

    #[test]
    fn missing_or_malformed_api_usage_is_an_error() {
        use UsageParseError::*;
        assert_eq!(parse_limit_info(b""), Err(MissingApiUsage));
        assert_eq!(parse_limit_info(b"api-bursts=1/750"), Err(MissingApiUsage));
        assert_eq!(
            parse_limit_info(b"per-app-api-usage=17/250(appName=x)"),
            Err(MissingApiUsage)
        );
        assert_eq!(parse_limit_info(b"api-usage"), Err(MissingApiUsage));
        assert_eq!(parse_limit_info(b"api-usage="), Err(Malformed));
        assert_eq!(parse_limit_info(b"api-usage=12"), Err(Malformed));
        assert_eq!(parse_limit_info(b"api-usage=/5"), Err(Malformed));
        assert_eq!(parse_limit_info(b"api-usage=-1/5"), Err(Malformed));
        assert_eq!(parse_limit_info(b"api-usage=1.5/5"), Err(Malformed));
        assert_eq!(parse_limit_info(b"api-usage=1/5/6"), Err(Malformed));
        assert_eq!(parse_limit_info(b"api-usage=1/0"), Err(ZeroLimit));
        assert_eq!(
            parse_limit_info(b"api-usage=99999999999999999999/5"),
            Err(OutOfRange)
        );
        assert_eq!(
            parse_limit_info(b"api-usage=18446744073709551615/18446744073709551615"),
            report(u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn limits_body_doc_example() {
        let body = br#"{"ConcurrentAsyncGetReportInstances":{"Max":200,"Remaining":200},
            "DailyApiRequests": {"Max": 25000, "Remaining": 24926, "<App name>": {"Max":0,"Remaining":0}},
            "DailyAsyncApexExecutions":{"Max":250000,"Remaining":250000}}"#;
        assert_eq!(
            parse_limits_body(body),
            Some(UsageReport {
                used: 74,
                limit: 25000
            })
        );
    }

    #[test]
    fn limits_body_edge_cases() {
        assert_eq!(
            parse_limits_body(br#"{"DailyApiRequests":{"Max":100,"Remaining":-10}}"#),
            Some(UsageReport {
                used: 110,
                limit: 100
            })
        );
        assert_eq!(
            parse_limits_body(br#"{"DailyApiRequests":{"Max":100,"Remaining":500}}"#),
            Some(UsageReport {
                used: 0,
                limit: 100
            })
        );
        assert_eq!(
            parse_limits_body(br#"{"DailyApiRequests":{"Max":0,"Remaining":0}}"#),
            None
        );
        assert_eq!(
            parse_limits_body(br#"{"DailyApiRequests":{"Max":100}}"#),
            None
        );
        assert_eq!(parse_limits_body(br#"{"DailyBulkApiBatches":{}}"#), None);
        assert_eq!(parse_limits_body(b"[]"), None);
        assert_eq!(parse_limits_body(b"<html>"), None);
    }

    /// A field that is not `api-usage`: a name and a free-form value without separators.
    fn extra_field() -> impl Strategy<Value = String> {
        ("[a-z][a-z-]{0,12}", "[0-9a-zA-Z/ =()._-]{0,16}", "[ ]{0,2}").prop_filter_map(
            "not api-usage",
            |(name, value, pad)| {
                (!name.eq_ignore_ascii_case("api-usage"))
                    .then(|| format!("{pad}{name}={}", value.replace(['(', ')'], "")))
            },
        )
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_limit_info(&bytes);
        }

        #[test]
        fn round_trips_with_extra_fields_in_any_order(
            used in any::<u64>(),
            limit in 1..=u64::MAX,
            extras in proptest::collection::vec(extra_field(), 0..5),
            position in any::<prop::sample::Index>(),
            sep in prop::sample::select(vec![";", "; ", " ; ", ","]),
        ) {
            let mut fields = extras;
            let at = position.index(fields.len() + 1);
            fields.insert(at, format!(" api-usage={used}/{limit} "));
            let value = fields.join(sep);
            prop_assert_eq!(parse_limit_info(value.as_bytes()), Ok(UsageReport { used, limit }));
        }
    }
}
