//! The admin listener: `/metrics` for Prometheus, health checks, and the JSON usage API.
//!
//! It listens apart from the proxy (default 127.0.0.1:9464) so that operators can firewall it
//! separately and so that scraping never competes with the integrations' traffic for a
//! connection slot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::meter::Meter;
use crate::metrics::Metrics;
use crate::proxy::ResponseBody;

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub meter: Arc<Meter>,
    /// False until every listener is bound, and again once shutdown starts.
    pub ready: AtomicBool,
    /// The status page, the threshold and history APIs.
    pub console: Arc<crate::console::Console>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        if crate::console::Console::serves(req.uri().path()) {
            return self.console.clone().handle(req).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is supported here\n",
            );
        }
        match req.uri().path() {
            "/metrics" => {
                self.metrics.update_usage(&self.meter.usage());
                let mut resp = text(StatusCode::OK, self.metrics.render());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if self.ready.load(Ordering::Relaxed) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            "/api/v1/usage" => json(StatusCode::OK, &self.meter.usage()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try / (status page), /metrics, /healthz, /readyz, /api/v1/usage, \
                 /api/v1/history or /api/v1/orgs/{org}/threshold\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut resp = Response::new(ResponseBody::full(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {e}\n"),
        ),
    }
}
