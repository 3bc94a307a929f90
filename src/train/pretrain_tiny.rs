//! Reproducible pretraining of the built-in tiny model on the procedural shapes
//! dataset, so the embedded default draws recognisable pictures.
//!
//! Two stages, both deterministic for a seed:
//! 1. the tiny autoencoder is trained to reconstruct shape images (MSE, plus a small
//!    penalty keeping latents bounded), then its latent scale/shift are calibrated to
//!    unit variance as Flux's are;
//! 2. the tiny DiT is fully fine-tuned with the ordinary [`Trainer`] (flow matching on
//!    cached latents) on a generated folder of captioned shape images.
//!
//! The result is two small safetensors files that `model::bundle` embeds.
//!
//! Must not: run at start-up; this is an offline, documented command.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::Init;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::TrainConfig;
use super::dataset::{DatasetConfig, FolderConfig, Resolution};
use super::events::{TrainControl, TrainEvent};
use super::lr_schedule::{LrSchedule, ScheduleKind};
use super::optim::{self, OptimizerConfig, OptimizerKind, ParamGroup};
use super::shapes::{self, ShapeScene};
use super::trainer::{TrainError, Trainer};
use crate::atomic_file;
use crate::model::bundle::{tiny_flux_config, tiny_vae_from_bytes, ModelBundle, TINY_SEED};
use crate::model::flux::{Flux, WeightSource};
use crate::model::seeded::{SeededInit, SeededRng};
use crate::model::text::TextEncoders;
use crate::model::vae::{image_to_tensor, Vae};

/// Sizes and lengths of the two stages.
#[derive(Clone, Debug)]
pub struct PretrainConfig {
    pub out_dir: PathBuf,
    pub seed: u64,
    pub image_size: u32,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    pub dit_images: usize,
    pub dit_steps: u64,
    pub dit_batch: usize,
    pub dit_lr: f64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("assets/tiny"),
            seed: TINY_SEED,
            image_size: 64,
            vae_steps: 600,
            vae_batch: 8,
            vae_lr: 2e-3,
            dit_images: 1200,
            dit_steps: 3000,
            dit_batch: 16,
            dit_lr: 1e-3,
        }
    }
}

/// Seeded weights, each made a trainable `Var` and recorded by name.
struct TrainableInit {
    inner: SeededInit,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SimpleBackend for TrainableInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let var = Var::from_tensor(&self.inner.get(s, name, h, dtype, dev)?)?;
        let t = var.as_tensor().clone();
        self.vars
            .lock()
            .map_err(|_| candle_core::Error::msg("weight recorder poisoned"))?
            .push((name.to_string(), var));
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

fn batch_of_scenes(rng: &mut SeededRng, n: usize, size: u32, device: &Device) -> Result<Tensor> {
    let images = (0..n)
        .map(|_| image_to_tensor(&ShapeScene::random(rng, size).render(size, None), device))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&images, 0)
}

/// A trained tiny autoencoder: its weights (BFL keys) and calibrated latent scale/shift.
pub(crate) struct TrainedVae {
    pub weights: Vec<(String, Tensor)>,
    pub scale: f64,
    pub shift: f64,
}

/// Stage 1: trains the tiny autoencoder. `log(step, loss)` reports progress.
pub(crate) fn pretrain_vae(
    cfg: &PretrainConfig,
    device: &Device,
    log: &mut dyn FnMut(usize, f64),
) -> std::result::Result<TrainedVae, TrainError> {
    let vars = Arc::new(Mutex::new(vec![]));
    let backend = TrainableInit {
        inner: SeededInit { seed: cfg.seed },
        vars: vars.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let vae = Vae::tiny_from_varbuilder(&Vae::tiny_config(), vb)?;
    let vars: Vec<(String, Var)> = vars
        .lock()
        .map_err(|_| candle_core::Error::msg("weight recorder poisoned"))?
        .clone();
    let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = optim::build(
        &OptimizerConfig::new(OptimizerKind::Adamw),
        vec![ParamGroup {
            name: "vae".into(),
            params: params.clone(),
            lr: cfg.vae_lr,
        }],
    )?;
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        warmup_steps: Some(20),
        ..LrSchedule::default()
    };
    for step in 0..cfg.vae_steps {
        let mut rng = SeededRng::for_name(cfg.seed, &format!("vae/{step}"));
        let x = batch_of_scenes(&mut rng, cfg.vae_batch, cfg.image_size, device)?;
        let z = vae.encode(&x)?;
        let recon = vae.decode(&z)?;
        let rec_loss = (recon - &x)?.sqr()?.mean_all()?;
        let loss = (&rec_loss + (z.sqr()?.mean_all()? * 1e-3)?)?;
        let mut grads: GradStore = loss.backward()?;
        optim::clip_grad_norm(&mut grads, params.iter(), 1.0)?;
        let lr = cfg.vae_lr * schedule.multiplier(step as u64, cfg.vae_steps as u64, cfg.vae_lr);
        opt.set_lr(0, lr)?;
        opt.step(&grads)?;
        log(step + 1, rec_loss.to_scalar::<f32>()? as f64);
    }
    // Calibrate latents to zero mean and unit variance, as Flux's scale/shift do.
    let mut rng = SeededRng::for_name(cfg.seed, "vae/calibration");
    let x = batch_of_scenes(&mut rng, 64, cfg.image_size, device)?;
    let z = vae.encode(&x)?.flatten_all()?.to_dtype(DType::F64)?;
    let mean = z.mean_all()?.to_scalar::<f64>()?;
    let std = (z - mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?
        .sqrt()
        .max(1e-6);
    let weights = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(TrainedVae {
        weights,
        scale: 1.0 / std,
        shift: mean,
    })
}

/// Writes the VAE weights with its scale/shift in the metadata.
fn save_vae(path: &Path, weights: &[(String, Tensor)], scale: f64, shift: f64) -> Result<()> {
    let metadata = std::collections::HashMap::from([
        ("scale_factor".to_string(), scale.to_string()),
        ("shift_factor".to_string(), shift.to_string()),
    ]);
    let bytes =
        safetensors::serialize(weights.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
    atomic_file::write(path, &bytes)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))
}

