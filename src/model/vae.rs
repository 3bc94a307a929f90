//! The Flux autoencoder: images to scaled latents (for caching and img2img)
//! and back (for samples), a cheap latent→RGB preview, and the conversions
//! between `image::RgbImage` and `(b, 3, h, w)` tensors.
//!
//! Owns: loading `ae.safetensors` (BFL/ComfyUI keys) and diffusers `vae/`
//! folders (keys renamed on load), the tiny built-in VAE, the latent scale and
//! shift (latents leaving this module are already scaled, as the DiT expects).
//!
//! Must not: know about the DiT, schedules, datasets or HTTP; write files.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Module, Result, Shape, Tensor};
use candle_nn::init::Init;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::flux::autoencoder::{Config, Decoder, Encoder};
use image::RgbImage;

use super::seeded::SeededInit;

/// Flux's latent scale and shift (`ae.safetensors`, diffusers `vae/config.json`).
const FLUX_SCALE_FACTOR: f64 = 0.3611;
const FLUX_SHIFT_FACTOR: f64 = 0.1159;

/// Latent→RGB factors for Flux's 16 channels, rows are channels, columns
/// R, G, B; applied to scaled latents they give roughly [-1, 1]. Published
/// with ComfyUI's latent formats (`comfy/latent_formats.py`, class `Flux`).
const FLUX_RGB_FACTORS: [[f32; 3]; 16] = [
    [-0.0346, 0.0244, 0.0681],
    [0.0034, 0.0210, 0.0687],
    [0.0275, -0.0668, -0.0433],
    [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329],
    [0.0004, 0.0383, 0.0115],
    [0.0405, 0.0861, 0.0915],
    [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180],
    [0.1008, 0.0755, -0.0421],
    [-0.0515, 0.0201, 0.0011],
    [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749],
    [-0.1264, -0.0522, -0.1103],
    [-0.0280, -0.0881, -0.0499],
    [-0.1262, -0.0982, -0.0778],
];
const FLUX_RGB_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

