//! `fluxlora bench`: the transformer's training and sampling speed on named
//! configurations with seeded weights, next to this machine's limit.
//!
//! Measures the matmul peak first (same device, dtype and thread count), then for one
//! [`BenchConfig`]: a rank-16 LoRA training step (forward, backward, AdamW; plain and
//! with gradient checkpointing), one transformer forward (a sampling step) without
//! LoRA and with 1 and 3 unmerged LoRAs, a LoRA hot swap (file to adapter set) and
//! the process's peak RSS. Timings are medians over `steps` runs after warm-up.
//!
//! FLOP convention, shared with scripts/bench/pytorch_bench.py: `forward_gflop` is
//! the base model's analytic forward count (2·in·out per token for every linear, 4·L²·
//! hidden per block for attention; LoRA products not counted); a training step counts
//! 2 × that, because the frozen base needs only the input-gradient pass in backward
//! (no weight gradients) and the adapters' own work is small.
//!
//! Must not: be used by tests to assert on time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::model::adapter::{AdapterSet, Lora, LoraLayer};
use crate::model::bundle::ModelBundle;
use crate::model::flux::{image_ids, text_ids, Flux, FluxConfig, FluxInputs, WeightSource};
use crate::model::keymap::{module_group, ModuleGroup};
use crate::model::lora_io::{self, LoraIoError};
use crate::model::seeded::SeededRng;
use crate::train::network::{NetworkConfig, TargetPreset, TrainableLora};
use crate::train::optim::{self, OptimError, OptimizerConfig, OptimizerKind, ParamGroup};
use crate::train::recompute::loss_and_grads;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("optimizer: {0}")]
    Optim(#[from] OptimError),
    #[error("LoRA file: {0}")]
    LoraIo(#[from] LoraIoError),
    #[error("bench: {0}")]
    Setup(String),
}

type Result<T> = std::result::Result<T, BenchError>;

/// The named configurations, all with seeded weights (no files needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchConfig {
    /// The built-in tiny model's architecture (hidden 64).
    Tiny,
    /// Hidden 512, 8 heads, 2 double + 4 single blocks, 16×16 image and 64 text
    /// tokens: a CPU-sized Flux where the matmuls dominate.
    Small,
    /// FLUX.1 [dev] at full size (for GPUs; 512 text tokens).
    Dev,
    /// FLUX.1 [schnell] at full size (for GPUs; 256 text tokens).
    Schnell,
}

impl BenchConfig {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Small => "small",
            Self::Dev => "dev",
            Self::Schnell => "schnell",
        }
    }

    /// The architecture, the text length and (image rows, cols, pixels per token)
    /// at `resolution` pixels (None: the config's default).
    fn shape(self, resolution: Option<usize>) -> Result<(FluxConfig, usize, (usize, usize))> {
        let square = |px: usize, per_token: usize| {
            let side = (px / per_token).max(1);
            (side, side)
        };
        Ok(match self {
            Self::Tiny => {
                let bundle = ModelBundle::tiny(&Device::Cpu)?;
                let per_token = bundle.vae()?.downsample_factor() * 2;
                let px = resolution.unwrap_or(bundle.defaults.width);
                let n_txt = bundle.text()?.t5_max_len();
                (bundle.flux.config().clone(), n_txt, square(px, per_token))
            }
            Self::Small => (
                FluxConfig {
                    in_channels: 64,
                    vec_in_dim: 256,
                    context_in_dim: 512,
                    hidden_size: 512,
                    mlp_ratio: 4.0,
                    num_heads: 8,
                    depth: 2,
                    depth_single_blocks: 4,
                    axes_dim: vec![8, 28, 28],
                    theta: 10_000.0,
                    qkv_bias: true,
                    guidance_embed: true,
                },
                64,
                square(resolution.unwrap_or(256), 16),
            ),
            Self::Dev => (
                FluxConfig::dev(),
                512,
                square(resolution.unwrap_or(512), 16),
            ),
            Self::Schnell => (
                FluxConfig::schnell(),
                256,
                square(resolution.unwrap_or(512), 16),
            ),
        })
    }
}

