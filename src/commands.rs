//! The command-line jobs (`sample`, `lora inspect|convert|merge`, `bench`) as library
//! functions, so `main.rs` only parses arguments and tests can call them directly.
//!
//! Must not: parse the command line or print (callers print what is returned).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use crate::bench::{self, BenchConfig, BenchOptions};
use crate::config::{DeviceChoice, Precision, Settings};
use crate::engine::Engine;
use crate::model::adapter::AdapterSet;
use crate::model::bundle::ModelBundle;
use crate::model::flux::save_checkpoint;
use crate::model::lora_io;
use crate::sample::generate::{generate, ResolvedRequest, SampleRequest};
use crate::sample::png_meta::{save_png, AppliedLora};
use crate::server::AppState;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::events::{TrainControl, TrainEvent};
use crate::train::trainer::Trainer;

/// Which model to load and how.
#[derive(Args, Clone, Debug, Default)]
pub struct ModelArgs {
    /// A model folder or file (BFL/ComfyUI single file, diffusers folder, ComfyUI
    /// install); the built-in tiny model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Compute precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

impl ModelArgs {
    pub fn load(&self) -> Result<ModelBundle> {
        let device = self.device.open()?;
        let dtype = self.precision.dtype();
        let bundle = match &self.model {
            Some(path) => ModelBundle::load(path, dtype, &device)
                .with_context(|| format!("loading model from {}", path.display()))?,
            None => ModelBundle::tiny_in(&device, dtype)?,
        };
        tracing::info!(model = %bundle.name, device = %self.device, "model loaded");
        Ok(bundle)
    }
}

/// `fluxlora bench` options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The configuration(s) to run; dev and schnell are full-size (for GPUs).
    #[arg(long, value_enum, default_value = "small")]
    pub config: Vec<BenchConfig>,
    /// CPU threads for candle's kernels (sets RAYON_NUM_THREADS and
    /// CANDLE_NUM_THREADS before any pool starts); default: as the environment says.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Image side in pixels, 16 per token side (default: tiny's own, 256 for
    /// small, 512 for dev and schnell).
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed runs per figure (medians are reported), after 2 warm-up runs.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Side of the square matmul that measures the peak (default 2048 on the CPU,
    /// 8192 on a GPU).
    #[arg(long)]
    pub matmul_n: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Compute precision (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// One JSON object per configuration (one per line) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// Runs `fluxlora bench`: returns the report (or the JSON lines); a line per finished
/// figure goes to `progress` meanwhile.
pub fn bench(args: &BenchArgs, progress: &mut dyn FnMut(&str)) -> Result<String> {
    if let Some(n) = args.threads {
        // Before any rayon pool or candle kernel starts: both are sized once, from these.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    let device = args.device.open()?;
    let mut out = String::new();
    for &cfg in &args.config {
        let mut opts = BenchOptions::new(cfg, &device);
        opts.resolution = args.resolution;
        opts.batch = args.batch;
        opts.steps = args.steps;
        if let Some(n) = args.matmul_n {
            opts.matmul_n = n;
        }
        if let Some(p) = args.precision {
            opts.dtype = p.dtype();
        }
        let report = bench::measure(&opts, &device, &mut |line| {
            progress(&format!("{}: {line}", cfg.name()))
        })?;
        if args.json {
            out.push_str(&serde_json::to_string(&report)?);
            out.push('\n');
        } else {
            out.push_str(&bench::format_report(&report));
        }
    }
    Ok(out)
}

/// The key layout `lora convert` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveFormat {
    /// kohya sd-scripts keys (`lora_unet_…`), what ComfyUI, Forge and A1111 load.
    Kohya,
    /// diffusers/peft keys (`transformer.….lora_A.weight`).
    Diffusers,
}

/// `FILE[:STRENGTH]` as given on the command line (strength 1 when absent).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraArg {
    pub path: PathBuf,
    pub strength: f64,
}

impl FromStr for LoraArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some((path, strength)) = s.rsplit_once(':') {
            if let Ok(strength) = strength.parse::<f64>() {
                if !strength.is_finite() {
                    return Err(format!("LoRA strength must be a finite number: `{s}`"));
                }
                return Ok(Self {
                    path: PathBuf::from(path),
                    strength,
                });
            }
        }
        Ok(Self {
            path: PathBuf::from(s),
            strength: 1.0,
        })
    }
}

