//! The HTTP surface: builds the actix-web app from [`Settings`] around a running
//! [`Engine`](crate::engine::Engine), one module per concern:
//!
//! - `native/`: the `/v1` API, one module per resource;
//! - `ws`: `/v1/ws`, the event stream;
//! - `comfy/`: the ComfyUI dialect; `webui/`: A1111's `/sdapi/v1`;
//! - `openapi`: the document of `/v1`, derived from the handlers and types;
//! - shared by the dialects: `state` (what handlers share), `paths` (the
//!   path-confinement policy), `present` (one presentation of events), `errors`
//!   (one mapping from errors to HTTP), `guard` (who may call) and `route_table`
//!   (every route is registered through it).
//!
//! This module only builds the app and registers each module's routes; the
//! modules do not import it, nor each other's routes (check:
//! `scripts/check-server-cycles.sh`).
//!
//! Safe by default: binds 127.0.0.1; any other address needs a token, checked on
//! every request, and browsers are served only from allowed origins (`guard`);
//! JSON bodies are limited in size; every path in a request must resolve inside
//! the configured roots (`paths`).
//!
//! Must not: touch tensors; handlers call the engine.

mod admission;
pub(crate) mod comfy;
pub(crate) mod errors;
pub(crate) mod guard;
mod native;
pub(crate) mod openapi;
mod paths;
mod present;
mod route_table;
mod state;
mod webui;
pub(crate) mod ws;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::BoxBody;
use actix_web::dev::{Server, Service, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::{web, App, HttpServer, ResponseError};

use self::errors::{json_error, ApiError};
use self::guard::{finish, Guard, Verdict};
use self::route_table::RouteTable;
pub use self::state::AppState;
use crate::config::Settings;

/// Registers every route of the app; returns `(method, actix pattern)` of each,
/// in the order they are matched. The native ones (`/v1/...`) are what the
/// OpenAPI document must list.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) -> Vec<(Method, String)> {
    let mut table = RouteTable::new(cfg);
    native::routes(&mut table);
    ws::routes(&mut table);
    openapi::routes(&mut table);
    let mut all = table.registered();
    // The A1111 and ComfyUI dialects are not part of the /v1 document. ComfyUI's
    // goes last: its front end takes every GET path no route took.
    let mut table = RouteTable::new(cfg);
    webui::routes(&mut table);
    all.extend(table.registered());
    let mut table = RouteTable::new(cfg);
    comfy::routes(&mut table);
    all.extend(table.registered());
    all
}

/// `(method, actix pattern)` of every route the app serves, on every surface, in
/// the order they are matched (for tests that must cover each route, such as
/// the token and origin checks).
pub fn route_list() -> Vec<(Method, String)> {
    let mut all = vec![];
    let _ = App::new().configure(|cfg| all = routes(cfg));
    all
}

/// A body over `limit` that a handler read whole is refused by actix's payload
/// extractor with a plain-text 413; this answers it as every other error is.
fn over_limit_as_json(res: ServiceResponse<BoxBody>, limit: usize) -> ServiceResponse<BoxBody> {
    let overflow = res.status() == actix_web::http::StatusCode::PAYLOAD_TOO_LARGE
        && res
            .response()
            .error()
            .and_then(|e| e.as_error::<actix_web::error::PayloadError>())
            .is_some_and(|e| matches!(e, actix_web::error::PayloadError::Overflow));
    if !overflow {
        return res;
    }
    let answer =
        ApiError::TooLarge(format!("request body is over the {limit}-byte limit")).error_response();
    res.into_response(answer)
}

/// Checks the settings are safe to serve with; the message names the setting.
pub fn check_bind(settings: &Settings) -> Result<(), String> {
    let ip: IpAddr = settings
        .host
        .parse()
        .map_err(|_| format!("host `{}` is not an IP address", settings.host))?;
    if !ip.is_loopback() && settings.token.as_deref().is_none_or(str::is_empty) {
        return Err(format!(
            "binding to {ip} exposes the daemon beyond this machine: set a token (--token or FLUXLORA_TOKEN)"
        ));
    }
    Ok(())
}

