//! Who may call the daemon: the bearer token, the session cookie, the browser
//! origin and the host name.
//!
//! With a token configured, every request must carry it (`Authorization: Bearer`,
//! or `?token=` where a browser cannot set headers, as for WebSockets and image
//! URLs), or the session cookie; both are compared in constant time. A request
//! let in by `?token=` (a browser opening the front end once with it) gets the
//! session cookie: `fluxlora_session_<port>`, `HttpOnly` (scripts cannot read
//! it), `SameSite=Strict` (a page or link of another site never makes the
//! browser send it, not even on a top-level GET), `Path=/`, for the browser
//! session. Its value is a hash of the token, not the token, so neither
//! responses nor the browser's cookie store hold the token; changing the token
//! ends every session. The page's later requests (fetches, `/ws`, `/view`
//! image URLs, static files) carry the cookie, and nothing else lets the page in.
//!
//! Requests from browsers carry an `Origin`: only loopback origins (a local
//! ComfyUI front end), the configured ones and the daemon's own (the page it
//! serves, reached under the `Host` it was opened with) are served and get CORS
//! headers, so a web page elsewhere can neither call the API nor open its
//! WebSocket. Clients that send no `Origin` (curl, scripts) are not affected.
//! Without a token (a loopback daemon) the `Host` must name this machine
//! (`localhost` or a loopback address): a page whose own host name was
//! re-pointed at 127.0.0.1 (DNS rebinding) sends its GETs without an `Origin`,
//! and is refused by this check.
//!
//! Must not: look inside request bodies, or write the token anywhere.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpResponse, ResponseError};
use sha2::{Digest, Sha256};

use super::errors::ApiError;

/// The checks, built once from the settings. `Debug` does not show the token
/// or the cookie's value.
#[derive(Clone)]
pub(crate) struct Guard {
    token: Option<String>,
    /// The session cookie, when there is a token.
    session: Option<Session>,
    origins: Vec<String>,
}

/// The session cookie's name (one per port: browsers share cookies between the
/// ports of a host) and value (derived from the token).
#[derive(Clone)]
struct Session {
    name: String,
    value: String,
    /// The `Set-Cookie` header that starts a browser session.
    set_cookie: HeaderValue,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("token", &crate::config::redacted(&self.token))
            .field("session", &self.session.as_ref().map(|s| &s.name))
            .field("origins", &self.origins)
            .finish()
    }
}

/// What the guard decided about a request.
pub(crate) enum Verdict {
    /// Serve it; add CORS headers for this origin to the response, and the
    /// session cookie when the request was let in by `?token=`.
    Pass {
        origin: Option<HeaderValue>,
        set_cookie: Option<HeaderValue>,
    },
    /// Answer now (a CORS preflight, or a refusal).
    Answer(HttpResponse),
}

/// What let a request in.
#[derive(Debug, PartialEq, Eq)]
enum Credential {
    /// The daemon has no token.
    NoneNeeded,
    Bearer,
    Cookie,
    Query,
}

