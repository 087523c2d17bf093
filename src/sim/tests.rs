//! End-to-end tests of the simulator over real sockets on `127.0.0.1:0`: one test per metering
//! rule of `salesforce-metering.md` (what counts, how much, what the limit answers, how usage is
//! reported), plus the transport (chunked uploads, h2c, hostile input) and the test hooks.
//! Window expiry and delays run on Tokio's paused clock, so no test sleeps for real.

use super::*;

use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const ORG: &str = "00D000000000001AAA";
const V: &str = "/services/data/v62.0";

struct Sim {
    handle: SimHandle,
    client: HttpClient,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    version: http::Version,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.body))
    }

    /// The `Sforce-Limit-Info` header, if any.
    fn usage(&self) -> Option<&str> {
        self.headers
            .get("sforce-limit-info")
            .map(|value| value.to_str().unwrap())
    }

    fn body_bytes(&self) -> u64 {
        self.headers["x-sim-body-bytes"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

async fn start(opts: SimOptions) -> Sim {
    let handle = spawn(opts).await.expect("sim starts");
    let client = Client::builder(TokioExecutor::new()).build_http();
    Sim { handle, client }
}

fn opts(limit: u64, used: u64) -> SimOptions {
    SimOptions {
        limit,
        used,
        ..SimOptions::default()
    }
}

impl Sim {
    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.handle.url));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = self.client.request(req).await.expect("sim answers");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            version: parts.version,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], Bytes::new()).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.call(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    async fn soap(&self, path: &str, header: &str, body: &str) -> Reply {
        self.call(
            "POST",
            path,
            &[
                ("content-type", "text/xml; charset=UTF-8"),
                ("soapaction", "\"\""),
            ],
            envelope(header, body),
        )
        .await
    }

    async fn count(&self) -> SimCount {
        let reply = self.get("/_sim/count").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }
}

fn envelope(header: &str, body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Header>{header}</soapenv:Header><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
    )
}

const SESSION: &str = "<urn:SessionHeader><urn:sessionId>00D!x</urn:sessionId></urn:SessionHeader>";
const SOAP_QUERY: &str =
    "<urn:query><urn:queryString>SELECT Id, Name FROM Contact</urn:queryString></urn:query>";
const SOAP_LOGIN: &str =
    "<urn:login><urn:username>ada@example.com</urn:username><urn:password>pw</urn:password></urn:login>";

fn limit_info(used: u64, limit: u64) -> String {
    format!("<LimitInfoHeader><limitInfo><current>{used}</current><limit>{limit}</limit><type>API REQUESTS</type></limitInfo></LimitInfoHeader>")
}

/// Sends raw bytes and reads until the server closes the connection.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn versions_list_is_free() {
    let sim = start(SimOptions::default()).await;
    let reply = sim.get("/services/data/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.usage(), None);
    let versions = reply.json();
    assert!(versions.as_array().unwrap().contains(
        &json!({"label": "Winter '25", "url": "/services/data/v62.0", "version": "62.0"})
    ));
    let count = sim.count().await;
    assert_eq!((count.used, count.requests), (0, 1));
}

