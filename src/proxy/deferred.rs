//! The proxy side of `on_limit = "defer"`: taking a limited call into the store (answering
//! `202 Accepted` with where to read its outcome), and serving that status URL.
//!
//! The status URL lives under the integration's own base URL on the proxy listener, so only a
//! request that matches the same integration reaches it; when the deferred call carried
//! credentials, the status request must carry the same ones.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde::Serialize;

use super::body::{Collected, RequestBody, ResponseBody};
use super::error::json_error;
use super::Route;
use crate::metrics::Outcome;
use crate::queue::deferred::{now_ms, Deferrals, STATUS_PATH};
use crate::store::{DeferredId, NewDeferred};

/// What a route needs to defer calls.
pub struct DeferRoute {
    pub deferrals: Arc<Deferrals>,
    pub max_body_bytes: usize,
}

#[derive(Serialize)]
struct Accepted<'a> {
    id: String,
    status: &'a str,
    status_url: String,
    message: String,
}

/// A limited call on its way into the store.
pub struct Limited<'a> {
    pub parts: &'a Parts,
    /// What to send upstream later: the path without the integration's prefix.
    pub path_and_query: &'a str,
    pub body: RequestBody,
    pub units: u32,
    pub limited: &'a crate::meter::Limited,
    /// The integration's base URL on the proxy, for the status URL.
    pub base: &'a str,
}

/// Stores a limited call and answers 202, or says why it cannot be deferred, with the
/// request's outcome: rejected (too large to store, the store failing), or the client's error
/// (its body broke off or stalled).
pub async fn defer(
    defer: &DeferRoute,
    route: &Route,
    call: Limited<'_>,
) -> Result<Response<ResponseBody>, (Response<ResponseBody>, Outcome)> {
    let Limited {
        parts,
        path_and_query,
        body,
        units,
        limited,
        base,
    } = call;
    let stall = route.org.upstream.response_timeout();
    let not_stored = |status, why: &str| {
        let message = format!(
            "callmeter: the call was limited ({}) and {why}, so it was not stored; send it again later",
            limited.budget.as_str(),
        );
        json_error(status, &message, "REQUEST_LIMIT_EXCEEDED")
    };
    let body = match body
        .collect_limited(defer.max_body_bytes, stall, &super::body::HELD_BYTES)
        .await
    {
        Ok(Collected::Whole(body)) => body,
        Ok(Collected::TooLarge) => {
            let why = format!(
                "its body is larger than defer.max_body_bytes = {}",
                defer.max_body_bytes
            );
            return Err((
                not_stored(StatusCode::PAYLOAD_TOO_LARGE, &why),
                Outcome::Rejected,
            ));
        }
        // The store keeps a call's head and body; replayed without its trailers it would not
        // be the call the client sent.
        Ok(Collected::Trailers) => {
            let why = "its body ends with trailers, which deferred calls do not keep";
            return Err((not_stored(StatusCode::FORBIDDEN, why), Outcome::Rejected));
        }
        Ok(Collected::Busy) => {
            let why = "the proxy holds as many request bodies as it may at once";
            return Err((
                not_stored(StatusCode::SERVICE_UNAVAILABLE, why),
                Outcome::Rejected,
            ));
        }
        Err(e) => {
            let soap = crate::salesforce::is_soap_path(path_and_query);
            return Err((e.into_response(soap), Outcome::ClientError));
        }
    };
    let call = NewDeferred {
        org: route.org.meter.id().to_string(),
        integration: route.id().to_owned(),
        method: parts.method.to_string(),
        path_and_query: path_and_query.to_owned(),
        // `Host` names the proxy; the upstream connection sets its own when the call is sent.
        headers: parts
            .headers
            .iter()
            .filter(|(k, _)| *k != http::header::HOST)
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
        units,
        created_ms: now_ms(),
    };
    match defer.deferrals.defer(call).await {
        Ok(id) => {
            let accepted = Accepted {
                id: id.to_string(),
                status: "pending",
                status_url: format!(
                    "{base}{STATUS_PATH}{id}.{}",
                    defer
                        .deferrals
                        .status_tag(route.org.meter.id().as_str(), route.id(), id)
                ),
                message: format!(
                    "callmeter: the call was limited ({}) and is stored; it will be sent when budget frees",
                    limited.budget.as_str()
                ),
            };
            Ok(json(StatusCode::ACCEPTED, &accepted))
        }
        Err(e) => {
            tracing::error!(error = %e, "storing a deferred call failed");
            let unavailable = json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "callmeter: the call was limited and could not be stored; it was not sent, send it again later",
                "SERVER_UNAVAILABLE",
            );
            Err((unavailable, Outcome::Rejected))
        }
    }
}

