//! Bulk API answers: 2.0 (`/services/data/vXX.X/jobs/{ingest,query}/…`, JSON) and 1.0
//! (`/services/async/XX.X/job/…`, XML or JSON by the request's `Content-Type`).
//!
//! Both cost one call per HTTP request, whatever the request does, so the sim does not keep job
//! state: it answers each step of a job's life (create, upload, close, poll, results) with a
//! plausible document, and the uploads themselves are only counted, never kept.

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::error::SimError;
use super::rest::Ctx;
use super::util::{self, IdGen, Resp};
use super::{xml, ReadBody};

/// Bulk API 1.0's XML namespace.
const ASYNC_NS: &str = "http://www.force.com/2009/06/asyncapi/dataload";

const RESULTS_CSV: &str = "\"sf__Id\",\"sf__Created\",\"Name\"\n\"001000000000001AAA\",\"true\",\"Sim Account 1\"\n\"001000000000002AAA\",\"true\",\"Sim Account 2\"\n";
const QUERY_CSV: &str = "\"Id\",\"Name\"\n\"001000000000001AAA\",\"Sim Account 1\"\n\"001000000000002AAA\",\"Sim Account 2\"\n";

fn api_version(version: &str) -> Value {
    let number = version.trim_start_matches('v');
    number
        .parse::<f64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(number))
}

/// Bulk 2.0 job info.
fn job_v2(ctx: &Ctx<'_>, kind: &str, id: &str, fields: &Map<String, Value>, state: &str) -> Value {
    let text = |name: &str, default: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    let now = util::rest_timestamp();
    let mut job = json!({
        "id": id,
        "operation": text("operation", if kind == "query" { "query" } else { "insert" }),
        "object": text("object", "Account"),
        "createdById": util::user_id(),
        "createdDate": now,
        "systemModstamp": now,
        "state": state,
        "concurrencyMode": "Parallel",
        "contentType": text("contentType", "CSV"),
        "apiVersion": api_version(ctx.version),
        "lineEnding": text("lineEnding", "LF"),
        "columnDelimiter": text("columnDelimiter", "COMMA")
    });
    if kind == "ingest" {
        job["contentUrl"] = Value::from(format!(
            "services/data/{}/jobs/ingest/{id}/batches",
            ctx.version
        ));
    } else if let Some(query) = fields.get("query") {
        job["query"] = query.clone();
    }
    if state == "JobComplete" {
        job["numberRecordsProcessed"] = Value::from(2);
        job["numberRecordsFailed"] = Value::from(0);
    }
    job
}

/// `/jobs/{ingest,query}[/ID[/…]]`.
pub(super) fn v2(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    let (kind, rest) = match ctx.tail {
        ["jobs", kind @ ("ingest" | "query"), rest @ ..] => (*kind, rest),
        _ => return Err(SimError::NotFound),
    };
    let method = ctx.method;
    let get = method == Method::GET || method == Method::HEAD;
    let ok = |value: Value| Ok(util::json(StatusCode::OK, &value));
    match rest {
        [] if get => ok(json!({"done": true, "records": [], "nextRecordsUrl": null})),
        [] if method == Method::POST => {
            let fields = match serde_json::from_slice(ctx.body.bytes()?) {
                Ok(Value::Object(fields)) => fields,
                Ok(_) => return Err(SimError::Json("Expected a JSON object".into())),
                Err(err) => return Err(SimError::Json(err.to_string())),
            };
            let required: &[&str] = if kind == "query" {
                &["query"]
            } else {
                &["object", "operation"]
            };
            if let Some(missing) = required.iter().find(|name| !fields.contains_key(**name)) {
                return Err(SimError::Json(format!(
                    "Required field {missing} is missing"
                )));
            }
            let state = if kind == "query" {
                "UploadComplete"
            } else {
                "Open"
            };
            ok(job_v2(ctx, kind, &ctx.ids.id("750"), &fields, state))
        }
        [] => Err(SimError::method(method, "GET, HEAD, POST")),
        [id] if get => ok(job_v2(ctx, kind, id, &Map::new(), "JobComplete")),
        [id] if method == Method::PATCH => {
            let fields = match serde_json::from_slice(ctx.body.bytes()?) {
                Ok(Value::Object(fields)) => fields,
                Ok(_) => return Err(SimError::Json("Expected a JSON object".into())),
                Err(err) => return Err(SimError::Json(err.to_string())),
            };
            let state = fields
                .get("state")
                .and_then(Value::as_str)
                .ok_or_else(|| SimError::Json("Required field state is missing".into()))?
                .to_owned();
            ok(job_v2(ctx, kind, id, &fields, &state))
        }
        [_] if method == Method::DELETE => Ok(util::empty(StatusCode::NO_CONTENT)),
        [_] => Err(SimError::method(method, "GET, HEAD, PATCH, DELETE")),
        [_, "batches"] if kind == "ingest" && method == Method::PUT => {
            Ok(util::empty(StatusCode::CREATED))
        }
        [_, "batches"] if kind == "ingest" => Err(SimError::method(method, "PUT")),
        [_, "successfulResults" | "failedResults" | "unprocessedrecords"]
            if kind == "ingest" && get =>
        {
            Ok(util::respond(StatusCode::OK, util::CSV, RESULTS_CSV))
        }
        [_, "results"] if kind == "query" && get => {
            let mut resp = util::respond(StatusCode::OK, util::CSV, QUERY_CSV);
            let headers = resp.headers_mut();
            headers.insert("sforce-numberofrecords", HeaderValue::from(2));
            headers.insert("sforce-locator", HeaderValue::from_static("null"));
            Ok(resp)
        }
        [_, _] => Err(SimError::NotFound),
        _ => Err(SimError::NotFound),
    }
}

