//! The Salesforce platform's rules, as pure functions: what a request is and what it costs
//! against the org's daily API limit, where Salesforce reports the org's usage, what its
//! limit errors look like, how login responses are rewritten to keep integrations on the proxy,
//! and what must never reach a log. No I/O, no async, no state beyond one response's scanner;
//! the source of truth is `shared/product/salesforce-metering.md`.
//!
//! # Layout
//! - `classify`: [`classify`] a request by method and path into a [`CallKind`] (and its metrics
//!   family, [`Api`]); [`counted_units`] says what it costs under the [`CountingRules`], reading
//!   a [`BodyPrefix`] where the body matters (Composite Batch, SOAP); [`refine`] tells a SOAP
//!   `login()` by its body.
//! - `usage`: [`parse_limit_info`] reads the `Sforce-Limit-Info` header, [`parse_limits_body`]
//!   the `limits` resource, both into a [`UsageReport`].
//! - `scan`: [`BodyScanner`] watches a streaming response body for the SOAP `LimitInfoHeader`
//!   and for a `REQUEST_LIMIT_EXCEEDED` error ([`LimitExceeded`]).
//! - `errors`: [`rest_error_body`] and [`soap_fault_body`] build Salesforce-shaped errors.
//! - `login`: [`rewrite_oauth_token`] and [`rewrite_soap_login`] point login responses at the
//!   proxy.
//! - `redact`: [`is_secret_header`] and [`redact_body`] keep credentials out of logs.
//! - `xml`, `json`: small byte-level tokenizers the others share; private.
//!
//! The module is self-contained (no `crate::` paths) so it can be tested on its own.

mod classify;
mod errors;
mod json;
mod login;
mod redact;
mod scan;
mod usage;
mod xml;

pub use classify::{
    classify, counted_units, is_soap_path, refine, Api, BodyPrefix, CallKind, CountingRules,
    BODY_PREFIX_LIMIT, COMPOSITE_BATCH_MAX,
};
pub use errors::{rest_error_body, soap_fault_body};
pub use login::{rewrite_oauth_token, rewrite_soap_login};
pub use redact::{is_secret_header, redact_body, REDACTED};
pub use scan::{BodyScanner, LimitExceeded, SCAN_LIMIT};
pub use usage::{
    limit_info_lines, parse_limit_info, parse_limits_body, UsageParseError, UsageReport,
};
