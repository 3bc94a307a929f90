//! `POST /upload/image` (`docs/comfyui-protocol.md` §1): a multipart `image`
//! into the input (or temp, output) folder, in an optional `subfolder`. Unlike
//! ComfyUI the image is decoded and checked before anything is written, the
//! body is limited to [`ComfyState::max_upload`](super::state::ComfyState), and
//! the file is written atomically. Without `overwrite`, a clash becomes
//! `name (1).ext` unless the file there has the same bytes (then nothing is
//! written and its name is answered), as ComfyUI does.
//!
//! Must not: write outside the folder: the file name must be a plain name and
//! the subfolder may not climb or be absolute.

use std::path::{Component, Path};

use actix_web::http::header::CONTENT_TYPE;
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::images;
use super::multipart::{self, Part};
use super::routes::both;
use crate::server::errors::ApiError;
use crate::server::paths;
use crate::server::route_table::RouteTable;
use crate::server::state::AppState;

pub(super) fn routes(table: &mut RouteTable) {
    both(table, Method::POST, "/upload/image", upload_image);
}

/// Reads the body up to `limit` bytes.
async fn read_limited(body: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    match body.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(ApiError::bad(format!("reading the upload: {e}"))),
        Err(_) => Err(ApiError::TooLarge(format!(
            "the upload is over the {limit}-byte limit"
        ))),
    }
}

fn text_field<'p>(parts: &'p [Part], name: &str) -> Option<&'p str> {
    parts
        .iter()
        .find(|p| p.name == name && p.filename.is_none())
        .and_then(|p| std::str::from_utf8(&p.data).ok())
        .map(str::trim)
}

/// A plain file name: no folders (`/`, `\`), not hidden, no NUL. A name with a
/// path is refused, not cut to its last part, as ComfyUI refuses one that
/// leaves the folder: the client meant another place than the one we would
/// write.
fn plain_name(written: &str) -> Result<String, ApiError> {
    if written.is_empty()
        || written.starts_with('.')
        || written.contains(['/', '\\', '\0'])
        || paths::has_overlong_name(Path::new(written))
    {
        return Err(ApiError::bad(format!(
            "image: `{written}` is not a plain file name (no folders, not hidden, at most {} bytes): put folders in `subfolder`",
            paths::NAME_MAX
        ))
        .at("image"));
    }
    Ok(written.to_string())
}

/// `name (n).ext`.
fn numbered(name: &str, n: u32) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem} ({n}).{ext}"),
        None => format!("{name} ({n})"),
    }
}

async fn upload_image(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = read_limited(body, state.comfy.max_upload).await?;
    let parts =
        multipart::parse(&content_type, &bytes).map_err(|e| ApiError::bad(e.to_string()))?;
    let image = parts
        .iter()
        .find(|p| p.name == "image" && p.filename.is_some())
        .ok_or_else(|| {
            ApiError::bad("send the image as a multipart file field named `image`").at("image")
        })?;
    let name = plain_name(image.filename.as_deref().unwrap_or(""))?;
    let kind = text_field(&parts, "type")
        .filter(|t| !t.is_empty())
        .unwrap_or("input");
    if !matches!(kind, "input" | "temp" | "output") {
        return Err(ApiError::bad(format!("type `{kind}`: use input, temp or output")).at("type"));
    }
    let subfolder = text_field(&parts, "subfolder").unwrap_or("");
    if subfolder.contains(['\\', '\0'])
        || paths::has_overlong_name(Path::new(subfolder))
        || Path::new(subfolder)
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ApiError::bad(format!(
            "subfolder `{subfolder}` must stay inside the {kind} folder (`/` between folders; no `..`, `\\` or NUL, not absolute; names of at most 255 bytes)"
        ))
        .at("subfolder"));
    }
    let overwrite = matches!(text_field(&parts, "overwrite"), Some("true" | "1"));
    images::decode(&name, &image.data).map_err(|e| ApiError::bad(e.to_string()).at("image"))?;

    let folder = state
        .comfy
        .folders
        .dir(kind)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    // The path policy for writes, before anything is made: the nearest existing
    // part of the subfolder lies inside the folder once links are followed.
    let leads_out = || {
        ApiError::Forbidden(format!(
            "subfolder `{subfolder}` leads out of the {kind} folder"
        ))
    };
    let folder = folder.canonicalize().map_err(|_| leads_out())?;
    let dir = paths::resolve_for_writing(std::slice::from_ref(&folder), &folder.join(subfolder))
        .map_err(|_| leads_out())?;
    if dir.exists() && !dir.is_dir() {
        return Err(ApiError::bad(format!(
            "subfolder `{subfolder}` is a file of the {kind} folder, not a folder"
        ))
        .at("subfolder"));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
    // A link inside the folder may not lead the write out of it.
    let inside = |p: &Path| p.canonicalize().is_ok_and(|p| p.starts_with(&folder));
    let mut chosen = name.clone();
    if !overwrite {
        let mut n = 1;
        loop {
            let path = dir.join(&chosen);
            match std::fs::read(&path) {
                Err(_) => break,
                Ok(existing) if existing == image.data => {
                    return Ok(HttpResponse::Ok()
                        .json(json!({"name": chosen, "subfolder": subfolder, "type": kind})));
                }
                Ok(_) => {
                    chosen = numbered(&name, n);
                    n += 1;
                }
            }
        }
    }
    let path = dir.join(&chosen);
    if path.exists() && !inside(&path) {
        return Err(ApiError::Forbidden(format!(
            "`{chosen}` leads out of the {kind} folder"
        )));
    }
    crate::atomic_file::write(&path, &image.data)
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
    Ok(HttpResponse::Ok().json(json!({"name": chosen, "subfolder": subfolder, "type": kind})))
}