/// The Flux autoencoder (encoder and decoder of BFL's `AutoEncoder`).
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl Vae {
    /// The tiny built-in VAE's architecture: Flux's layout at 32 channels
    /// (candle's GroupNorm uses 32 groups), four levels (8× down-sampling like
    /// Flux), one res block per level and 4 latent channels. Its latents are
    /// not rescaled (scale 1, shift 0).
    pub(crate) fn tiny_config() -> Config {
        Config {
            resolution: 64,
            in_channels: 3,
            ch: 32,
            out_ch: 3,
            ch_mult: vec![1, 1, 1, 1],
            num_res_blocks: 1,
            z_channels: 4,
            scale_factor: 1.0,
            shift_factor: 0.0,
        }
    }

    /// The tiny VAE with weights made from `seed` (F32).
    pub(crate) fn tiny(seed: u64, device: &Device) -> Result<Self> {
        let vb = SeededInit::var_builder(seed, DType::F32, device);
        Self::tiny_from_varbuilder(&Self::tiny_config(), vb)
    }

    /// A VAE of architecture `cfg` (normally [`Vae::tiny_config`], possibly
    /// with a calibrated scale/shift) with weights from `vb`, BFL key layout:
    /// `encoder.down.0.block.0.conv1.weight`, `decoder.mid.attn_1.q.weight`, …
    pub(crate) fn tiny_from_varbuilder(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, vb)
    }

    fn build(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        check_config(cfg)?;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a Flux autoencoder, memory-mapped:
    /// - a single file with BFL keys (`ae.safetensors`, ComfyUI `models/vae/`),
    ///   optionally under a `vae.` / `first_stage_model.` prefix;
    /// - a diffusers `vae/` folder (`config.json` +
    ///   `diffusion_pytorch_model.safetensors`), or such a file alone.
    ///
    /// The architecture is read off the tensor shapes (or `config.json`); the
    /// latent scale/shift come from `config.json`, else Flux's for 16 latent
    /// channels, else 1/0.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let (file, config_json) = if path.is_dir() {
            (
                diffusers_weights_file(path)?,
                read_json(&path.join("config.json"))?,
            )
        } else if path.is_file() {
            (path.to_path_buf(), None)
        } else {
            bail!("VAE: {} does not exist", path.display());
        };
        let weights = VaeWeights::open(&file)?;
        let mut cfg = weights.infer_config()?;
        if let Some(json) = &config_json {
            apply_diffusers_config(&mut cfg, json, path)?;
        }
        let vb = VarBuilder::from_backend(Box::new(weights), dtype, device.clone());
        Self::build(&cfg, vb)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    /// Channels of a latent (16 for Flux).
    pub(crate) fn latent_channels(&self) -> usize {
        self.cfg.z_channels
    }

    /// Pixels per latent cell along each side (8 for Flux).
    pub(crate) fn downsample_factor(&self) -> usize {
        1 << self.cfg.ch_mult.len().saturating_sub(1)
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Images `(b, 3, h, w)` in [-1, 1] → scaled latents `(b, z, h/8, w/8)`,
    /// F32: the mean of the encoder's distribution (deterministic), then
    /// `(mean - shift) * scale`.
    pub(crate) fn encode(&self, images: &Tensor) -> Result<Tensor> {
        self.scale(&self.mean(images)?)
    }

    /// Scaled latents `(b, z, h/8, w/8)` → images `(b, 3, h, w)`, F32, roughly
    /// in [-1, 1] (not clamped; [`tensor_to_images`] clamps).
    pub(crate) fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "VAE decode: latents must be (b, c, h, w), got {:?}",
                latents.dims()
            ))
        })?;
        if c != self.cfg.z_channels {
            bail!(
                "VAE decode: latents have {c} channels, this VAE has {}",
                self.cfg.z_channels
            );
        }
        let z = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        let z = ((z / self.cfg.scale_factor)? + self.cfg.shift_factor)?;
        self.decoder
            .forward(&z.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)
    }

    /// The mean of the encoder's distribution (the first half of its output
    /// channels; the second half, the log-variance, is not used), F32.
    fn mean(&self, images: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "VAE encode: images must be (b, 3, h, w), got {:?}",
                images.dims()
            ))
        })?;
        let f = self.downsample_factor();
        if c != self.cfg.in_channels || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            bail!(
                "VAE encode: images must be (b, {}, h, w) with h and w multiples of {f}, got {:?}",
                self.cfg.in_channels,
                images.dims()
            );
        }
        let x = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        let moments = self.encoder.forward(&x)?.to_dtype(DType::F32)?; // (b, 2z, h/f, w/f)
        moments.narrow(1, 0, self.cfg.z_channels)
    }

    fn scale(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.cfg.shift_factor)? * self.cfg.scale_factor
    }
}

fn check_config(cfg: &Config) -> Result<()> {
    let bad = |why: String| Err(candle_core::Error::Msg(format!("VAE config: {why}")));
    if cfg.ch_mult.is_empty() || cfg.num_res_blocks == 0 || cfg.z_channels == 0 {
        return bad(format!("empty architecture {cfg:?}"));
    }
    if cfg.ch == 0
        || cfg
            .ch_mult
            .iter()
            .any(|m| *m == 0 || !(cfg.ch * m).is_multiple_of(32))
    {
        return bad(format!(
            "every level's channels must be a positive multiple of 32 (GroupNorm(32)): {cfg:?}"
        ));
    }
    if cfg.scale_factor == 0.0 {
        return bad("scale_factor must not be 0".to_string());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Previews

/// A cheap preview of scaled latents `(b, c, h, w)`: a fixed linear map of the
/// channels to RGB, returned as `(b, 3, h, w)` F32 in [0, 1]. Flux's 16
/// channels use ComfyUI's published factors; other channel counts average
/// every third channel into R, G and B.
pub(crate) fn latent_to_rgb_preview(latents: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = latents.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "latent preview: latents must be (b, c, h, w), got {:?}",
            latents.dims()
        ))
    })?;
    let (factors, bias) = preview_factors(c);
    let dev = latents.device();
    let w = Tensor::from_vec(factors.concat(), (c, 3), dev)?;
    let b = Tensor::from_vec(bias.to_vec(), 3, dev)?;
    let x = latents
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?; // (b, h, w, c)
    let rgb = x.broadcast_matmul(&w)?.broadcast_add(&b)?; // (b, h, w, 3)
    let rgb = rgb.permute((0, 3, 1, 2))?.contiguous()?;
    ((rgb + 1.0)? * 0.5)?.clamp(0f32, 1f32)
}

