//! The REST family's answers: the versions list, `/services/data/vXX.X/…` (resources, sObjects,
//! query, search, limits, Composite, Composite Batch, sObject Tree, sObject Collections, Bulk API
//! 2.0 via `bulk`) and Apex REST.
//!
//! The bodies are small and canned but shaped like Salesforce's, so a client library (or the
//! proxy) parses them as it would the real ones. Nothing is stored: a created record is not
//! found again. Metering happens before any of this runs (see `SimServer::metered_rest`); only
//! Composite Batch needs its body read first, by [`batch_requests`].

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::error::SimError;
use super::meter::{Api, Usage};
use super::util::{self, IdGen, Resp};
use super::{bulk, ReadBody};

/// API versions the sim claims, oldest first as Salesforce lists them.
const VERSIONS: [(&str, &str); 7] = [
    ("Summer '23", "58.0"),
    ("Winter '24", "59.0"),
    ("Spring '24", "60.0"),
    ("Summer '24", "61.0"),
    ("Winter '25", "62.0"),
    ("Spring '25", "63.0"),
    ("Summer '25", "64.0"),
];

/// Top-level REST resources the sim answers generically (`{}` to a GET): real Salesforce
/// resources whose bodies no test looks into. Any other name under a version is a 404, which
/// Salesforce still counts, as the request reached the API.
const GENERIC: [&str; 24] = [
    "tooling",
    "ui-api",
    "connect",
    "chatter",
    "actions",
    "analytics",
    "recent",
    "process",
    "quickActions",
    "support",
    "tabs",
    "theme",
    "appMenu",
    "async-queries",
    "consent",
    "event",
    "knowledgeManagement",
    "licensing",
    "localizedvalue",
    "metadata",
    "scheduling",
    "wave",
    "graphql",
    "compactLayouts",
];

/// `GET /services/data/`: free, and the only REST answer without `Sforce-Limit-Info`.
pub(super) fn versions(method: &Method) -> Resp {
    if !is_get(method) {
        return SimError::method(method, "GET, HEAD").to_rest();
    }
    let list: Vec<Value> = VERSIONS
        .iter()
        .map(|(label, version)| {
            json!({"label": label, "url": format!("/services/data/v{version}"), "version": version})
        })
        .collect();
    util::json(StatusCode::OK, &Value::Array(list))
}

/// What a REST handler needs from the request.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) method: &'a Method,
    /// The version segment as sent, e.g. `v62.0`.
    pub(super) version: &'a str,
    /// The path after the version.
    pub(super) tail: &'a [&'a str],
    pub(super) query: Option<&'a str>,
    pub(super) body: &'a ReadBody,
    pub(super) ids: &'a IdGen,
}

impl Ctx<'_> {
    fn url(&self, rest: &str) -> String {
        format!("/services/data/{}/{rest}", self.version)
    }

    /// The body as a JSON value; Salesforce answers an unreadable one with `JSON_PARSER_ERROR`.
    fn json_body(&self) -> Result<Value, SimError> {
        let bytes = self.body.bytes()?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(SimError::Json(
                "No content to map due to end-of-input".into(),
            ));
        }
        serde_json::from_slice(bytes).map_err(|err| SimError::Json(err.to_string()))
    }

    fn json_object(&self) -> Result<Map<String, Value>, SimError> {
        match self.json_body()? {
            Value::Object(map) => Ok(map),
            _ => Err(SimError::Json("Expected a JSON object".into())),
        }
    }

    fn param(&self, name: &str) -> Result<Option<String>, SimError> {
        util::query_param(self.query, name).map_err(SimError::Query)
    }
}

/// The REST resource a request addresses, which decides its API family and its cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// `/vXX.X`: the resources of a version.
    Resources,
    Limits,
    Composite,
    /// `/composite/batch`: the one request that costs a call per subrequest.
    Batch,
    Tree,
    Collections,
    /// `/composite/graph` and unknown composite resources.
    CompositeOther,
    /// `/jobs/…`: Bulk API 2.0.
    Jobs,
    SObjects,
    Query,
    Search,
    Generic,
    Unknown,
}

