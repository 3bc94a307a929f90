//! Jobs on disk: `<data>/jobs/<id>/job.json` (the record, rewritten atomically on
//! every change) and `events.jsonl` (one event per line, appended; a torn line
//! from a crash is skipped when read back). A training job's saves live in the
//! same folder. `<data>/jobs/.last_seq` keeps the newest event number handed out
//! when it may be higher than any stored event's (after a delete or a clean stop).
//!
//! Must not: run jobs.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::events::{Event, JobState};
use crate::atomic_file;

/// What a job is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Train,
    Sample,
}

/// The persisted record of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    /// Unix seconds.
    pub created: f64,
    pub updated: f64,
    /// The request as submitted (a TrainConfig or a sample request).
    pub request: serde_json::Value,
    /// Files the job produced (LoRAs, images).
    #[serde(default)]
    #[schema(value_type = Vec<String>, required)]
    pub outputs: Vec<PathBuf>,
    #[serde(default)]
    #[schema(required)]
    pub error: Option<String>,
}

/// The sequence number of a stored line that is a JSON object with one: a number
/// handed out, whether or not the rest of the line still reads as an event.
fn seq_of(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line).ok()?["seq"].as_u64()
}

/// The jobs folder.
pub(crate) struct JobStore {
    root: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{}: {e}", path.display()))
}

impl JobStore {
    pub(crate) fn open(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("jobs");
        std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
        Ok(Self { root })
    }

