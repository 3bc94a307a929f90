//! Who may call the daemon: the bearer token, the browser origin and the host name.
//!
//! With a token configured, every request must carry it (`Authorization: Bearer`,
//! or `?token=` where a browser cannot set headers, as for WebSockets and image
//! URLs); it is compared in constant time. Requests from browsers carry an
//! `Origin`: only loopback origins (a local ComfyUI front end) and the configured
//! ones are served and get CORS headers, so a web page elsewhere can neither call
//! the API nor open its WebSocket. Clients that send no `Origin` (curl, scripts)
//! are not affected. Without a token (a loopback daemon) the `Host` must name this
//! machine (`localhost` or a loopback address): a page whose own host name was
//! re-pointed at 127.0.0.1 (DNS rebinding) sends its GETs without an `Origin`,
//! and is refused by this check.
//!
//! Must not: look inside request bodies.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpResponse, ResponseError};

use super::errors::ApiError;

/// The checks, built once from the settings. `Debug` does not show the token.
#[derive(Clone)]
pub(crate) struct Guard {
    token: Option<String>,
    origins: Vec<String>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("token", &crate::config::redacted(&self.token))
            .field("origins", &self.origins)
            .finish()
    }
}

/// What the guard decided about a request.
pub(crate) enum Verdict {
    /// Serve it; add CORS headers for this origin to the response.
    Pass { origin: Option<HeaderValue> },
    /// Answer now (a CORS preflight, or a refusal).
    Answer(HttpResponse),
}

impl Guard {
    pub(crate) fn new(token: Option<String>, origins: &[String]) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    pub(crate) fn check(&self, req: &ServiceRequest) -> Verdict {
        if self.token.is_none() {
            if let Some(host) = req.headers().get(header::HOST) {
                let host = host.to_str().unwrap_or("");
                if !is_loopback_host(host) {
                    return Verdict::Answer(
                        ApiError::Forbidden(format!(
                            "host `{host}` is not this machine: without a token the daemon answers only to localhost or a loopback address (use http://127.0.0.1, or start it with --token)"
                        ))
                        .error_response(),
                    );
                }
            }
        }
        let origin = req.headers().get(header::ORIGIN).cloned();
        if let Some(o) = &origin {
            if !self.origin_allowed(o.to_str().unwrap_or("")) {
                return Verdict::Answer(
                    ApiError::Forbidden(format!(
                        "origin `{}` may not call this daemon: start it with --cors-origin {0}",
                        o.to_str().unwrap_or("?")
                    ))
                    .error_response(),
                );
            }
            if req.method() == Method::OPTIONS
                && req
                    .headers()
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
            {
                let mut preflight = HttpResponse::NoContent();
                preflight
                    .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone()))
                    .insert_header((
                        header::ACCESS_CONTROL_ALLOW_METHODS,
                        "GET, POST, DELETE, OPTIONS",
                    ))
                    .insert_header((
                        header::ACCESS_CONTROL_ALLOW_HEADERS,
                        "authorization, content-type",
                    ))
                    .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
                    .insert_header((header::VARY, "Origin"));
                return Verdict::Answer(preflight.finish());
            }
        }
        if !self.authorised(req) {
            return Verdict::Answer(ApiError::Unauthorized.error_response());
        }
        Verdict::Pass { origin }
    }

    fn authorised(&self, req: &ServiceRequest) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| same_secret(v, token));
        let query = || {
            web::Query::<Vec<(String, String)>>::from_query(req.query_string())
                .is_ok_and(|q| q.iter().any(|(k, v)| k == "token" && same_secret(v, token)))
        };
        bearer || query()
    }

    /// Loopback origins (any port) and the configured ones.
    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.contains(&origin) {
            return true;
        }
        let Some(rest) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        is_loopback_host(rest)
    }
}

/// Whether `host` (`name[:port]`, as in a `Host` header or an origin after its
/// scheme) is `localhost` or a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, port)) if port.is_empty() || is_port(port) => ip,
            _ => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `:PORT` after a host: digits only (so `localhost:80@evil.com` is no loopback host).
fn is_port(rest: &str) -> bool {
    rest.strip_prefix(':')
        .unwrap_or(rest)
        .bytes()
        .all(|b| b.is_ascii_digit())
}

/// Compares a presented token with the configured one in time that depends only
/// on their lengths, not on where they first differ.
fn same_secret(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Adds the CORS headers for an allowed origin to a response.
pub(crate) fn with_cors<B: MessageBody + 'static>(
    mut res: ServiceResponse<B>,
    origin: Option<HeaderValue>,
) -> ServiceResponse<BoxBody> {
    if let Some(o) = origin {
        let headers = res.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    res.map_into_boxed_body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_configured_origins_only() {
        let g = Guard::new(None, &["https://studio.example.org/".into()]);
        for ok in [
            "http://localhost:8188",
            "http://127.0.0.1:8188",
            "http://127.0.0.5",
            "http://[::1]:8188",
            "https://studio.example.org",
        ] {
            assert!(g.origin_allowed(ok), "{ok}");
        }
        for bad in [
            "http://evil.example.com",
            "http://localhost.evil.com",
            "http://127.0.0.1.evil.com:80",
            "null",
            "file://",
            "http://192.168.1.4:8188",
            "http://localhost:80@evil.com",
            "http://[::1]evil.com",
        ] {
            assert!(!g.origin_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_host_headers_only() {
        for ok in [
            "localhost",
            "localhost:7860",
            "127.0.0.1:7860",
            "[::1]:7860",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "rebound.example.com:7860",
            "192.168.1.4",
            "localhost:7860@x",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn debug_output_hides_the_token() {
        let g = Guard::new(Some("s3cret-t0ken".into()), &[]);
        let shown = format!("{g:?}");
        assert!(!shown.contains("s3cret-t0ken"), "{shown}");
        assert!(shown.contains(r#"token: Some("<redacted>")"#), "{shown}");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret("s3cret", "s3cret"));
        for other in ["s3cre", "s3cret!", "S3cret", ""] {
            assert!(!same_secret(other, "s3cret"), "{other}");
        }
    }
}
