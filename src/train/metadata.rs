//! The training metadata written into a LoRA: the `ss_*` fields of kohya's
//! `train_network.py` / `flux_train_network.py`, the `modelspec.*` fields of its
//! `library/sai_model_spec.py`, and fluxlora's own keys, rendered as the string map
//! `lora_io`'s writers take.
//!
//! Owns: [`KohyaMetadata`] with kohya's defaults and Python-style rendering of
//! values (`True`, `None`, `1e-05`, `(1024, 1024)`, `json.dumps` spacing). The tag
//! counts come from the dataset scan (`train::dataset`).
//!
//! Must not: write files or compute the `sshs_*` hashes (that is `model::lora_io`).

use std::collections::BTreeMap;

use serde::Serialize;

/// Which Flux model a LoRA was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FluxVariant {
    Dev,
    Schnell,
}

/// One dataset folder in `ss_dataset_dirs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DatasetDir {
    pub n_repeats: usize,
    pub img_count: usize,
}

/// The metadata kohya's `train_network.py` / `flux_train_network.py` write into a
/// Flux LoRA (`ss_*`), plus the ModelSpec fields of `library/sai_model_spec.py`
/// (`modelspec.*`). Field values are rendered as Python's `str()` would (`True`,
/// `None`, `0.0001`, `1e-05`, `(1024, 1024)`), because tools parse them that way.
/// The training module fills it; `extra` carries fluxlora's own keys.
#[derive(Clone, Debug)]
pub(crate) struct KohyaMetadata {
    pub output_name: String,
    /// `modelspec.title`; defaults to `output_name`.
    pub title: Option<String>,
    pub variant: FluxVariant,
    pub network_dim: usize,
    pub network_alpha: f64,
    pub network_dropout: Option<f64>,
    /// `ss_network_args` (JSON object), written when not empty.
    pub network_args: BTreeMap<String, String>,
    pub learning_rate: f64,
    pub unet_lr: Option<f64>,
    pub text_encoder_lr: Option<f64>,
    /// Optimizer name with arguments, e.g. `AdamW(weight_decay=0.01)`.
    pub optimizer: String,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub max_train_steps: usize,
    pub num_epochs: usize,
    pub num_train_images: usize,
    pub num_reg_images: usize,
    pub num_batches_per_epoch: usize,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub gradient_checkpointing: bool,
    pub max_grad_norm: f64,
    /// `no`, `fp16` or `bf16`.
    pub mixed_precision: String,
    pub seed: Option<u64>,
    /// (width, height).
    pub resolution: (usize, usize),
    pub cache_latents: bool,
    pub caption_dropout_rate: f64,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub flip_aug: bool,
    pub enable_bucket: bool,
    pub min_bucket_reso: usize,
    pub max_bucket_reso: usize,
    pub bucket_no_upscale: bool,
    pub noise_offset: Option<f64>,
    pub guidance_scale: f64,
    pub timestep_sampling: String,
    pub sigmoid_scale: f64,
    pub model_prediction_type: String,
    pub discrete_flow_shift: f64,
    pub weighting_scheme: String,
    pub apply_t5_attn_mask: bool,
    /// Base model file name (`ss_sd_model_name`).
    pub sd_model_name: Option<String>,
    pub vae_name: Option<String>,
    /// Unix seconds.
    pub training_started_at: f64,
    pub training_finished_at: Option<f64>,
    pub session_id: u32,
    pub steps: Option<usize>,
    pub epoch: Option<usize>,
    /// `ss_tag_frequency`: dataset folder → tag → count (as the dataset scan counts
    /// them).
    pub tag_frequency: BTreeMap<String, BTreeMap<String, usize>>,
    pub dataset_dirs: BTreeMap<String, DatasetDir>,
    /// `ss_bucket_info`: the buckets in use and their image counts
    /// (`{"buckets": {"0": {"resolution", "count"}}, "mean_img_ar_error"}`);
    /// `None` without buckets, written `null` as kohya does.
    pub bucket_info: Option<serde_json::Value>,
    pub training_comment: Option<String>,
    pub author: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub tags: Option<String>,
    pub trigger_phrase: Option<String>,
    pub usage_hint: Option<String>,
    /// When the file is written, unix seconds (`modelspec.date`).
    pub saved_at: f64,
    /// Further keys written as they are (fluxlora's own training metadata).
    pub extra: BTreeMap<String, String>,
}

