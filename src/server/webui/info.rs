//! The `info` of a txt2img answer: the JSON string A1111's `Processed.js()`
//! returns, with its keys, from a [`Plan`] and the infotexts the images carry.
//!
//! Must not: run anything; it only shapes JSON.

use serde_json::{json, Map, Value};

use super::request::Plan;

/// What ran, beside the plan.
pub(super) struct Ran<'a> {
    pub model_name: &'a str,
    /// Each image's `parameters` text, as its PNG carries it.
    pub infotexts: &'a [String],
    /// `YYYYmmddHHMMSS` (UTC) of the start.
    pub job_timestamp: &'a str,
    /// `Lora hashes` as the infotexts record it, when any LoRA was applied.
    pub lora_hashes: Option<String>,
}

/// `Processed.js()`'s object for `plan`.
pub(super) fn info(plan: &Plan, ran: &Ran) -> Value {
    let n = plan.batch_size * plan.n_iter;
    let seeds = plan.all_seeds();
    let subseeds: Vec<i64> = (0..n as i64)
        .map(|i| plan.subseed.wrapping_add(i))
        .collect();
    let mut extra = Map::new();
    extra.insert("Distilled CFG Scale".into(), json!(plan.guidance));
    extra.insert("Schedule type".into(), json!(plan.scheduler.a1111_label()));
    if let Some(hashes) = &ran.lora_hashes {
        extra.insert("Lora hashes".into(), json!(hashes));
    }
    json!({
        "prompt": plan.prompt,
        "all_prompts": vec![&plan.prompt; n],
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": vec![&plan.negative_prompt; n],
        "seed": plan.seed,
        "all_seeds": seeds,
        "subseed": plan.subseed,
        "all_subseeds": subseeds,
        "subseed_strength": 0.0,
        "width": plan.width,
        "height": plan.height,
        "sampler_name": plan.sampler.a1111_name(),
        "cfg_scale": plan.cfg_scale,
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": ran.model_name,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": null,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": ran.infotexts,
        "styles": [],
        "job_timestamp": ran.job_timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": false,
        "version": format!("fluxlora {}", env!("CARGO_PKG_VERSION")),
    })
}

/// The value of `Key: value` in an infotext's parameter line (a quoted value read
/// back as JSON), as A1111's infotext parser reads it.
pub(super) fn infotext_value(infotext: &str, key: &str) -> Option<String> {
    let line = infotext.lines().last()?;
    let start = line.find(&format!("{key}: "))? + key.len() + 2;
    let rest = &line[start..];
    if rest.starts_with('"') {
        let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
        return de.next()?.ok();
    }
    Some(rest.split(", ").next().unwrap_or(rest).to_string())
}

/// `unix` seconds as `YYYYmmddHHMMSS` in UTC (A1111's `job_timestamp` form).
pub(super) fn timestamp(unix: f64) -> String {
    let [y, m, d, h, mi, s] = crate::clock::utc_parts(unix);
    format!("{y:04}{m:02}{d:02}{h:02}{mi:02}{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_infotext_values_read_as_a1111_writes_them() {
        assert_eq!(timestamp(0.0), "19700101000000");
        assert_eq!(timestamp(1_709_210_096.7), "20240229123456");
        let text =
            "a cat <lora:s:0.8>\nSteps: 4, Seed: 7, Lora hashes: \"s: 0123456789ab\", Version: v";
        assert_eq!(infotext_value(text, "Seed").as_deref(), Some("7"));
        assert_eq!(
            infotext_value(text, "Lora hashes").as_deref(),
            Some("s: 0123456789ab")
        );
        assert_eq!(infotext_value(text, "Model"), None);
    }
}
