//! Text-to-image generation with a loaded bundle: encode the prompt, draw seeded
//! noise, integrate the flow with the requested sampler over the requested
//! schedule, decode with the VAE.

use candle_core::{Result, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::png_meta::{AppliedLora, GenerationParams};
use super::samplers::{Sampler, SeededNoise, StepInfo};
use super::schedule::Scheduler;
use super::velocity::{FluxVelocity, TrueCfg};
use crate::model::adapter::AdapterSet;
use crate::model::bundle::{ModelBundle, SamplingDefaults};
use crate::model::flux::{image_ids, pack_latents, text_ids, unpack_latents};
use crate::model::seeded::SeededRng;
use crate::model::vae::{image_to_tensor, tensor_to_images};

/// Pixels per packed token side: 8× VAE down-sampling times 2×2 patches.
pub(crate) const SIZE_MULTIPLE: usize = 16;

/// One text-to-image request. Missing fields take the model's defaults.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    pub prompt: String,
    /// Recorded in the PNG metadata.
    #[serde(default)]
    #[schema(default = "")]
    pub negative_prompt: String,
    /// Pixels, a multiple of 16 up to 4096; the model's default when unset.
    #[serde(default)]
    #[schema(minimum = 16, maximum = 4096, multiple_of = 16)]
    pub width: Option<usize>,
    /// Pixels, a multiple of 16 up to 4096; the model's default when unset.
    #[serde(default)]
    #[schema(minimum = 16, maximum = 4096, multiple_of = 16)]
    pub height: Option<usize>,
    /// Sampling steps, 1 to 1000; the model's default when unset.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: Option<usize>,
    /// Distilled guidance, ≥ 0; the model's default when unset.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub guidance: Option<f64>,
    /// True classifier-free guidance with the negative prompt (Forge's "CFG scale"
    /// for Flux): above 1, every step runs the model twice, v = v_neg + s·(v − v_neg);
    /// 1 or unset is one pass (Flux's distilled guidance alone). 0 to 100.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub cfg_scale: Option<f64>,
    /// img2img: an image file (PNG, JPEG, WebP) to start from, resized to width ×
    /// height, inside the folders the daemon may read.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub init_image: Option<std::path::PathBuf>,
    /// img2img: the share of the schedule run on the noised image, 0 to 1 (A1111's
    /// denoising strength): 1 starts from pure noise, 0 returns the image as the VAE
    /// sees it. Default 0.75 with an image; only with `init_image`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub denoise: Option<f64>,
    /// Seed of the noise (the initial noise and an ancestral sampler's); image i
    /// of the batch uses seed + i.
    #[serde(default)]
    #[schema(default = 0)]
    pub seed: u64,
    /// The sampler: `euler`, `euler_ancestral` (rectified-flow Euler a, fresh
    /// seeded noise every step), `heun` (two model passes per step) or `dpmpp_2m`.
    #[serde(default)]
    #[schema(default = "euler")]
    pub sampler: Sampler,
    /// The schedule: `simple` (Flux's shifted equal steps) or `beta` (ComfyUI's
    /// Beta(0.6, 0.6) quantiles, shifted alike).
    #[serde(default)]
    #[schema(default = "simple")]
    pub scheduler: Scheduler,
    /// Images to generate, 1 to 64.
    #[serde(default = "one")]
    #[schema(default = 1, minimum = 1, maximum = 64)]
    pub batch_size: usize,
}

fn one() -> usize {
    1
}

impl SampleRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: None,
            height: None,
            steps: None,
            guidance: None,
            cfg_scale: None,
            init_image: None,
            denoise: None,
            seed: 0,
            sampler: Sampler::default(),
            scheduler: Scheduler::default(),
            batch_size: 1,
        }
    }
}

/// A1111's default denoising strength for img2img.
pub(crate) const DEFAULT_DENOISE: f64 = 0.75;