impl Kind {
    pub(super) fn of(tail: &[&str]) -> Kind {
        match tail {
            [] => Kind::Resources,
            ["limits"] => Kind::Limits,
            ["composite"] => Kind::Composite,
            // The Tooling API's Composite Batch runs and counts its subrequests the same way.
            ["composite", "batch"] | ["tooling", "composite", "batch"] => Kind::Batch,
            ["composite", "tree", ..] => Kind::Tree,
            ["composite", "sobjects", ..] => Kind::Collections,
            ["composite", ..] => Kind::CompositeOther,
            ["jobs", ..] => Kind::Jobs,
            ["sobjects", ..] => Kind::SObjects,
            ["query" | "queryAll", ..] => Kind::Query,
            ["search" | "parameterizedSearch", ..] => Kind::Search,
            ["limits", ..] => Kind::Generic, // e.g. limits/recordCount: an ordinary call
            [name, ..] if GENERIC.contains(name) => Kind::Generic,
            _ => Kind::Unknown,
        }
    }

    pub(super) fn api(self) -> Api {
        match self {
            Kind::Composite
            | Kind::Batch
            | Kind::Tree
            | Kind::Collections
            | Kind::CompositeOther => Api::Composite,
            Kind::Jobs => Api::Bulk,
            Kind::Resources
            | Kind::Limits
            | Kind::SObjects
            | Kind::Query
            | Kind::Search
            | Kind::Generic
            | Kind::Unknown => Api::Rest,
        }
    }
}

/// The most subrequests Salesforce runs in one Composite Batch.
const BATCH_MAX: usize = 25;

/// The subrequests of a Composite Batch body, which is what Salesforce counts. Anything but a
/// JSON object with a non-empty `batchRequests` array of at most `BATCH_MAX` entries is
/// refused whole (and costs one call).
pub(super) fn batch_requests(body: &ReadBody) -> Result<Vec<Value>, SimError> {
    let bytes = body.bytes()?;
    let value: Value =
        serde_json::from_slice(bytes).map_err(|err| SimError::Json(err.to_string()))?;
    match value.get("batchRequests") {
        Some(Value::Array(requests)) if requests.len() > BATCH_MAX => Err(SimError::Json(format!(
            "A batch can have at most {BATCH_MAX} subrequests"
        ))),
        Some(Value::Array(requests)) if !requests.is_empty() => Ok(requests.clone()),
        Some(Value::Array(_)) => Err(SimError::Json("batchRequests must not be empty".into())),
        Some(_) => Err(SimError::Json("batchRequests must be an array".into())),
        None => Err(SimError::Json(
            "Required field batchRequests is missing".into(),
        )),
    }
}

/// The answer to a counted REST request. `batch` is Composite Batch's parsed body (POST only).
pub(super) fn respond(
    ctx: &Ctx<'_>,
    kind: Kind,
    batch: Option<Result<Vec<Value>, SimError>>,
    usage: Usage,
) -> Resp {
    let result = match kind {
        Kind::Resources => resources(ctx),
        Kind::Limits => limits(ctx, usage),
        Kind::Composite => composite(ctx),
        Kind::Batch => match batch {
            Some(requests) => requests.and_then(|requests| composite_batch(ctx, &requests)),
            None => Err(SimError::method(ctx.method, "POST")),
        },
        Kind::Tree => tree(ctx),
        Kind::Collections => collections(ctx),
        Kind::CompositeOther => composite_other(ctx),
        Kind::Jobs => bulk::v2(ctx),
        Kind::SObjects => sobjects(ctx, &ctx.tail[1..]),
        Kind::Query => query(ctx),
        Kind::Search => search(ctx),
        Kind::Generic => generic(ctx),
        Kind::Unknown => Err(SimError::NotFound),
    };
    result.unwrap_or_else(|err| err.to_rest())
}

