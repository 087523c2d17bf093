//! The SOAP API: request envelopes read with `xml`, answers written as Salesforce writes them.
//!
//! Salesforce's SOAP answers put their elements in the endpoint's default namespace (partner
//! `urn:partner.soap.sforce.com` for `/u/`, enterprise for `/c/`, tooling for `/T/`, metadata
//! for `/m/`) with usage in the SOAP header:
//! `<LimitInfoHeader><limitInfo><current>USED</current><limit>LIMIT</limit><type>API REQUESTS</type></limitInfo></LimitInfoHeader>`.
//! `login()` answers carry no usage; faults (the limit, a malformed envelope) are HTTP 500 with
//! an `ApiFault` detail in the endpoint's fault namespace, and no header either.

use http::StatusCode;

use super::error::SimError;
use super::meter::Usage;
use super::util::{self, xml_escape, IdGen, Resp};
use super::xml;

const ENVELOPE_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// A SOAP endpoint, by its path letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SoapApi {
    /// `/services/Soap/u/`.
    Partner,
    /// `/services/Soap/c/`.
    Enterprise,
    /// `/services/Soap/m/`.
    Metadata,
    /// `/services/Soap/T/`.
    Tooling,
}

impl SoapApi {
    pub(super) fn from_segment(segment: &str) -> Option<Self> {
        match segment {
            "u" => Some(SoapApi::Partner),
            "c" => Some(SoapApi::Enterprise),
            "m" => Some(SoapApi::Metadata),
            "T" => Some(SoapApi::Tooling),
            _ => None,
        }
    }

    /// Only the partner and enterprise APIs have `login()`.
    pub(super) fn has_login(self) -> bool {
        matches!(self, SoapApi::Partner | SoapApi::Enterprise)
    }

    fn segment(self) -> &'static str {
        match self {
            SoapApi::Partner => "u",
            SoapApi::Enterprise => "c",
            SoapApi::Metadata => "m",
            SoapApi::Tooling => "T",
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            SoapApi::Partner => "urn:partner.soap.sforce.com",
            SoapApi::Enterprise => "urn:enterprise.soap.sforce.com",
            SoapApi::Metadata => "http://soap.sforce.com/2006/04/metadata",
            SoapApi::Tooling => "urn:tooling.soap.sforce.com",
        }
    }

    fn fault_namespace(self) -> &'static str {
        match self {
            SoapApi::Enterprise => "urn:fault.enterprise.soap.sforce.com",
            SoapApi::Tooling => "urn:fault.tooling.soap.sforce.com",
            // The metadata API reports API faults with the partner fault types.
            SoapApi::Partner | SoapApi::Metadata => "urn:fault.partner.soap.sforce.com",
        }
    }

    fn sobject_namespace(self) -> &'static str {
        match self {
            SoapApi::Enterprise => "urn:sobject.enterprise.soap.sforce.com",
            SoapApi::Tooling => "urn:sobject.tooling.soap.sforce.com",
            SoapApi::Partner | SoapApi::Metadata => "urn:sobject.partner.soap.sforce.com",
        }
    }
}

/// What the sim reads from a SOAP request.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SoapRequest {
    /// The operation: the first element of the body (`login`, `query`, `create`, …).
    pub(super) op: String,
    /// A `DebuggingHeader` in the SOAP header: Salesforce meters such calls separately.
    pub(super) debugging: bool,
    username: Option<String>,
    query: Option<String>,
    /// How many `sObjects` (or `ids`) the operation carries, at least 1.
    items: usize,
}

impl SoapRequest {
    pub(super) fn is_login(&self) -> bool {
        self.op == "login"
    }
}

/// Reads an envelope: a root `Envelope` with a `Body` holding one operation element.
pub(super) fn parse(body: &[u8]) -> Result<SoapRequest, SimError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| SimError::Soap("Invalid byte sequence: the request is not UTF-8".into()))?;
    let tags = xml::scan(text).map_err(SimError::Soap)?;
    if tags.first().map(|tag| tag.local) != Some("Envelope") {
        return Err(SimError::Soap(
            "The root element of a SOAP request must be Envelope".into(),
        ));
    }
    let mut section = "";
    let mut op = None;
    let mut debugging = false;
    let mut items = 0;
    for tag in &tags {
        match tag.depth {
            1 => section = tag.local,
            2 if section == "Header" && tag.local == "DebuggingHeader" => debugging = true,
            2 if section == "Body" && op.is_none() => op = Some(tag.local),
            3 if section == "Body" && matches!(tag.local, "sObjects" | "ids") => items += 1,
            _ => {}
        }
    }
    let op = op.ok_or_else(|| SimError::Soap("No operation available for request".into()))?;
    Ok(SoapRequest {
        op: op.to_owned(),
        debugging,
        username: xml::first_text(text, &tags, "username"),
        query: xml::first_text(text, &tags, "queryString"),
        items: items.max(1),
    })
}