/// Latent→RGB factors (rows: channels) and bias for `channels` channels.
pub(crate) fn preview_factors(channels: usize) -> (Vec<[f32; 3]>, [f32; 3]) {
    if channels == FLUX_RGB_FACTORS.len() {
        return (FLUX_RGB_FACTORS.to_vec(), FLUX_RGB_BIAS);
    }
    let per_colour = |colour: usize| (0..channels).filter(|c| c % 3 == colour).count();
    let mut factors: Vec<[f32; 3]> = (0..channels)
        .map(|c| {
            let mut row = [0f32; 3];
            row[c % 3] = 1.0 / per_colour(c % 3) as f32;
            row
        })
        .collect();
    // Fewer than three channels: the missing colours repeat a channel.
    for colour in channels.min(3)..3 {
        if channels > 0 {
            factors[colour % channels][colour] = 1.0;
        }
    }
    (factors, [0.0; 3])
}

// ---------------------------------------------------------------------------
// Images ↔ tensors

/// An RGB image → `(1, 3, h, w)` F32 in [-1, 1] (`v / 127.5 - 1`).
pub(crate) fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hwc = Tensor::from_vec(img.as_raw().clone(), (h, w, 3), &Device::Cpu)?;
    let chw = hwc.permute((2, 0, 1))?.to_dtype(DType::F32)?;
    ((chw / 127.5)? - 1.0)?.unsqueeze(0)?.to_device(device)
}