#[tokio::test]
async fn rest_calls_count_one_each_and_report_usage() {
    let sim = start(SimOptions::default()).await;
    let account = "001000000000001AAA";
    let calls: Vec<(&str, String, &str, StatusCode)> = vec![
        ("GET", V.to_owned(), "", StatusCode::OK),
        ("GET", format!("{V}/sobjects"), "", StatusCode::OK),
        (
            "GET",
            format!("{V}/sobjects/Account/{account}"),
            "",
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{V}/sobjects/Account/describe"),
            "",
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{V}/query?q=SELECT+Id+FROM+Contact"),
            "",
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{V}/queryAll?q=SELECT%20Id%20FROM%20Lead"),
            "",
            StatusCode::OK,
        ),
        (
            "POST",
            format!("{V}/sobjects/Account"),
            r#"{"Name":"Acme"}"#,
            StatusCode::CREATED,
        ),
        (
            "PATCH",
            format!("{V}/sobjects/Account/{account}"),
            r#"{"Name":"B"}"#,
            StatusCode::NO_CONTENT,
        ),
        (
            "PATCH",
            format!("{V}/sobjects/Account/Ext__c/42"),
            r#"{"Name":"C"}"#,
            StatusCode::CREATED,
        ),
        (
            "DELETE",
            format!("{V}/sobjects/Account/{account}"),
            "",
            StatusCode::NO_CONTENT,
        ),
        (
            "GET",
            format!("{V}/search?q=FIND+%7Bacme%7D"),
            "",
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{V}/ui-api/record-ui/{account}"),
            "",
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{V}/tooling/query?q=SELECT+Id+FROM+ApexClass"),
            "",
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{V}/limits/recordCount?sObjects=Account"),
            "",
            StatusCode::OK,
        ),
        (
            "PUT",
            format!("{V}/sobjects/Account"),
            "",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (n, (method, path, body, status)) in calls.iter().enumerate() {
        let reply = sim
            .call(method, path, &[("content-type", "application/json")], *body)
            .await;
        assert_eq!(reply.status, *status, "{method} {path}: {}", reply.body);
        let expected = format!("api-usage={}/15000", n + 1);
        assert_eq!(reply.usage(), Some(expected.as_str()), "{method} {path}");
    }

    let record = sim
        .get(&format!("{V}/sobjects/Contact/003000000000009AAA"))
        .await
        .json();
    assert_eq!(record["Id"], "003000000000009AAA");
    assert_eq!(record["attributes"]["type"], "Contact");
    let query = sim
        .get(&format!(
            "{V}/query?q=SELECT+Id,(SELECT+Id+FROM+Contacts)+FROM+Opportunity"
        ))
        .await
        .json();
    assert_eq!(query["totalSize"], 2);
    assert_eq!(query["records"][0]["attributes"]["type"], "Opportunity");
    let created = sim
        .post_json(&format!("{V}/sobjects/Lead"), &json!({"LastName": "L"}))
        .await
        .json();
    assert_eq!(created["success"], true);
    assert_eq!(created["errors"], json!([]));
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("00Q") && id.len() == 18, "{id}");
    let tooling = sim
        .get(&format!("{V}/tooling/query?q=SELECT+Id+FROM+ApexClass"))
        .await
        .json();
    assert_eq!(tooling["records"][0]["attributes"]["type"], "ApexClass");

    let count = sim.count().await;
    assert_eq!(count.used, calls.len() as u64 + 4);
    assert_eq!(count.by_api.get("rest"), Some(&count.used));
    assert_eq!(count.by_client.get("unknown"), Some(&count.used));
}

#[tokio::test]
async fn composite_tree_and_collections_cost_one_call_each() {
    let sim = start(SimOptions::default()).await;
    let composite = sim
        .post_json(
            &format!("{V}/composite"),
            &json!({"allOrNone": true, "compositeRequest": [
                {"method": "GET", "url": format!("{V}/sobjects/Account/001000000000001AAA"), "referenceId": "a"},
                {"method": "POST", "url": format!("{V}/sobjects/Contact"), "referenceId": "b", "body": {"LastName": "X"}},
                {"method": "PATCH", "url": format!("{V}/sobjects/Contact/@{{b.id}}"), "referenceId": "c", "body": {}}
            ]}),
        )
        .await;
    assert_eq!(composite.status, StatusCode::OK, "{}", composite.body);
    assert_eq!(composite.usage(), Some("api-usage=1/15000"));
    let responses = composite.json()["compositeResponse"]
        .as_array()
        .unwrap()
        .clone();
    let statuses: Vec<&Value> = responses.iter().map(|r| &r["httpStatusCode"]).collect();
    assert_eq!(statuses, [&json!(200), &json!(201), &json!(204)]);
    assert_eq!(responses[1]["referenceId"], "b");
    assert!(responses[1]["body"]["id"]
        .as_str()
        .unwrap()
        .starts_with("003"));
    assert!(responses[1]["httpHeaders"]["Location"]
        .as_str()
        .unwrap()
        .contains("/sobjects/Contact/003"));

    let tree = sim
        .post_json(
            &format!("{V}/composite/tree/Account"),
            &json!({"records": [
                {"attributes": {"type": "Account", "referenceId": "ref1"}, "Name": "A"},
                {"attributes": {"type": "Account", "referenceId": "ref2"}, "Name": "B"}
            ]}),
        )
        .await;
    assert_eq!(tree.status, StatusCode::CREATED, "{}", tree.body);
    assert_eq!(tree.usage(), Some("api-usage=2/15000"));
    assert_eq!(tree.json()["results"][1]["referenceId"], "ref2");

    let records: Vec<Value> = (0..3)
        .map(|i| json!({"attributes": {"type": "Contact"}, "LastName": format!("L{i}")}))
        .collect();
    let saved = sim
        .post_json(
            &format!("{V}/composite/sobjects"),
            &json!({"allOrNone": false, "records": records}),
        )
        .await;
    assert_eq!(saved.status, StatusCode::OK, "{}", saved.body);
    assert_eq!(saved.json().as_array().unwrap().len(), 3);
    assert_eq!(saved.usage(), Some("api-usage=3/15000"));

    let fetched = sim
        .get(&format!(
            "{V}/composite/sobjects/Account?ids=001000000000001AAA,001000000000002AAA&fields=Name"
        ))
        .await;
    assert_eq!(fetched.json().as_array().unwrap().len(), 2);
    let deleted = sim
        .call(
            "DELETE",
            &format!("{V}/composite/sobjects?ids=001000000000001AAA"),
            &[],
            "",
        )
        .await;
    assert_eq!(deleted.json()[0]["success"], true);
    assert_eq!(deleted.usage(), Some("api-usage=5/15000"));

    let count = sim.count().await;
    assert_eq!(count.by_api.get("composite"), Some(&5));
    assert_eq!(count.used, 5);
}

#[tokio::test]
async fn composite_batch_costs_one_call_per_subrequest() {
    let sim = start(SimOptions::default()).await;
    let batch = json!({"haltOnError": false, "batchRequests": [
        {"method": "GET", "url": "v62.0/sobjects/Account/001000000000001AAA"},
        {"method": "PATCH", "url": "v62.0/sobjects/Account/001000000000001AAA", "richInput": {"Name": "N"}},
        {"method": "GET", "url": "v62.0/query?q=SELECT+Id+FROM+Account"}
    ]});
    let reply = sim.post_json(&format!("{V}/composite/batch"), &batch).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.usage(), Some("api-usage=3/15000"));
    let answer = reply.json();
    assert_eq!(answer["hasErrors"], false);
    let codes: Vec<&Value> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["statusCode"])
        .collect();
    assert_eq!(codes, [&json!(200), &json!(204), &json!(200)]);

    // A subrequest without a url fails alone, and still counts.
    let partly_bad =
        json!({"batchRequests": [{"method": "GET", "url": "v62.0/limits"}, {"method": "GET"}]});
    let reply = sim
        .post_json(&format!("{V}/composite/batch"), &partly_bad)
        .await;
    assert_eq!(reply.usage(), Some("api-usage=5/15000"));
    assert_eq!(reply.json()["hasErrors"], true);
    assert_eq!(reply.json()["results"][1]["statusCode"], 400);

    let count = sim.count().await;
    assert_eq!(count.by_api.get("composite"), Some(&5));
}

