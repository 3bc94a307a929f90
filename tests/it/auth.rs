//! Who gets in, over every route the app registers (`server::route_list`, so a
//! new route is covered without touching this file): with a token, a request
//! without it, with a wrong one (bearer, query or session cookie) is refused
//! on every route and both WebSockets, and the right one (bearer, query, or the
//! cookie a browser gets by opening the front end with `?token=`) is let in; a
//! foreign browser origin is refused on every route, preflight and request
//! alike, while loopback and configured origins are served; and a daemon bound
//! beyond loopback without a token does not start.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use fluxlora::server;

use crate::support::app::{spawn_app_with, App, Response};
use crate::support::concrete;

const TOKEN: &str = "s3cret-t0ken-for-auth";
const CONFIGURED: &str = "https://studio.example.org";

/// Whether `r` is the app's own 404 for a request no route took (so the route
/// under test did not serve it).
fn is_unrouted(r: &Response, method: &str, path: &str) -> bool {
    r.status == 404 && body(r).contains(&format!("no route {method} {path}"))
}

fn body(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// What happens to a WebSocket handshake on `path` with `query` and `headers`:
/// `Ok` when it upgrades, else the handshake error (which names the status).
fn handshake(app: &App, path: &str, query: &str, headers: &[(&str, &str)]) -> Result<(), String> {
    let stream = TcpStream::connect(app.addr).unwrap();
    app.ws_at(stream, path, query, headers).map(drop)
}

#[test]
fn with_a_token_every_route_and_both_websockets_let_in_only_the_token_or_its_cookie() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let with_token = spawn_app_with(
        listener,
        &tmp.path().join("state"),
        vec![],
        Some(TOKEN),
        |s| s.cors_origins = vec![CONFIGURED.into()],
    );
    // Requests below carry exactly the credentials they name.
    let app = App {
        addr: with_token.addr,
        token: None,
    };
    let bearer = format!("Bearer {TOKEN}");

    // Opening the front end once with the token starts a session cookie.
    let opened = app.get(&format!("/?token={TOKEN}"));
    assert_eq!(opened.status, 200, "{}", body(&opened));
    let set_cookie = opened.header("set-cookie").expect("a session cookie");
    assert!(!set_cookie.contains(TOKEN), "{set_cookie}");
    assert!(!body(&opened).contains(TOKEN));
    let attributes: Vec<&str> = set_cookie.split("; ").collect();
    assert_eq!(attributes[1..], ["Path=/", "HttpOnly", "SameSite=Strict"]);
    let cookie = attributes[0].to_string();
    let (cookie_name, cookie_value) = cookie.split_once('=').unwrap();
    let wrong_cookie = format!(
        "{cookie_name}={}",
        cookie_value.replace(char::is_alphanumeric, "0")
    );
    let token_cookie = format!("{cookie_name}={TOKEN}");

    let routes = server::route_list();
    let mut requests = 0usize;
    let mut covered = std::collections::BTreeSet::new();
    for (method, pattern) in &routes {
        let method = method.as_str();
        let path = concrete(pattern, "none");
        covered.insert(pattern.split('/').nth(1).unwrap_or("").to_string());
        let refused: [(&str, String, Vec<(&str, &str)>); 6] = [
            ("no token", path.clone(), vec![]),
            (
                "a wrong bearer token",
                path.clone(),
                vec![("Authorization", "Bearer s3cret-t0ken-for-autH")],
            ),
            (
                "the token without `Bearer`",
                path.clone(),
                vec![("Authorization", TOKEN)],
            ),
            (
                "a wrong query token",
                format!("{path}?token={TOKEN}x"),
                vec![],
            ),
            (
                "a cookie with a wrong value",
                path.clone(),
                vec![("Cookie", wrong_cookie.as_str())],
            ),
            (
                "the token as the cookie",
                path.clone(),
                vec![("Cookie", token_cookie.as_str())],
            ),
        ];
        for (what, uri, headers) in &refused {
            let r = app.request_with(method, uri, None, headers);
            requests += 1;
            assert_eq!(r.status, 401, "{method} {uri} with {what}: {}", body(&r));
            if method != "HEAD" {
                assert_eq!(r.json()["error"]["code"], "unauthorized");
            }
            assert!(r.header("set-cookie").is_none(), "{method} {uri}");
        }
        let admitted: [(&str, String, Vec<(&str, &str)>); 3] = [
            (
                "the bearer token",
                path.clone(),
                vec![("Authorization", bearer.as_str())],
            ),
            ("the query token", format!("{path}?token={TOKEN}"), vec![]),
            (
                "the session cookie",
                path.clone(),
                vec![("Cookie", cookie.as_str())],
            ),
        ];
        for (what, uri, headers) in &admitted {
            let r = app.request_with(method, uri, None, headers);
            requests += 1;
            assert!(
                ![401, 403].contains(&r.status) && !is_unrouted(&r, method, &path),
                "{method} {uri} with {what}: {} {}",
                r.status,
                body(&r)
            );
            assert!(!body(&r).contains(TOKEN), "{method} {uri} echoes the token");
            assert!(!r.head.contains(TOKEN), "{method} {uri} echoes the token");
        }
        // Origins: foreign ones are refused before anything else (even with the
        // token), loopback and configured ones are served with CORS headers.
        for origin in [
            "https://evil.example.com",
            "http://localhost.evil.com:8188",
            "null",
        ] {
            let preflight = app.request_with(
                "OPTIONS",
                &path,
                None,
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", method),
                ],
            );
            let actual = app.request_with(
                method,
                &path,
                None,
                &[("Origin", origin), ("Authorization", bearer.as_str())],
            );
            requests += 2;
            for (what, r) in [("preflight", &preflight), ("request", &actual)] {
                assert_eq!(
                    r.status,
                    403,
                    "{what} {method} {path} from {origin}: {}",
                    body(r)
                );
                assert!(r.header("access-control-allow-origin").is_none());
            }
        }
        for origin in ["http://127.0.0.1:8188", "http://localhost:5173", CONFIGURED] {
            let preflight = app.request_with(
                "OPTIONS",
                &path,
                None,
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", method),
                ],
            );
            assert_eq!(
                preflight.status, 204,
                "preflight {method} {path} from {origin}"
            );
            let actual = app.request_with(
                method,
                &path,
                None,
                &[("Origin", origin), ("Authorization", bearer.as_str())],
            );
            requests += 2;
            for r in [&preflight, &actual] {
                assert_eq!(
                    r.header("access-control-allow-origin").as_deref(),
                    Some(origin),
                    "{method} {path} from {origin}: {} {}",
                    r.status,
                    body(r)
                );
            }
            assert!(![401, 403].contains(&actual.status) && !is_unrouted(&actual, method, &path));
        }
    }
    // Every surface is in the table: native, A1111, ComfyUI (bare and /api/),
    // and the front end.
    for surface in [
        "v1",
        "sdapi",
        "prompt",
        "api",
        "view",
        "upload",
        "userdata",
        "{path:.*}",
    ] {
        assert!(
            covered.contains(surface),
            "no {surface} route in {covered:?}"
        );
    }

    // Both WebSockets (and ComfyUI's under /api/): the same rules, in the
    // handshake. tungstenite's error names the status.
    let mut handshakes = 0usize;
    for ws in ["/v1/ws", "/ws", "/api/ws"] {
        for (what, query, headers) in [
            ("no token", String::new(), vec![]),
            ("a wrong query token", format!("token={TOKEN}x"), vec![]),
            (
                "a wrong cookie",
                String::new(),
                vec![("Cookie", wrong_cookie.as_str())],
            ),
        ] {
            let refused = handshake(&app, ws, &query, &headers).expect_err(what);
            assert!(refused.contains("401"), "{ws} with {what}: {refused}");
            handshakes += 1;
        }
        let evil = handshake(
            &app,
            ws,
            &format!("token={TOKEN}"),
            &[("Origin", "https://evil.example.com")],
        );
        assert!(evil.expect_err("a foreign origin").contains("403"), "{ws}");
        for (what, query, headers) in [
            ("the query token", format!("token={TOKEN}"), vec![]),
            (
                "the bearer token",
                String::new(),
                vec![("Authorization", bearer.as_str())],
            ),
            (
                "the cookie, from the page",
                String::new(),
                vec![
                    ("Cookie", cookie.as_str()),
                    ("Origin", "http://localhost:8188"),
                ],
            ),
        ] {
            handshake(&app, ws, &query, &headers)
                .unwrap_or_else(|e| panic!("{ws} with {what}: {e}"));
            handshakes += 1;
        }
        handshakes += 1;
    }
    println!(
        "auth: {} routes, {requests} HTTP requests and {handshakes} WebSocket handshakes checked",
        routes.len()
    );
}

