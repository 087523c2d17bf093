//! OAuth 2.0 (`/services/oauth2/token`, `revoke`, `userinfo`) and the identity URL
//! (`/id/ORGID/USERID`). None of these count against the daily limit.
//!
//! The token answer is where a client learns its instance URL, so `instance_url` is the base the
//! client used to reach the sim (its `Host`), which is what lets the proxy's rewriting be tested.
//! Any credentials are accepted. Errors use OAuth's own shape,
//! `{"error": "…", "error_description": "…"}`, as Salesforce's token endpoint does.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::route::OAuthOp;
use super::util::{self, IdGen, Resp};
use super::ReadBody;

/// What the OAuth handlers need from the request.
pub(super) struct Ctx<'a> {
    pub(super) method: &'a Method,
    pub(super) query: Option<&'a str>,
    pub(super) body: &'a ReadBody,
    /// `http://HOST`: how the client reached the sim.
    pub(super) base: &'a str,
    pub(super) org_id: &'a str,
    pub(super) ids: &'a IdGen,
}

pub(super) fn handle(op: OAuthOp, ctx: &Ctx<'_>) -> Resp {
    match op {
        OAuthOp::Token => token(ctx),
        // Revoking always succeeds: there is nothing to revoke.
        OAuthOp::Revoke => util::empty(StatusCode::OK),
        OAuthOp::UserInfo => util::json(
            StatusCode::OK,
            &identity_body(ctx.base, ctx.org_id, &util::user_id()),
        ),
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Resp {
    util::json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// `POST /services/oauth2/token` with a form body.
fn token(ctx: &Ctx<'_>) -> Resp {
    if ctx.method != Method::POST {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "must use HTTP POST",
        );
    }
    let Some(bytes) = ctx.body.data.as_deref() else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "request body too large",
        );
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body is not UTF-8",
        );
    };
    // Parameters may come in the body (the norm) or the query string (some old clients).
    let params = match (
        util::parse_form(text),
        util::parse_form(ctx.query.unwrap_or("")),
    ) {
        (Ok(mut body), Ok(query)) => {
            body.extend(query);
            body
        }
        (Err(err), _) | (_, Err(err)) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &err)
        }
    };
    let grant_type = params
        .iter()
        .find(|(key, _)| key == "grant_type")
        .map(|(_, value)| value.as_str());
    let with_refresh_token = match grant_type {
        Some("password" | "authorization_code") => true,
        Some(
            "refresh_token"
            | "client_credentials"
            | "urn:ietf:params:oauth:grant-type:jwt-bearer"
            | "urn:ietf:params:oauth:grant-type:saml2-bearer",
        ) => false,
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant type not supported",
            )
        }
    };
    let user_id = util::user_id();
    let mut answer = json!({
        "access_token": ctx.ids.session(ctx.org_id),
        "instance_url": ctx.base,
        "id": format!("{}/id/{}/{user_id}", ctx.base, ctx.org_id),
        "token_type": "Bearer",
        "issued_at": util::epoch_millis().to_string(),
        "signature": ctx.ids.signature()
    });
    if with_refresh_token {
        answer["refresh_token"] = Value::from(format!("5Aep861{}", ctx.ids.token(80)));
        answer["scope"] = Value::from("api refresh_token");
    }
    util::json(StatusCode::OK, &answer)
}

/// `GET /id/ORGID/USERID`: who the token belongs to and where its APIs are.
pub(super) fn identity(method: &Method, base: &str, org: &str, user: &str) -> Resp {
    if method != Method::GET && method != Method::HEAD {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "must use HTTP GET",
        );
    }
    util::json(StatusCode::OK, &identity_body(base, org, user))
}

fn identity_body(base: &str, org: &str, user: &str) -> Value {
    // Salesforce leaves `{version}` in these URLs for the client to fill in.
    let org15: String = org.chars().take(15).collect();
    json!({
        "id": format!("{base}/id/{org}/{user}"),
        "asserted_user": true,
        "user_id": user,
        "organization_id": org,
        "username": "sim.user@example.com",
        "display_name": "Sim User",
        "active": true,
        "user_type": "STANDARD",
        "urls": {
            "enterprise": format!("{base}/services/Soap/c/{{version}}/{org15}"),
            "partner": format!("{base}/services/Soap/u/{{version}}/{org15}"),
            "metadata": format!("{base}/services/Soap/m/{{version}}/{org15}"),
            "rest": format!("{base}/services/data/v{{version}}/"),
            "sobjects": format!("{base}/services/data/v{{version}}/sobjects/"),
            "query": format!("{base}/services/data/v{{version}}/query/"),
            "limits": format!("{base}/services/data/v{{version}}/limits"),
            "profile": format!("{base}/{user}")
        }
    })
}