    /// The jobs folder itself.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates the folder of a new job; `false` when a job of that id exists.
    pub(crate) fn claim(&self, id: &str) -> std::io::Result<bool> {
        let dir = self.dir(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(&dir, e)),
        }
    }

    fn high_water_path(&self) -> PathBuf {
        self.root.join(".last_seq")
    }

    /// The newest event number recorded by [`Self::set_high_water`] (0 if none).
    pub(crate) fn high_water(&self) -> u64 {
        std::fs::read_to_string(self.high_water_path())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records the newest event number handed out (atomically).
    pub(crate) fn set_high_water(&self, seq: u64) -> std::io::Result<()> {
        let path = self.high_water_path();
        atomic_file::write(&path, seq.max(self.high_water()).to_string().as_bytes())
            .map_err(|e| io(&path, e))
    }

    /// Writes the record atomically (creating the job folder).
    pub(crate) fn save(&self, record: &JobRecord) -> std::io::Result<()> {
        let path = self.dir(&record.id).join("job.json");
        let text = serde_json::to_vec_pretty(record).map_err(|e| io(&path, e))?;
        atomic_file::write(&path, &text).map_err(|e| io(&path, e))
    }

    /// Appends an event to its job's log (previews are not stored).
    pub(crate) fn append(&self, event: &Event) -> std::io::Result<()> {
        if event.is_preview() {
            return Ok(());
        }
        let path = self.dir(&event.job).join("events.jsonl");
        let mut line = serde_json::to_vec(event).map_err(|e| io(&path, e))?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        f.write_all(&line).map_err(|e| io(&path, e))
    }

    /// The job's stored events with `seq > since`, in order. Lines that do not
    /// parse as an event (torn by a crash, even inside a UTF-8 character) are skipped.
    pub(crate) fn events_since(&self, id: &str, since: u64) -> std::io::Result<Vec<Event>> {
        Ok(self
            .lines(id)?
            .split(|&b| b == b'\n')
            .filter_map(|l| serde_json::from_slice::<Event>(l).ok())
            .filter(|e| e.seq > since)
            .collect())
    }

    /// The bytes of a job's event log (none when it has no log yet).
    fn lines(&self, id: &str) -> std::io::Result<Vec<u8>> {
        let path = self.dir(id).join("events.jsonl");
        match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Every stored record (unreadable ones are skipped with a warning), oldest first.
    pub(crate) fn load_all(&self) -> std::io::Result<Vec<JobRecord>> {
        let mut out = vec![];
        for entry in std::fs::read_dir(&self.root).map_err(|e| io(&self.root, e))? {
            let Ok(entry) = entry else { continue };
            let path = entry.path().join("job.json");
            match std::fs::read(&path).map(|b| serde_json::from_slice::<JobRecord>(&b)) {
                // A record names its own folder; one that names another is not trusted.
                Ok(Ok(r)) if entry.file_name().to_str() == Some(r.id.as_str()) => out.push(r),
                Ok(Ok(r)) => {
                    tracing::warn!(file = %path.display(), id = %r.id, "skipping a job record whose id is not its folder's name")
                }
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping unreadable job record")
                }
                Err(_) => {}
            }
        }
        out.sort_by(|a, b| a.created.total_cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Ends a job's log with a newline if a crash left a torn last line, so the next
    /// event does not run into it.
    pub(crate) fn seal_log(&self, id: &str) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.dir(id).join("events.jsonl");
        let mut f = match OpenOptions::new().read(true).append(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        };
        let len = f.metadata().map_err(|e| io(&path, e))?.len();
        if len == 0 {
            return Ok(());
        }
        let mut last = [0u8];
        f.seek(SeekFrom::Start(len - 1))
            .and_then(|_| f.read_exact(&mut last))
            .map_err(|e| io(&path, e))?;
        if last[0] != b'\n' {
            f.write_all(b"\n").map_err(|e| io(&path, e))?;
        }
        Ok(())
    }

    /// The newest stored event's sequence number of a job, read from the end of its
    /// log (events are appended in order; a torn last line is skipped), so a start
    /// with a long history does not parse every event.
    pub(crate) fn last_seq(&self, id: &str) -> Option<u64> {
        use std::io::{Read, Seek, SeekFrom};
        const TAIL: u64 = 16 * 1024;
        let path = self.dir(id).join("events.jsonl");
        let mut f = std::fs::File::open(&path).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).ok()?;
        let from_tail = tail.split(|&b| b == b'\n').rev().find_map(seq_of);
        // A last event longer than the tail: read the whole log.
        from_tail.or_else(|| {
            self.lines(id)
                .ok()?
                .split(|&b| b == b'\n')
                .filter_map(seq_of)
                .max()
        })
    }

    /// Deletes a job's folder.
    pub(crate) fn remove(&self, id: &str) -> std::io::Result<()> {
        let dir = self.dir(id);
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::events::EventKind;

    #[test]
    fn records_and_events_round_trip_and_torn_lines_are_skipped() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = JobStore::open(dir.path())?;
        let rec = JobRecord {
            id: "j1".into(),
            kind: JobKind::Train,
            state: JobState::Running,
            created: 1.0,
            updated: 1.0,
            request: serde_json::json!({"max_train_steps": 3}),
            outputs: vec![],
            error: None,
        };
        store.save(&rec)?;
        for seq in 1..=3 {
            store.append(&Event {
                seq,
                job: "j1".into(),
                time: 0.0,
                kind: EventKind::State {
                    state: JobState::Running,
                },
            })?;
        }
        // A crash mid-append leaves a torn line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(store.dir("j1").join("events.jsonl"))?;
        f.write_all(b"{\"seq\": 4, \"job\"")?;
        assert_eq!(store.load_all()?, vec![rec]);
        let since = store.events_since("j1", 1)?;
        assert_eq!(since.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(since[0].to_json()["type"], "state");
        assert_eq!(store.last_seq("j1"), Some(3));
        assert_eq!(store.last_seq("none"), None);
        // After a restart seals the log, new events are readable again.
        store.seal_log("j1")?;
        store.seal_log("j1")?;
        store.append(&Event {
            seq: 5,
            job: "j1".into(),
            time: 0.0,
            kind: EventKind::State {
                state: JobState::Interrupted,
            },
        })?;
        assert_eq!(store.last_seq("j1"), Some(5));
        assert_eq!(store.events_since("j1", 3)?.len(), 1);
        // A line torn inside a UTF-8 character hides nothing after it.
        let mut f = OpenOptions::new()
            .append(true)
            .open(store.dir("j1").join("events.jsonl"))?;
        f.write_all(b"{\"seq\": 6, \"job\": \"j1\", \"data\": {\"message\": \"\xc3\n")?;
        store.append(&Event {
            seq: 7,
            job: "j1".into(),
            time: 0.0,
            kind: EventKind::Error {
                message: "café".into(),
            },
        })?;
        let after: Vec<u64> = store.events_since("j1", 4)?.iter().map(|e| e.seq).collect();
        assert_eq!(after, vec![5, 7]);
        Ok(())
    }

    #[test]
    fn ids_are_claimed_once_and_the_high_water_mark_only_rises() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = JobStore::open(dir.path())?;
        assert!(store.claim("a")?);
        assert!(!store.claim("a")?);
        assert_eq!(store.high_water(), 0);
        store.set_high_water(9)?;
        store.set_high_water(4)?;
        assert_eq!(store.high_water(), 9);
        // The mark is no job, nor is a record that names another folder.
        let forged = JobRecord {
            id: "..".into(),
            kind: JobKind::Sample,
            state: JobState::Finished,
            created: 0.0,
            updated: 0.0,
            request: serde_json::Value::Null,
            outputs: vec![],
            error: None,
        };
        let text = serde_json::to_vec(&forged).unwrap();
        std::fs::write(store.dir("a").join("job.json"), text)?;
        assert_eq!(store.load_all()?, vec![]);
        Ok(())
    }
}
