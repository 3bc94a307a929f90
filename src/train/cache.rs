//! Caches of VAE latents and text-encoder outputs, in memory and optionally on disk.
//!
//! Keys hold everything that changes the cached value: for latents the image
//! file's content hash, the bucket, the crop window, the flip and the autoencoder;
//! for text the caption, the encoders and the T5 length. A disk cache written by one
//! run is reused by the next (`<cache_dir>/latents/<key>.safetensors`,
//! `<cache_dir>/text/<key>.safetensors`), and files are written atomically.
//!
//! Must not: decide what to cache (the trainer asks).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Result, Tensor};

use crate::atomic_file;

/// Text-encoder outputs for one caption.
#[derive(Clone, Debug)]
pub(crate) struct TextCond {
    /// (n_txt, t5_dim)
    pub t5: Tensor,
    /// (pooled_dim,)
    pub pooled: Tensor,
}

/// Latents and text conditioning, in memory with an optional disk copy.
pub(crate) struct Cache {
    dir: Option<PathBuf>,
    latents: HashMap<String, Tensor>,
    text: HashMap<String, TextCond>,
    pub hits: usize,
    pub misses: usize,
}

/// A short stable hash of a key string (FNV-1a 64), used for file names.
fn key_hash(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Cache {
    pub(crate) fn new(dir: Option<&Path>) -> Self {
        Self {
            dir: dir.map(Path::to_path_buf),
            latents: HashMap::new(),
            text: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    fn file(&self, kind: &str, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(kind).join(format!("{}.safetensors", key_hash(key))))
    }

    /// Reads `names` from a cache file whose stored key equals `key` (guards against
    /// hash collisions); `None` when absent or unreadable.
    fn read(&self, kind: &str, key: &str, names: &[&str]) -> Option<Vec<Tensor>> {
        let path = self.file(kind, key)?;
        let bytes = std::fs::read(&path).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        if meta.metadata().as_ref()?.get("key")? != key {
            return None;
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
        names.iter().map(|n| tensors.get(*n).cloned()).collect()
    }

    fn write(&self, kind: &str, key: &str, tensors: &[(&str, &Tensor)]) -> Result<()> {
        let Some(path) = self.file(kind, key) else {
            return Ok(());
        };
        let cpu: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(n, t)| Ok((*n, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let meta = HashMap::from([("key".to_string(), key.to_string())]);
        let bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (*n, t)), Some(meta))
            .map_err(|e| candle_core::Error::msg(format!("cache {}: {e}", path.display())))?;
        atomic_file::write(&path, &bytes)
            .map_err(|e| candle_core::Error::msg(format!("cache {}: {e}", path.display())))
    }

    /// The latents for `key` from memory or disk, if cached.
    pub(crate) fn get_latents(&mut self, key: &str, device: &Device) -> Result<Option<Tensor>> {
        if let Some(t) = self.latents.get(key) {
            self.hits += 1;
            return Ok(Some(t.clone()));
        }
        let Some(mut v) = self.read("latents", key, &["latents"]) else {
            return Ok(None);
        };
        self.hits += 1;
        let t = v.remove(0).to_device(device)?;
        self.latents.insert(key.to_string(), t.clone());
        Ok(Some(t))
    }

    /// Stores freshly computed latents in memory and on disk.
    pub(crate) fn put_latents(&mut self, key: &str, t: &Tensor) -> Result<()> {
        self.misses += 1;
        self.write("latents", key, &[("latents", t)])?;
        self.latents.insert(key.to_string(), t.clone());
        Ok(())
    }

    /// The text conditioning for `key` from memory or disk, if cached.
    pub(crate) fn get_text(&mut self, key: &str, device: &Device) -> Result<Option<TextCond>> {
        if let Some(c) = self.text.get(key) {
            self.hits += 1;
            return Ok(Some(c.clone()));
        }
        let Some(v) = self.read("text", key, &["t5", "pooled"]) else {
            return Ok(None);
        };
        self.hits += 1;
        let c = TextCond {
            t5: v[0].to_device(device)?,
            pooled: v[1].to_device(device)?,
        };
        self.text.insert(key.to_string(), c.clone());
        Ok(Some(c))
    }

    /// Stores freshly computed text conditioning in memory and on disk.
    pub(crate) fn put_text(&mut self, key: &str, c: &TextCond) -> Result<()> {
        self.misses += 1;
        self.write("text", key, &[("t5", &c.t5), ("pooled", &c.pooled)])?;
        self.text.insert(key.to_string(), c.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_cache_is_reused_by_a_new_cache_and_keys_are_checked() -> Result<()> {
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let dev = Device::Cpu;
        let t = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let mut a = Cache::new(Some(dir.path()));
        assert!(a.get_latents("img#1", &dev)?.is_none());
        a.put_latents("img#1", &t)?;
        let mut b = Cache::new(Some(dir.path()));
        let got = b.get_latents("img#1", &dev)?.expect("read back from disk");
        assert_eq!(got.to_vec1::<f32>()?, vec![1., 2., 3.]);
        assert_eq!(b.hits, 1);
        assert!(b.get_latents("img#2", &dev)?.is_none());
        let c = TextCond {
            t5: Tensor::ones((2, 3), candle_core::DType::F32, &dev)?,
            pooled: Tensor::zeros(4, candle_core::DType::F32, &dev)?,
        };
        a.put_text("caption", &c)?;
        let got = Cache::new(Some(dir.path()))
            .get_text("caption", &dev)?
            .expect("cached");
        assert_eq!(got.t5.dims(), &[2, 3]);
        // Memory-only caches keep nothing on disk.
        let mut m = Cache::new(None);
        m.put_latents("x", &t)?;
        assert!(m.get_latents("x", &dev)?.is_some());
        Ok(())
    }
}
