//! What can be wrong with a request, and how Salesforce's REST API says so.
//!
//! Every malformed request ends here rather than in a panic: the handlers return a [`SimError`]
//! and this module turns it into Salesforce's error shape, a JSON array of
//! `{"message": …, "errorCode": …}`. SOAP and OAuth render the same errors in their own shapes
//! (`soap::client_fault`, `oauth`), using the `Display` text as the message.

use http::{Method, StatusCode};
use serde_json::Value;

use super::util::{self, Resp};

/// A request the sim refuses, or the one Salesforce refuses at the limit.
#[derive(Debug, thiserror::Error)]
pub(super) enum SimError {
    /// A path Salesforce has no resource for.
    #[error("The requested resource does not exist")]
    NotFound,
    /// A resource that exists, with a method it does not take.
    #[error("HTTP Method '{method}' not allowed. Allowed are {allowed}")]
    Method {
        method: String,
        allowed: &'static str,
    },
    /// A JSON body that does not parse, or not in the shape the resource takes.
    #[error("{0}")]
    Json(String),
    /// A SOQL query that is missing or cannot be read.
    #[error("{0}")]
    Query(String),
    /// A query parameter or header of the sim's own (hooks, delay) that does not parse.
    #[error("{0}")]
    BadParam(String),
    /// A body the route needs to parse, larger than the sim keeps in memory.
    #[error("The request body is too large for the simulator to parse")]
    TooLarge,
    /// The body could not be read to its end (the client went away or sent broken framing).
    #[error("Could not read the request body: {0}")]
    Body(String),
    /// A SOAP request that is not a well-formed envelope with an operation.
    #[error("{0}")]
    Soap(String),
    /// The org's daily allocation is spent.
    #[error("TotalRequests Limit exceeded.")]
    LimitExceeded,
    /// A bug in the sim itself.
    #[error("{0}")]
    Internal(String),
}

impl SimError {
    pub(super) fn method(method: &Method, allowed: &'static str) -> Self {
        SimError::Method {
            method: method.as_str().to_owned(),
            allowed,
        }
    }

    pub(super) fn status(&self) -> StatusCode {
        match self {
            SimError::NotFound => StatusCode::NOT_FOUND,
            SimError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            SimError::Json(_)
            | SimError::Query(_)
            | SimError::BadParam(_)
            | SimError::Body(_)
            | SimError::Soap(_) => StatusCode::BAD_REQUEST,
            SimError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            SimError::LimitExceeded => StatusCode::FORBIDDEN,
            SimError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Salesforce's `errorCode` for this error.
    pub(super) fn code(&self) -> &'static str {
        match self {
            SimError::NotFound => "NOT_FOUND",
            SimError::Method { .. } => "METHOD_NOT_ALLOWED",
            SimError::Json(_) => "JSON_PARSER_ERROR",
            SimError::Query(_) => "MALFORMED_QUERY",
            SimError::BadParam(_) | SimError::Body(_) => "INVALID_INPUT",
            SimError::TooLarge => "REQUEST_ENTITY_TOO_LARGE",
            SimError::Soap(_) => "INVALID_XML",
            SimError::LimitExceeded => "REQUEST_LIMIT_EXCEEDED",
            SimError::Internal(_) => "UNKNOWN_EXCEPTION",
        }
    }

    /// The REST rendering: `[{"message":"…","errorCode":"…"}]`. Written by hand, not with
    /// `json!`, so the key order is Salesforce's whatever serde_json's map features are.
    pub(super) fn to_rest(&self) -> Resp {
        util::respond(
            self.status(),
            util::JSON,
            rest_error_body(&self.to_string(), self.code()),
        )
    }
}

/// `[{"message":MESSAGE,"errorCode":CODE}]`, with both strings JSON-escaped.
pub(super) fn rest_error_body(message: &str, code: &str) -> String {
    format!(
        "[{{\"message\":{},\"errorCode\":{}}}]",
        Value::from(message),
        Value::from(code)
    )
}
