//! The HTTP surface: builds the actix-web app from [`Settings`] around a running
//! [`Engine`]. Route groups live in their own modules (`native` for `/v1`);
//! `errors` maps every failure to one JSON shape.
//!
//! Safe by default: binds 127.0.0.1; any other address needs a token, checked on
//! every request (`Authorization: Bearer`, or `?token=`); JSON bodies are limited in
//! size; every path in a request must resolve inside the configured roots.
//!
//! Must not: touch tensors; handlers call the engine.

pub mod errors;
pub mod native;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use actix_web::dev::{Server, Service};
use actix_web::{web, App, HttpServer, ResponseError};

use self::errors::{json_error, ApiError};
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
}

impl AppState {
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

/// Binds and starts the server; returns it (to await or stop) and its address.
pub fn start(settings: &Settings, state: AppState) -> std::io::Result<(Server, SocketAddr)> {
    check_bind(settings).map_err(std::io::Error::other)?;
    let listener = TcpListener::bind((settings.host.as_str(), settings.port))?;
    let addr = listener.local_addr()?;
    let state = web::Data::new(state);
    let token = settings.token.clone().filter(|t| !t.is_empty());
    let limit = settings.max_body_bytes;
    let server = HttpServer::new(move || {
        let token = token.clone();
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
                let authorised = match &token {
                    None => true,
                    Some(t) => {
                        let bearer = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .is_some_and(|v| v == t);
                        let query = req
                            .query_string()
                            .split('&')
                            .any(|kv| kv == format!("token={t}"));
                        bearer || query
                    }
                };
                let fut = if authorised {
                    Some(srv.call(req))
                } else {
                    None
                };
                async move {
                    match fut {
                        Some(f) => f.await,
                        None => Err(ApiError::Unauthorized.into()),
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
    .listen(listener)?
    .run();
    Ok((server, addr))
}