fn is_get(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn ok(value: Value) -> Result<Resp, SimError> {
    Ok(util::json(StatusCode::OK, &value))
}

fn resources(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    if !is_get(ctx.method) {
        return Err(SimError::method(ctx.method, "GET, HEAD"));
    }
    let names = [
        "sobjects",
        "query",
        "queryAll",
        "search",
        "limits",
        "composite",
        "jobs",
        "tooling",
        "ui-api",
        "connect",
    ];
    let map: Map<String, Value> = names
        .iter()
        .map(|name| ((*name).to_owned(), Value::from(ctx.url(name))))
        .collect();
    ok(Value::Object(map))
}

/// `/limits`: the daily allocation as `Max`/`Remaining`, plus a few other limits and a
/// connected-app entry, since clients must tolerate keys besides `Max` and `Remaining`.
fn limits(ctx: &Ctx<'_>, usage: Usage) -> Result<Resp, SimError> {
    if !is_get(ctx.method) {
        return Err(SimError::method(ctx.method, "GET, HEAD"));
    }
    let remaining = usage.limit.saturating_sub(usage.used);
    ok(json!({
        "ConcurrentAsyncGetReportInstances": {"Max": 200, "Remaining": 200},
        "DailyApiRequests": {
            "Max": usage.limit,
            "Remaining": remaining,
            "Sim Connected App": {"Max": 0, "Remaining": 0}
        },
        "DailyAsyncApexExecutions": {"Max": 250_000, "Remaining": 250_000},
        "DailyBulkApiBatches": {"Max": 15_000, "Remaining": 15_000},
        "DailyBulkV2QueryJobs": {"Max": 10_000, "Remaining": 10_000},
        "DataStorageMB": {"Max": 5, "Remaining": 5},
        "FileStorageMB": {"Max": 20, "Remaining": 20},
        "SingleEmail": {"Max": 15, "Remaining": 15}
    }))
}

/// A canned record of `sobject`, number `n`.
fn record(ctx: &Ctx<'_>, sobject: &str, id: &str, n: u64) -> Value {
    json!({
        "attributes": {"type": sobject, "url": ctx.url(&format!("sobjects/{sobject}/{id}"))},
        "Id": id,
        "Name": format!("Sim {sobject} {n}")
    })
}

/// A two-record query result.
fn query_result(ctx: &Ctx<'_>, sobject: &str) -> Value {
    let prefix = util::key_prefix(sobject);
    let records: Vec<Value> = (1..=2)
        .map(|n| record(ctx, sobject, &util::record_id(prefix, n), n))
        .collect();
    json!({"totalSize": records.len(), "done": true, "records": records})
}

fn created(id: &str) -> Value {
    json!({"id": id, "success": true, "errors": []})
}

/// `/sobjects/…`; `rest` is the path after `sobjects`.
fn sobjects(ctx: &Ctx<'_>, rest: &[&str]) -> Result<Resp, SimError> {
    let method = ctx.method;
    match rest {
        [] if is_get(method) => {
            let list: Vec<Value> = ["Account", "Contact", "Lead", "Opportunity", "Case"]
                .iter()
                .map(|name| {
                    json!({
                        "name": name,
                        "label": name,
                        "keyPrefix": util::key_prefix(name),
                        "createable": true,
                        "queryable": true,
                        "urls": {"sobject": ctx.url(&format!("sobjects/{name}"))}
                    })
                })
                .collect();
            ok(json!({"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": list}))
        }
        [] => Err(SimError::method(method, "GET, HEAD")),
        [sobject] if is_get(method) => ok(json!({
            "objectDescribe": {
                "name": sobject,
                "label": sobject,
                "keyPrefix": util::key_prefix(sobject),
                "urls": {"sobject": ctx.url(&format!("sobjects/{sobject}"))}
            },
            "recentItems": []
        })),
        [sobject] if method == Method::POST => {
            ctx.json_object()?;
            let id = ctx.ids.id(util::key_prefix(sobject));
            Ok(util::json(StatusCode::CREATED, &created(&id)))
        }
        [_] => Err(SimError::method(method, "GET, HEAD, POST")),
        [sobject, "describe"] if is_get(method) => ok(json!({
            "name": sobject,
            "label": sobject,
            "keyPrefix": util::key_prefix(sobject),
            "fields": [
                {"name": "Id", "type": "id", "label": format!("{sobject} ID")},
                {"name": "Name", "type": "string", "label": "Name"}
            ]
        })),
        [_, "describe"] => Err(SimError::method(method, "GET, HEAD")),
        [sobject, id] if is_get(method) => ok(record(ctx, sobject, id, 1)),
        [_, _] if method == Method::PATCH => {
            ctx.json_object()?;
            Ok(util::empty(StatusCode::NO_CONTENT))
        }
        [_, _] if method == Method::DELETE => Ok(util::empty(StatusCode::NO_CONTENT)),
        [_, _] => Err(SimError::method(method, "GET, HEAD, PATCH, DELETE")),
        // Upsert (and read) by external id: sobjects/Account/Ext_Id__c/42.
        [sobject, _, _] if method == Method::PATCH => {
            ctx.json_object()?;
            let id = ctx.ids.id(util::key_prefix(sobject));
            let mut answer = created(&id);
            answer["created"] = Value::Bool(true);
            Ok(util::json(StatusCode::CREATED, &answer))
        }
        [sobject, _, _] if is_get(method) => {
            let id = util::record_id(util::key_prefix(sobject), 1);
            ok(record(ctx, sobject, &id, 1))
        }
        [_, _, _] if method == Method::DELETE => Ok(util::empty(StatusCode::NO_CONTENT)),
        [_, _, _] => Err(SimError::method(method, "GET, HEAD, PATCH, DELETE")),
        // Relationships and other deeper paths: a record set of the parent's type.
        [sobject, ..] if is_get(method) => ok(query_result(ctx, sobject)),
        _ => Err(SimError::method(method, "GET, HEAD")),
    }
}

/// `/query?q=…`, `/queryAll?q=…` and the next-page locator `/query/01g…-2000`.
fn query(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    if !is_get(ctx.method) {
        return Err(SimError::method(ctx.method, "GET, HEAD"));
    }
    if ctx.tail.len() > 1 {
        return ok(query_result(ctx, "Account"));
    }
    let q = ctx
        .param("q")?
        .ok_or_else(|| SimError::Query("A query string has to be specified".into()))?;
    let sobject = util::soql_object(&q)
        .ok_or_else(|| SimError::Query(format!("unexpected token: no FROM in {q:?}")))?;
    ok(query_result(ctx, sobject))
}

fn search(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    if ctx.method == Method::POST || is_get(ctx.method) {
        ok(json!({"searchRecords": []}))
    } else {
        Err(SimError::method(ctx.method, "GET, HEAD, POST"))
    }
}

/// Resources the sim does not model. Tooling's query and sObjects reuse the REST shapes.
fn generic(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    match ctx.tail {
        ["tooling", "query" | "queryAll", ..] => {
            let sub = Ctx {
                tail: &ctx.tail[1..],
                ..*ctx
            };
            return query(&sub);
        }
        ["tooling", "sobjects", rest @ ..] => return sobjects(ctx, rest),
        _ => {}
    }
    let method = ctx.method;
    if is_get(method) {
        ok(json!({}))
    } else if method == Method::POST {
        Ok(util::json(
            StatusCode::CREATED,
            &created(&ctx.ids.id("a00")),
        ))
    } else if method == Method::PATCH || method == Method::PUT || method == Method::DELETE {
        Ok(util::empty(StatusCode::NO_CONTENT))
    } else {
        Err(SimError::method(
            method,
            "GET, HEAD, POST, PATCH, PUT, DELETE",
        ))
    }
}

/// The object type a subrequest URL addresses: the segment after `sobjects/`.
fn url_sobject(url: &str) -> &str {
    let path = url.split('?').next().unwrap_or(url);
    let mut segments = path.split('/');
    segments
        .by_ref()
        .find(|segment| *segment == "sobjects")
        .and_then(|_| segments.next())
        .filter(|sobject| !sobject.is_empty())
        .unwrap_or("Account")
}

/// What a subrequest of Composite or Composite Batch answers: status and body.
fn subresponse(ctx: &Ctx<'_>, method: &str, url: &str) -> (u16, Value) {
    let sobject = url_sobject(url);
    match method.to_ascii_uppercase().as_str() {
        "GET" if url.contains("/query") => (200, query_result(ctx, "Account")),
        "GET" => {
            let id = util::record_id(util::key_prefix(sobject), 1);
            (200, record(ctx, sobject, &id, 1))
        }
        "POST" => (201, created(&ctx.ids.id(util::key_prefix(sobject)))),
        "PATCH" | "PUT" | "DELETE" => (204, Value::Null),
        other => (
            405,
            json!([{
                "message": format!("HTTP Method '{other}' not allowed"),
                "errorCode": "METHOD_NOT_ALLOWED"
            }]),
        ),
    }
}

/// `/composite`: one call for up to 25 subrequests, answered one `compositeResponse` each.
fn composite(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    if ctx.method != Method::POST {
        return Err(SimError::method(ctx.method, "POST"));
    }
    let body = ctx.json_object()?;
    let requests = match body.get("compositeRequest") {
        Some(Value::Array(requests)) if !requests.is_empty() => requests,
        _ => {
            return Err(SimError::Json(
                "compositeRequest must be a non-empty array".into(),
            ))
        }
    };
    let mut responses = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        let field = |name: &str| request.get(name).and_then(Value::as_str);
        let (Some(method), Some(url), Some(reference)) =
            (field("method"), field("url"), field("referenceId"))
        else {
            return Err(SimError::Json(format!(
                "compositeRequest[{i}] needs string fields method, url and referenceId"
            )));
        };
        let (status, body) = subresponse(ctx, method, url);
        let mut headers = Map::new();
        if status == 201 {
            if let Some(id) = body.get("id").and_then(Value::as_str) {
                let location = ctx.url(&format!("sobjects/{}/{id}", url_sobject(url)));
                headers.insert("Location".into(), Value::from(location));
            }
        }
        responses.push(json!({
            "body": body,
            "httpHeaders": headers,
            "httpStatusCode": status,
            "referenceId": reference
        }));
    }
    ok(json!({"compositeResponse": responses}))
}