/// What a Bulk 1.0 handler needs from the request.
pub(super) struct V1<'a> {
    pub(super) method: &'a Method,
    /// `62.0`.
    pub(super) version: &'a str,
    /// The path after the version.
    pub(super) tail: &'a [&'a str],
    pub(super) headers: &'a HeaderMap,
    pub(super) body: &'a ReadBody,
    pub(super) ids: &'a IdGen,
}

impl V1<'_> {
    /// Bulk 1.0 speaks JSON to clients that send JSON, XML otherwise.
    fn json(&self) -> bool {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.to_ascii_lowercase().contains("json"))
    }

    /// `operation`, `object`, `state`… from the request body, XML or JSON.
    fn fields(&self) -> Result<Map<String, Value>, SimError> {
        let bytes = self.body.bytes()?;
        if self.json() {
            return match serde_json::from_slice(bytes) {
                Ok(Value::Object(fields)) => Ok(fields),
                Ok(_) => Err(SimError::Json("Expected a JSON object".into())),
                Err(err) => Err(SimError::Json(err.to_string())),
            };
        }
        let text =
            std::str::from_utf8(bytes).map_err(|_| SimError::Soap("Invalid UTF-8".into()))?;
        let tags = xml::scan(text).map_err(SimError::Soap)?;
        Ok(tags
            .iter()
            .filter(|tag| tag.depth == 1)
            .map(|tag| (tag.local.to_owned(), Value::from(xml::text(text, tag))))
            .collect())
    }

    /// A Bulk 1.0 document: `<root xmlns=…>` with one element per field, or a JSON object.
    fn document(&self, status: StatusCode, root: &str, fields: &[(&str, Value)]) -> Resp {
        if self.json() {
            let map: Map<String, Value> = fields
                .iter()
                .map(|(name, value)| ((*name).to_owned(), value.clone()))
                .collect();
            return util::json(status, &Value::Object(map));
        }
        util::respond(status, util::XML, xml_document(root, fields))
    }

    fn job(&self, status: StatusCode, id: &str, given: &Map<String, Value>, state: &str) -> Resp {
        let text = |name: &str, default: &str| {
            Value::from(
                given
                    .get(name)
                    .and_then(Value::as_str)
                    .filter(|value| !value.is_empty())
                    .unwrap_or(default),
            )
        };
        let now = Value::from(util::xml_timestamp());
        let zero = Value::from(0);
        self.document(
            status,
            "jobInfo",
            &[
                ("id", Value::from(id)),
                ("operation", text("operation", "insert")),
                ("object", text("object", "Account")),
                ("createdById", Value::from(util::user_id())),
                ("createdDate", now.clone()),
                ("systemModstamp", now),
                ("state", Value::from(state)),
                ("concurrencyMode", text("concurrencyMode", "Parallel")),
                ("contentType", text("contentType", "CSV")),
                ("numberBatchesQueued", zero.clone()),
                ("numberBatchesInProgress", zero.clone()),
                ("numberBatchesCompleted", zero.clone()),
                ("numberBatchesFailed", zero.clone()),
                ("numberBatchesTotal", zero.clone()),
                ("numberRecordsProcessed", zero.clone()),
                ("numberRetries", zero.clone()),
                ("apiVersion", api_version(self.version)),
                ("numberRecordsFailed", zero.clone()),
                ("totalProcessingTime", zero.clone()),
                ("apiActiveProcessingTime", zero.clone()),
                ("apexProcessingTime", zero),
            ],
        )
    }

    fn batch_fields(job: &str, id: &str, state: &str) -> Vec<(&'static str, Value)> {
        let now = Value::from(util::xml_timestamp());
        let processed = if state == "Completed" { 2 } else { 0 };
        vec![
            ("id", Value::from(id)),
            ("jobId", Value::from(job)),
            ("state", Value::from(state)),
            ("createdDate", now.clone()),
            ("systemModstamp", now),
            ("numberRecordsProcessed", Value::from(processed)),
            ("numberRecordsFailed", Value::from(0)),
            ("totalProcessingTime", Value::from(0)),
            ("apiActiveProcessingTime", Value::from(0)),
            ("apexProcessingTime", Value::from(0)),
        ]
    }

    /// Bulk 1.0's error document, `<error><exceptionCode>…` or its JSON twin.
    fn error(&self, err: &SimError) -> Resp {
        let code = match err {
            SimError::NotFound | SimError::Method { .. } => "InvalidUrl",
            SimError::Json(_) | SimError::Soap(_) | SimError::TooLarge => "InvalidJob",
            _ => "ClientInputError",
        };
        self.document(
            err.status(),
            "error",
            &[
                ("exceptionCode", Value::from(code)),
                ("exceptionMessage", Value::from(err.to_string())),
            ],
        )
    }
}

