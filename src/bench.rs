//! `fluxlora bench`: measured throughput next to this machine's limit.
//!
//! Prints the f32 matmul peak of the device (the ceiling for everything else), then
//! the Flux transformer's forward pass, one LoRA training step and a full sampling
//! run, each as achieved GFLOP/s (from the model's analytic FLOP count) and as a
//! share of that peak. Timings are medians over repeated runs after a warm-up.
//!
//! Must not: be used by tests to assert on time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Result, Tensor};

use crate::model::adapter::AdapterSet;
use crate::model::bundle::ModelBundle;
use crate::model::flux::{image_ids, text_ids, Flux, FluxInputs};
use crate::model::keymap::{module_group, ModuleGroup};
use crate::model::seeded::SeededRng;
use crate::sample::generate::{generate, ResolvedRequest, SampleRequest};
use crate::train::network::{NetworkConfig, TrainableLora};
use crate::train::recompute::loss_and_grads;

/// Median seconds of `runs` calls of `f` after one warm-up call.
fn median_secs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Waits for queued device work (CUDA is asynchronous) so timings are honest.
fn sync(device: &Device) -> Result<()> {
    device.synchronize()
}

/// Achieved f32 GFLOP/s of an n×n×n matmul.
pub(crate) fn matmul_peak(device: &Device, n: usize) -> Result<f64> {
    let a = SeededRng::new(1).randn((n, n), device)?;
    let b = SeededRng::new(2).randn((n, n), device)?;
    let secs = median_secs(5, || {
        a.matmul(&b)?;
        sync(device)
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

/// Runs the benchmarks on `bundle` and returns the report.
pub fn run(bundle: &Arc<ModelBundle>, batch: usize, width: usize, height: usize) -> Result<String> {
    let device = bundle.device().clone();
    let flux = &bundle.flux;
    let cfg = flux.config();
    let mut out = String::new();
    let n = if device.is_cpu() { 1024 } else { 4096 };
    let peak = matmul_peak(&device, n)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let _ = writeln!(
        out,
        "device: {device:?} ({threads} threads), model: {}, dtype: {:?}",
        bundle.name,
        flux.dtype()
    );
    let _ = writeln!(
        out,
        "matmul peak (f32 {n}³): {peak:.1} GFLOP/s  ← the machine's limit for what follows"
    );

    let factor = bundle.vae()?.downsample_factor() * 2;
    let (rows, cols) = (height / factor, width / factor);
    let n_img = rows * cols;
    let n_txt = bundle.text()?.t5_max_len();
    let mut rng = SeededRng::new(3);
    let img = rng
        .randn((batch, n_img, cfg.in_channels), &device)?
        .to_dtype(flux.dtype())?;
    let txt = rng.randn((batch, n_txt, cfg.context_in_dim), &device)?;
    let y = rng.randn((batch, cfg.vec_in_dim), &device)?;
    let (img_ids, txt_ids) = (
        image_ids(batch, rows, cols, &device)?,
        text_ids(batch, n_txt, &device)?,
    );
    let t = Tensor::full(0.5f32, batch, &device)?;
    let g = Tensor::full(1.0f32, batch, &device)?;
    let inputs = FluxInputs {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        timesteps: &t,
        y: &y,
        guidance: cfg.guidance_embed.then_some(&g),
    };
    let flops = forward_flops(flux, batch, n_img, n_txt);
    let line = |out: &mut String, what: &str, secs: f64, flops: f64| {
        let gf = flops / secs / 1e9;
        let _ = writeln!(
            out,
            "{what:<44} {:>9.2} ms  {gf:>8.2} GFLOP/s  {:>5.1}% of peak",
            secs * 1e3,
            100.0 * gf / peak
        );
    };
    let _ = writeln!(out, "batch {batch}, {width}×{height} ({n_img} image + {n_txt} text tokens), {:.3} GFLOP per forward", flops / 1e9);

    let secs = median_secs(5, || {
        flux.forward(&inputs, &AdapterSet::none())?;
        sync(&device)
    })?;
    line(&mut out, "transformer forward", secs, flops);

    let net = NetworkConfig::default();
    let lora = TrainableLora::new(&net, flux.linear_shapes(), 1, &device)?;
    let adapters = AdapterSet::none().with(lora.lora.clone(), 1.0);
    let secs = median_secs(5, || {
        flux.forward(&inputs, &adapters)?;
        sync(&device)
    })?;
    line(
        &mut out,
        "transformer forward + rank-16 LoRA, unmerged",
        secs,
        flops,
    );

    let target = rng.randn((batch, n_img, cfg.in_channels), &device)?;
    let params = lora.params();
    for (checkpointing, what) in [
        (false, "LoRA train step (forward + backward)"),
        (true, "  … with gradient checkpointing"),
    ] {
        let secs = median_secs(3, || {
            loss_and_grads(
                flux,
                &inputs,
                &adapters,
                &target,
                1.0,
                checkpointing,
                &params,
            )?;
            sync(&device)
        })?;
        // Backward costs about twice the forward; recomputation adds one more forward.
        line(&mut out, what, secs, flops * 3.0);
    }

    let req = SampleRequest {
        width: Some(width),
        height: Some(height),
        batch_size: batch,
        ..SampleRequest::new("a red circle on a blue background")
    };
    let req = ResolvedRequest::new(&req, bundle).map_err(candle_core::Error::wrap)?;
    let secs = median_secs(3, || {
        generate(bundle, &req, &AdapterSet::none(), &mut |_, _| Ok(()))?;
        sync(&device)
    })?;
    line(
        &mut out,
        &format!("sampling, {} steps (text + DiT + VAE)", req.steps),
        secs,
        flops * req.steps as f64,
    );
    let _ = writeln!(out, "(sampling GFLOP/s counts the transformer only; text encoding and VAE decode are extra work)");
    Ok(out)
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
}