/// `/composite/batch`: already counted per subrequest; a subrequest without `method` and `url`
/// fails alone, as Salesforce reports per-subrequest errors in `results`.
fn composite_batch(ctx: &Ctx<'_>, requests: &[Value]) -> Result<Resp, SimError> {
    let mut has_errors = false;
    let results: Vec<Value> = requests
        .iter()
        .map(|request| {
            let method = request.get("method").and_then(Value::as_str);
            let url = request.get("url").and_then(Value::as_str);
            let (status, result) = match (method, url) {
                (Some(method), Some(url)) => subresponse(ctx, method, url),
                _ => (
                    400,
                    json!([{
                        "message": "A subrequest needs method and url",
                        "errorCode": "JSON_PARSER_ERROR"
                    }]),
                ),
            };
            has_errors |= status >= 400;
            json!({"statusCode": status, "result": result})
        })
        .collect();
    ok(json!({"hasErrors": has_errors, "results": results}))
}

/// The non-empty `records` array of a Tree or Collections body.
fn records(ctx: &Ctx<'_>) -> Result<Vec<Value>, SimError> {
    match ctx.json_object()?.remove("records") {
        Some(Value::Array(records)) if !records.is_empty() => Ok(records),
        _ => Err(SimError::Json("records must be a non-empty array".into())),
    }
}