#[tokio::test]
async fn malformed_composite_batch_is_a_400_that_costs_one_call() {
    let sim = start(SimOptions::default()).await;
    let path = format!("{V}/composite/batch");
    let bodies = [
        "not json",
        r#"{"batchRequests": []}"#,
        r#"{"batchRequests": "x"}"#,
        "{}",
        "[1,2]",
        "",
    ];
    for (n, body) in bodies.iter().enumerate() {
        let reply = sim
            .call(
                "POST",
                &path,
                &[("content-type", "application/json")],
                *body,
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.json()[0]["errorCode"], "JSON_PARSER_ERROR");
        assert_eq!(
            reply.usage(),
            Some(format!("api-usage={}/15000", n + 1).as_str())
        );
    }
    let reply = sim.get(&path).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(sim.count().await.used, bodies.len() as u64 + 1);
}

#[tokio::test]
async fn soap_calls_cost_one_and_report_usage_in_limit_info_header() {
    let sim = start(opts(1000, 10)).await;
    let reply = sim
        .soap(&format!("/services/Soap/u/62.0/{ORG}"), SESSION, SOAP_QUERY)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "text/xml;charset=UTF-8");
    assert_eq!(reply.usage(), None);
    assert!(reply.body.contains(&limit_info(11, 1000)), "{}", reply.body);
    assert!(reply
        .body
        .contains(r#"xmlns="urn:partner.soap.sforce.com""#));
    assert!(reply
        .body
        .contains("<queryResponse><result xsi:type=\"QueryResult\"><done>true</done>"));
    assert!(reply.body.contains("<sf:type>Contact</sf:type>"));

    let create = "<urn:create><urn:sObjects><urn:type>Account</urn:type></urn:sObjects><urn:sObjects><urn:type>Account</urn:type></urn:sObjects></urn:create>";
    let reply = sim
        .soap(&format!("/services/Soap/c/62.0/{ORG}"), SESSION, create)
        .await;
    assert!(reply.body.contains(&limit_info(12, 1000)), "{}", reply.body);
    assert!(reply
        .body
        .contains(r#"xmlns="urn:enterprise.soap.sforce.com""#));
    assert_eq!(reply.body.matches("<success>true</success>").count(), 2);

    let reply = sim
        .soap(&format!("/services/Soap/T/62.0/{ORG}"), SESSION, SOAP_QUERY)
        .await;
    assert!(reply.body.contains(&limit_info(13, 1000)));
    let reply = sim
        .soap(
            &format!("/services/Soap/m/62.0/{ORG}"),
            SESSION,
            "<met:listMetadata xmlns:met=\"http://soap.sforce.com/2006/04/metadata\"/>",
        )
        .await;
    assert!(reply.body.contains(&limit_info(14, 1000)));
    assert!(reply.body.contains("<listMetadataResponse/>"));
    // Without the org id in the path it is still an ordinary (counted) call.
    let reply = sim
        .soap("/services/Soap/u/62.0", SESSION, "<urn:getUserInfo/>")
        .await;
    assert!(reply.body.contains(&limit_info(15, 1000)));
    assert!(reply
        .body
        .contains(&format!("<organizationId>{ORG}</organizationId>")));

    let count = sim.count().await;
    assert_eq!(count.by_api.get("soap"), Some(&5));
    assert_eq!(count.used, 15);
}

#[tokio::test]
async fn soap_calls_with_a_debugging_header_are_counted_apart() {
    let sim = start(opts(1, 1)).await; // already at the limit: the separate allocation still works
    let header = format!("{SESSION}<urn:DebuggingHeader><urn:debugLevel>Detail</urn:debugLevel></urn:DebuggingHeader>");
    let reply = sim
        .soap(&format!("/services/Soap/u/62.0/{ORG}"), &header, SOAP_QUERY)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(reply.body.contains(&limit_info(1, 1)), "{}", reply.body);
    assert!(reply.body.contains("<DebuggingInfo>"));
    let count = sim.count().await;
    assert_eq!((count.used, count.debugging, count.rejected), (1, 1, 0));
}

#[tokio::test]
async fn soap_login_is_free_and_points_at_the_host_the_client_used() {
    let sim = start(SimOptions::default()).await;
    let reply = sim
        .call(
            "POST",
            "/services/Soap/u/62.0",
            &[
                ("host", "proxy.example.com:8443"),
                ("content-type", "text/xml"),
            ],
            envelope("", SOAP_LOGIN),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let body = &reply.body;
    assert!(
        body.contains(&format!(
            "<serverUrl>http://proxy.example.com:8443/services/Soap/u/62.0/{ORG}</serverUrl>"
        )),
        "{body}"
    );
    assert!(body.contains(&format!(
        "<metadataServerUrl>http://proxy.example.com:8443/services/Soap/m/62.0/{ORG}</metadataServerUrl>"
    )));
    assert!(body.contains("<sessionId>00D000000000001!AQ"));
    assert!(body.contains("<userId>005000000000001AAA</userId>"));
    assert!(body.contains("<userName>ada@example.com</userName>"));
    assert!(!body.contains("LimitInfoHeader"));

    // Without a Host override it is the sim's own URL; enterprise logins get /c/ URLs.
    let reply = sim.soap("/services/Soap/c/62.0", "", SOAP_LOGIN).await;
    assert!(reply.body.contains(&format!(
        "<serverUrl>{}/services/Soap/c/62.0/{ORG}</serverUrl>",
        sim.handle.url
    )));
    assert!(reply
        .body
        .contains(r#"xmlns="urn:enterprise.soap.sforce.com""#));

    assert_eq!(sim.count().await.used, 0);
}

#[tokio::test]
async fn bulk_apis_cost_one_call_per_request() {
    let sim = start(SimOptions::default()).await;
    // Bulk API 2.0: create, upload, close, poll, results.
    let job = sim
        .post_json(
            &format!("{V}/jobs/ingest"),
            &json!({"object": "Contact", "operation": "upsert", "externalIdFieldName": "Ext__c"}),
        )
        .await;
    assert_eq!(job.status, StatusCode::OK, "{}", job.body);
    let job = job.json();
    assert_eq!(
        (
            job["state"].as_str(),
            job["object"].as_str(),
            job["operation"].as_str()
        ),
        (Some("Open"), Some("Contact"), Some("upsert"))
    );
    let id = job["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("750"));
    assert_eq!(
        job["contentUrl"],
        format!("services/data/v62.0/jobs/ingest/{id}/batches")
    );
    let csv = "LastName,Ext__c\nA,1\nB,2\n";
    let upload = sim
        .call(
            "PUT",
            &format!("{V}/jobs/ingest/{id}/batches"),
            &[("content-type", "text/csv")],
            csv,
        )
        .await;
    assert_eq!(upload.status, StatusCode::CREATED);
    assert_eq!(upload.body_bytes(), csv.len() as u64);
    let closed = sim
        .call(
            "PATCH",
            &format!("{V}/jobs/ingest/{id}"),
            &[("content-type", "application/json")],
            r#"{"state":"UploadComplete"}"#,
        )
        .await;
    assert_eq!(closed.json()["state"], "UploadComplete");
    assert_eq!(
        sim.get(&format!("{V}/jobs/ingest/{id}")).await.json()["state"],
        "JobComplete"
    );
    let results = sim
        .get(&format!("{V}/jobs/ingest/{id}/successfulResults"))
        .await;
    assert!(results.body.starts_with("\"sf__Id\""));
    assert_eq!(results.usage(), Some("api-usage=5/15000"));
    let query = sim
        .post_json(
            &format!("{V}/jobs/query"),
            &json!({"operation": "query", "query": "SELECT Id FROM Account"}),
        )
        .await;
    let qid = query.json()["id"].as_str().unwrap().to_owned();
    let rows = sim.get(&format!("{V}/jobs/query/{qid}/results")).await;
    assert_eq!(rows.headers["sforce-locator"], "null");
    assert_eq!(rows.usage(), Some("api-usage=7/15000"));

    // Bulk API 1.0, XML.
    let xml_job = r#"<?xml version="1.0" encoding="UTF-8"?><jobInfo xmlns="http://www.force.com/2009/06/asyncapi/dataload"><operation>insert</operation><object>Contact</object><contentType>CSV</contentType></jobInfo>"#;
    let created = sim
        .call(
            "POST",
            "/services/async/62.0/job",
            &[
                ("content-type", "application/xml"),
                ("x-sfdc-session", "00D!x"),
            ],
            xml_job,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert!(
        created
            .body
            .contains("<operation>insert</operation><object>Contact</object>"),
        "{}",
        created.body
    );
    assert!(created.body.contains("<state>Open</state>"));
    assert_eq!(created.usage(), Some("api-usage=8/15000"));
    let v1 = "/services/async/62.0/job/750000000000001AAA";
    let batch = sim
        .call(
            "POST",
            &format!("{v1}/batch"),
            &[("content-type", "text/csv")],
            csv,
        )
        .await;
    assert_eq!(batch.status, StatusCode::CREATED);
    assert!(batch.body.contains("<state>Queued</state>"));
    let info = sim.get(&format!("{v1}/batch/751000000000001AAA")).await;
    assert!(info.body.contains("<state>Completed</state>"));
    let list = sim.get(&format!("{v1}/batch")).await;
    assert!(list.body.contains("<batchInfoList"), "{}", list.body);
    let close = r#"<?xml version="1.0" encoding="UTF-8"?><jobInfo xmlns="http://www.force.com/2009/06/asyncapi/dataload"><state>Closed</state></jobInfo>"#;
    let closed = sim
        .call("POST", v1, &[("content-type", "application/xml")], close)
        .await;
    assert!(closed.body.contains("<state>Closed</state>"));
    // Bulk API 1.0, JSON.
    let json_job = sim
        .post_json(
            "/services/async/62.0/job",
            &json!({"operation": "delete", "object": "Lead", "contentType": "JSON"}),
        )
        .await;
    assert_eq!(json_job.json()["object"], "Lead");
    // A malformed job costs a call and answers Bulk's own error document.
    let bad = sim
        .call(
            "POST",
            "/services/async/62.0/job",
            &[("content-type", "application/xml")],
            "<jobInfo>",
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.body
            .contains("<exceptionCode>InvalidJob</exceptionCode>"),
        "{}",
        bad.body
    );
    assert_eq!(bad.usage(), Some("api-usage=14/15000"));

    let count = sim.count().await;
    assert_eq!(count.by_api.get("bulk"), Some(&14));
}

#[tokio::test]
async fn apex_rest_costs_one_call_and_echoes_the_request() {
    let sim = start(SimOptions::default()).await;
    let reply = sim
        .call(
            "POST",
            "/services/apexrest/Orders/v1?x=1",
            &[("content-type", "application/json")],
            r#"{"a":1}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.usage(), Some("api-usage=1/15000"));
    assert_eq!(
        reply.json(),
        json!({"method": "POST", "path": "/Orders/v1", "query": "x=1", "bodyBytes": 7, "body": {"a": 1}})
    );
    let text = sim
        .call("PUT", "/services/apexrest/Echo", &[], "plain words")
        .await;
    assert_eq!(text.json()["body"], "plain words");
    assert_eq!(sim.count().await.by_api.get("apex"), Some(&2));
}

#[tokio::test]
async fn oauth_token_is_free_and_points_at_the_host_the_client_used() {
    let sim = start(SimOptions::default()).await;
    let form = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("host", "proxy.example.com"),
    ];
    let reply = sim
        .call("POST", "/services/oauth2/token", &form, "grant_type=password&client_id=c&client_secret=s&username=ada%40example.com&password=pw")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.usage(), None);
    let token = reply.json();
    assert_eq!(token["instance_url"], "http://proxy.example.com");
    assert_eq!(
        token["id"],
        format!("http://proxy.example.com/id/{ORG}/005000000000001AAA")
    );
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["access_token"]
        .as_str()
        .unwrap()
        .starts_with("00D000000000001!"));
    assert!(token["refresh_token"].is_string());
    assert!(token["issued_at"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(token["signature"].is_string());

    let refreshed = sim
        .call(
            "POST",
            "/services/oauth2/token",
            &form[..1],
            "grant_type=refresh_token&refresh_token=r&client_id=c",
        )
        .await
        .json();
    assert_eq!(refreshed["instance_url"], sim.handle.url);
    assert!(refreshed.get("refresh_token").is_none());

    let unsupported = sim
        .call("POST", "/services/oauth2/token", &form, "grant_type=magic")
        .await;
    assert_eq!(unsupported.status, StatusCode::BAD_REQUEST);
    assert_eq!(unsupported.json()["error"], "unsupported_grant_type");
    let missing = sim.call("POST", "/services/oauth2/token", &form, "").await;
    assert_eq!(missing.json()["error"], "unsupported_grant_type");
    let garbled = sim
        .call("POST", "/services/oauth2/token", &form, "grant_type=%zz")
        .await;
    assert_eq!(garbled.json()["error"], "invalid_request");
    let wrong_method = sim.get("/services/oauth2/token").await;
    assert_eq!(wrong_method.status, StatusCode::BAD_REQUEST);

    let identity = sim.get(&format!("/id/{ORG}/005000000000001AAA")).await;
    assert_eq!(identity.json()["organization_id"], ORG);
    assert_eq!(
        sim.get("/services/oauth2/userinfo").await.status,
        StatusCode::OK
    );
    assert_eq!(
        sim.call("POST", "/services/oauth2/revoke", &[], "token=x")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(sim.count().await.used, 0);
}

#[tokio::test]
async fn limits_resource_counts_by_option_and_reports_the_allocation() {
    let sim = start(opts(15_000, 100)).await;
    let reply = sim.get(&format!("{V}/limits")).await;
    assert_eq!(reply.usage(), Some("api-usage=101/15000"));
    let limits = reply.json();
    assert_eq!(limits["DailyApiRequests"]["Max"], 15_000);
    assert_eq!(limits["DailyApiRequests"]["Remaining"], 14_899);
    assert!(limits["DailyApiRequests"]["Sim Connected App"].is_object());

    let free = start(SimOptions {
        count_limits: false,
        ..opts(15_000, 100)
    })
    .await;
    let reply = free.get(&format!("{V}/limits")).await;
    assert_eq!(reply.usage(), Some("api-usage=100/15000"));
    assert_eq!(reply.json()["DailyApiRequests"]["Remaining"], 14_900);
    assert_eq!(free.count().await.used, 100);
}

#[tokio::test]
async fn unknown_paths_are_free_404s() {
    let sim = start(SimOptions::default()).await;
    let paths = [
        "/",
        "/foo",
        "/services/xyz",
        "/services/data/latest/sobjects",
        "/services/oauth2/authorize",
        "/services/Soap/x/62.0",
        "/cometd/62.0",
    ];
    for path in paths {
        let reply = sim.get(path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            reply.body,
            r#"[{"message":"The requested resource does not exist","errorCode":"NOT_FOUND"}]"#
        );
        assert_eq!(reply.usage(), None);
    }
    let count = sim.count().await;
    assert_eq!((count.used, count.requests), (0, paths.len() as u64));

    // Under a REST version the request reached the API: Salesforce counts it.
    let reply = sim.get(&format!("{V}/nonsense")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.usage(), Some("api-usage=1/15000"));
}

#[tokio::test]
async fn at_the_limit_rest_answers_403_and_counts_nothing() {
    let sim = start(opts(2, 0)).await;
    assert_eq!(
        sim.get(&format!("{V}/sobjects")).await.usage(),
        Some("api-usage=1/2")
    );
    assert_eq!(
        sim.get(&format!("{V}/sobjects")).await.usage(),
        Some("api-usage=2/2")
    );
    let refused = [
        sim.get(&format!("{V}/sobjects")).await,
        sim.post_json(
            &format!("{V}/composite/batch"),
            &json!({"batchRequests": [{"method": "GET", "url": "v62.0/limits"}]}),
        )
        .await,
        sim.post_json(
            &format!("{V}/jobs/ingest"),
            &json!({"object": "Account", "operation": "insert"}),
        )
        .await,
        sim.get("/services/async/62.0/job/750000000000001AAA").await,
        sim.get("/services/apexrest/Orders").await,
        sim.get(&format!("{V}/limits")).await,
    ];
    for reply in &refused {
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(
            reply.body,
            r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#
        );
        assert_eq!(reply.usage(), Some("api-usage=2/2"));
        assert!(reply.headers.get("retry-after").is_none());
    }
    // Free requests still work.
    assert_eq!(sim.get("/services/data/").await.status, StatusCode::OK);
    let token = sim
        .call("POST", "/services/oauth2/token", &[], "grant_type=password")
        .await;
    assert_eq!(token.status, StatusCode::OK);
    let count = sim.count().await;
    assert_eq!((count.used, count.rejected), (2, refused.len() as u64));
}

#[tokio::test]
async fn at_the_limit_soap_answers_a_fault_and_counts_nothing() {
    let sim = start(opts(1, 1)).await;
    let reply = sim
        .soap(&format!("/services/Soap/u/62.0/{ORG}"), SESSION, SOAP_QUERY)
        .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let body = &reply.body;
    assert!(
        body.contains("<faultcode>sf:REQUEST_LIMIT_EXCEEDED</faultcode>"),
        "{body}"
    );
    assert!(body.contains(r#"xmlns:sf="urn:fault.partner.soap.sforce.com""#));
    assert!(body.contains("<sf:ApiFault"));
    assert!(body.contains("<sf:exceptionCode>REQUEST_LIMIT_EXCEEDED</sf:exceptionCode>"));
    assert!(body.contains("TotalRequests Limit exceeded."));
    let enterprise = sim
        .soap(&format!("/services/Soap/c/62.0/{ORG}"), SESSION, SOAP_QUERY)
        .await;
    assert!(enterprise
        .body
        .contains(r#"xmlns:sf="urn:fault.enterprise.soap.sforce.com""#));
    // login() is not metered by the daily limit.
    let login = sim.soap("/services/Soap/u/62.0", "", SOAP_LOGIN).await;
    assert_eq!(login.status, StatusCode::OK);
    let count = sim.count().await;
    assert_eq!((count.used, count.rejected), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_never_exceed_the_limit() {
    let sim = Arc::new(start(opts(50, 0)).await);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let sim = sim.clone();
            tokio::spawn(async move {
                let path = if i % 2 == 0 {
                    format!("{V}/sobjects")
                } else {
                    "/services/apexrest/X".to_owned()
                };
                sim.get(&path).await.status
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::FORBIDDEN => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, refused), (50, 150));
    let count = sim.count().await;
    assert_eq!((count.used, count.rejected, count.requests), (50, 150, 200));
}

#[tokio::test]
async fn external_calls_and_the_test_hooks() {
    let sim = start(opts(100, 5)).await;
    let count = sim.count().await;
    assert_eq!((count.used, count.external, count.limit), (5, 5, 100));
    assert_eq!(count.by_client.get("external"), Some(&5));
    assert_eq!(count.by_api.get("external"), Some(&5));

    let added = sim.call("POST", "/_sim/external?n=10", &[], "").await;
    assert_eq!(added.status, StatusCode::OK);
    assert_eq!(added.json()["used"], 15);
    let limited = sim.call("POST", "/_sim/limit?n=16", &[], "").await;
    assert_eq!(limited.json()["limit"], 16);
    assert_eq!(
        sim.get(&format!("{V}/sobjects")).await.usage(),
        Some("api-usage=16/16")
    );
    assert_eq!(
        sim.get(&format!("{V}/sobjects")).await.status,
        StatusCode::FORBIDDEN
    );
    // External calls happened elsewhere: they are added even past the limit (soft limit).
    sim.call("POST", "/_sim/external?n=4", &[], "").await;
    let count = sim.count().await;
    assert_eq!(
        (count.used, count.external, count.rejected, count.requests),
        (20, 19, 1, 2)
    );
    assert_eq!(count.by_client.get("unknown"), Some(&1));

    for (method, path, status) in [
        ("POST", "/_sim/external?n=abc", StatusCode::BAD_REQUEST),
        ("POST", "/_sim/external", StatusCode::BAD_REQUEST),
        ("POST", "/_sim/limit?n=-1", StatusCode::BAD_REQUEST),
        ("GET", "/_sim/external?n=1", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/_sim/count", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/_sim/bogus", StatusCode::NOT_FOUND),
    ] {
        let reply = sim.call(method, path, &[], "").await;
        assert_eq!(reply.status, status, "{method} {path}");
    }

    let reset = sim.call("POST", "/_sim/reset", &[], "").await.json();
    assert_eq!(
        (
            reset["used"].as_u64(),
            reset["limit"].as_u64(),
            reset["requests"].as_u64()
        ),
        (Some(0), Some(16), Some(0))
    );
    assert_eq!(sim.handle.count(), serde_json::from_value(reset).unwrap());
}

#[tokio::test(start_paused = true)]
async fn calls_age_out_one_window_after_they_were_made() {
    const HOUR: Duration = Duration::from_secs(3600);
    let sim = start(opts(3, 0)).await;
    let call = |client: &'static str| {
        let sim = &sim;
        async move {
            sim.call(
                "GET",
                &format!("{V}/sobjects"),
                &[("sforce-call-options", client)],
                "",
            )
            .await
        }
    };
    // t = 0: two calls by a.
    call("client=a").await;
    call("client=a").await;
    // t = 12 h: one by b, and the org is full.
    tokio::time::advance(12 * HOUR).await;
    assert_eq!(call("client=b").await.usage(), Some("api-usage=3/3"));
    assert_eq!(call("client=b").await.status, StatusCode::FORBIDDEN);
    // t = 24 h − 1 ms: a's calls are still inside the window.
    tokio::time::advance(12 * HOUR - Duration::from_millis(1)).await;
    assert_eq!(call("client=b").await.status, StatusCode::FORBIDDEN);
    // t = 24 h: they age out, and there is room for two more.
    tokio::time::advance(Duration::from_millis(1)).await;
    let count = sim.count().await;
    assert_eq!(count.used, 1);
    assert_eq!(count.by_client.get("a"), None);
    assert_eq!(call("client=b").await.usage(), Some("api-usage=2/3"));
    // t = 36 h: b's first call ages out; the one made at 24 h stays.
    tokio::time::advance(12 * HOUR).await;
    let count = sim.count().await;
    assert_eq!(
        (count.used, count.by_client.get("b").copied()),
        (1, Some(1))
    );
    assert_eq!(count.rejected, 2);

    // Calls already used at start age out too.
    let busy = start(opts(10, 10)).await;
    assert_eq!(
        busy.get(&format!("{V}/sobjects")).await.status,
        StatusCode::FORBIDDEN
    );
    tokio::time::advance(24 * HOUR).await;
    assert_eq!(
        busy.get(&format!("{V}/sobjects")).await.usage(),
        Some("api-usage=1/10")
    );
}

#[tokio::test]
async fn calls_are_attributed_to_the_client_in_call_options() {
    let sim = start(SimOptions::default()).await;
    let path = format!("{V}/sobjects");
    for options in [
        "client=salesloft",
        "client=salesloft",
        "defaultNamespace=ns, client=etl-job",
        "client=",
        "query=x",
    ] {
        sim.call("GET", &path, &[("sforce-call-options", options)], "")
            .await;
    }
    sim.get(&path).await;
    // Bytes that are not UTF-8 are tolerated, and the call is unattributed.
    let req = Request::get(format!("{}{path}", sim.handle.url))
        .header(
            "sforce-call-options",
            HeaderValue::from_bytes(b"client=\xff").unwrap(),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        sim.client.request(req).await.unwrap().status(),
        StatusCode::OK
    );
    let count = sim.count().await;
    let expected: BTreeMap<String, u64> = [("salesloft", 2), ("etl-job", 1), ("unknown", 4)]
        .map(|(k, v)| (k.to_owned(), v))
        .into();
    assert_eq!(count.by_client, expected);
}

#[tokio::test]
async fn chunked_uploads_are_read_whole() {
    let sim = start(SimOptions::default()).await;
    let mut stream = TcpStream::connect(sim.handle.addr).await.unwrap();
    let head = format!(
        "PUT {V}/jobs/ingest/750000000000001AAA/batches HTTP/1.1\r\nHost: sim\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // 160 chunks of 64 KiB: 10 MiB, more than the sim keeps in memory.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..160 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 201"), "{answer}");
    assert!(
        answer.contains(&format!("x-sim-body-bytes: {}", 160 * 64 * 1024)),
        "{answer}"
    );
    assert!(answer.contains("sforce-limit-info: api-usage=1/15000"));

    // An Apex echo of a body too large to keep reports its size and no body.
    let big = vec![b'y'; KEEP_BODY_BYTES + 1];
    let reply = sim
        .call("POST", "/services/apexrest/Upload", &[], big)
        .await;
    assert_eq!(reply.json()["bodyBytes"], KEEP_BODY_BYTES as u64 + 1);
    assert_eq!(reply.json()["body"], Value::Null);
    // A route that must parse such a body says so, and the call still counts.
    let reply = sim
        .call(
            "POST",
            &format!("{V}/sobjects/Account"),
            &[],
            vec![b' '; KEEP_BODY_BYTES + 1],
        )
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.usage(), Some("api-usage=3/15000"));
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let sim = start(SimOptions::default()).await;
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(format!("{}{V}/sobjects/Account", sim.handle.url))
        .header("sforce-call-options", "client=h2")
        .body(Full::new(Bytes::from_static(br#"{"Name":"h2"}"#)))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["sforce-limit-info"], "api-usage=1/15000");
    assert_eq!(resp.headers()["x-sim-body-bytes"], "13");
    // Over h2 the base URL comes from :authority.
    let req = Request::post(format!("{}/services/oauth2/token", sim.handle.url))
        .body(Full::new(Bytes::from_static(b"grant_type=password")))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let token: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(token["instance_url"], sim.handle.url);
    assert_eq!(sim.count().await.by_client.get("h2"), Some(&1));

    // HTTP/1.1 still works on the same port.
    assert_eq!(
        sim.get("/services/data/").await.version,
        http::Version::HTTP_11
    );
}

#[tokio::test]
async fn malformed_requests_get_errors_not_panics() {
    let sim = start(SimOptions::default()).await;
    let json_type = [("content-type", "application/json")];
    let cases: [(&str, String, &str, StatusCode, &str); 9] = [
        (
            "POST",
            format!("{V}/sobjects/Account"),
            "{not json",
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
        ),
        (
            "POST",
            format!("{V}/sobjects/Account"),
            "",
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
        ),
        (
            "PATCH",
            format!("{V}/sobjects/Account/001000000000001AAA"),
            "[1]",
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
        ),
        (
            "GET",
            format!("{V}/query"),
            "",
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
        ),
        (
            "GET",
            format!("{V}/query?q=%zz"),
            "",
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
        ),
        (
            "GET",
            format!("{V}/query?q=SELECT+Id"),
            "",
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
        ),
        (
            "POST",
            format!("{V}/composite"),
            "[]",
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
        ),
        (
            "POST",
            format!("{V}/composite"),
            r#"{"compositeRequest":[{"method":"GET"}]}"#,
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
        ),
        (
            "POST",
            format!("{V}/jobs/ingest"),
            r#"{"object":"Account"}"#,
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
        ),
    ];
    for (n, (method, path, body, status, code)) in cases.iter().enumerate() {
        let reply = sim.call(method, path, &json_type, *body).await;
        assert_eq!(
            reply.status, *status,
            "{method} {path} {body}: {}",
            reply.body
        );
        assert_eq!(reply.json()[0]["errorCode"], *code, "{method} {path}");
        // They reached the API, so they count, and report usage like any REST answer.
        assert_eq!(
            reply.usage(),
            Some(format!("api-usage={}/15000", n + 1).as_str())
        );
    }

    // SOAP: not an envelope, not UTF-8, no operation → a client fault, counted.
    let soap = format!("/services/Soap/u/62.0/{ORG}");
    for body in [
        &b"<<<"[..],
        b"\xff\xfe<x/>",
        envelope("", "").as_bytes(),
        b"",
    ] {
        let reply = sim
            .call(
                "POST",
                &soap,
                &[("content-type", "text/xml")],
                body.to_vec(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            reply.body.contains("<faultcode>soapenv:Client</faultcode>"),
            "{}",
            reply.body
        );
    }
    assert_eq!(sim.count().await.used, cases.len() as u64 + 4);

    // A bad test-delay header is refused before anything counts.
    let reply = sim
        .call(
            "GET",
            &format!("{V}/sobjects"),
            &[("x-sim-delay-ms", "soon")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()[0]["errorCode"], "INVALID_INPUT");

    // Garbage on the wire: hyper answers 400 itself and the sim keeps serving.
    let answer = raw(sim.handle.addr, b"GARBAGE\r\n\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    let answer = raw(sim.handle.addr, b"POST /services/apexrest/X HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert_eq!(sim.count().await.used, cases.len() as u64 + 4);
}

#[tokio::test(start_paused = true)]
async fn delay_header_delays_the_answer_after_counting() {
    let sim = start(SimOptions::default()).await;
    let started = Instant::now();
    let reply = sim
        .call(
            "GET",
            &format!("{V}/sobjects"),
            &[("x-sim-delay-ms", "5000")],
            "",
        )
        .await;
    assert!(started.elapsed() >= Duration::from_millis(5000));
    assert_eq!(reply.usage(), Some("api-usage=1/15000"));

    // A client that gives up still spent the call, as with Salesforce.
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        sim.call(
            "GET",
            &format!("{V}/sobjects"),
            &[("x-sim-delay-ms", "60000")],
            "",
        ),
    )
    .await;
    assert!(gave_up.is_err());
    assert_eq!(sim.handle.count().used, 2);
}

#[tokio::test]
async fn base_url_falls_back_to_the_listener_address() {
    let sim = start(SimOptions::default()).await;
    let body = "grant_type=password";
    for host in ["", "Host: user@evil.example\r\n", "Host: not a host\r\n"] {
        let request = format!(
            "POST /services/oauth2/token HTTP/1.0\r\n{host}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = raw(sim.handle.addr, request.as_bytes()).await;
        let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let token: Value = serde_json::from_str(json).unwrap_or_else(|_| panic!("{answer}"));
        assert_eq!(token["instance_url"], sim.handle.url, "{host}");
    }
}

#[tokio::test]
async fn stopping_closes_the_listener() {
    let sim = start(SimOptions::default()).await;
    let addr = sim.handle.addr;
    sim.handle.shutdown().await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());

    let handle = spawn(SimOptions::default()).await.unwrap();
    let addr = handle.addr;
    handle.stop();
    let mut closed = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed);
}

#[tokio::test]
async fn serve_runs_on_a_listener_the_caller_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, opts(10, 3), async move {
        let _ = stopped.await;
    }));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(
            Request::get(format!("http://{addr}{V}/sobjects"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["sforce-limit-info"], "api-usage=4/10");
    drop(client);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