/// A SOAP envelope in the endpoint's default namespace, with `header` (if any) and `body`.
fn envelope(api: SoapApi, header: &str, body: &str) -> String {
    let header = if header.is_empty() {
        String::new()
    } else {
        format!("<soapenv:Header>{header}</soapenv:Header>")
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="{ENVELOPE_NS}" xmlns="{ns}" xmlns:xsi="{XSI_NS}" xmlns:sf="{sobject_ns}">{header}<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#,
        ns = api.namespace(),
        sobject_ns = api.sobject_namespace(),
    )
}

fn limit_info_header(usage: Usage) -> String {
    format!(
        "<LimitInfoHeader><limitInfo><current>{}</current><limit>{}</limit><type>API REQUESTS</type></limitInfo></LimitInfoHeader>",
        usage.used, usage.limit
    )
}

/// `login()`: free, and the place clients learn their server URL, so the URLs are built on the
/// base the client used to reach the sim.
pub(super) fn login_response(
    api: SoapApi,
    version: &str,
    base: &str,
    org_id: &str,
    session: &str,
    request: &SoapRequest,
) -> Resp {
    let base = xml_escape(base);
    let org = xml_escape(org_id);
    let version = xml_escape(version);
    let user_id = util::user_id();
    let username = xml_escape(
        request
            .username
            .as_deref()
            .unwrap_or("sim.user@example.com"),
    );
    let body = format!(
        "<loginResponse><result>\
<metadataServerUrl>{base}/services/Soap/m/{version}/{org}</metadataServerUrl>\
<passwordExpired>false</passwordExpired>\
<sandbox>false</sandbox>\
<serverUrl>{base}/services/Soap/{segment}/{version}/{org}</serverUrl>\
<sessionId>{session}</sessionId>\
<userId>{user_id}</userId>\
<userInfo>\
<accessibilityMode>false</accessibilityMode>\
<chatterExternal>false</chatterExternal>\
<currencySymbol>$</currencySymbol>\
<orgAttachmentFileSizeLimit>5242880</orgAttachmentFileSizeLimit>\
<orgDefaultCurrencyIsoCode>USD</orgDefaultCurrencyIsoCode>\
<orgDefaultCurrencyLocale>en_US</orgDefaultCurrencyLocale>\
<orgDisallowHtmlAttachments>false</orgDisallowHtmlAttachments>\
<orgHasPersonAccounts>false</orgHasPersonAccounts>\
<organizationId>{org}</organizationId>\
<organizationMultiCurrency>false</organizationMultiCurrency>\
<organizationName>Sim Org</organizationName>\
<profileId>{profile}</profileId>\
<roleId xsi:nil=\"true\"/>\
<sessionSecondsValid>7200</sessionSecondsValid>\
<userDefaultCurrencyIsoCode xsi:nil=\"true\"/>\
<userEmail>{username}</userEmail>\
<userFullName>Sim User</userFullName>\
<userId>{user_id}</userId>\
<userLanguage>en_US</userLanguage>\
<userLocale>en_US</userLocale>\
<userName>{username}</userName>\
<userTimeZone>America/Los_Angeles</userTimeZone>\
<userType>Standard</userType>\
<userUiSkin>Theme3</userUiSkin>\
</userInfo>\
</result></loginResponse>",
        segment = api.segment(),
        session = xml_escape(session),
        profile = util::record_id("00e", 1),
    );
    util::respond(StatusCode::OK, util::XML, envelope(api, "", &body))
}