/// `/composite/tree/{SObject}`: creates record trees in one call.
fn tree(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    let sobject = match ctx.tail {
        [_, _, sobject] => *sobject,
        _ => return Err(SimError::NotFound),
    };
    if ctx.method != Method::POST {
        return Err(SimError::method(ctx.method, "POST"));
    }
    let prefix = util::key_prefix(sobject);
    let results: Vec<Value> = records(ctx)?
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let reference = record
                .pointer("/attributes/referenceId")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("ref{}", i + 1));
            json!({"referenceId": reference, "id": ctx.ids.id(prefix)})
        })
        .collect();
    Ok(util::json(
        StatusCode::CREATED,
        &json!({"hasErrors": false, "results": results}),
    ))
}

/// `/composite/sobjects[/{SObject}[/{ExternalIdField}]]`: up to 200 records in one call.
fn collections(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    let method = ctx.method;
    let saved = |ids: Vec<String>| -> Value { ids.iter().map(|id| created(id)).collect() };
    match &ctx.tail[2..] {
        [] if method == Method::POST => {
            let ids = records(ctx)?
                .iter()
                .map(|record| {
                    let sobject = record
                        .pointer("/attributes/type")
                        .and_then(Value::as_str)
                        .unwrap_or("Account");
                    ctx.ids.id(util::key_prefix(sobject))
                })
                .collect();
            ok(saved(ids))
        }
        [] if method == Method::PATCH => {
            let ids = records(ctx)?
                .iter()
                .map(|record| {
                    record
                        .get("id")
                        .or_else(|| record.get("Id"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| ctx.ids.id("001"))
                })
                .collect();
            ok(saved(ids))
        }
        [] if method == Method::DELETE => {
            let ids = ctx
                .param("ids")?
                .ok_or_else(|| SimError::BadParam("ids is required".into()))?;
            ok(saved(ids.split(',').map(str::to_owned).collect()))
        }
        [] => Err(SimError::method(method, "POST, PATCH, DELETE")),
        [sobject] if is_get(method) || method == Method::POST => {
            let ids: Vec<String> = if method == Method::POST {
                match ctx.json_object()?.remove("ids") {
                    Some(Value::Array(ids)) => ids
                        .iter()
                        .filter_map(|id| id.as_str().map(str::to_owned))
                        .collect(),
                    _ => return Err(SimError::Json("ids must be an array".into())),
                }
            } else {
                ctx.param("ids")?
                    .unwrap_or_default()
                    .split(',')
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            let list: Vec<Value> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| record(ctx, sobject, id, i as u64 + 1))
                .collect();
            ok(Value::Array(list))
        }
        [_] => Err(SimError::method(method, "GET, HEAD, POST")),
        [sobject, _] if method == Method::PATCH => {
            let prefix = util::key_prefix(sobject);
            let list: Vec<Value> = records(ctx)?
                .iter()
                .map(|_| {
                    let mut answer = created(&ctx.ids.id(prefix));
                    answer["created"] = Value::Bool(true);
                    answer
                })
                .collect();
            ok(Value::Array(list))
        }
        [_, _] => Err(SimError::method(method, "PATCH")),
        _ => Err(SimError::NotFound),
    }
}

/// `/composite/graph` (answered empty); any other composite resource does not exist.
fn composite_other(ctx: &Ctx<'_>) -> Result<Resp, SimError> {
    match ctx.tail {
        ["composite", "graph"] if ctx.method == Method::POST => ok(json!({"graphs": []})),
        ["composite", "graph"] => Err(SimError::method(ctx.method, "POST")),
        _ => Err(SimError::NotFound),
    }
}

/// Apex REST: echoes what it was sent, so tests can check the request arrived intact. The body
/// is echoed as JSON when it is JSON, else as text, else (binary or too large) only its size.
pub(super) fn apex(method: &Method, path: &str, query: Option<&str>, body: &ReadBody) -> Resp {
    let echoed = match body.data.as_deref() {
        None | Some([]) => Value::Null,
        Some(bytes) => serde_json::from_slice(bytes).unwrap_or_else(|_| {
            std::str::from_utf8(bytes)
                .map(Value::from)
                .unwrap_or(Value::Null)
        }),
    };
    util::json(
        StatusCode::OK,
        &json!({
            "method": method.as_str(),
            "path": path,
            "query": query,
            "bodyBytes": body.len,
            "body": echoed
        }),
    )
}