/// How to run one configuration.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub config: BenchConfig,
    /// Image side in pixels (16 per token side); None: the config's default.
    pub resolution: Option<usize>,
    pub batch: usize,
    /// Timed runs per figure (the median is reported), after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    pub dtype: DType,
    /// Side of the square matmul that measures the peak.
    pub matmul_n: usize,
}

impl BenchOptions {
    /// The defaults for `config` on `device`: 20 steps after 2 warm-ups, f32 on the
    /// CPU and bf16 elsewhere, a 2048³ (CPU) or 8192³ matmul for the peak.
    pub fn new(config: BenchConfig, device: &Device) -> Self {
        Self {
            config,
            resolution: None,
            batch: 1,
            steps: 20,
            warmup: 2,
            dtype: if device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            },
            matmul_n: if device.is_cpu() { 2048 } else { 8192 },
        }
    }
}

/// One configuration's figures; the field names are shared with the PyTorch script.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub config: String,
    pub implementation: &'static str,
    pub device: String,
    pub dtype: String,
    /// The thread count candle's CPU kernels use (RAYON_NUM_THREADS / CANDLE_NUM_THREADS).
    pub threads: usize,
    pub batch: usize,
    pub image_tokens: usize,
    pub text_tokens: usize,
    pub lora_rank: usize,
    pub lora_targets: &'static str,
    /// The architecture (BFL `FluxParams` names), so the PyTorch side builds the same.
    pub model: FluxConfig,
    pub steps: usize,
    pub train_step_s: f64,
    pub train_step_checkpointed_s: f64,
    pub sample_step_s: f64,
    pub sample_step_1lora_s: f64,
    pub sample_step_3lora_s: f64,
    pub hot_swap_ms: f64,
    /// The process's peak resident set (VmHWM) after all figures; None off Linux.
    pub peak_rss_mb: Option<f64>,
    pub forward_gflop: f64,
    /// Training: 2 × forward_gflop / train_step_s (see `flop_convention`).
    pub achieved_gflops: f64,
    pub matmul_peak_gflops: f64,
    pub matmul_peak_n: usize,
    /// achieved_gflops as a share of matmul_peak_gflops, in percent.
    pub pct_of_peak: f64,
    pub flop_convention: &'static str,
}

const FLOP_CONVENTION: &str = "forward_gflop: base-model linears (2·in·out per token) + attention (4·L²·hidden per block), LoRA not counted; a training step counts 2 × forward (forward + input-gradient backward; the frozen base needs no weight gradients)";