/// The answer to a counted operation, with usage in `LimitInfoHeader`.
pub(super) fn op_response(
    api: SoapApi,
    request: &SoapRequest,
    usage: Usage,
    ids: &IdGen,
    org_id: &str,
) -> Resp {
    let op = request.op.as_str();
    let result = match op {
        "query" | "queryAll" | "queryMore" => {
            let sobject = request
                .query
                .as_deref()
                .and_then(util::soql_object)
                .unwrap_or("Account");
            query_result(sobject)
        }
        "create" | "update" | "upsert" | "delete" | "undelete" => {
            let created = if op == "upsert" {
                "<created>true</created>"
            } else {
                ""
            };
            (0..request.items)
                .map(|_| {
                    format!(
                        "<result>{created}<id>{}</id><success>true</success></result>",
                        ids.id("001")
                    )
                })
                .collect()
        }
        "getUserInfo" => format!(
            "<result><organizationId>{}</organizationId><userFullName>Sim User</userFullName><userId>{}</userId></result>",
            xml_escape(org_id),
            util::user_id()
        ),
        "getServerTimestamp" => format!(
            "<result><timestamp>{}</timestamp></result>",
            util::xml_timestamp()
        ),
        _ => String::new(),
    };
    let body = if result.is_empty() {
        format!("<{op}Response/>")
    } else {
        format!("<{op}Response>{result}</{op}Response>")
    };
    let mut header = limit_info_header(usage);
    if request.debugging {
        header.push_str("<DebuggingInfo><debugLog></debugLog></DebuggingInfo>");
    }
    util::respond(StatusCode::OK, util::XML, envelope(api, &header, &body))
}

/// A two-record `QueryResult`, in the partner API's generic sObject form.
fn query_result(sobject: &str) -> String {
    let prefix = util::key_prefix(sobject);
    let records: String = (1..=2)
        .map(|n| {
            let id = util::record_id(prefix, n);
            format!(
                "<records xsi:type=\"sf:sObject\"><sf:type>{sobject}</sf:type><sf:Id>{id}</sf:Id><sf:Id>{id}</sf:Id><sf:Name>Sim {sobject} {n}</sf:Name></records>"
            )
        })
        .collect();
    format!(
        "<result xsi:type=\"QueryResult\"><done>true</done><queryLocator xsi:nil=\"true\"/>{records}<size>2</size></result>"
    )
}

/// A SOAP fault, HTTP 500: `faultcode` and an `ApiFault` detail with `exceptionCode`.
fn fault(api: SoapApi, faultcode: &str, code: &str, message: &str) -> Resp {
    let message = xml_escape(message);
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="{ENVELOPE_NS}" xmlns:sf="{fault_ns}" xmlns:xsi="{XSI_NS}"><soapenv:Body><soapenv:Fault><faultcode>{faultcode}</faultcode><faultstring>{code}: {message}</faultstring><detail><sf:ApiFault xsi:type="sf:ApiFault"><sf:exceptionCode>{code}</sf:exceptionCode><sf:exceptionMessage>{message}</sf:exceptionMessage></sf:ApiFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#,
        fault_ns = api.fault_namespace(),
    );
    util::respond(StatusCode::INTERNAL_SERVER_ERROR, util::XML, body)
}

/// What Salesforce's SOAP API answers at the limit.
pub(super) fn limit_fault(api: SoapApi) -> Resp {
    fault(
        api,
        "sf:REQUEST_LIMIT_EXCEEDED",
        "REQUEST_LIMIT_EXCEEDED",
        &SimError::LimitExceeded.to_string(),
    )
}

/// A request that is not a readable envelope: a client fault, as SOAP 1.1 reports it (HTTP 500).
pub(super) fn client_fault(api: SoapApi, message: &str) -> Resp {
    fault(api, "soapenv:Client", "INVALID_XML", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope_with(header: &str, body: &str) -> Vec<u8> {
        format!(
            r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="{ENVELOPE_NS}" xmlns:urn="urn:partner.soap.sforce.com"><soapenv:Header>{header}</soapenv:Header><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
        )
        .into_bytes()
    }

    #[test]
    fn reads_operation_debugging_and_items() {
        let req = parse(&envelope_with(
            "<urn:SessionHeader><urn:sessionId>x</urn:sessionId></urn:SessionHeader><urn:DebuggingHeader><urn:debugLevel>Db</urn:debugLevel></urn:DebuggingHeader>",
            "<urn:create><urn:sObjects/><urn:sObjects/><urn:sObjects/></urn:create>",
        ))
        .unwrap();
        assert_eq!(req.op, "create");
        assert!(req.debugging);
        assert_eq!(req.items, 3);

        let req = parse(&envelope_with(
            "",
            "<urn:query><urn:queryString>SELECT Id FROM Lead</urn:queryString></urn:query>",
        ))
        .unwrap();
        assert_eq!((req.op.as_str(), req.debugging), ("query", false));
        assert_eq!(req.query.as_deref(), Some("SELECT Id FROM Lead"));
    }

    #[test]
    fn refuses_what_is_not_an_envelope() {
        assert!(parse(b"\xff\xfe").is_err());
        assert!(parse(b"<notEnvelope/>").is_err());
        assert!(parse(&envelope_with("", "")).is_err());
        assert!(parse(b"<soapenv:Envelope><soapenv:Body><query>").is_err());
    }
}
