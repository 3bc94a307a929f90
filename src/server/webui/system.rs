//! What A1111 reports about the process: `/cmd-flags` (the settings the daemon
//! started with, under A1111's flag names where one exists, ours beside them)
//! and `/memory` (RAM as A1111 reads it: `used` is the process's resident
//! memory, `free` the rest of the total; `cuda` as its error form, since
//! the engine does not read device memory counters).
//!
//! Must not: show the token; `api_auth` only says whether one is required.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use crate::config::{DeviceChoice, Precision, Settings};
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;
use crate::train::events::{memory_bytes, peak_memory_bytes, system_ram};

pub(super) fn routes(table: &mut RouteTable) {
    table
        .add(Method::GET, "/sdapi/v1/cmd-flags", cmd_flags_route)
        .add(Method::GET, "/sdapi/v1/memory", memory);
}

/// The `/cmd-flags` object for these settings.
fn cmd_flags(settings: &Settings) -> Value {
    let loopback = settings
        .host
        .parse::<std::net::IpAddr>()
        .map_or(settings.host == "localhost", |ip| ip.is_loopback());
    json!({
        "api": true,
        "nowebui": true,
        "listen": !loopback,
        "server_name": settings.host,
        "port": settings.port,
        "data_dir": settings.data_dir.display().to_string(),
        "ckpt": settings.model.as_ref().map(|p| p.display().to_string()),
        "lora_dir": settings.lora_dir().display().to_string(),
        "cors_allow_origins": (!settings.cors_origins.is_empty())
            .then(|| settings.cors_origins.join(",")),
        // A1111 keeps `user:password` here; we only say whether a token is needed.
        "api_auth": settings.token.as_ref().map(|_| "(bearer token required)"),
        "use_cpu": match settings.device {
            DeviceChoice::Cpu => vec!["all"],
            DeviceChoice::Cuda(_) => vec![],
        },
        "device_id": match settings.device {
            DeviceChoice::Cpu => None,
            DeviceChoice::Cuda(i) => Some(i.to_string()),
        },
        "no_half": matches!(settings.precision, Precision::F32),
        "precision": match settings.precision {
            Precision::F32 => "full",
            _ => "autocast",
        },
        "fluxlora_version": env!("CARGO_PKG_VERSION"),
        "fluxlora_precision": settings.precision,
    })
}

async fn cmd_flags_route(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(cmd_flags(&state.webui.settings))
}

async fn memory(state: web::Data<AppState>) -> HttpResponse {
    // A1111's reading: `used` is this process's resident memory, `free` the
    // rest of the machine's total.
    let (total, _) = system_ram();
    let rss = memory_bytes().unwrap_or(0);
    let cuda = if state.device.starts_with("cuda") {
        json!({"error": "device memory counters are not read by this daemon"})
    } else {
        json!({"error": "the daemon runs on the CPU"})
    };
    HttpResponse::Ok().json(json!({
        "ram": {
            "free": total.saturating_sub(rss),
            "used": rss,
            "total": total,
        },
        "cuda": cuda,
        "process": {"peak_rss": peak_memory_bytes()},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_the_settings_and_hide_the_token() {
        let settings = Settings {
            host: "0.0.0.0".into(),
            token: Some("secret-token".into()),
            cors_origins: vec!["https://a.example".into(), "https://b.example".into()],
            ..Settings::default()
        };
        let flags = cmd_flags(&settings);
        assert_eq!(flags["listen"], true);
        assert_eq!(flags["use_cpu"], json!(["all"]));
        assert_eq!(flags["no_half"], true);
        assert_eq!(
            flags["cors_allow_origins"],
            "https://a.example,https://b.example"
        );
        assert!(!flags.to_string().contains("secret-token"));
        let local = cmd_flags(&Settings {
            token: None,
            ..Settings::default()
        });
        assert_eq!(local["listen"], false);
        assert_eq!(local["api_auth"], Value::Null);
    }
}
