//! The HTTP surface: builds the actix-web app from [`Settings`] around a running
//! [`Engine`]. Route groups live in their own modules (`native` for `/v1`, `ws`
//! for its event stream, `openapi` for its description); `guard` decides who may
//! call; `errors` maps every failure to one JSON shape.
//!
//! Safe by default: binds 127.0.0.1; any other address needs a token, checked on
//! every request, and browsers are served only from allowed origins (`guard`);
//! JSON bodies are limited in size; every path in a request must resolve inside
//! the configured roots.
//!
//! Must not: touch tensors; handlers call the engine.

pub mod comfy;
pub mod errors;
pub mod guard;
pub mod native;
pub mod openapi;
pub mod ws;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, Service};
use actix_web::{web, App, HttpServer, ResponseError};

use self::errors::{json_error, ApiError};
use self::guard::{with_cors, Guard, Verdict};
use crate::config::Settings;
use crate::engine::Engine;

/// What handlers share.
pub struct AppState {
    pub engine: Engine,
    pub model_name: String,
    pub device: String,
    pub dtype: String,
    /// Folders requests may read from (datasets, LoRAs).
    pub roots: Vec<PathBuf>,
    /// Where bare LoRA file names are looked up.
    pub lora_dir: Option<PathBuf>,
    /// The loaded model's file or folder; `None` for the built-in tiny model.
    pub model_path: Option<PathBuf>,
    /// Where other model files are looked for.
    pub model_dirs: Vec<PathBuf>,
    /// The loaded model's sampling defaults, to check requests before queueing them.
    pub sampling: crate::model::bundle::SamplingDefaults,
    /// Set to `true` when the daemon stops: long-lived connections (WebSockets)
    /// close so they do not hold up the graceful stop.
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AppState {
    /// The state for serving `bundle` through `engine` with these settings.
    pub fn new(
        settings: &Settings,
        bundle: &crate::model::bundle::ModelBundle,
        engine: Engine,
    ) -> Self {
        Self {
            engine,
            model_name: bundle.name.clone(),
            device: settings.device.to_string(),
            dtype: format!("{:?}", bundle.flux.dtype()).to_lowercase(),
            roots: settings.read_roots(),
            lora_dir: Some(settings.lora_dir()),
            model_path: settings.model.clone(),
            model_dirs: settings.model_dirs(),
            sampling: bundle.defaults.clone(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// `path` resolved inside the configured roots, or a message saying why not.
    pub fn resolve_path(&self, path: &Path) -> Result<PathBuf, String> {
        native::resolve_in_roots(&self.roots, path)
    }
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
pub fn stop_on_signal(server: &Server, stopping: Arc<tokio::sync::watch::Sender<bool>>) {
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
pub fn start(settings: &Settings, state: AppState) -> std::io::Result<(Server, SocketAddr)> {
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
        ..settings.clone()
    };
    check_bind(&bound).map_err(std::io::Error::other)?;
    let state = web::Data::new(state);
    let guard = Guard::new(settings.token.clone(), &settings.cors_origins);
    let limit = settings.max_body_bytes;
    let server = HttpServer::new(move || {
        let guard = guard.clone();
        App::new()
            .app_data(state.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(limit)
                    .error_handler(json_error),
            )
            .app_data(
                web::QueryConfig::default()
                    .error_handler(|e, _| ApiError::bad(e.to_string()).into()),
            )
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e, _| ApiError::bad(e.to_string()).into()),
            )
            .wrap_fn(move |req, srv| {
                let verdict = guard.check(&req);
                let fut = match verdict {
                    Verdict::Pass { origin } => Ok((srv.call(req), origin)),
                    Verdict::Answer(res) => Err(req.into_response(res)),
                };
                async move {
                    match fut {
                        Ok((f, origin)) => Ok(with_cors(f.await?, origin)),
                        Err(answer) => Ok(answer.map_into_boxed_body()),
                    }
                }
            })
            .configure(native::routes)
            .default_service(web::to(|req: actix_web::HttpRequest| async move {
                ApiError::NotFound(format!("no route {} {}", req.method(), req.path()))
                    .error_response()
            }))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(STOP_GRACE.as_secs())
    .listen(listener)?
    .run();
    Ok((server, addr))
}