/// Median seconds of `runs` calls of `f` after `warmup` untimed calls.
fn median_secs(
    warmup: usize,
    runs: usize,
    device: &Device,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Achieved GFLOP/s of an n×n×n matmul in `dtype`.
pub(crate) fn matmul_peak(device: &Device, n: usize, dtype: DType) -> Result<f64> {
    let a = SeededRng::new(1).randn((n, n), device)?.to_dtype(dtype)?;
    let b = SeededRng::new(2).randn((n, n), device)?.to_dtype(dtype)?;
    let secs = median_secs(1, 5, device, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs / 1e9)
}

/// FLOPs of one forward pass for `batch` samples of `n_img` image and `n_txt` text
/// tokens: 2·in·out per token for every linear (each on the tokens it sees), plus
/// the attention products 4·L²·hidden per block.
pub(crate) fn forward_flops(flux: &Flux, batch: usize, n_img: usize, n_txt: usize) -> f64 {
    let cfg = flux.config();
    let mut flops = 0.0;
    for (module, &(out_f, in_f)) in flux.linear_shapes() {
        let leaf = module.rsplit('.').next().unwrap_or("");
        let tokens = match module_group(module) {
            _ if module.contains("mod")
                || module.contains("adaLN")
                || leaf == "in_layer"
                || leaf == "out_layer" =>
            {
                1
            }
            ModuleGroup::Double(_) if module.contains(".txt_") => n_txt,
            ModuleGroup::Double(_) => n_img,
            ModuleGroup::Single(_) => n_img + n_txt,
            ModuleGroup::Other if module == "txt_in" => n_txt,
            ModuleGroup::Other => n_img,
        };
        flops += 2.0 * (in_f * out_f * tokens) as f64;
    }
    let l = (n_img + n_txt) as f64;
    let blocks = (cfg.depth + cfg.depth_single_blocks) as f64;
    flops += blocks * 4.0 * l * l * cfg.hidden_size as f64;
    flops * batch as f64
}

/// The LoRA the benchmark trains and samples with: rank 16 on every attention and
/// MLP linear of every block (peft's usual Flux targets).
fn network() -> NetworkConfig {
    NetworkConfig {
        rank: 16,
        alpha: 16.0,
        targets: TargetPreset::AttentionMlp,
        ..NetworkConfig::default()
    }
}

/// A frozen LoRA with seeded, non-zero down and up on the network's modules.
fn seeded_lora(
    name: &str,
    seed: u64,
    shapes: &BTreeMap<String, (usize, usize)>,
    dtype: DType,
    device: &Device,
) -> Result<Lora> {
    let net = network();
    let mut lora = Lora::new(name);
    let mut rng = SeededRng::new(seed);
    for (module, &(out_f, in_f)) in shapes {
        if !net.targets_module(module) {
            continue;
        }
        let down = (rng.randn((net.rank, in_f), device)? * (1.0 / (in_f as f64).sqrt()))?;
        let up = (rng.randn((out_f, net.rank), device)? * 0.01)?;
        lora.layers.insert(
            module.clone(),
            LoraLayer {
                down: down.to_dtype(dtype)?,
                up: up.to_dtype(dtype)?,
                alpha: net.alpha,
            },
        );
    }
    Ok(lora)
}

/// Runs one configuration on `device`; `progress` gets a line per finished figure.
pub fn measure(
    opts: &BenchOptions,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let (cfg, n_txt, (rows, cols)) = opts.config.shape(opts.resolution)?;
    let (batch, n_img) = (opts.batch.max(1), rows * cols);
    let peak = matmul_peak(device, opts.matmul_n, opts.dtype)?;
    progress(&format!(
        "matmul peak ({:?} {}³): {peak:.1} GFLOP/s",
        opts.dtype, opts.matmul_n
    ));
    let flux = Flux::new(&cfg, &WeightSource::Seeded(7), opts.dtype, device)?;
    let flops = forward_flops(&flux, batch, n_img, n_txt);

    let mut rng = SeededRng::new(3);
    let img = rng
        .randn((batch, n_img, cfg.in_channels), device)?
        .to_dtype(opts.dtype)?;
    let txt = rng
        .randn((batch, n_txt, cfg.context_in_dim), device)?
        .to_dtype(opts.dtype)?;
    let y = rng
        .randn((batch, cfg.vec_in_dim), device)?
        .to_dtype(opts.dtype)?;
    let target = rng
        .randn((batch, n_img, cfg.in_channels), device)?
        .to_dtype(opts.dtype)?;
    let (img_ids, txt_ids) = (
        image_ids(batch, rows, cols, device)?,
        text_ids(batch, n_txt, device)?,
    );
    let t = Tensor::full(0.5f32, batch, device)?;
    let g = Tensor::full(1.0f32, batch, device)?;
    let inputs = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &t,
        y: &y,
        guidance: cfg.guidance_embed.then_some(&g),
    };
    let (warmup, steps) = (opts.warmup, opts.steps.max(1));

    // Training: the trainable LoRA (f32 master weights) and AdamW.
    let net = network();
    let lora = TrainableLora::new(&net, flux.linear_shapes(), 1, device)?;
    let params = lora.params();
    let mut opt = optim::build(
        &OptimizerConfig::new(OptimizerKind::Adamw),
        vec![ParamGroup {
            name: "transformer".into(),
            params: params.clone(),
            lr: 1e-4,
        }],
    )?;
    let training = AdapterSet::none().with(lora.lora.clone(), 1.0);
    let mut train = |checkpointing: bool| -> Result<f64> {
        median_secs(warmup, steps, device, || {
            let (_loss, grads) = loss_and_grads(
                &flux,
                &inputs,
                &training,
                &target,
                1.0,
                checkpointing,
                &params,
            )?;
            opt.step(&grads)?;
            Ok(())
        })
    };
    let train_step_s = train(false)?;
    progress(&format!("train step: {:.3} s", train_step_s));
    let train_step_checkpointed_s = train(true)?;
    progress(&format!(
        "train step, checkpointed: {:.3} s",
        train_step_checkpointed_s
    ));

    // Sampling: one transformer forward with 0, 1 and 3 unmerged LoRAs.
    let shapes = flux.linear_shapes().clone();
    let loras = (0..3)
        .map(|i| {
            seeded_lora(&format!("lora{i}"), 100 + i, &shapes, opts.dtype, device).map(Arc::new)
        })
        .collect::<Result<Vec<_>>>()?;
    let forward = |set: &AdapterSet| {
        median_secs(warmup, steps, device, || {
            flux.forward(&inputs, set)?;
            Ok(())
        })
    };
    let sample_step_s = forward(&AdapterSet::none())?;
    let one = AdapterSet::none().with(loras[0].clone(), 1.0);
    let sample_step_1lora_s = forward(&one)?;
    let three = loras
        .iter()
        .fold(AdapterSet::none(), |set, l| set.with(l.clone(), 0.7));
    let sample_step_3lora_s = forward(&three)?;
    progress(&format!(
        "sample step: {sample_step_s:.3} s, 1 LoRA {sample_step_1lora_s:.3} s, 3 LoRAs {sample_step_3lora_s:.3} s"
    ));

    // Hot swap: a LoRA file read (page cache warm) into the adapter set in use.
    let file = temp_lora_path(opts.config);
    lora_io::save_kohya(&file, &loras[1], &BTreeMap::new(), DType::F32)?;
    let mut current = one;
    let swap = median_secs(warmup, steps, device, || {
        let loaded = lora_io::load(&file, device)?;
        current = AdapterSet::none().with(Arc::new(loaded.lora), 1.0);
        Ok(())
    });
    // The file goes whether or not the swap worked; a failed removal only leaves a temp file.
    let _ = std::fs::remove_file(&file);
    let hot_swap_ms = swap? * 1e3;
    flux.forward(&inputs, &current)?;

    let achieved = 2.0 * flops / train_step_s / 1e9;
    Ok(BenchReport {
        config: opts.config.name().into(),
        implementation: "fluxlora (candle)",
        device: format!("{device:?}"),
        dtype: format!("{:?}", opts.dtype).to_lowercase(),
        threads: candle_core::utils::get_num_threads(),
        batch,
        image_tokens: n_img,
        text_tokens: n_txt,
        lora_rank: net.rank,
        lora_targets: "attention and MLP linears of every block",
        model: cfg.clone(),
        steps,
        train_step_s,
        train_step_checkpointed_s,
        sample_step_s,
        sample_step_1lora_s,
        sample_step_3lora_s,
        hot_swap_ms,
        peak_rss_mb: crate::train::events::peak_memory_bytes().map(|b| b as f64 / (1 << 20) as f64),
        forward_gflop: flops / 1e9,
        achieved_gflops: achieved,
        matmul_peak_gflops: peak,
        matmul_peak_n: opts.matmul_n,
        pct_of_peak: 100.0 * achieved / peak,
        flop_convention: FLOP_CONVENTION,
    })
}