impl KohyaMetadata {
    /// Metadata with kohya's defaults for a Flux LoRA of `network_dim` / `network_alpha`.
    pub(crate) fn new(
        output_name: impl Into<String>,
        variant: FluxVariant,
        network_dim: usize,
        network_alpha: f64,
    ) -> Self {
        let now = crate::clock::unix_now();
        Self {
            output_name: output_name.into(),
            title: None,
            variant,
            network_dim,
            network_alpha,
            network_dropout: None,
            network_args: BTreeMap::new(),
            learning_rate: 1e-4,
            unet_lr: None,
            text_encoder_lr: None,
            optimizer: "torch.optim.adamw.AdamW".into(),
            lr_scheduler: "constant".into(),
            lr_warmup_steps: 0,
            max_train_steps: 0,
            num_epochs: 1,
            num_train_images: 0,
            num_reg_images: 0,
            num_batches_per_epoch: 0,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            max_grad_norm: 1.0,
            mixed_precision: "bf16".into(),
            seed: None,
            resolution: (1024, 1024),
            cache_latents: true,
            caption_dropout_rate: 0.0,
            shuffle_caption: false,
            keep_tokens: 0,
            flip_aug: false,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_no_upscale: false,
            noise_offset: None,
            guidance_scale: 3.5,
            timestep_sampling: "sigma".into(),
            sigmoid_scale: 1.0,
            model_prediction_type: "sigma_scaled".into(),
            discrete_flow_shift: 3.0,
            weighting_scheme: "uniform".into(),
            apply_t5_attn_mask: false,
            sd_model_name: None,
            vae_name: None,
            training_started_at: now,
            training_finished_at: None,
            session_id: (now.fract() * u32::MAX as f64) as u32,
            steps: None,
            epoch: None,
            tag_frequency: BTreeMap::new(),
            dataset_dirs: BTreeMap::new(),
            bucket_info: None,
            training_comment: None,
            author: None,
            description: None,
            license: None,
            tags: None,
            trigger_phrase: None,
            usage_hint: None,
            saved_at: now,
            extra: BTreeMap::new(),
        }
    }

    /// The `ss_*` and `modelspec.*` entries (plus `extra`) as safetensors metadata.
    pub(crate) fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        let opt_f = |v: Option<f64>| v.map(py_float).unwrap_or_else(|| "None".into());
        let b = |v: bool| if v { "True" } else { "False" }.to_string();

