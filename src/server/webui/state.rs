//! [`WebuiState`]: what the A1111 routes share: the queue lock (one generation
//! at a time, as A1111's `queue_lock`) and the running generation that
//! `/progress` reports and `/interrupt` stops.
//!
//! Must not: run jobs; the txt2img handler records what it runs here.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// `/skip` asked to drop the batch now sampling and go on with the next.
    pub skipped: bool,
    /// The step the batch now sampling has done, of how many.
    pub step: usize,
    pub steps: usize,
    /// The newest preview of the batch now sampling (PNG): `/progress`'s
    /// `current_image`.
    pub preview: Option<Arc<[u8]>>,
}

impl Run {
    /// A run of `job_count` batches starting now.
    pub(crate) fn new(job_count: usize, timestamp: String) -> Self {
        Self {
            job: None,
            job_no: 0,
            job_count,
            started: Instant::now(),
            timestamp,
            interrupted: false,
            skipped: false,
            step: 0,
            steps: 0,
            preview: None,
        }
    }
}

/// What the A1111 routes share.
pub(crate) struct WebuiState {
    pub(super) queue: tokio::sync::Mutex<()>,
    run: Mutex<Option<Run>>,
    /// Where img2img's start images are kept (`<data-dir>/webui`).
    pub(super) init_dir: PathBuf,
    /// The settings the daemon was started with (`/cmd-flags` shows them).
    pub(super) settings: crate::config::Settings,
}

impl WebuiState {
    pub(crate) fn new(settings: &crate::config::Settings) -> Self {
        Self {
            queue: tokio::sync::Mutex::new(()),
            run: Mutex::new(None),
            init_dir: settings.data_dir.join("webui"),
            settings: settings.clone(),
        }
    }

    pub(super) fn run(&self) -> MutexGuard<'_, Option<Run>> {
        self.run
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