/// `(b, 3, h, w)` (or `(3, h, w)`) in [-1, 1] → RGB images, clamped and
/// rounded to the nearest 8-bit value.
pub(crate) fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = match images.rank() {
        3 => images.unsqueeze(0)?,
        4 => images.clone(),
        _ => bail!("images must be (b, 3, h, w), got {:?}", images.dims()),
    };
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        bail!("images must have 3 channels, got {:?}", images.dims());
    }
    let bytes = ((images.to_dtype(DType::F32)? + 1.0)? * 127.5)?
        .clamp(0f32, 255f32)?
        .round()?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))? // (b, h, w, 3)
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<u8>()?;
    let per_image = h * w * 3;
    (0..b)
        .map(|i| {
            let raw = bytes[i * per_image..(i + 1) * per_image].to_vec();
            RgbImage::from_raw(w as u32, h as u32, raw)
                .ok_or_else(|| candle_core::Error::Msg("image buffer size mismatch".to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Weight files

/// The weights of a diffusers `vae/` folder.
fn diffusers_weights_file(dir: &Path) -> Result<PathBuf> {
    for name in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bf16.safetensors",
    ] {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    bail!(
        "VAE: {} has no diffusion_pytorch_model.safetensors (expected a diffusers vae/ folder)",
        dir.display()
    )
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("VAE: {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(format!("VAE: {}: {e}", path.display())))
}

/// Takes the latent scaling (and checks the architecture) from a diffusers
/// `AutoencoderKL` config.
fn apply_diffusers_config(cfg: &mut Config, json: &serde_json::Value, dir: &Path) -> Result<()> {
    let what = format!("VAE {}/config.json", dir.display());
    let flag = |k: &str| json.get(k).and_then(|v| v.as_bool());
    if flag("use_quant_conv") == Some(true) || flag("use_post_quant_conv") == Some(true) {
        bail!("{what}: quant_conv layers are not part of the Flux autoencoder; not a Flux VAE");
    }
    if flag("mid_block_add_attention") == Some(false) {
        bail!("{what}: mid-block attention is off; not a Flux VAE");
    }
    if let Some(z) = json.get("latent_channels").and_then(|v| v.as_u64()) {
        if z as usize != cfg.z_channels {
            bail!(
                "{what}: latent_channels {z} but the weights have {}",
                cfg.z_channels
            );
        }
    }
    if let Some(s) = json.get("scaling_factor").and_then(|v| v.as_f64()) {
        cfg.scale_factor = s;
    }
    // `shift_factor` may be null (SD-style VAEs): no shift.
    match json.get("shift_factor") {
        Some(v) if v.is_null() => cfg.shift_factor = 0.0,
        Some(v) => {
            if let Some(s) = v.as_f64() {
                cfg.shift_factor = s;
            }
        }
        None => {}
    }
    Ok(())
}

/// A VAE weight file seen through BFL key names: diffusers files are renamed
/// on the fly (and their 2-D attention projections reshaped to 1×1 convs).
struct VaeWeights {
    st: MmapedSafetensors,
    prefix: String,
    /// `Some(levels)` when the file uses diffusers keys.
    diffusers_levels: Option<usize>,
    what: String,
}

impl VaeWeights {
    fn open(file: &Path) -> Result<Self> {
        let what = format!("VAE {}", file.display());
        // SAFETY: read-only mapping; the file must not be truncated while loaded.
        let st = unsafe { MmapedSafetensors::new(file) }
            .map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
        let marker = "encoder.conv_in.weight";
        let prefix = st
            .tensors()
            .into_iter()
            .filter_map(|(k, _)| k.strip_suffix(marker).map(str::to_string))
            .min_by_key(|p| p.len())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{what}: no …{marker}; not an autoencoder checkpoint"
                ))
            })?;
        let mut w = Self {
            st,
            prefix,
            diffusers_levels: None,
            what,
        };
        if w.raw_shape("encoder.down_blocks.0.resnets.0.conv1.weight")
            .is_some()
        {
            if w.raw_shape("quant_conv.weight").is_some() {
                bail!("{}: has quant_conv layers; not a Flux VAE", w.what);
            }
            let levels = (0..)
                .take_while(|i| {
                    w.raw_shape(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))
                        .is_some()
                })
                .count();
            w.diffusers_levels = Some(levels);
        }
        Ok(w)
    }

    fn key(&self, bfl_name: &str) -> String {
        match self.diffusers_levels {
            Some(levels) => format!("{}{}", self.prefix, bfl_to_diffusers_key(bfl_name, levels)),
            None => format!("{}{bfl_name}", self.prefix),
        }
    }

    fn raw_shape(&self, key: &str) -> Option<Vec<usize>> {
        self.st
            .get(&format!("{}{key}", self.prefix))
            .ok()
            .map(|v| v.shape().to_vec())
    }

    fn shape(&self, bfl_name: &str) -> Option<Vec<usize>> {
        self.st
            .get(&self.key(bfl_name))
            .ok()
            .map(|v| v.shape().to_vec())
    }

    fn need(&self, bfl_name: &str, dim: usize) -> Result<usize> {
        self.shape(bfl_name)
            .and_then(|s| s.get(dim).copied())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: missing tensor {}",
                    self.what,
                    self.key(bfl_name)
                ))
            })
    }

    /// The architecture from the tensor shapes.
    fn infer_config(&self) -> Result<Config> {
        let ch = self.need("encoder.conv_in.weight", 0)?;
        let in_channels = self.need("encoder.conv_in.weight", 1)?;
        let levels = (0..)
            .take_while(|i| {
                self.shape(&format!("encoder.down.{i}.block.0.conv1.weight"))
                    .is_some()
            })
            .count();
        let num_res_blocks = (0..)
            .take_while(|j| {
                self.shape(&format!("encoder.down.0.block.{j}.conv1.weight"))
                    .is_some()
            })
            .count();
        let mut ch_mult = Vec::with_capacity(levels);
        for i in 0..levels {
            let out = self.need(&format!("encoder.down.{i}.block.0.conv1.weight"), 0)?;
            if ch == 0 || out % ch != 0 {
                bail!(
                    "{}: level {i} has {out} channels, not a multiple of {ch}",
                    self.what
                );
            }
            ch_mult.push(out / ch);
        }
        let z_channels = self.need("decoder.conv_in.weight", 1)?;
        let out_ch = self.need("decoder.conv_out.weight", 0)?;
        let (scale_factor, shift_factor) = if z_channels == 16 {
            (FLUX_SCALE_FACTOR, FLUX_SHIFT_FACTOR)
        } else {
            (1.0, 0.0)
        };
        Ok(Config {
            resolution: 256,
            in_channels,
            ch,
            out_ch,
            ch_mult,
            num_res_blocks,
            z_channels,
            scale_factor,
            shift_factor,
        })
    }
}