        // train_network.py
        put("ss_session_id", self.session_id.to_string());
        put("ss_training_started_at", py_float(self.training_started_at));
        put("ss_output_name", self.output_name.clone());
        put("ss_learning_rate", py_float(self.learning_rate));
        put("ss_text_encoder_lr", opt_f(self.text_encoder_lr));
        put("ss_unet_lr", opt_f(self.unet_lr));
        put("ss_num_train_images", self.num_train_images.to_string());
        put("ss_num_reg_images", self.num_reg_images.to_string());
        put(
            "ss_num_batches_per_epoch",
            self.num_batches_per_epoch.to_string(),
        );
        put("ss_num_epochs", self.num_epochs.to_string());
        put("ss_gradient_checkpointing", b(self.gradient_checkpointing));
        put(
            "ss_gradient_accumulation_steps",
            self.gradient_accumulation_steps.to_string(),
        );
        put("ss_max_train_steps", self.max_train_steps.to_string());
        put("ss_lr_warmup_steps", self.lr_warmup_steps.to_string());
        put("ss_lr_scheduler", self.lr_scheduler.clone());
        put("ss_network_module", "networks.lora_flux".into());
        put("ss_network_dim", self.network_dim.to_string());
        put("ss_network_alpha", py_float(self.network_alpha));
        put("ss_network_dropout", opt_f(self.network_dropout));
        put("ss_mixed_precision", self.mixed_precision.clone());
        put("ss_full_fp16", b(false));
        put("ss_v2", b(false));
        put("ss_base_model_version", "flux1".into());
        put("ss_clip_skip", "None".into());
        put("ss_max_token_length", "None".into());
        put("ss_cache_latents", b(self.cache_latents));
        put(
            "ss_seed",
            self.seed
                .map(|s| s.to_string())
                .unwrap_or_else(|| "None".into()),
        );
        put("ss_noise_offset", opt_f(self.noise_offset));
        put(
            "ss_training_comment",
            self.training_comment
                .clone()
                .unwrap_or_else(|| "None".into()),
        );
        put("ss_optimizer", self.optimizer.clone());
        put("ss_max_grad_norm", py_float(self.max_grad_norm));
        put(
            "ss_caption_dropout_rate",
            py_float(self.caption_dropout_rate),
        );
        put("ss_batch_size_per_device", self.batch_size.to_string());
        put(
            "ss_total_batch_size",
            (self.batch_size * self.gradient_accumulation_steps).to_string(),
        );
        put(
            "ss_resolution",
            format!("({}, {})", self.resolution.0, self.resolution.1),
        );
        put("ss_flip_aug", b(self.flip_aug));
        put("ss_shuffle_caption", b(self.shuffle_caption));
        put("ss_keep_tokens", self.keep_tokens.to_string());
        put("ss_enable_bucket", b(self.enable_bucket));
        put("ss_bucket_no_upscale", b(self.bucket_no_upscale));
        put("ss_min_bucket_reso", self.min_bucket_reso.to_string());
        put("ss_max_bucket_reso", self.max_bucket_reso.to_string());
        let dirs: serde_json::Map<String, serde_json::Value> = self
            .dataset_dirs
            .iter()
            .map(|(k, d)| {
                (
                    k.clone(),
                    serde_json::json!({"n_repeats": d.n_repeats, "img_count": d.img_count}),
                )
            })
            .collect();
        put("ss_dataset_dirs", py_json(&serde_json::Value::Object(dirs)));
        put(
            "ss_tag_frequency",
            py_json(&serde_json::to_value(&self.tag_frequency).unwrap_or_default()),
        );
        put(
            "ss_bucket_info",
            py_json(
                self.bucket_info
                    .as_ref()
                    .unwrap_or(&serde_json::Value::Null),
            ),
        );
        if !self.network_args.is_empty() {
            put(
                "ss_network_args",
                py_json(&serde_json::to_value(&self.network_args).unwrap_or_default()),
            );
        }
        if let Some(n) = &self.sd_model_name {
            put("ss_sd_model_name", n.clone());
        }
        if let Some(n) = &self.vae_name {
            put("ss_vae_name", n.clone());
        }
        if let Some(t) = self.training_finished_at {
            put("ss_training_finished_at", py_float(t));
        }
        if let Some(s) = self.steps {
            put("ss_steps", s.to_string());
        }
        if let Some(e) = self.epoch {
            put("ss_epoch", e.to_string());
        }
        // flux_train_network.py update_metadata
        put("ss_model_type", "flux".into());
        put("ss_apply_t5_attn_mask", b(self.apply_t5_attn_mask));
        put("ss_weighting_scheme", self.weighting_scheme.clone());
        put("ss_guidance_scale", py_float(self.guidance_scale));
        put("ss_timestep_sampling", self.timestep_sampling.clone());
        put("ss_sigmoid_scale", py_float(self.sigmoid_scale));
        put(
            "ss_model_prediction_type",
            self.model_prediction_type.clone(),
        );
        put("ss_discrete_flow_shift", py_float(self.discrete_flow_shift));

        // sai_model_spec.py
        let arch = match self.variant {
            FluxVariant::Dev => "flux-1-dev",
            FluxVariant::Schnell => "flux-1-schnell",
        };
        put("modelspec.sai_model_spec", "1.0.1".into());
        put("modelspec.architecture", format!("{arch}/lora"));
        put(
            "modelspec.implementation",
            "https://github.com/black-forest-labs/flux".into(),
        );
        put(
            "modelspec.implementation_version",
            format!("fluxlora/{}", env!("CARGO_PKG_VERSION")),
        );
        put(
            "modelspec.title",
            self.title
                .clone()
                .unwrap_or_else(|| self.output_name.clone()),
        );
        put(
            "modelspec.resolution",
            format!("{}x{}", self.resolution.0, self.resolution.1),
        );
        put("modelspec.date", iso_date(self.saved_at));
        for (k, v) in [
            ("modelspec.author", &self.author),
            ("modelspec.description", &self.description),
            ("modelspec.license", &self.license),
            ("modelspec.tags", &self.tags),
            ("modelspec.trigger_phrase", &self.trigger_phrase),
            ("modelspec.usage_hint", &self.usage_hint),
        ] {
            if let Some(v) = v {
                put(k, v.clone());
            }
        }
        for (k, v) in &self.extra {
            put(k, v.clone());
        }
        m
    }
}