/// Loads LoRAs, checks they fit the model, and returns them as an adapter set with
/// their (name, strength) for the PNG metadata.
fn load_adapters(
    bundle: &ModelBundle,
    loras: &[LoraArg],
) -> Result<(AdapterSet, Vec<AppliedLora>)> {
    let mut set = AdapterSet::none();
    let mut names = vec![];
    for arg in loras {
        let file = lora_io::load(&arg.path, bundle.device())?;
        if !file.unmatched.is_empty() {
            tracing::warn!(file = %arg.path.display(), keys = ?file.unmatched, "LoRA keys that match no module were ignored");
        }
        lora_io::validate(&file.lora, &bundle.adapter_shapes())?;
        names.push(AppliedLora {
            name: file.lora.name.clone(),
            strength: arg.strength,
            hash: file.lora.hash.clone(),
        });
        set.push(Arc::new(file.lora), arg.strength);
    }
    Ok((set, names))
}

/// Output path of image `index` of `count`: the path itself, or `stem_index.ext`.
fn numbered(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}_{index}.{ext}"))
}

/// `fluxlora sample`: generates and writes PNGs; returns the written paths.
pub fn sample(
    model: &ModelArgs,
    req: &SampleRequest,
    loras: &[LoraArg],
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let bundle = model.load()?;
    let (adapters, names) = load_adapters(&bundle, loras)?;
    let req = ResolvedRequest::new(req, &bundle)?;
    let started = std::time::Instant::now();
    let images = generate(&bundle, &req, &adapters, &mut |info, _| {
        tracing::debug!(step = info.step, total = info.total, "sampling");
        Ok(())
    })?;
    tracing::info!(
        images = images.len(),
        steps = req.steps,
        seconds = started.elapsed().as_secs_f64(),
        "sampled"
    );
    let mut written = vec![];
    for (i, image) in images.iter().enumerate() {
        let path = numbered(out, i, images.len());
        save_png(&path, image, &req.params(i, &bundle.name, &names))
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Where `fluxlora train --resume` continues from.
#[derive(Clone, Debug, PartialEq)]
pub enum ResumeArg {
    /// The newest state folder in the run's output folder.
    Auto,
    /// A state folder (`<name>-stepNNNNNN-state`).
    State(PathBuf),
}

impl FromStr for ResumeArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(if s == "auto" {
            Self::Auto
        } else {
            Self::State(PathBuf::from(s))
        })
    }
}

/// `fluxlora train`: runs a config with a progress bar; returns the final LoRA.
pub fn train(cfg: TrainConfig, resume: Option<&ResumeArg>) -> Result<PathBuf> {
    let model = ModelArgs {
        model: cfg.model.clone(),
        device: cfg.device,
        precision: cfg.mixed_precision,
    };
    let mut bundle = model.load()?;
    if let Some(n) = cfg.t5_max_token_length {
        bundle.text_mut()?.set_t5_max_len(n)?;
    }
    let bundle = Arc::new(bundle);
    let state = match resume {
        None => None,
        Some(ResumeArg::State(p)) => Some(p.clone()),
        Some(ResumeArg::Auto) => Some(
            checkpoint::latest_state(&cfg.output_dir, &cfg.output_name).with_context(|| {
                format!(
                    "no saved state of `{}` in {}",
                    cfg.output_name,
                    cfg.output_dir.display()
                )
            })?,
        ),
    };
    let mut trainer = Trainer::new(cfg, bundle, state.as_deref())?;
    let bar = indicatif::ProgressBar::new(trainer.total_steps());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {per_sec} {msg}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.set_position(trainer.progress().step);
    let control = TrainControl::default();
    let result = trainer.run(&control, &mut |event| match &event {
        TrainEvent::Caching { done, total } => bar.set_message(format!("caching {done}/{total}")),
        TrainEvent::Step(s) => {
            bar.set_position(s.step);
            bar.set_message(format!(
                "loss {:.4} (avg {:.4}) lr {:.2e}",
                s.loss, s.loss_ema, s.lr
            ));
        }
        TrainEvent::Saved { path, .. } => bar.println(format!("saved {}", path.display())),
        TrainEvent::Sample { paths, .. } => {
            for p in paths {
                bar.println(format!("sample {}", p.display()));
            }
        }
        TrainEvent::Validation { step, loss } => {
            bar.println(format!("step {step}: validation loss {loss:.4}"))
        }
        _ => {}
    });
    bar.finish();
    result?.context("training was cancelled")
}

/// The demo run's config (`examples/demo.toml`), built into the binary.
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.toml");

/// `fluxlora train --demo`: writes the demo dataset (pink "zorbly" shapes) and
/// trains the demo config on the built-in tiny model. With `out`, everything goes
/// under that folder instead of `demo-output/`.
pub fn demo(out: Option<&Path>) -> Result<PathBuf> {
    let mut cfg: TrainConfig = toml::from_str(DEMO_CONFIG).context("examples/demo.toml")?;
    if let Some(out) = out {
        cfg.output_dir = out.to_path_buf();
        cfg.dataset.folders[0].path = out.join("dataset/zorbly");
        cfg.dataset.folders[1].path = out.join("dataset/regular");
    }
    write_demo_dataset(&cfg)?;
    cfg.validate()?;
    train(cfg, None)
}