impl SimpleBackend for VaeWeights {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let key = self.key(name);
        let t = self
            .st
            .load(&key, dev)
            .map_err(|e| candle_core::Error::Msg(format!("{}: tensor {key}: {e}", self.what)))?;
        // diffusers stores the mid-block attention projections as linear
        // weights (out, in); BFL as 1×1 convolutions (out, in, 1, 1).
        let t = if t.rank() == 2 && s.rank() == 4 && t.elem_count() == s.elem_count() {
            t.reshape(s.clone())?
        } else {
            t
        };
        if t.shape() != &s {
            bail!(
                "{}: tensor {key} has shape {:?}, the model expects {:?}",
                self.what,
                t.dims(),
                s.dims()
            );
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.st.load(&self.key(name), dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(&self.key(name)).is_ok()
    }
}

/// The diffusers `AutoencoderKL` name of a BFL autoencoder tensor, for a VAE
/// with `levels` resolution levels (as diffusers' `convert_ldm_vae_checkpoint`
/// maps them, in reverse): `down.i.block.j` ↔ `down_blocks.i.resnets.j`,
/// `up.i` ↔ `up_blocks.(levels-1-i)`, `mid.block_1/2` ↔ `mid_block.resnets.0/1`,
/// `mid.attn_1.{norm,q,k,v,proj_out}` ↔
/// `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`,
/// `norm_out` ↔ `conv_norm_out`, `nin_shortcut` ↔ `conv_shortcut`.
pub(crate) fn bfl_to_diffusers_key(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let resnet_rest = |rest: &[&str]| -> String {
        rest.iter()
            .map(|p| {
                if *p == "nin_shortcut" {
                    "conv_shortcut"
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    match parts.as_slice() {
        [side, "norm_out", rest @ ..] => format!("{side}.conv_norm_out.{}", rest.join(".")),
        [side, "down", i, "block", j, rest @ ..] => {
            format!("{side}.down_blocks.{i}.resnets.{j}.{}", resnet_rest(rest))
        }
        [side, "down", i, "downsample", rest @ ..] => {
            format!("{side}.down_blocks.{i}.downsamplers.0.{}", rest.join("."))
        }
        [side, "up", i, "block", j, rest @ ..] => {
            let i = up_index(i, levels);
            format!("{side}.up_blocks.{i}.resnets.{j}.{}", resnet_rest(rest))
        }
        [side, "up", i, "upsample", rest @ ..] => {
            let i = up_index(i, levels);
            format!("{side}.up_blocks.{i}.upsamplers.0.{}", rest.join("."))
        }
        [side, "mid", "block_1", rest @ ..] => {
            format!("{side}.mid_block.resnets.0.{}", resnet_rest(rest))
        }
        [side, "mid", "block_2", rest @ ..] => {
            format!("{side}.mid_block.resnets.1.{}", resnet_rest(rest))
        }
        [side, "mid", "attn_1", layer, rest @ ..] => {
            let layer = match *layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                other => other,
            };
            format!("{side}.mid_block.attentions.0.{layer}.{}", rest.join("."))
        }
        _ => name.to_string(),
    }
}

fn up_index(i: &str, levels: usize) -> String {
    match i.parse::<usize>() {
        Ok(i) if i < levels => (levels - 1 - i).to_string(),
        _ => i.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use std::collections::HashMap;

    fn test_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x * 7 + y * 13) % 256) as u8])
        })
    }

    #[test]
    fn tiny_vae_round_trip_shapes_and_timing() -> Result<()> {
        let dev = Device::Cpu;
        let t0 = std::time::Instant::now();
        let vae = Vae::tiny(7, &dev)?;
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(vae.latent_channels(), 4);
        assert_eq!(vae.downsample_factor(), 8);
        let img = image_to_tensor(&test_image(64, 64), &dev)?;
        let img = Tensor::cat(&[&img, &img.flip(&[3])?], 0)?; // (2, 3, 64, 64)

        let t0 = std::time::Instant::now();
        let z = vae.encode(&img)?;
        let enc_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(z.dims(), &[2, 4, 8, 8]);
        assert_eq!(z.dtype(), DType::F32);
        let t0 = std::time::Instant::now();
        let x = vae.decode(&z)?;
        let dec_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(x.dims(), &[2, 3, 64, 64]);
        assert_eq!(x.dtype(), DType::F32);

        // deterministic, and batching does not mix images
        let z_again = Vae::tiny(7, &dev)?.encode(&img)?;
        assert_eq!(max_abs_diff(&z, &z_again), 0.0);
        let z0 = vae.encode(&img.narrow(0, 0, 1)?)?;
        assert!(max_abs_diff(&z.narrow(0, 0, 1)?, &z0) < 1e-4);

        assert!(vae.encode(&img.narrow(2, 0, 60)?).is_err());
        assert!(vae
            .decode(&Tensor::zeros((1, 16, 8, 8), DType::F32, &dev)?)
            .is_err());
        let t0 = std::time::Instant::now();
        let one = vae.decode(&vae.encode(&img.narrow(0, 0, 1)?)?)?;
        let one_ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(one.dims(), &[1, 3, 64, 64]);
        eprintln!(
            "tiny VAE: build {build_ms:.1} ms; batch of 2 at 64²: encode {enc_ms:.1} ms, \
             decode {dec_ms:.1} ms; one image encode+decode {one_ms:.1} ms"
        );
        Ok(())
    }

    #[test]
    fn preview_has_rgb_shape_and_unit_range() -> Result<()> {
        let dev = Device::Cpu;
        for c in [16usize, 4, 2] {
            let z = Tensor::randn(0f32, 2.0, (2, c, 5, 7), &dev)?;
            let p = latent_to_rgb_preview(&z)?;
            assert_eq!(p.dims(), &[2, 3, 5, 7]);
            let v = p.flatten_all()?.to_vec1::<f32>()?;
            assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        }
        // Flux: a zero latent shows the bias colour
        let p = latent_to_rgb_preview(&Tensor::zeros((1, 16, 1, 1), DType::F32, &dev)?)?;
        let v = p.flatten_all()?.to_vec1::<f32>()?;
        for (got, b) in v.iter().zip(FLUX_RGB_BIAS) {
            assert!((got - (b + 1.0) / 2.0).abs() < 1e-6);
        }
        // 4 channels: R averages channels 0 and 3, G is 1, B is 2
        let z = Tensor::from_vec(vec![0.2f32, -0.4, 0.6, 0.0], (1, 4, 1, 1), &dev)?;
        let v = latent_to_rgb_preview(&z)?.flatten_all()?.to_vec1::<f32>()?;
        let want = [(0.1 + 1.0) / 2.0, (-0.4 + 1.0) / 2.0, (0.6 + 1.0) / 2.0];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{v:?}");
        }
        Ok(())
    }

    #[test]
    fn image_tensor_round_trip_is_exact() -> Result<()> {
        let dev = Device::Cpu;
        let mut img = RgbImage::new(16, 4);
        for (i, p) in img.pixels_mut().enumerate() {
            let v = (i * 4) as u8;
            *p = image::Rgb([v, 255 - v, v.wrapping_mul(3)]);
        }
        img.put_pixel(0, 0, image::Rgb([0, 255, 128]));
        let t = image_to_tensor(&img, &dev)?;
        assert_eq!(t.dims(), &[1, 3, 4, 16]);
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(v[0], -1.0); // R of (0,0)
        assert_eq!(v[64], 1.0); // G of (0,0)
        let back = tensor_to_images(&t)?;
        assert_eq!(back.len(), 1);
        assert_eq!(back[0], img);
        // out-of-range values clamp
        let loud = (t * 3.0)?;
        let clamped = tensor_to_images(&loud)?;
        assert_eq!(clamped[0].get_pixel(0, 0), &image::Rgb([0, 255, 129]));
        Ok(())
    }

    #[test]
    fn diffusers_key_names_match_convert_ldm_vae_checkpoint() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.weight",
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
            ),
            (
                "decoder.up.0.block.2.conv1.weight",
                "decoder.up_blocks.3.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.3.upsample.conv.bias",
                "decoder.up_blocks.0.upsamplers.0.conv.bias",
            ),
            (
                "decoder.mid.block_2.norm1.weight",
                "decoder.mid_block.resnets.1.norm1.weight",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            (
                "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "decoder.mid.attn_1.q.bias",
                "decoder.mid_block.attentions.0.to_q.bias",
            ),
        ];
        for (bfl, diffusers) in cases {
            assert_eq!(bfl_to_diffusers_key(bfl, 4), diffusers, "{bfl}");
        }
    }

    /// Saves a VAE's tensors under BFL keys and under diffusers keys, loads
    /// both with `Vae::load` and checks they decode identically.
    #[test]
    fn load_reads_bfl_and_diffusers_layouts() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Vae::tiny_config();
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let original = Vae::tiny_from_varbuilder(&cfg, vb)?;

        let mut bfl = HashMap::new();
        let mut diffusers = HashMap::new();
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            let t = var.as_tensor().clone();
            let dkey = bfl_to_diffusers_key(name, cfg.ch_mult.len());
            let is_attn_proj =
                name.contains("attn_1.") && !name.contains(".norm.") && t.rank() == 4;
            let dt = if is_attn_proj {
                t.squeeze(3)?.squeeze(2)?
            } else {
                t.clone()
            };
            bfl.insert(format!("vae.{name}"), t);
            assert!(
                diffusers.insert(dkey, dt).is_none(),
                "two tensors map to one key"
            );
        }
        let bfl_file = dir.path().join("ae.safetensors");
        candle_core::safetensors::save(&bfl, &bfl_file)?;
        let vae_dir = dir.path().join("vae");
        std::fs::create_dir(&vae_dir).expect("mkdir");
        candle_core::safetensors::save(
            &diffusers,
            vae_dir.join("diffusion_pytorch_model.safetensors"),
        )?;
        std::fs::write(
            vae_dir.join("config.json"),
            r#"{"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.5,
                "shift_factor": 0.25, "use_quant_conv": false, "use_post_quant_conv": false}"#,
        )
        .expect("config");

        let from_bfl = Vae::load(&bfl_file, &dev, DType::F32)?;
        let from_diffusers = Vae::load(&vae_dir, &dev, DType::F32)?;
        for v in [&from_bfl, &from_diffusers] {
            assert_eq!(v.config().ch, 32);
            assert_eq!(v.config().ch_mult, vec![1, 1, 1, 1]);
            assert_eq!(v.config().num_res_blocks, 1);
            assert_eq!(v.latent_channels(), 4);
        }
        assert_eq!(from_diffusers.config().scale_factor, 0.5);
        assert_eq!(from_diffusers.config().shift_factor, 0.25);
        assert_eq!(from_bfl.config().scale_factor, 1.0);

        let z = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &dev)?;
        let want = original.decode(&z)?;
        assert_eq!(max_abs_diff(&want, &from_bfl.decode(&z)?), 0.0);
        // same weights; only the latent scaling differs: undo it
        let z_d = (((&z / cfg.scale_factor)? * 0.5)? - 0.125)?;
        assert!(max_abs_diff(&want, &from_diffusers.decode(&z_d)?) < 1e-4);
        let img = image_to_tensor(&test_image(32, 32), &dev)?;
        assert!(max_abs_diff(&original.encode(&img)?, &from_bfl.encode(&img)?) == 0.0);

        // a config that is not Flux's is refused
        std::fs::write(vae_dir.join("config.json"), r#"{"use_quant_conv": true}"#).expect("config");
        assert!(Vae::load(&vae_dir, &dev, DType::F32).is_err());
        Ok(())
    }
}