/// Both stages; writes `vae.safetensors` and `flux.safetensors` into `cfg.out_dir`.
pub fn pretrain(
    cfg: &PretrainConfig,
    log: &mut dyn FnMut(&str),
) -> std::result::Result<(), TrainError> {
    let device = Device::Cpu;
    std::fs::create_dir_all(&cfg.out_dir).map_err(|source| TrainError::Io {
        path: cfg.out_dir.clone(),
        source,
    })?;
    let vae_path = cfg.out_dir.join("vae.safetensors");
    let TrainedVae {
        weights,
        scale,
        shift,
    } = pretrain_vae(cfg, &device, &mut |step, loss| {
        if step % 50 == 0 {
            log(&format!("vae step {step}: reconstruction loss {loss:.5}"));
        }
    })?;
    save_vae(&vae_path, &weights, scale, shift)?;
    log(&format!("vae saved: scale {scale:.4}, shift {shift:.4}"));

    // Stage 2: the DiT, fully fine-tuned by the ordinary trainer on cached latents.
    let data = cfg.out_dir.join(".pretrain-dataset");
    shapes::write_dataset(&data, cfg.dit_images, cfg.image_size, cfg.seed).map_err(|source| {
        TrainError::Io {
            path: data.clone(),
            source,
        }
    })?;
    let text = TextEncoders::tiny(TINY_SEED, &device)?;
    let vae = tiny_vae_from_bytes(
        &std::fs::read(&vae_path).map_err(|source| TrainError::Io {
            path: vae_path.clone(),
            source,
        })?,
        &device,
    )?;
    let flux_cfg = tiny_flux_config(&text, &vae);
    let flux = Flux::new_trainable(&flux_cfg, &WeightSource::Seeded(TINY_SEED), &device)?;
    let bundle = Arc::new(ModelBundle::new(
        "tiny",
        flux,
        text,
        vae,
        ModelBundle::tiny_defaults(),
    ));
    let train = TrainConfig {
        output_dir: cfg.out_dir.join(".pretrain-run"),
        output_name: "flux".into(),
        dataset: DatasetConfig {
            folders: vec![FolderConfig::new(data.clone())],
            resolution: Resolution {
                width: cfg.image_size,
                height: cfg.image_size,
            },
            enable_bucket: false,
            ..DatasetConfig::default()
        },
        optimizer: OptimizerConfig::new(OptimizerKind::Adamw),
        lr_scheduler: LrSchedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: Some(100),
            ..LrSchedule::default()
        },
        learning_rate: cfg.dit_lr,
        max_train_steps: Some(cfg.dit_steps),
        train_batch_size: cfg.dit_batch,
        full_finetune: true,
        save_precision: crate::config::Precision::F32,
        seed: cfg.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(train, bundle, None)?;
    let path = trainer
        .run(&TrainControl::default(), &mut |e| {
            if let TrainEvent::Step(s) = e {
                if s.step % 100 == 0 {
                    log(&format!(
                        "dit step {}/{}: loss {:.4} (avg {:.4}), {:.1} it/s",
                        s.step, s.total_steps, s.loss, s.loss_ema, s.it_per_s
                    ));
                }
            }
        })?
        .ok_or_else(|| candle_core::Error::msg("pretraining was cancelled"))?;
    let flux_path = cfg.out_dir.join("flux.safetensors");
    std::fs::rename(&path, &flux_path).map_err(|source| TrainError::Io {
        path: flux_path.clone(),
        source,
    })?;
    for dir in [&data, &cfg.out_dir.join(".pretrain-run")] {
        let _ = std::fs::remove_dir_all(dir);
    }
    log(&format!("flux saved: {}", flux_path.display()));
    Ok(())
}