/// A request with every default filled in and checked.
#[derive(Clone, Debug)]
pub struct ResolvedRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// 1: one pass per step; otherwise true CFG with the negative prompt.
    pub cfg_scale: f64,
    /// img2img's start image and the share of the schedule run on it.
    pub init_image: Option<std::path::PathBuf>,
    pub denoise: f64,
    pub seed: u64,
    pub sampler: Sampler,
    pub scheduler: Scheduler,
    pub batch_size: usize,
}

/// The largest true-CFG scale accepted.
pub(crate) const MAX_CFG_SCALE: f64 = 100.0;

/// Largest side we accept; beyond this a CPU or a GPU runs out long before finishing.
pub(crate) const MAX_SIDE: usize = 4096;
pub(crate) const MAX_STEPS: usize = 1000;
pub(crate) const MAX_BATCH: usize = 64;

/// A sampling request that cannot run; `field` names the offending field.
#[derive(Debug, thiserror::Error)]
#[error("{field} {message}")]
pub struct RequestError {
    pub field: &'static str,
    pub message: String,
}

impl ResolvedRequest {
    /// Fills `req`'s gaps from the model's defaults and checks every value.
    pub fn new(
        req: &SampleRequest,
        bundle: &ModelBundle,
    ) -> std::result::Result<Self, RequestError> {
        Self::with_defaults(req, &bundle.defaults)
    }

    pub(crate) fn with_defaults(
        req: &SampleRequest,
        d: &SamplingDefaults,
    ) -> std::result::Result<Self, RequestError> {
        let r = Self {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            width: req.width.unwrap_or(d.width),
            height: req.height.unwrap_or(d.height),
            steps: req.steps.unwrap_or(d.steps),
            guidance: req.guidance.unwrap_or(d.guidance),
            cfg_scale: req.cfg_scale.unwrap_or(1.0),
            init_image: req.init_image.clone(),
            denoise: req.denoise.unwrap_or(if req.init_image.is_some() {
                DEFAULT_DENOISE
            } else {
                1.0
            }),
            seed: req.seed,
            sampler: req.sampler,
            scheduler: req.scheduler,
            batch_size: req.batch_size,
        };
        let bad = |field, message: String| Err(RequestError { field, message });
        for (field, v) in [("width", r.width), ("height", r.height)] {
            if v == 0 || v % SIZE_MULTIPLE != 0 || v > MAX_SIDE {
                return bad(
                    field,
                    format!(
                        "must be a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIDE}, got {v}"
                    ),
                );
            }
        }
        if r.steps == 0 || r.steps > MAX_STEPS {
            return bad(
                "steps",
                format!("must be between 1 and {MAX_STEPS}, got {}", r.steps),
            );
        }
        if r.batch_size == 0 || r.batch_size > MAX_BATCH {
            return bad(
                "batch_size",
                format!("must be between 1 and {MAX_BATCH}, got {}", r.batch_size),
            );
        }
        if !r.guidance.is_finite() || r.guidance < 0.0 {
            return bad(
                "guidance",
                format!("must be a finite number ≥ 0, got {}", r.guidance),
            );
        }
        if !(0.0..=1.0).contains(&r.denoise) {
            return bad(
                "denoise",
                format!("must be between 0 and 1, got {}", r.denoise),
            );
        }
        if r.init_image.is_none() && req.denoise.is_some() {
            return bad(
                "denoise",
                "applies to img2img only: give `init_image` too".into(),
            );
        }
        if !(0.0..=MAX_CFG_SCALE).contains(&r.cfg_scale) {
            return bad(
                "cfg_scale",
                format!(
                    "must be between 0 and {MAX_CFG_SCALE} (1 for one pass), got {}",
                    r.cfg_scale
                ),
            );
        }
        Ok(r)
    }

    /// The parameters recorded in the PNG of image `index` of the batch.
    pub(crate) fn params(
        &self,
        index: usize,
        model: &str,
        loras: &[AppliedLora],
    ) -> GenerationParams {
        GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            cfg_scale: self.cfg_scale,
            seed: self.seed.wrapping_add(index as u64),
            sampler: self.sampler,
            scheduler: self.scheduler,
            width: self.width,
            height: self.height,
            model: model.to_string(),
            loras: loras.to_vec(),
        }
    }
}

