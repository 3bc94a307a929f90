//! [`WebuiState`]: what the A1111 routes share: the queue lock (one generation
//! at a time, as A1111's `queue_lock`) and the running generation that
//! `/progress` reports and `/interrupt` stops.
//!
//! Must not: run jobs; the txt2img handler records what it runs here.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// The generation now running through `/sdapi/v1`.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    /// The engine job of the batch now sampling.
    pub job: Option<String>,
    /// Batches done.
    pub job_no: usize,
    /// Batches asked for (`n_iter`).
    pub job_count: usize,
    pub started: Instant,
    /// `YYYYmmddHHMMSS` of the start.
    pub timestamp: String,
    pub interrupted: bool,
}

/// What the A1111 routes share.
pub(crate) struct WebuiState {
    pub(super) queue: tokio::sync::Mutex<()>,
    run: Mutex<Option<Run>>,
    /// Where img2img's start images are kept (`<data-dir>/webui`).
    pub(super) init_dir: PathBuf,
}

impl WebuiState {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            queue: tokio::sync::Mutex::new(()),
            run: Mutex::new(None),
            init_dir: data_dir.join("webui"),
        }
    }

    pub(super) fn run(&self) -> MutexGuard<'_, Option<Run>> {
        self.run
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
