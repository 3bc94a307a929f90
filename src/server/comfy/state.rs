//! [`ComfyState`]: what the ComfyUI routes share beside [`AppState`](crate::server::AppState):
//! its folders and limits (and, as it lands, the prompt queue, history and
//! output cache of the executor).
//!
//! Must not: serve anything; it only holds.

use super::folders::Folders;
use crate::config::Settings;

/// The ComfyUI dialect's shared state.
pub struct ComfyState {
    pub folders: Folders,
    /// The largest request body accepted (`/features`' `max_upload_size`).
    pub max_upload: usize,
}

impl ComfyState {
    pub fn new(settings: &Settings) -> Self {
        Self {
            folders: Folders::new(settings),
            max_upload: settings.max_body_bytes,
        }
    }
}
