//! Which API family a request belongs to, decided from its path alone.
//!
//! Salesforce meters by API: everything under a versioned REST prefix
//! (`/services/data/vXX.X/…`), Bulk API 1.0 (`/services/async/XX.X/…`), Apex REST
//! (`/services/apexrest/…`) and the SOAP endpoints (`/services/Soap/{u,c,m,T}/XX.X[/ORGID]`) is
//! an API request, including one that ends in an error. The versions list, OAuth and identity
//! URLs are not, and neither is a path outside these prefixes (a 404 that never reached an API).
//! How many calls a request costs is decided later, by the family's handler.

use super::soap::SoapApi;

/// A routed request; borrowed slices point into the request path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route<'a> {
    /// The sim's own test hooks under `/_sim/`.
    Hook(Hook),
    /// `GET /services/data/`: the versions list.
    Versions,
    /// `/services/oauth2/…`.
    OAuth(OAuthOp),
    /// `/id/ORGID/USERID`: the identity URL a token response points at.
    Identity {
        org: &'a str,
        user: &'a str,
    },
    /// `/services/data/vXX.X/…`; `tail` is what follows the version.
    Rest {
        version: &'a str,
        tail: Vec<&'a str>,
    },
    /// `/services/async/XX.X/…` (Bulk API 1.0).
    Bulk1 {
        version: &'a str,
        tail: Vec<&'a str>,
    },
    /// `/services/apexrest/…`; `path` keeps the leading `/`.
    Apex {
        path: &'a str,
    },
    /// `/services/Soap/{u,c,m,T}/XX.X[/ORGID]`.
    Soap {
        api: SoapApi,
        version: &'a str,
        org: Option<&'a str>,
    },
    NotFound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hook {
    Count,
    External,
    Limit,
    Reset,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OAuthOp {
    Token,
    Revoke,
    UserInfo,
}

pub(super) fn classify(path: &str) -> Route<'_> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments[..] {
        ["_sim", ref rest @ ..] => Route::Hook(match rest {
            ["count"] => Hook::Count,
            ["external"] => Hook::External,
            ["limit"] => Hook::Limit,
            ["reset"] => Hook::Reset,
            _ => Hook::Unknown,
        }),
        ["id", org, user] => Route::Identity { org, user },
        ["services", "data"] => Route::Versions,
        ["services", "data", version, ref tail @ ..] if rest_version(version) => Route::Rest {
            version,
            tail: tail.to_vec(),
        },
        ["services", "oauth2", "token"] => Route::OAuth(OAuthOp::Token),
        ["services", "oauth2", "revoke"] => Route::OAuth(OAuthOp::Revoke),
        ["services", "oauth2", "userinfo"] => Route::OAuth(OAuthOp::UserInfo),
        ["services", "async", version, ref tail @ ..] if soap_version(version) => Route::Bulk1 {
            version,
            tail: tail.to_vec(),
        },
        ["services", "apexrest", _, ..] => {
            // Keep the Apex path as sent (from its first segment on) for the echo.
            let path = path
                .find("/apexrest/")
                .map(|at| &path[at + "/apexrest".len()..])
                .unwrap_or("/");
            Route::Apex { path }
        }
        ["services", "Soap", api, version, ref org @ ..]
            if soap_version(version) && org.len() <= 1 =>
        {
            match SoapApi::from_segment(api) {
                Some(api) => Route::Soap {
                    api,
                    version,
                    org: org.first().copied(),
                },
                None => Route::NotFound,
            }
        }
        _ => Route::NotFound,
    }
}

/// `v62.0`: a REST version segment.
fn rest_version(segment: &str) -> bool {
    segment.strip_prefix('v').is_some_and(soap_version)
}

/// `62.0`: digits, a dot, digits.
fn soap_version(segment: &str) -> bool {
    match segment.split_once('.') {
        Some((major, minor)) => {
            !major.is_empty()
                && !minor.is_empty()
                && major.bytes().all(|b| b.is_ascii_digit())
                && minor.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_paths() {
        assert_eq!(classify("/services/data/"), Route::Versions);
        assert_eq!(classify("/services/data"), Route::Versions);
        assert_eq!(
            classify("/services/data/v62.0/sobjects/Account/001"),
            Route::Rest {
                version: "v62.0",
                tail: vec!["sobjects", "Account", "001"]
            }
        );
        assert_eq!(
            classify("/services/data/v62.0"),
            Route::Rest {
                version: "v62.0",
                tail: vec![]
            }
        );
        assert_eq!(classify("/services/data/latest/sobjects"), Route::NotFound);
        assert_eq!(classify("/services/data/v62/sobjects"), Route::NotFound);
    }

    #[test]
    fn soap_paths() {
        assert_eq!(
            classify("/services/Soap/u/62.0"),
            Route::Soap {
                api: SoapApi::Partner,
                version: "62.0",
                org: None
            }
        );
        assert_eq!(
            classify("/services/Soap/T/62.0/00D000000000001AAA"),
            Route::Soap {
                api: SoapApi::Tooling,
                version: "62.0",
                org: Some("00D000000000001AAA")
            }
        );
        assert_eq!(classify("/services/Soap/x/62.0"), Route::NotFound);
        assert_eq!(classify("/services/Soap/u/62.0/org/extra"), Route::NotFound);
        assert_eq!(classify("/services/soap/u/62.0"), Route::NotFound);
    }

    #[test]
    fn other_families() {
        assert_eq!(
            classify("/services/apexrest/Orders/7"),
            Route::Apex { path: "/Orders/7" }
        );
        assert_eq!(classify("/services/apexrest"), Route::NotFound);
        assert_eq!(
            classify("/services/async/62.0/job"),
            Route::Bulk1 {
                version: "62.0",
                tail: vec!["job"]
            }
        );
        assert_eq!(
            classify("/services/oauth2/token"),
            Route::OAuth(OAuthOp::Token)
        );
        assert_eq!(classify("/services/oauth2/authorize"), Route::NotFound);
        assert_eq!(
            classify("/id/00D/005"),
            Route::Identity {
                org: "00D",
                user: "005"
            }
        );
        assert_eq!(classify("/_sim/count"), Route::Hook(Hook::Count));
        assert_eq!(classify("/_sim/nope"), Route::Hook(Hook::Unknown));
        assert_eq!(classify("/"), Route::NotFound);
        assert_eq!(classify("/cometd/62.0"), Route::NotFound);
    }
}