impl Guard {
    /// The checks for a daemon with `token` (none or empty: no token) serving on
    /// `port` (it names the session cookie) to loopback origins and `origins`.
    pub(crate) fn new(token: Option<String>, origins: &[String], port: u16) -> Self {
        let token = token.filter(|t| !t.is_empty());
        let session = token.as_ref().map(|t| {
            let name = format!("fluxlora_session_{port}");
            let value = session_value(t);
            let cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
            Session {
                set_cookie: HeaderValue::from_str(&cookie)
                    .expect("a cookie of ASCII letters, digits, `_` and hex is a header value"),
                name,
                value,
            }
        });
        Self {
            token,
            session,
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    pub(crate) fn check(&self, req: &ServiceRequest) -> Verdict {
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or(""));
        if self.token.is_none() {
            if let Some(host) = host {
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
            if !self.origin_allowed(o.to_str().unwrap_or(""), host) {
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
        let Some(credential) = self.credential(req) else {
            return Verdict::Answer(ApiError::Unauthorized.error_response());
        };
        let set_cookie = match (&credential, &self.session) {
            (Credential::Query, Some(session)) => Some(session.set_cookie.clone()),
            _ => None,
        };
        Verdict::Pass { origin, set_cookie }
    }

    /// What lets `req` in, if anything: the bearer header, the session cookie,
    /// then `?token=`.
    fn credential(&self, req: &ServiceRequest) -> Option<Credential> {
        let (Some(token), Some(session)) = (&self.token, &self.session) else {
            return Some(Credential::NoneNeeded);
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| same_secret(v, token));
        if bearer {
            return Some(Credential::Bearer);
        }
        if session.presented_by(req) {
            return Some(Credential::Cookie);
        }
        let query = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .is_ok_and(|q| q.iter().any(|(k, v)| k == "token" && same_secret(v, token)));
        query.then_some(Credential::Query)
    }

    /// Loopback origins (any port), the configured ones, and the daemon's own as
    /// the browser reached it (`Host`; with a token it may be any name, and
    /// the token still decides).
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
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
            || host.is_some_and(|h| !h.is_empty() && rest == h.to_ascii_lowercase())
    }
}

impl Session {
    /// Whether a `Cookie` header of `req` holds this session's cookie.
    fn presented_by(&self, req: &ServiceRequest) -> bool {
        req.headers()
            .get_all(header::COOKIE)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == self.name && same_secret(value, &self.value))
    }
}

/// The session cookie's value for `token`: SHA-256 over a fixed label and the
/// token, in hex. It lets a browser in as the token does, but does not reveal
/// the token (which also works as a bearer token and on the WebSockets).
fn session_value(token: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"fluxlora session cookie\0");
    hash.update(token.as_bytes());
    crate::hex::hex(&hash.finalize())
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

/// Compares a presented secret with the expected one in time that depends only
/// on their lengths, not on where they first differ.
fn same_secret(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Adds to a response what the guard's verdict asked for: the CORS headers for
/// an allowed origin, the session cookie.
pub(crate) fn finish<B: MessageBody + 'static>(
    mut res: ServiceResponse<B>,
    origin: Option<HeaderValue>,
    set_cookie: Option<HeaderValue>,
) -> ServiceResponse<BoxBody> {
    let headers = res.headers_mut();
    if let Some(o) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if let Some(cookie) = set_cookie {
        headers.append(header::SET_COOKIE, cookie);
    }
    res.map_into_boxed_body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_configured_origins_only() {
        let g = Guard::new(None, &["https://studio.example.org/".into()], 7860);
        for ok in [
            "http://localhost:8188",
            "http://127.0.0.1:8188",
            "http://127.0.0.5",
            "http://[::1]:8188",
            "https://studio.example.org",
        ] {
            assert!(g.origin_allowed(ok, None), "{ok}");
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
            assert!(!g.origin_allowed(bad, None), "{bad}");
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
        let g = Guard::new(Some("s3cret-t0ken".into()), &[], 7860);
        let shown = format!("{g:?}");
        assert!(!shown.contains("s3cret-t0ken"), "{shown}");
        assert!(shown.contains(r#"token: Some("<redacted>")"#), "{shown}");
    }

    fn request(headers: &[(&str, &str)], uri: &str) -> ServiceRequest {
        let mut req = actix_web::test::TestRequest::default().uri(uri);
        for (k, v) in headers {
            req = req.insert_header((*k, *v));
        }
        req.to_srv_request()
    }

    /// The status a refusal answers, or `None` when the request passes; with the
    /// `Set-Cookie` value a pass carries.
    fn verdict(g: &Guard, headers: &[(&str, &str)], uri: &str) -> (Option<u16>, Option<String>) {
        match g.check(&request(headers, uri)) {
            Verdict::Pass { set_cookie, .. } => {
                (None, set_cookie.map(|c| c.to_str().unwrap().to_string()))
            }
            Verdict::Answer(res) => (Some(res.status().as_u16()), None),
        }
    }

    #[test]
    fn the_query_token_starts_a_cookie_session_and_only_the_right_cookie_continues_it() {
        let g = Guard::new(Some("s3cret-t0ken".into()), &[], 8188);
        let host = ("Host", "studio.lan:8188");
        let (refused, _) = verdict(&g, &[host], "/");
        assert_eq!(refused, Some(401));
        let (passed, cookie) = verdict(&g, &[host], "/?token=s3cret-t0ken");
        assert_eq!(passed, None);
        let cookie = cookie.expect("a session cookie");
        assert!(!cookie.contains("s3cret-t0ken"), "{cookie}");
        let attributes: Vec<&str> = cookie.split("; ").collect();
        assert_eq!(attributes[1..], ["Path=/", "HttpOnly", "SameSite=Strict"]);
        let pair = attributes[0];
        assert!(pair.starts_with("fluxlora_session_8188="), "{pair}");
        // The cookie lets requests in, among others; it is not set again.
        let with_others = format!("theme=dark; {pair}; x=1");
        assert_eq!(
            verdict(&g, &[host, ("Cookie", &with_others)], "/ws"),
            (None, None)
        );
        // Nothing else does: a wrong value, the token as the value, another port's name.
        let (name, value) = pair.split_once('=').unwrap();
        let mut flipped = value.to_string();
        let last = if flipped.ends_with('0') { "1" } else { "0" };
        flipped.replace_range(flipped.len() - 1.., last);
        for wrong in [
            format!("{name}={flipped}"),
            format!("{name}=s3cret-t0ken"),
            format!("{name}="),
            format!("fluxlora_session_8189={value}"),
            format!("{name}{value}"),
        ] {
            let (status, _) = verdict(&g, &[host, ("Cookie", &wrong)], "/view");
            assert_eq!(status, Some(401), "{wrong}");
        }
        // A bearer token passes without starting a session.
        let bearer = ("Authorization", "Bearer s3cret-t0ken");
        assert_eq!(verdict(&g, &[host, bearer], "/"), (None, None));
    }

    #[test]
    fn a_page_may_call_the_daemon_under_the_name_it_was_opened_with() {
        let g = Guard::new(Some("t".into()), &[], 8188);
        let cookie = format!("fluxlora_session_8188={}", session_value("t"));
        let cookie = ("Cookie", cookie.as_str());
        let host = ("Host", "studio.lan:8188");
        for own in ["http://studio.lan:8188", "https://studio.lan:8188"] {
            let (status, _) = verdict(&g, &[host, cookie, ("Origin", own)], "/prompt");
            assert_eq!(status, None, "{own}");
        }
        for foreign in [
            "http://studio.lan:9999",
            "http://evil.example.com",
            "http://studio.lan",
        ] {
            let (status, _) = verdict(&g, &[host, cookie, ("Origin", foreign)], "/prompt");
            assert_eq!(status, Some(403), "{foreign}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_secret("s3cret", "s3cret"));
        for other in ["s3cre", "s3cret!", "S3cret", ""] {
            assert!(!same_secret(other, "s3cret"), "{other}");
        }
    }
}