/// The id in a status path, if `path` is one.
pub fn status_id(path: &str) -> Option<&str> {
    path.strip_prefix(STATUS_PATH)
}

#[derive(Serialize)]
struct Status<'a> {
    id: String,
    state: &'a str,
    attempts: u32,
    created_ms: u64,
    updated_ms: u64,
    next_attempt_ms: u64,
    last_error: Option<&'a str>,
    upstream_status: Option<u16>,
    upstream_body: Option<String>,
}

/// `GET <base>/callmeter/deferred/{id}.{tag}`: the outcome of one of this integration's calls,
/// for the holder of its status URL (the tag, see `Deferrals::status_tag`) who also carries the
/// call's `Authorization`, if it had one. A URL without the tag (as handed out before tags)
/// still reads a call that had an `Authorization`, with it.
///
/// Only `GET` and `HEAD` read it; any other method is answered 405 before the store is looked
/// at (so it tells nothing about the id): a `DELETE` answered 200 with the status would read as
/// a cancelled call that goes on to be sent.
pub async fn status(
    defer: &DeferRoute,
    route: &Route,
    parts: &Parts,
    id: &str,
) -> Response<ResponseBody> {
    match parts.method {
        Method::GET => read_status(defer, route, parts, id).await,
        Method::HEAD => ResponseBody::head_only(read_status(defer, route, parts, id).await),
        _ => {
            let mut resp = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "callmeter: a deferred call's status URL only reads its outcome (GET or HEAD); \
                     {} does not cancel or change the call (the admin can discard it)",
                    parts.method
                ),
                "METHOD_NOT_ALLOWED",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            resp
        }
    }
}

async fn read_status(
    defer: &DeferRoute,
    route: &Route,
    parts: &Parts,
    id: &str,
) -> Response<ResponseBody> {
    let not_found = || {
        json_error(
            StatusCode::NOT_FOUND,
            "callmeter: no deferred call with this id for this integration",
            "NOT_FOUND",
        )
    };
    let (id, tag) = match id.split_once('.') {
        Some((id, tag)) => (id, Some(tag)),
        None => (id, None),
    };
    let Ok(id) = id.parse::<DeferredId>() else {
        return not_found();
    };
    let call = match defer.deferrals.get(id).await {
        Ok(Some(call)) => call,
        Ok(None) => return not_found(),
        Err(e) => {
            tracing::error!(error = %e, "reading a deferred call failed");
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "callmeter: the store cannot be read",
                "SERVER_UNAVAILABLE",
            );
        }
    };
    let same_integration =
        call.org == route.org.meter.id().as_str() && call.integration == route.id();
    let stored_auth = call
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.as_slice());
    let given_auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let tag_ok = match tag {
        Some(tag) => {
            let expected = defer
                .deferrals
                .status_tag(&call.org, &call.integration, call.id);
            constant_time_eq(tag.as_bytes(), expected.as_bytes())
        }
        // Without a tag, only the call's own credential opens it.
        None => stored_auth.is_some(),
    };
    let auth_ok =
        stored_auth.is_none_or(|stored| given_auth.is_some_and(|g| constant_time_eq(g, stored)));
    if !same_integration || !tag_ok || !auth_ok {
        return not_found();
    }
    let body = call
        .upstream_body
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    json(
        StatusCode::OK,
        &Status {
            id: call.id.to_string(),
            state: call.state.as_str(),
            attempts: call.attempts,
            created_ms: call.created_ms,
            updated_ms: call.updated_ms,
            next_attempt_ms: call.next_attempt_ms,
            last_error: call.last_error.as_deref(),
            upstream_status: call.upstream_status,
            upstream_body: body,
        },
    )
}

/// Compares secrets without an early exit, so timing does not reveal a matching prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value)
        .map(Bytes::from)
        .unwrap_or_default();
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abc", b"Bearer abd"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
    }

    #[test]
    fn status_paths_carry_the_id() {
        assert_eq!(status_id("/callmeter/deferred/42"), Some("42"));
        assert_eq!(status_id("/services/data/v62.0/sobjects"), None);
    }
}