/// A per-process temp path for the hot-swap LoRA file.
fn temp_lora_path(config: BenchConfig) -> PathBuf {
    std::env::temp_dir().join(format!(
        "fluxlora-bench-{}-{}.safetensors",
        config.name(),
        std::process::id()
    ))
}

/// The human-readable report: every figure beside the matmul peak.
pub fn format_report(r: &BenchReport) -> String {
    let mut out = String::new();
    let peak = r.matmul_peak_gflops;
    let fwd = r.forward_gflop * 1e9;
    let _ = writeln!(
        out,
        "config {}: {} on {:?}, {}, {} threads; batch {}, {} image + {} text tokens, {:.3} GFLOP per forward",
        r.config, r.implementation, r.device, r.dtype, r.threads, r.batch, r.image_tokens, r.text_tokens, r.forward_gflop
    );
    let _ = writeln!(
        out,
        "matmul peak ({} {}³): {peak:.1} GFLOP/s  ← the machine's limit for what follows",
        r.dtype, r.matmul_peak_n
    );
    let line = |out: &mut String, what: &str, secs: f64, flops: f64| {
        let gf = flops / secs / 1e9;
        let _ = writeln!(
            out,
            "{what:<46} {:>10.2} ms  {gf:>8.2} GFLOP/s  {:>5.1}% of peak",
            secs * 1e3,
            100.0 * gf / peak
        );
    };
    line(
        &mut out,
        "LoRA train step (fwd + bwd + AdamW)",
        r.train_step_s,
        2.0 * fwd,
    );
    line(
        &mut out,
        "  … with gradient checkpointing",
        r.train_step_checkpointed_s,
        2.0 * fwd,
    );
    line(&mut out, "sample step (one forward)", r.sample_step_s, fwd);
    line(
        &mut out,
        "  … with 1 unmerged LoRA",
        r.sample_step_1lora_s,
        fwd,
    );
    line(
        &mut out,
        "  … with 3 unmerged LoRAs",
        r.sample_step_3lora_s,
        fwd,
    );
    let _ = writeln!(
        out,
        "3 LoRAs / none: {:.2}×; LoRA hot swap (file → adapter set): {:.2} ms; peak RSS: {}",
        r.sample_step_3lora_s / r.sample_step_s,
        r.hot_swap_ms,
        r.peak_rss_mb
            .map_or("not measured".to_string(), |mb| format!("{mb:.0} MB"))
    );
    let _ = writeln!(
        out,
        "medians of {} steps; GFLOP/s from analytic counts: training = 2 × forward (the frozen base needs only the input-gradient pass), LoRA work not counted",
        r.steps
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_count_of_a_single_linear_model_part_is_exact() {
        let bundle = ModelBundle::tiny(&Device::Cpu).unwrap();
        let one = forward_flops(&bundle.flux, 1, 4, 2);
        let two = forward_flops(&bundle.flux, 2, 4, 2);
        assert_eq!(two, 2.0 * one);
        // img_in alone: 2 · in · out · n_img.
        let (out_f, in_f) = bundle.flux.linear_shapes()["img_in"];
        assert!(one > 2.0 * (in_f * out_f * 4) as f64);
    }

    /// The JSON carries the fields the PyTorch script shares, with sane values; no
    /// assertion on how fast anything ran.
    #[test]
    fn tiny_report_has_the_shared_fields() -> Result<()> {
        let dev = Device::Cpu;
        let opts = BenchOptions {
            steps: 1,
            warmup: 0,
            matmul_n: 64,
            ..BenchOptions::new(BenchConfig::Tiny, &dev)
        };
        let mut lines = vec![];
        let report = measure(&opts, &dev, &mut |l| lines.push(l.to_string()))?;
        assert!(!lines.is_empty());
        let json = serde_json::to_value(&report).map_err(|e| BenchError::Setup(e.to_string()))?;
        for key in [
            "train_step_s",
            "train_step_checkpointed_s",
            "sample_step_s",
            "sample_step_1lora_s",
            "sample_step_3lora_s",
            "hot_swap_ms",
            "forward_gflop",
            "achieved_gflops",
            "matmul_peak_gflops",
            "pct_of_peak",
        ] {
            let v = json[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "{key}: {}", json[key]);
        }
        assert_eq!(json["config"], "tiny");
        assert!(json["threads"].as_u64().unwrap_or(0) >= 1);
        assert!(format_report(&report).contains("% of peak"));
        Ok(())
    }
}