/// `<?xml…?><root xmlns="…asyncapi/dataload"><name>value</name>…</root>`.
fn xml_document(root: &str, fields: &[(&str, Value)]) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{ASYNC_NS}">{}</{root}>"#,
        xml_fields(fields)
    )
}

/// `<name>value</name>` per field, values escaped.
fn xml_fields(fields: &[(&str, Value)]) -> String {
    let mut out = String::new();
    for (name, value) in fields {
        let text = match value {
            Value::String(text) => util::xml_escape(text),
            other => util::xml_escape(&other.to_string()),
        };
        out.push_str(&format!("<{name}>{text}</{name}>"));
    }
    out
}

/// `/services/async/XX.X/job[/ID[/batch[/BID[/request|/result[/RID]]]]]`.
pub(super) fn v1(ctx: &V1<'_>) -> Resp {
    v1_inner(ctx).unwrap_or_else(|err| ctx.error(&err))
}

fn v1_inner(ctx: &V1<'_>) -> Result<Resp, SimError> {
    let method = ctx.method;
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match ctx.tail {
        ["job"] if post => {
            let fields = ctx.fields()?;
            Ok(ctx.job(StatusCode::CREATED, &ctx.ids.id("750"), &fields, "Open"))
        }
        ["job"] => Err(SimError::method(method, "POST")),
        ["job", id] if get => Ok(ctx.job(StatusCode::OK, id, &Map::new(), "Closed")),
        ["job", id] if post => {
            let fields = ctx.fields()?;
            let state = fields
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("Closed")
                .to_owned();
            Ok(ctx.job(StatusCode::OK, id, &fields, &state))
        }
        ["job", _] => Err(SimError::method(method, "GET, HEAD, POST")),
        ["job", job, "batch"] if post => {
            let fields = V1::batch_fields(job, &ctx.ids.id("751"), "Queued");
            Ok(ctx.document(StatusCode::CREATED, "batchInfo", &fields))
        }
        ["job", job, "batch"] if get => {
            let batch = V1::batch_fields(job, &util::record_id("751", 1), "Completed");
            if ctx.json() {
                let map: Map<String, Value> = batch
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value))
                    .collect();
                return Ok(util::json(StatusCode::OK, &json!({"batchInfo": [map]})));
            }
            let body = format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><batchInfoList xmlns="{ASYNC_NS}"><batchInfo>{}</batchInfo></batchInfoList>"#,
                xml_fields(&batch)
            );
            Ok(util::respond(StatusCode::OK, util::XML, body))
        }
        ["job", _, "batch"] => Err(SimError::method(method, "GET, HEAD, POST")),
        ["job", job, "batch", id] if get => Ok(ctx.document(
            StatusCode::OK,
            "batchInfo",
            &V1::batch_fields(job, id, "Completed"),
        )),
        ["job", _, "batch", _, "request"] if get => {
            Ok(util::respond(StatusCode::OK, util::CSV, QUERY_CSV))
        }
        ["job", _, "batch", _, "result"] if get => {
            let result = util::record_id("752", 1);
            if ctx.json() {
                return Ok(util::json(StatusCode::OK, &json!([result])));
            }
            let body = format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><result-list xmlns="{ASYNC_NS}"><result>{result}</result></result-list>"#
            );
            Ok(util::respond(StatusCode::OK, util::XML, body))
        }
        ["job", _, "batch", _, "result", _] if get => {
            Ok(util::respond(StatusCode::OK, util::CSV, RESULTS_CSV))
        }
        ["job", _, "batch", ..] => Err(SimError::method(method, "GET, HEAD")),
        _ => Err(SimError::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_documents_escape_their_values() {
        let doc = xml_document(
            "jobInfo",
            &[("object", Value::from("A<B")), ("n", Value::from(2))],
        );
        assert_eq!(
            doc,
            format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><jobInfo xmlns="{ASYNC_NS}"><object>A&lt;B</object><n>2</n></jobInfo>"#
            )
        );
    }
}