/// How long requests in flight (a synchronous sample) may take to finish once the
/// daemon is asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops `server` on Ctrl-C or SIGTERM: WebSockets are told first (they close
/// with "going away"), then requests in flight get [`STOP_GRACE`] to finish.
/// Call inside the server's runtime.
pub(crate) fn stop_on_signal(server: &Server, stopping: Arc<tokio::sync::watch::Sender<bool>>) {
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        let interrupted = actix_web::rt::signal::ctrl_c();
        #[cfg(unix)]
        {
            use actix_web::rt::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut terminate) => {
                    tokio::select! {
                        _ = interrupted => {}
                        _ = terminate.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = interrupted.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = interrupted.await;
        tracing::info!("stopping: closing WebSockets, finishing requests in flight");
        stopping.send_replace(true);
        handle.stop(true).await;
    });
}

/// Binds and starts the server; returns it (to await or stop) and its address.
pub(crate) fn start(settings: &Settings, state: AppState) -> std::io::Result<(Server, SocketAddr)> {
    let listener = TcpListener::bind((settings.host.as_str(), settings.port))?;
    start_on(listener, settings, state)
}

/// Starts the server on a bound listener (whose socket options its connections
/// inherit); the listener's address must pass [`check_bind`] with these settings.
pub fn start_on(
    listener: TcpListener,
    settings: &Settings,
    state: AppState,
) -> std::io::Result<(Server, SocketAddr)> {
    let addr = listener.local_addr()?;
    let bound = Settings {
        host: addr.ip().to_string(),
        port: addr.port(),
        ..settings.clone()
    };
    check_bind(&bound).map_err(std::io::Error::other)?;
    let state = web::Data::new(state);
    let server = HttpServer::new(move || app(&bound, state.clone()))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(STOP_GRACE.as_secs())
        .listen(listener)?
        .run();
    Ok((server, addr))
}

/// The app that serves `state` with these settings (their port names the
/// session cookie): the guard around every route, the body limits and the error
/// shapes. [`start_on`] serves it; tests may call it in process.
pub fn app(
    settings: &Settings,
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let guard = Guard::new(
        settings.token.clone(),
        &settings.cors_origins,
        settings.port,
    );
    let limit = settings.max_body_bytes;
    App::new()
        .app_data(state)
        .app_data(
            web::JsonConfig::default()
                .limit(limit)
                .error_handler(json_error),
        )
        // Bodies read whole (`web::Bytes`: the A1111 routes, ComfyUI's queue,
        // history and settings) have the JSON bodies' limit too, not actix's 256 KiB.
        .app_data(web::PayloadConfig::new(limit))
        .app_data(
            web::QueryConfig::default().error_handler(|e, _| ApiError::bad(e.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default().error_handler(|e, _| ApiError::bad(e.to_string()).into()),
        )
        .wrap_fn(move |req, srv| {
            let verdict = guard.check(&req);
            let fut = match verdict {
                Verdict::Pass { origin, set_cookie } => Ok((srv.call(req), origin, set_cookie)),
                Verdict::Answer(res) => Err(req.into_response(res)),
            };
            async move {
                match fut {
                    Ok((f, origin, set_cookie)) => {
                        let res = over_limit_as_json(f.await?, limit);
                        Ok(finish(res, origin, set_cookie))
                    }
                    Err(answer) => Ok(answer.map_into_boxed_body()),
                }
            }
        })
        .configure(|cfg| {
            routes(cfg);
        })
        .default_service(web::to(|req: actix_web::HttpRequest| async move {
            ApiError::NotFound(format!(
                "fluxlora does not implement {} {}",
                req.method(),
                req.path()
            ))
            .error_response()
        }))
}