/// img2img's start image, decoded within limits and resized to `width` × `height`.
fn load_init_image(path: &std::path::Path, width: usize, height: usize) -> Result<RgbImage> {
    let fail = |e: String| candle_core::Error::Msg(format!("init_image {}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let image = decode_limited(&bytes, MAX_INIT_SIDE)
        .map_err(fail)?
        .to_rgb8();
    Ok(image::imageops::resize(
        &image,
        width as u32,
        height as u32,
        image::imageops::FilterType::Triangle,
    ))
}

/// The most memory one image decode may allocate.
const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Image bytes (PNG, JPEG, WebP) decoded within limits: at most `max_side`
/// pixels each way and [`MAX_DECODE_BYTES`] of memory, so a decompression bomb
/// is refused before it allocates. The one decoder for images from outside
/// (uploads, img2img start images, dataset images from a graph).
pub(crate) fn decode_limited(
    bytes: &[u8],
    max_side: u32,
) -> std::result::Result<image::DynamicImage, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not an image (PNG, JPEG or WebP expected)".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader.decode().map_err(|e| e.to_string())
}

/// The largest side of an img2img start image (it is resized to the output size).
pub(crate) const MAX_INIT_SIDE: u32 = MAX_SIDE as u32 * 2;

/// Initial noise for one image: standard normal latents (c, h/8, w/8) from `seed`.
pub(crate) fn latent_noise(
    seed: u64,
    channels: usize,
    h: usize,
    w: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    SeededRng::for_name(seed, "latent-noise").randn((1, channels, h, w), device)
}

/// Generates `req.batch_size` images; image i uses seed `req.seed + i`. `on_step`
/// sees each step's packed latents (for previews) and may cancel by returning an error.
pub fn generate(
    bundle: &ModelBundle,
    req: &ResolvedRequest,
    adapters: &AdapterSet,
    on_step: &mut dyn FnMut(StepInfo, &Tensor) -> Result<()>,
) -> Result<Vec<RgbImage>> {
    let device = bundle.device();
    let b = req.batch_size;
    let vae = bundle.vae()?;
    let factor = vae.downsample_factor();
    let (lh, lw) = (req.height / factor, req.width / factor);
    let channels = vae.latent_channels();

    let prompts: Vec<&str> = vec![req.prompt.as_str(); b];
    let emb = bundle.text()?.encode_with(&prompts, adapters)?;
    let n_txt = emb.t5.dim(1)?;
    let txt_ids = text_ids(b, n_txt, device)?;
    let img_ids = image_ids(b, lh / 2, lw / 2, device)?;

    let noise = (0..b)
        .map(|i| latent_noise(req.seed.wrapping_add(i as u64), channels, lh, lw, device))
        .collect::<Result<Vec<_>>>()?;
    let noise = pack_latents(&Tensor::cat(&noise, 0)?)?.to_dtype(bundle.flux.dtype())?;
    let mut times = req
        .scheduler
        .times(req.steps, (lh / 2) * (lw / 2), bundle.defaults.shift);
    let mut ancestral = SeededNoise::new((0..b).map(|i| req.seed.wrapping_add(i as u64)));
    // img2img: the image's latents noised to the time the remaining steps start at.
    let start = match &req.init_image {
        None => noise,
        Some(path) => {
            let image = load_init_image(path, req.width, req.height)?;
            let x0 = vae.encode(&image_to_tensor(&image, device)?)?;
            let x0 = pack_latents(&x0.repeat((b, 1, 1, 1))?)?.to_dtype(bundle.flux.dtype())?;
            let run = ((req.steps as f64) * req.denoise).round() as usize;
            times.drain(..req.steps - run.min(req.steps));
            let t = times[0];
            ((x0 * (1.0 - t))? + (noise * t)?)?
        }
    };

    let velocity = FluxVelocity {
        flux: &bundle.flux,
        adapters,
        img_ids: &img_ids,
        txt: &emb.t5,
        txt_ids: &txt_ids,
        y: &emb.pooled,
        guidance: req.guidance,
    };
    let packed = if req.cfg_scale == 1.0 {
        req.sampler
            .run(&velocity, start, &times, &mut ancestral, on_step)?
    } else {
        // The negative prompt's conditioning (same length: T5's fixed sequence).
        let negatives: Vec<&str> = vec![req.negative_prompt.as_str(); b];
        let neg = bundle.text()?.encode_with(&negatives, adapters)?;
        let neg_ids = text_ids(b, neg.t5.dim(1)?, device)?;
        let negative = FluxVelocity {
            txt: &neg.t5,
            txt_ids: &neg_ids,
            y: &neg.pooled,
            ..velocity
        };
        let cfg = TrueCfg {
            positive: &velocity,
            negative: &negative,
            scale: req.cfg_scale,
        };
        req.sampler
            .run(&cfg, start, &times, &mut ancestral, on_step)?
    };
    let latents = unpack_latents(&packed, lh, lw)?;
    let pixels = vae.decode(&latents)?;
    tensor_to_images(&pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img2img_at_denoise_zero_is_the_vae_round_trip() -> Result<()> {
        let bundle = ModelBundle::tiny(&candle_core::Device::Cpu)?;
        let tmp = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let path = tmp.path().join("start.png");
        let image = RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, 90])
        });
        image.save(&path).map_err(candle_core::Error::wrap)?;
        let mut request = SampleRequest::new("anything");
        (request.width, request.height, request.steps) = (Some(32), Some(32), Some(4));
        request.init_image = Some(path.clone());
        request.denoise = Some(0.0);
        let req = ResolvedRequest::new(&request, &bundle).expect("a valid request");
        let mut steps = 0;
        let out = generate(&bundle, &req, &AdapterSet::default(), &mut |_, _| {
            steps += 1;
            Ok(())
        })?;
        assert_eq!(steps, 0, "denoise 0 runs no step");
        let vae = bundle.vae()?;
        let x = image_to_tensor(&load_init_image(&path, 32, 32)?, bundle.device())?;
        let expect = tensor_to_images(&vae.decode(&vae.encode(&x)?)?)?;
        assert_eq!(out[0].as_raw(), expect[0].as_raw());
        assert_ne!(
            out[0].as_raw(),
            image.as_raw(),
            "a real round trip, not the input"
        );
        Ok(())
    }

    #[test]
    fn sampler_and_scheduler_default_to_euler_over_simple_and_parse_by_name() {
        let plain: SampleRequest = serde_json::from_str(r#"{"prompt": "x"}"#).unwrap();
        assert_eq!(
            (plain.sampler, plain.scheduler),
            (Sampler::Euler, Scheduler::Simple)
        );
        assert_eq!(
            (plain.sampler, plain.scheduler),
            (
                SampleRequest::new("x").sampler,
                SampleRequest::new("x").scheduler
            )
        );
        let chosen: SampleRequest =
            serde_json::from_str(r#"{"prompt": "x", "sampler": "dpmpp_2m", "scheduler": "beta"}"#)
                .unwrap();
        assert_eq!(
            (chosen.sampler, chosen.scheduler),
            (Sampler::Dpmpp2m, Scheduler::Beta)
        );
        let err = serde_json::from_str::<SampleRequest>(r#"{"prompt": "x", "sampler": "lms"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("euler_ancestral") && err.contains("dpmpp_2m"),
            "{err}"
        );
        let resolved =
            ResolvedRequest::with_defaults(&chosen, &ModelBundle::tiny_defaults()).unwrap();
        let params = resolved.params(0, "tiny", &[]);
        assert_eq!(
            (params.sampler, params.scheduler),
            (Sampler::Dpmpp2m, Scheduler::Beta)
        );
    }
}