/// Writes the demo's two dataset folders named in `cfg` (the concept, then the
/// regularisation images).
pub fn write_demo_dataset(cfg: &TrainConfig) -> Result<()> {
    use crate::train::shapes::{write_concept_dataset, write_dataset, Concept};
    let [concept, regular] = [&cfg.dataset.folders[0].path, &cfg.dataset.folders[1].path];
    write_concept_dataset(concept, &Concept::demo(), 24, 64, 7)
        .with_context(|| format!("writing the demo dataset to {}", concept.display()))?;
    write_dataset(regular, 24, 64, 8)
        .with_context(|| format!("writing the demo dataset to {}", regular.display()))?;
    Ok(())
}

/// `fluxlora serve`: loads the model, starts the engine and serves HTTP until stopped.
pub fn serve(settings: Settings) -> Result<()> {
    crate::server::check_bind(&settings).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    let model = ModelArgs {
        model: settings.model.clone(),
        device: settings.device,
        precision: settings.precision,
    };
    let bundle = Arc::new(model.load()?);
    let engine = Engine::start(bundle.clone(), &settings.data_dir, settings.lora_dir())?;
    let state = AppState::new(&settings, &bundle, engine.clone());
    let name = bundle.name.clone();
    let stopping = state.stopping.clone();
    actix_web::rt::System::new().block_on(async move {
        let (server, addr) = crate::server::start(&settings, state)?;
        crate::server::stop_on_signal(&server, stopping);
        tracing::info!("fluxlora serving on http://{addr} with model {name}");
        server.await
    })?;
    engine.shutdown();
    Ok(())
}

/// `fluxlora nodes`: the node definitions with the LoRA folder's files and the
/// input folder's images, as JSON.
pub fn nodes(settings: &Settings, compact: bool) -> Result<String> {
    use crate::server::comfy::nodes::{object_info, FolderLists};
    let input = settings
        .comfy_root
        .as_ref()
        .unwrap_or(&settings.data_dir)
        .join("input");
    let info = object_info(&FolderLists::read(Some(&settings.lora_dir()), Some(&input)));
    Ok(if compact {
        serde_json::to_string(&info)?
    } else {
        serde_json::to_string_pretty(&info)?
    })
}

/// `fluxlora lora inspect`.
pub fn lora_inspect(path: &Path, json: bool) -> Result<String> {
    let file = lora_io::load(path, &candle_core::Device::Cpu)?;
    let report = lora_io::describe(&file);
    Ok(if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.to_string()
    })
}

/// `fluxlora lora convert`: returns a one-line summary.
pub fn lora_convert(
    input: &Path,
    output: &Path,
    to: SaveFormat,
    precision: &str,
) -> Result<String> {
    let precision: Precision = precision.parse().map_err(anyhow::Error::msg)?;
    let file = lora_io::load(input, &candle_core::Device::Cpu)?;
    match to {
        SaveFormat::Kohya => {
            lora_io::save_kohya(output, &file.lora, &file.metadata, precision.dtype())?
        }
        SaveFormat::Diffusers => {
            lora_io::save_diffusers(output, &file.lora, &file.metadata, precision.dtype())?
        }
    }
    Ok(format!(
        "{} ({:?}, {} modules) → {} ({to:?})",
        input.display(),
        file.format,
        file.lora.layers.len(),
        output.display()
    ))
}

/// `fluxlora lora merge`: the base transformer with the LoRAs folded in, BFL keys.
pub fn lora_merge(model: &ModelArgs, loras: &[LoraArg], out: &Path) -> Result<()> {
    let bundle = model.load()?;
    let (adapters, _) = load_adapters(&bundle, loras)?;
    let weights = bundle.flux.merged_weights(&adapters)?;
    save_checkpoint(out, bundle.flux.config(), &weights, bundle.flux.dtype())
        .with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_arg_parses_optional_strength() {
        let a: LoraArg = "style.safetensors:0.6".parse().unwrap();
        assert_eq!(a.path, PathBuf::from("style.safetensors"));
        assert_eq!(a.strength, 0.6);
        let b: LoraArg = "dir:x/style.safetensors".parse().unwrap();
        assert_eq!(b.path, PathBuf::from("dir:x/style.safetensors"));
        assert_eq!(b.strength, 1.0);
        assert!("a.safetensors:NaN".parse::<LoraArg>().is_err());
    }

    #[test]
    fn batch_outputs_are_numbered() {
        assert_eq!(
            numbered(Path::new("o/x.png"), 0, 1),
            PathBuf::from("o/x.png")
        );
        assert_eq!(
            numbered(Path::new("o/x.png"), 1, 2),
            PathBuf::from("o/x_1.png")
        );
    }
}
