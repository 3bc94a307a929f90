//! What `POST /sdapi/v1/img2img` adds to txt2img (A1111's
//! `StableDiffusionImg2ImgProcessingAPI`): `init_images` (base64, a `data:` URL
//! prefix allowed; the first is used, as A1111 uses one per batch) and
//! `denoising_strength` (0.75 by default), which the sampling core runs as its
//! img2img (the image encoded by the VAE, the schedule entered part-way). The
//! image is checked by decoding it, then written once, named by its hash, in the
//! daemon's `webui/` folder, where the sampling job reads it.
//!
//! Refused (422 naming the field): inpainting (`mask`), `resize_mode` other than
//! 0 ("Just resize"), `initial_noise_multiplier` other than 1.
//!
//! Must not: sample; the txt2img handler runs the plan.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::errors::WebuiError;

/// A1111's default denoising strength.
const DEFAULT_DENOISING: f64 = 0.75;

/// The start image, on disk, and how much of the schedule runs on it.
#[derive(Clone, Debug)]
pub(super) struct InitImage {
    pub path: PathBuf,
    pub denoise: f64,
}

/// The bytes of a base64 field as A1111 clients send images (a `data:` URL
/// prefix allowed).
pub(super) fn base64_field(field: &str, text: &str) -> Result<Vec<u8>, WebuiError> {
    let encoded = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| WebuiError::field(field, format!("not base64: {e}")))
}

/// Reads img2img's fields: `denoising_strength` (a field txt2img has too, for its
/// hires fix) and the others among the fields txt2img does not know.
pub(super) fn init_image(
    denoising_strength: Option<f64>,
    fields: &Map<String, Value>,
    dir: &Path,
) -> Result<InitImage, WebuiError> {
    if fields.get("mask").is_some_and(|m| !m.is_null()) {
        return Err(WebuiError::field(
            "mask",
            "inpainting (a mask) is not supported; send no mask",
        ));
    }
    let number = |name: &str, default: f64| -> Result<f64, WebuiError> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| WebuiError::field(name, format!("must be a number, got {v}"))),
        }
    };
    if number("resize_mode", 0.0)? != 0.0 {
        return Err(WebuiError::field(
            "resize_mode",
            "only 0 (Just resize: the image is resized to width × height) is supported",
        ));
    }
    if number("initial_noise_multiplier", 1.0)? != 1.0 {
        return Err(WebuiError::field(
            "initial_noise_multiplier",
            "only 1 is supported",
        ));
    }
    let denoise = denoising_strength.unwrap_or(DEFAULT_DENOISING);
    let first = fields
        .get("init_images")
        .and_then(Value::as_array)
        .and_then(|images| images.first())
        .and_then(Value::as_str)
        .ok_or_else(|| {
            WebuiError::field("init_images", "give at least one image, base64-encoded")
        })?;
    let bytes = base64_field("init_images", first)?;
    use crate::sample::generate::{decode_limited, MAX_INIT_SIDE};
    decode_limited(&bytes, MAX_INIT_SIDE)
        .map_err(|e| WebuiError::field("init_images", format!("not a readable image: {e}")))?;
    let hash = crate::hex::hex(&Sha256::digest(&bytes)[..8]);
    let path = dir.join(format!("init-{hash}.img"));
    if !path.is_file() {
        crate::atomic_file::write(&path, &bytes)
            .map_err(|e| WebuiError::Internal(format!("writing {}: {e}", path.display())))?;
    }
    Ok(InitImage { path, denoise })
}
