//! The sampler's hot-loaded LoRAs: kept by path and modification time (an edited
//! file is read again), the least recently used dropped beyond a few, so a daemon
//! that serves many LoRAs over days does not keep them all in memory.
//!
//! Must not: read files itself; the caller loads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::adapter::Lora;

/// LoRAs kept loaded by default.
pub(crate) const DEFAULT_CAPACITY: usize = 8;

pub(crate) struct LoraCache {
    capacity: usize,
    /// Least recently used first.
    entries: Vec<(PathBuf, SystemTime, Arc<Lora>)>,
}

impl LoraCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: vec![],
        }
    }

    /// The LoRA at `path` as of `modified`, loading it with `load` when it is not
    /// kept or the file changed since.
    pub(crate) fn get_or_load<E>(
        &mut self,
        path: &Path,
        modified: SystemTime,
        load: impl FnOnce() -> Result<Lora, E>,
    ) -> Result<Arc<Lora>, E> {
        let kept = self.entries.iter().position(|(p, _, _)| p == path);
        if let Some(i) = kept {
            let entry = self.entries.remove(i);
            if entry.1 == modified {
                let lora = entry.2.clone();
                self.entries.push(entry);
                return Ok(lora);
            }
        }
        let lora = Arc::new(load()?);
        self.entries
            .push((path.to_path_buf(), modified, lora.clone()));
        if self.entries.len() > self.capacity {
            self.entries.remove(0);
        }
        Ok(lora)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_recent_loras_and_reloads_changed_files() {
        let mut cache = LoraCache::new(2);
        let t0 = SystemTime::UNIX_EPOCH;
        let mut loads = vec![];
        let mut get = |cache: &mut LoraCache, name: &str, t: SystemTime| {
            cache
                .get_or_load(Path::new(name), t, || {
                    loads.push(name.to_string());
                    Ok::<_, ()>(Lora::new(name))
                })
                .unwrap()
                .name
                .clone()
        };
        assert_eq!(get(&mut cache, "a", t0), "a");
        assert_eq!(get(&mut cache, "b", t0), "b");
        get(&mut cache, "a", t0); // hit; b is now the least recently used
        get(&mut cache, "c", t0); // evicts b
        get(&mut cache, "a", t0); // hit
        get(&mut cache, "b", t0); // loaded again
        get(&mut cache, "b", t0 + Duration::from_secs(1)); // the file changed
        assert_eq!(loads, vec!["a", "b", "c", "b", "b"]);
    }

    #[test]
    fn a_failed_load_keeps_nothing() {
        let mut cache = LoraCache::new(2);
        let t0 = SystemTime::UNIX_EPOCH;
        assert!(cache
            .get_or_load(Path::new("bad"), t0, || Err::<Lora, _>("corrupt"))
            .is_err());
        assert!(cache.entries.is_empty());
    }
}
