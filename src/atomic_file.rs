//! Whole-file writes that never leave a half-written file behind: write to a
//! temporary file in the destination folder, fsync, then rename over the target.
//!
//! Owns the one way the project writes user-visible files (images, LoRAs, job
//! state). Must not: write anywhere but next to the target.
//!
//! Fault injection, for the crash tests (`tests/it/faults.rs`) only: a process
//! started with `FLUXLORA_FAULT_STALL_WRITE=<part>:<n>` (read once, at its first
//! write) stalls in its `n`-th [`write`] of a file whose name contains `<part>`:
//! half the bytes reach the temporary file, a warning says so, and the writing
//! thread blocks for good, so the test can SIGKILL the daemon in the middle of a
//! save. Unset, it costs one check per write and changes nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable of the fault-injection point (see the module comment).
const STALL_WRITE_ENV: &str = "FLUXLORA_FAULT_STALL_WRITE";

/// Makes temporary names unique within the process (concurrent writers of one target).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes the file at `path` through `fill`, atomically: readers see the old file or
/// the complete new one. Parent folders are created.
pub(crate) fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable (best effort; not possible on every platform).
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether `name` is one of our temporary names (`.<target>….tmp`, files and the
/// state folders of training saves).
fn is_leftover(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Removes temporary files and folders a killed process left under `dir` (down to
/// `depth` levels); returns how many were removed. Only our own temporary names are
/// touched.
pub(crate) fn remove_leftovers(dir: &Path, depth: usize) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type()?.is_dir();
        if is_leftover(&entry.file_name().to_string_lossy()) {
            if is_dir {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed += 1;
        } else if is_dir && depth > 0 {
            removed += remove_leftovers(&path, depth - 1)?;
        }
    }
    Ok(removed)
}

/// [`write_with`] for bytes already in memory.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |w| {
        if stall_point().is_some_and(|s| s.is_due(path)) {
            w.write_all(&bytes[..bytes.len() / 2])?;
            w.flush()?;
            tracing::warn!(file = %path.display(), "fault injection ({STALL_WRITE_ENV}): stalled in the middle of a write");
            loop {
                std::thread::park();
            }
        }
        w.write_all(bytes)
    })
}

/// Where to stall: the `nth` write of a file whose name contains `part`.
struct StallPoint {
    part: String,
    nth: u64,
    seen: AtomicU64,
}

impl StallPoint {
    /// `<part>:<n>`, with `n` ≥ 1.
    fn parse(spec: &str) -> Option<Self> {
        let (part, nth) = spec.rsplit_once(':')?;
        let nth = nth.parse().ok().filter(|&n| n >= 1)?;
        Some(Self {
            part: part.to_string(),
            nth,
            seen: AtomicU64::new(0),
        })
    }

    /// Counts a write of `path` and says whether it is the one to stall.
    fn is_due(&self, path: &Path) -> bool {
        let named = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains(&self.part));
        named && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.nth
    }
}

/// The process's stall point, from [`STALL_WRITE_ENV`] (read once).
fn stall_point() -> Option<&'static StallPoint> {
    static POINT: OnceLock<Option<StallPoint>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let spec = std::env::var(STALL_WRITE_ENV).ok()?;
            let point = StallPoint::parse(&spec);
            if point.is_none() {
                tracing::warn!(%spec, "{STALL_WRITE_ENV} is not `<part of a file name>:<n>`; ignored");
            }
            point
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.bin");
        write(&path, b"old")?;
        let err = write_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path)?, b"old");
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
        write(&path, b"new")?;
        assert_eq!(std::fs::read(&path)?, b"new");
        Ok(())
    }

    #[test]
    fn the_stall_point_picks_the_nth_write_of_matching_files() {
        assert!(StallPoint::parse("weights").is_none());
        assert!(StallPoint::parse("weights:0").is_none());
        let point = StallPoint::parse("weights.safetensors:2").expect("a valid spec");
        let due: Vec<bool> = [
            "s/.run-step000004-state.tmp/weights.safetensors",
            "s/run-step000004.safetensors",
            "s/.run-step000008-state.tmp/weights.safetensors",
            "s/.run-step000012-state.tmp/weights.safetensors",
        ]
        .iter()
        .map(|p| point.is_due(Path::new(p)))
        .collect();
        assert_eq!(due, [false, false, true, false]);
    }

    #[test]
    fn leftovers_of_a_killed_writer_are_removed_and_nothing_else() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let job = dir.path().join("job");
        std::fs::create_dir_all(job.join(".lora-step000004-state.tmp"))?;
        std::fs::write(job.join(".lora.safetensors.77.0.tmp"), b"half")?;
        std::fs::write(job.join("lora.safetensors"), b"whole")?;
        std::fs::write(job.join(".hidden"), b"user's")?;
        std::fs::write(dir.path().join("notes.tmp"), b"user's")?;
        assert_eq!(remove_leftovers(dir.path(), 1)?, 2);
        let mut left: Vec<_> = std::fs::read_dir(&job)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()?;
        left.sort();
        assert_eq!(left, vec![".hidden", "lora.safetensors"]);
        assert!(dir.path().join("notes.tmp").exists());
        Ok(())
    }
}