/// Python's `repr(float)`: shortest round-trip digits, `.0` on integers, exponent
/// form below 1e-4 and from 1e16 (`1e-05`, `1e+16`).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let exp = x.abs().log10().floor() as i32;
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{x:e}");
        let (mant, e) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match e.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', e),
        };
        format!("{mant}e{sign}{digits:0>2}")
    }
}

/// `json.dumps` spacing (`", "` and `": "`) for the JSON-valued `ss_*` fields.
fn py_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", serde_json::Value::String(k.clone()), py_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(py_json).collect::<Vec<_>>().join(", "))
        }
        other => other.to_string(),
    }
}

/// ISO-8601 date-time (UTC, seconds) of a unix time, kohya's `modelspec.date` form.
fn iso_date(unix: f64) -> String {
    let [y, m, d, h, mi, s] = crate::clock::utc_parts(unix);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::adapter::{Lora, LoraLayer};
    use crate::model::lora_io;

    /// A one-module LoRA to carry the metadata into a file.
    fn tiny_lora() -> Lora {
        let mut lora = Lora::new("m");
        lora.layers.insert(
            "time_in.in_layer".into(),
            LoraLayer {
                down: Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap(),
                up: Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap(),
                alpha: 2.0,
            },
        );
        lora
    }

    #[test]
    fn metadata_round_trips_through_a_saved_file() {
        let mut meta = KohyaMetadata::new("my_lora", FluxVariant::Dev, 16, 16.0);
        meta.learning_rate = 1e-5;
        meta.max_train_steps = 1500;
        meta.training_started_at = 1_723_456_789.123_456;
        meta.saved_at = 1_723_456_789.0;
        meta.sd_model_name = Some("flux1-dev.safetensors".into());
        meta.tag_frequency.insert(
            "10_dog".into(),
            [("a dog", 1), ("dog", 1), ("grass", 1), ("sky", 1)]
                .into_iter()
                .map(|(tag, n)| (tag.to_string(), n))
                .collect(),
        );
        meta.extra.insert("fluxlora_job".into(), "abc".into());
        let map = meta.to_map();
        assert_eq!(map["ss_network_module"], "networks.lora_flux");
        assert_eq!(map["ss_network_dim"], "16");
        assert_eq!(map["ss_network_alpha"], "16.0");
        assert_eq!(map["ss_learning_rate"], "1e-05");
        assert_eq!(map["ss_base_model_version"], "flux1");
        assert_eq!(map["ss_training_started_at"], "1723456789.123456");
        assert_eq!(
            map["ss_tag_frequency"],
            r#"{"10_dog": {"a dog": 1, "dog": 1, "grass": 1, "sky": 1}}"#
        );
        assert_eq!(map["ss_resolution"], "(1024, 1024)");
        assert_eq!(map["ss_bucket_info"], "null", "no buckets: kohya's null");
        meta.bucket_info = Some(serde_json::json!({
            "buckets": {"0": {"resolution": [512, 768], "count": 20}},
            "mean_img_ar_error": 0.0,
        }));
        assert_eq!(
            meta.to_map()["ss_bucket_info"],
            r#"{"buckets": {"0": {"count": 20, "resolution": [512, 768]}}, "mean_img_ar_error": 0.0}"#
        );
        assert_eq!(map["modelspec.architecture"], "flux-1-dev/lora");
        assert_eq!(map["modelspec.date"], "2024-08-12T09:59:49");
        assert_eq!(map["modelspec.title"], "my_lora");
        assert_eq!(map["ss_gradient_checkpointing"], "False");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        lora_io::save_kohya(&path, &tiny_lora(), &map, DType::F16).unwrap();
        let f = lora_io::load(&path, &Device::Cpu).unwrap();
        for (k, v) in &map {
            assert_eq!(f.metadata.get(k), Some(v), "{k}");
        }
        assert_eq!(lora_io::read_metadata(&path).unwrap(), f.metadata);
    }

    #[test]
    fn helpers_match_python() {
        for (x, s) in [
            (1e-5, "1e-05"),
            (1e-4, "0.0001"),
            (16.0, "16.0"),
            (3.5, "3.5"),
            (1e16, "1e+16"),
            (2.5e-7, "2.5e-07"),
            (123456789012345.6, "123456789012345.6"),
            (0.0, "0.0"),
        ] {
            assert_eq!(py_float(x), s);
        }
        assert_eq!(iso_date(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(951_782_400.0 + 86_399.0), "2000-02-29T23:59:59");
    }
}
