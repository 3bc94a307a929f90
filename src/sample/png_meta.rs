//! PNG files that carry their generation parameters.
//!
//! Two text chunks, as the tools people use read them: `parameters` in A1111's
//! format (prompt line, `Negative prompt:` line, then `Key: value, …`), which
//! A1111/Forge's PNG Info and many galleries parse, and `fluxlora` with the full
//! request as JSON for exact reproduction.

use std::io::{self, Write};
use std::path::Path;

use image::RgbImage;
use serde::Serialize;

use super::samplers::Sampler;
use super::schedule::Scheduler;
use crate::atomic_file;

/// What produced an image, written into its PNG.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    /// 1 for one pass; above, true CFG with the negative prompt.
    pub cfg_scale: f64,
    pub seed: u64,
    pub sampler: Sampler,
    pub scheduler: Scheduler,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// Each LoRA applied.
    pub loras: Vec<AppliedLora>,
}

/// A LoRA as an image's parameters record it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct AppliedLora {
    /// What `<lora:name:…>` calls it (the file stem).
    pub name: String,
    pub strength: f64,
    /// The file's A1111 hash (SHA-256 of the tensor data after the safetensors
    /// header, hex); `None` for an adapter that is no file (a live training one).
    pub hash: Option<String>,
}

/// Hex digits of a LoRA hash that A1111's `Lora hashes` records (its
/// `shorthash`).
pub(crate) const SHORT_HASH_LEN: usize = 12;

/// `text` as A1111 writes a value of its `Key: value` line: as it is, or as a JSON
/// string when it holds a comma, a colon or a line break.
fn quote(text: &str) -> String {
    if text.contains([',', ':', '\n']) {
        serde_json::Value::from(text).to_string()
    } else {
        text.to_string()
    }
}

impl GenerationParams {
    /// A1111's `parameters` text. LoRAs appear as `<lora:name:strength>` in the prompt
    /// line, as A1111 itself records them, so "send to txt2img" re-applies them, and
    /// their short hashes under `Lora hashes` as A1111's Lora extension writes them.
    pub(crate) fn a1111_text(&self) -> String {
        let mut prompt = self.prompt.clone();
        for lora in &self.loras {
            prompt.push_str(&format!(" <lora:{}:{}>", lora.name, lora.strength));
        }
        let mut text = prompt;
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, Schedule type: {}, CFG scale: {}, Distilled CFG Scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler.a1111_name(),
            self.scheduler.a1111_label(),
            self.cfg_scale,
            self.guidance,
            self.seed,
            self.width,
            self.height,
            quote(&self.model),
        ));
        let hashes: Vec<String> = self
            .loras
            .iter()
            .filter_map(|l| {
                let hash = l.hash.as_deref()?;
                let short = hash.get(..SHORT_HASH_LEN).unwrap_or(hash);
                Some(format!("{}: {short}", l.name.replace([':', ','], "")))
            })
            .collect();
        if !hashes.is_empty() {
            text.push_str(&format!(", Lora hashes: {}", quote(&hashes.join(", "))));
        }
        text.push_str(&format!(
            ", Version: fluxlora {}",
            env!("CARGO_PKG_VERSION")
        ));
        text
    }
}

fn write_png(w: &mut dyn Write, image: &RgbImage, params: &GenerationParams) -> io::Result<()> {
    let mut encoder = png::Encoder::new(w, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let json = serde_json::to_string(params).map_err(io::Error::other)?;
    for (key, text) in [("parameters", params.a1111_text()), ("fluxlora", json)] {
        let result = if text.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk(key.to_string(), text)
        } else {
            encoder.add_itxt_chunk(key.to_string(), text)
        };
        result.map_err(io::Error::other)?;
    }
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer
        .write_image_data(image.as_raw())
        .map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

/// Writes `image` to `path` atomically with the parameter chunks.
pub(crate) fn save_png(path: &Path, image: &RgbImage, params: &GenerationParams) -> io::Result<()> {
    atomic_file::write_with(path, |w| write_png(w, image, params))
}

/// The text chunks of a PNG file, (keyword, text), tEXt and iTXt alike.
pub fn read_text_chunks(bytes: &[u8]) -> io::Result<Vec<(String, String)>> {
    let decoder = png::Decoder::new(io::Cursor::new(bytes));
    let reader = decoder.read_info().map_err(io::Error::other)?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.utf8_text {
        out.push((c.keyword.clone(), c.get_text().map_err(io::Error::other)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_carries_a1111_parameters_and_json() -> io::Result<()> {
        let img = RgbImage::from_fn(4, 2, |x, y| image::Rgb([x as u8 * 40, y as u8 * 90, 7]));
        let params = GenerationParams {
            prompt: "a red circle — on blue".into(),
            negative_prompt: String::new(),
            steps: 4,
            guidance: 3.5,
            cfg_scale: 1.0,
            seed: 42,
            sampler: Sampler::Euler,
            scheduler: Scheduler::Simple,
            width: 4,
            height: 2,
            model: "tiny".into(),
            loras: vec![AppliedLora {
                name: "style".into(),
                strength: 0.8,
                hash: Some("0123456789abcdef".into()),
            }],
        };
        let mut bytes = Vec::new();
        write_png(&mut bytes, &img, &params)?;
        let chunks = read_text_chunks(&bytes)?;
        let text = &chunks
            .iter()
            .find(|(k, _)| k == "parameters")
            .expect("parameters")
            .1;
        assert!(
            text.starts_with("a red circle — on blue <lora:style:0.8>\nSteps: 4, Sampler: Euler")
        );
        assert!(text.contains("Seed: 42, Size: 4x2, Model: tiny, "));
        assert!(
            text.contains(", Lora hashes: \"style: 0123456789ab\", Version: fluxlora "),
            "{text}"
        );
        let json = &chunks
            .iter()
            .find(|(k, _)| k == "fluxlora")
            .expect("json")
            .1;
        let v: serde_json::Value = serde_json::from_str(json).map_err(io::Error::other)?;
        assert_eq!(v["seed"], 42);
        assert_eq!(
            (&v["sampler"], &v["scheduler"]),
            (&"euler".into(), &"simple".into())
        );
        assert!(text.contains("Sampler: Euler, Schedule type: Simple, CFG scale: 1,"));
        let other = GenerationParams {
            sampler: Sampler::EulerAncestral,
            scheduler: Scheduler::Beta,
            ..params.clone()
        };
        assert!(
            other
                .a1111_text()
                .contains("Steps: 4, Sampler: Euler a, Schedule type: Beta, CFG scale: 1,"),
            "{}",
            other.a1111_text()
        );
        let decoded = image::load_from_memory(&bytes)
            .map_err(io::Error::other)?
            .to_rgb8();
        assert_eq!(decoded, img);
        Ok(())
    }
}