#[test]
fn without_a_token_foreign_origins_are_refused_on_every_route() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let app = spawn_app_with(listener, &tmp.path().join("state"), vec![], None, |_| {});
    let mut requests = 0usize;
    for (method, pattern) in server::route_list() {
        let path = concrete(&pattern, "none");
        let evil = "https://evil.example.com";
        let preflight = app.request_with(
            "OPTIONS",
            &path,
            None,
            &[
                ("Origin", evil),
                ("Access-Control-Request-Method", method.as_str()),
            ],
        );
        let actual = app.request_with(method.as_str(), &path, None, &[("Origin", evil)]);
        // A page whose host name was re-pointed here (DNS rebinding) and that
        // names itself as the origin.
        let rebound = app.request_with(
            method.as_str(),
            &path,
            None,
            &[
                ("Host", "rebound.example.com"),
                ("Origin", "http://rebound.example.com"),
            ],
        );
        requests += 3;
        for r in [&preflight, &actual, &rebound] {
            assert_eq!(r.status, 403, "{method} {path}: {}", body(r));
            assert!(r.header("access-control-allow-origin").is_none());
        }
    }
    println!("cors without a token: {requests} requests from foreign origins refused");
}

/// `fluxlora serve` with `args`, without `FLUXLORA_TOKEN`: its exit status and
/// stderr, or a panic if it is still serving after a minute.
fn serve_exits(args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fluxlora"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data.path())
        .args(args)
        .env_remove("FLUXLORA_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`fluxlora serve {args:?}` started serving");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

#[test]
fn the_binary_refuses_to_serve_beyond_loopback_without_a_token() {
    for args in [
        &["--host", "0.0.0.0"][..],
        &["--host", "::"][..],
        &["--host", "0.0.0.0", "--token", ""][..],
    ] {
        let (status, stderr) = serve_exits(args);
        assert!(!status.success(), "{args:?}");
        assert!(stderr.contains("set a token"), "{args:?}: {stderr}");
    }
}
