//! A training run: one [`Trainer`] holds a [`TrainConfig`]'s run on a loaded model.
//!
//! It scans the dataset, caches latents (and text embeddings when captions are
//! static), attaches a trainable LoRA to the shared base model, and takes optimizer
//! steps one at a time. The loop that drives it, the same for the CLI and the
//! daemon's engine, is [`super::run`]; a driver interleaves other work between
//! steps through its hooks: previews with the live adapter, pause, cancel.
//! Every random draw is derived from the seed and the run's counters, so a run
//! resumed from a saved state reaches the same weights as one never interrupted.
//!
//! Must not: own the model (it borrows the bundle) or know about HTTP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::cache::{Cache, TextCond};
use super::checkpoint::{self, Progress};
use super::config::{ConfigError, TrainConfig};
use super::dataset::{Augment, Batch, BatchItem, Bucket, Dataset, DatasetError};
use super::events::{peak_memory_bytes, StepStats, TrainEvent};
use super::metadata::{DatasetDir, FluxVariant, KohyaMetadata};
use super::network::{Trainable, TrainableLora};
use super::objective::{noised, velocity_target};
use super::optim::{self, OptimError, Optimizer, ParamGroup};
use super::prompts::PromptSpec;
use super::recompute::{keep_params, loss_and_grads};
use super::run::{TrainHooks, Verdict};
use crate::model::adapter::{AdapterSet, Lora};
use crate::model::bundle::ModelBundle;
use crate::model::flux::{image_ids, pack_latents, save_checkpoint, text_ids, FluxInputs};
use crate::model::lora_io::{self, LoraIoError};
use crate::model::seeded::SeededRng;
use crate::sample::generate::{generate, ResolvedRequest};
use crate::sample::png_meta::{save_png, AppliedLora};

/// Why a run stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Optimizer(#[from] OptimError),
    #[error(transparent)]
    Lora(#[from] LoraIoError),
    #[error("{0}")]
    Model(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn config_error(field: &str, message: impl Into<String>) -> TrainError {
    TrainError::Config(ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    })
}

pub(super) type Result<T> = std::result::Result<T, TrainError>;

/// One micro-batch ready for the model.
struct MicroBatch {
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor,
    guidance: Tensor,
    target: Tensor,
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    bundle: Arc<ModelBundle>,
    dataset: Dataset,
    validation: Option<Dataset>,
    cache: Cache,
    network: Trainable,
    optimizer: Box<dyn Optimizer>,
    progress: Progress,
    total_steps: u64,
    batches: Vec<Batch>,
    batches_per_epoch: usize,
    resumed_from: Option<u64>,
    /// Base learning rate of each optimizer group (DiT, then text encoder).
    base_lrs: Vec<f64>,
    /// The autoencoder's part of every latent cache key (fixed for the run, so keys
    /// can be formed after the autoencoder is released).
    latent_tag: String,
    /// The text encoders' part of every text cache key.
    text_tag: String,
    started: Instant,
    steps_this_session: u64,
    started_at_unix: f64,
    truncation_warned: bool,
}

impl Trainer {
    /// Validates the config, scans the dataset and builds the network and optimizer;
    /// with `resume`, restores a state folder written by an earlier run.
    pub fn new(cfg: TrainConfig, bundle: Arc<ModelBundle>, resume: Option<&Path>) -> Result<Self> {
        cfg.validate()?;
        if cfg.dataset.weighted_captions {
            return Err(config_error(
                "dataset.weighted_captions",
                "weighted captions are not supported by this trainer: T5 and CLIP embeddings would need per-token scaling; remove the weights or set weighted_captions = false (parentheses are then plain text)",
            ));
        }
        if cfg.network.dropout > 0.0 && cfg.gradient_checkpointing {
            return Err(config_error(
                "network.dropout",
                "LoRA dropout cannot be combined with gradient_checkpointing: the recomputed blocks would draw different dropout masks",
            ));
        }
        if cfg.mixed_precision.dtype() != bundle.flux.dtype() {
            return Err(config_error(
                "mixed_precision",
                format!(
                    "the model is loaded in {:?} but the config asks for {:?}",
                    bundle.flux.dtype(),
                    cfg.mixed_precision
                ),
            ));
        }
        if let Some(n) = cfg.t5_max_token_length {
            if bundle.text()?.t5_max_len() != n {
                return Err(config_error(
                    "t5_max_token_length",
                    format!(
                        "the loaded text encoders use {} T5 tokens, not {n}",
                        bundle.text()?.t5_max_len()
                    ),
                ));
            }
        }
        let dataset = Dataset::scan(&cfg.dataset)?;
        if !dataset.latents_are_cacheable() {
            return Err(config_error(
                "dataset.random_crop",
                "random_crop changes the crop every step, which cached latents cannot follow; use center crops",
            ));
        }
        let device = bundle.device().clone();
        let network = if cfg.full_finetune {
            let weights = bundle.flux.trainable_weights()?.ok_or_else(|| {
                config_error(
                    "full_finetune",
                    "the model was not loaded for full fine-tuning (Flux::new_trainable)",
                )
            })?;
            Trainable::Full(weights)
        } else {
            let shapes = bundle.adapter_shapes();
            Trainable::Lora(TrainableLora::new(
                &cfg.network,
                &shapes,
                cfg.seed,
                &device,
            )?)
        };
        // One optimizer group per learning rate: the DiT's and the text encoder's.
        let (dit_params, te_params) = match &network {
            Trainable::Lora(l) => l.param_groups(),
            Trainable::Full(_) => (network.params(), vec![]),
        };
        let te_lr = cfg.text_encoder_lr.unwrap_or(cfg.learning_rate);
        let groups: Vec<ParamGroup> = [
            ("dit", dit_params, cfg.learning_rate),
            ("te", te_params, te_lr),
        ]
        .into_iter()
        .filter(|(_, p, _)| !p.is_empty())
        .map(|(name, params, lr)| ParamGroup {
            name: name.into(),
            params,
            lr,
        })
        .collect();
        let base_lrs: Vec<f64> = groups.iter().map(|g| g.lr).collect();
        let mut optimizer = optim::build(&cfg.optimizer, groups)?;
        let batches_per_epoch = dataset.steps_per_epoch(cfg.train_batch_size);
        let steps_per_epoch = batches_per_epoch.div_ceil(cfg.gradient_accumulation_steps) as u64;
        let total_steps = match (cfg.max_train_steps, cfg.max_train_epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * steps_per_epoch.max(1),
            (None, None) => {
                return Err(config_error(
                    "max_train_steps",
                    "set max_train_steps or max_train_epochs",
                ))
            }
        };
        let mut progress = Progress {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            micro_step: 0,
            loss_ema: 0.0,
            loss_count: 0,
        };
        let mut resumed_from = None;
        if let Some(dir) = resume {
            let saved = checkpoint::load_state(dir, &device)?;
            network.load_state_tensors(saved.weights)?;
            optimizer.load_state(&saved.optimizer)?;
            tracing::info!(step = saved.progress.step, state = %dir.display(), "resuming");
            resumed_from = Some(saved.progress.step);
            progress = saved.progress;
        }
        let batches = dataset.epoch_batches(progress.epoch, cfg.train_batch_size, cfg.seed);
        let cache = Cache::new(cfg.cache_dir.as_deref());
        let vae = bundle.vae()?.config();
        let latent_tag = format!(
            "vae={}:{}:{}:{}",
            bundle.name, vae.z_channels, vae.scale_factor, vae.shift_factor
        );
        let text_tag = format!("{}|t5={}", bundle.name, bundle.text()?.t5_max_len());
        let validation = cfg
            .validation_dataset
            .as_ref()
            .map(Dataset::scan)
            .transpose()?;
        Ok(Self {
            cfg,
            bundle,
            dataset,
            validation,
            cache,
            network,
            optimizer,
            progress,
            total_steps,
            batches,
            batches_per_epoch,
            resumed_from,
            base_lrs,
            latent_tag,
            text_tag,
            started: Instant::now(),
            steps_this_session: 0,
            started_at_unix: crate::clock::unix_now(),
            truncation_warned: false,
        })
    }

    pub(crate) fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn bundle(&self) -> &Arc<ModelBundle> {
        &self.bundle
    }

    pub(crate) fn total_steps(&self) -> u64 {
        self.total_steps
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub(crate) fn is_done(&self) -> bool {
        self.progress.step >= self.total_steps
    }

    /// The adapter being trained, as the sampler applies it (shares storage with the
    /// trainable tensors, so it always shows the latest step); `None` when the whole
    /// model trains (the bundle's own weights are then live).
    pub fn live_lora(&self) -> Option<Arc<Lora>> {
        self.network.live_lora()
    }

    /// The `Started` event of this run.
    pub(crate) fn started_event(&self) -> TrainEvent {
        let trainable_parameters = self.network.params().iter().map(|v| v.elem_count()).sum();
        TrainEvent::Started {
            total_steps: self.total_steps,
            steps_per_epoch: self
                .batches_per_epoch
                .div_ceil(self.cfg.gradient_accumulation_steps) as u64,
            images: self.dataset.images().len(),
            trainable_parameters,
            resumed_from_step: self.resumed_from,
        }
    }

    fn encode_image(&self, image: usize, augment: &Augment) -> Result<Tensor> {
        let (pixels, _, _) = self.dataset.load_pixels(image, augment)?;
        let pixels = pixels
            .unsqueeze(0)?
            .to_device(self.bundle.device())?
            .to_dtype(self.bundle.vae()?.dtype())?;
        Ok(self
            .bundle
            .vae()?
            .encode(&pixels)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?)
    }

    fn encode_text(&mut self, caption: &str) -> Result<TextCond> {
        let emb = self.bundle.text()?.encode(&[caption])?;
        if !self.truncation_warned
            && emb
                .truncated
                .iter()
                .any(|t| t.t5_dropped > 0 || t.clip_dropped > 0)
        {
            self.truncation_warned = true;
            tracing::warn!(caption, "caption longer than the text encoders' context was truncated (reported once per run)");
        }
        Ok(TextCond {
            t5: emb.t5.squeeze(0)?,
            pooled: emb.pooled.squeeze(0)?,
        })
    }

    /// The caption of one use of an image and its (cached when static) conditioning.
    fn text_for(&mut self, item: &BatchItem) -> Result<(String, TextCond)> {
        if !self.dataset.captions_are_static() {
            let caption = self.dataset.caption(item)?.text;
            let cond = self.encode_text(&caption)?;
            return Ok((caption, cond));
        }
        let caption = self.dataset.fixed_caption(item.image)?.text;
        let key = format!("{}|{caption}", self.text_tag);
        let device = self.bundle.device().clone();
        if let Some(c) = self.cache.get_text(&key, &device)? {
            return Ok((caption, c));
        }
        let cond = self.encode_text(&caption)?;
        self.cache.put_text(&key, &cond)?;
        Ok((caption, cond))
    }

    /// The latents of `image` cropped to `bucket` under `augment`: from the cache, or
    /// encoded and cached. The key holds everything that changes them.
    fn latents_for(&mut self, image: usize, bucket: Bucket, augment: &Augment) -> Result<Tensor> {
        let hash = self.dataset.content_hash(image)?;
        let key = format!(
            "{hash}|{}x{}|flip={}|crop={},{}|{}",
            bucket.width,
            bucket.height,
            augment.flip,
            augment.crop_left_top.0,
            augment.crop_left_top.1,
            self.latent_tag
        );
        let device = self.bundle.device().clone();
        if let Some(t) = self.cache.get_latents(&key, &device)? {
            return Ok(t);
        }
        let t = self.encode_image(image, augment)?;
        self.cache.put_latents(&key, &t)?;
        Ok(t)
    }

    /// Encodes every latent (both flips when `flip_aug`) and every static caption once,
    /// before the first step, reporting [`TrainEvent::Caching`] progress. After each
    /// image the hooks are asked whether to go on; anything but `Continue` stops
    /// caching and is returned (with a `cache_dir`, a later run finds the work done
    /// so far).
    pub(super) fn prepare_caches(&mut self, hooks: &mut dyn TrainHooks) -> Result<Verdict> {
        let n = self.dataset.images().len();
        let report_every = (n / 100).max(1);
        let flips: &[bool] = if self.cfg.dataset.flip_aug {
            &[false, true]
        } else {
            &[false]
        };
        for image in 0..n {
            let plain = self.dataset.plain_augment(image)?;
            let bucket = self.dataset.images()[image].placement.bucket;
            for &flip in flips {
                self.latents_for(image, bucket, &Augment { flip, ..plain })?;
            }
            if self.dataset.captions_are_static() {
                self.text_for(&BatchItem { image, seed: 0 })?;
            }
            let done = image + 1;
            if done % report_every == 0 || done == n {
                hooks.emit(TrainEvent::Caching { done, total: n });
            }
            match hooks.while_caching(self) {
                Verdict::Continue => {}
                verdict => return Ok(verdict),
            }
        }
        tracing::info!(
            cached = self.cache.hits,
            encoded = self.cache.misses,
            "caches ready"
        );
        Ok(Verdict::Continue)
    }

    /// After caching, frees the text encoders and the autoencoder when no step needs
    /// them (static captions, no text-encoder LoRA, no previews, no validation) and
    /// nobody else holds the model (the CLI; a daemon keeps them for its sampler).
    pub(super) fn release_encoders_if_unused(&mut self) {
        let needed = !self.dataset.captions_are_static()
            || self.network.trains_text_encoder()
            || self.validation.is_some()
            || (self.cfg.sample_every_n_steps.is_some() && !self.cfg.sample_prompts.is_empty());
        if needed {
            return;
        }
        if let Some(bundle) = Arc::get_mut(&mut self.bundle) {
            bundle.release_encoders();
            tracing::info!(
                "text encoders and autoencoder released: every latent and caption is cached"
            );
        }
    }

    /// The next micro-batch of the epoch (rolling over to the next epoch).
    fn next_micro_batch(&mut self) -> Result<MicroBatch> {
        if self.progress.batch_in_epoch >= self.batches.len() {
            self.progress.epoch += 1;
            self.progress.batch_in_epoch = 0;
            self.batches = self.dataset.epoch_batches(
                self.progress.epoch,
                self.cfg.train_batch_size,
                self.cfg.seed,
            );
        }
        let batch = self.batches[self.progress.batch_in_epoch].clone();
        self.progress.batch_in_epoch += 1;
        self.progress.micro_step += 1;

        let mut latents = vec![];
        let mut t5 = vec![];
        let mut pooled = vec![];
        let mut captions = vec![];
        for item in &batch.items {
            let augment = self.dataset.augment(item)?;
            latents.push(self.latents_for(item.image, batch.bucket, &augment)?);
            let (caption, cond) = self.text_for(item)?;
            t5.push(cond.t5);
            pooled.push(cond.pooled);
            captions.push(caption);
        }
        // A trained text encoder changes the pooled vector every step: recompute it
        // through the adapters (T5 is not trained, so its cached output stands).
        let y = if self.network.trains_text_encoder() {
            let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
            self.bundle
                .text()?
                .pooled_with(&captions, &self.network.adapters(self.cfg.network.dropout))?
        } else {
            Tensor::stack(&pooled, 0)?
        };
        let device = self.bundle.device().clone();
        let x0 = Tensor::stack(&latents, 0)?; // (b, c, h, w)
        let (b, c, lh, lw) = x0.dims4()?;
        let mut rng = SeededRng::for_name(
            self.cfg.seed,
            &format!("train/micro/{}", self.progress.micro_step),
        );
        let obj = &self.cfg.objective;
        let t = obj.sample_timesteps(&mut rng, b, lh, lw);
        let noise = obj.sample_noise(&mut rng, (b, c, lh, lw), &device)?;
        let x_t = noised(&x0, &noise, &t)?;
        let target = velocity_target(&x0, &noise)?;
        let txt = Tensor::stack(&t5, 0)?;
        let n_txt = txt.dim(1)?;
        let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        Ok(MicroBatch {
            img: pack_latents(&x_t)?,
            img_ids: image_ids(b, lh / 2, lw / 2, &device)?,
            txt,
            txt_ids: text_ids(b, n_txt, &device)?,
            timesteps: Tensor::from_vec(t32, b, &device)?,
            y,
            guidance: Tensor::full(obj.guidance_scale as f32, b, &device)?,
            target: pack_latents(&target)?,
        })
    }

    /// One optimizer step (with gradient accumulation); emits `Step` and any
    /// `Saved` / `Sample` events that fall due.
    pub(super) fn step(&mut self, emit: &mut dyn FnMut(TrainEvent)) -> Result<StepStats> {
        let factor = self.cfg.lr_scheduler.multiplier(
            self.progress.step,
            self.total_steps,
            self.cfg.learning_rate,
        );
        for (group, base) in self.base_lrs.iter().enumerate() {
            self.optimizer.set_lr(group, base * factor)?;
        }
        let lr = self.base_lrs[0] * factor;
        let accum = self.cfg.gradient_accumulation_steps;
        let params = self.network.params();
        let adapters = self.network.adapters(self.cfg.network.dropout);
        let mut grads = GradStore::default();
        let mut loss_sum = 0.0f64;
        let epoch_before = self.progress.epoch;
        for _ in 0..accum {
            let mb = self.next_micro_batch()?;
            let inputs = FluxInputs {
                img: &mb.img,
                img_ids: &mb.img_ids,
                txt: &mb.txt,
                txt_ids: &mb.txt_ids,
                timesteps: &mb.timesteps,
                y: &mb.y,
                guidance: Some(&mb.guidance),
            };
            let (loss, g) = loss_and_grads(
                &self.bundle.flux,
                &inputs,
                &adapters,
                &mb.target,
                1.0 / accum as f64,
                self.cfg.gradient_checkpointing,
                &params,
            )?;
            if !loss.is_finite() {
                return Err(TrainError::Model(candle_core::Error::msg(format!(
                    "loss became {loss} at step {}: lower the learning rate or enable max_grad_norm",
                    self.progress.step + 1
                ))));
            }
            loss_sum += loss as f64;
            keep_params(&mut grads, &g, &params)?;
        }
        let grad_norm = if self.cfg.max_grad_norm > 0.0 {
            Some(optim::clip_grad_norm(
                &mut grads,
                params.iter(),
                self.cfg.max_grad_norm,
            )?)
        } else {
            None
        };
        if grad_norm.is_some_and(|n| !n.is_finite()) {
            return Err(TrainError::Model(candle_core::Error::msg(format!(
                "gradient norm became non-finite at step {}: lower the learning rate",
                self.progress.step + 1
            ))));
        }
        self.optimizer.step(&grads)?;
        self.progress.step += 1;
        self.steps_this_session += 1;

        let loss = loss_sum / accum as f64;
        self.progress.loss_count += 1;
        self.progress.loss_ema = 0.9 * self.progress.loss_ema + 0.1 * loss;
        let loss_ema = self.progress.loss_ema
            / (1.0 - 0.9f64.powi(self.progress.loss_count.min(10_000) as i32));
        let elapsed = self.started.elapsed().as_secs_f64();
        let it_per_s = self.steps_this_session as f64 / elapsed.max(1e-9);
        let remaining = self.total_steps.saturating_sub(self.progress.step) as f64;
        let stats = StepStats {
            step: self.progress.step,
            total_steps: self.total_steps,
            epoch: self.progress.epoch,
            loss,
            loss_ema,
            lr: self.optimizer.effective_lr(0).unwrap_or(lr),
            grad_norm,
            it_per_s,
            eta_s: remaining / it_per_s.max(1e-9),
            peak_memory_bytes: peak_memory_bytes(),
        };
        emit(TrainEvent::Step(stats.clone()));

        let step = self.progress.step;
        let last = step >= self.total_steps;
        // Previews before saves, as kohya does.
        if self
            .cfg
            .sample_every_n_steps
            .is_some_and(|n| step.is_multiple_of(n))
        {
            let paths = self.sample_previews(step)?;
            if !paths.is_empty() {
                emit(TrainEvent::Sample { step, paths });
            }
        }
        if !last
            && self
                .cfg
                .save_every_n_steps
                .is_some_and(|n| step.is_multiple_of(n))
        {
            self.save_step(emit)?;
        }
        let epoch_done = self.progress.batch_in_epoch >= self.batches.len()
            || self.progress.epoch > epoch_before;
        if !last && epoch_done {
            let finished_epochs =
                self.progress.epoch + u64::from(self.progress.batch_in_epoch >= self.batches.len());
            if self
                .cfg
                .save_every_n_epochs
                .is_some_and(|n| finished_epochs.is_multiple_of(n))
            {
                let path = checkpoint::epoch_lora_path(
                    &self.cfg.output_dir,
                    &self.cfg.output_name,
                    finished_epochs,
                );
                self.save_lora(&path, false)?;
                emit(TrainEvent::Saved { step, path });
            }
        }
        if self
            .cfg
            .validate_every_n_steps
            .is_some_and(|n| step.is_multiple_of(n))
            || (last && self.validation.is_some())
        {
            if let Some(loss) = self.validation_loss()? {
                emit(TrainEvent::Validation { step, loss });
            }
        }
        Ok(stats)
    }

    /// Saves the LoRA and the full state of the current step, then prunes old saves.
    pub(super) fn save_step(&mut self, emit: &mut dyn FnMut(TrainEvent)) -> Result<PathBuf> {
        let step = self.progress.step;
        let dir = &self.cfg.output_dir;
        let path = checkpoint::step_lora_path(dir, &self.cfg.output_name, step);
        self.save_lora(&path, false)?;
        let state = self.optimizer.state()?;
        let weights = self.network.state_tensors()?;
        checkpoint::save_state(dir, &self.cfg.output_name, &self.progress, &weights, &state)?;
        if let Some(keep) = self.cfg.save_last_n {
            checkpoint::prune_step_saves(dir, &self.cfg.output_name, keep)?;
        }
        emit(TrainEvent::Saved {
            step,
            path: path.clone(),
        });
        Ok(path)
    }

    /// kohya-compatible metadata for the LoRA as it is now.
    fn metadata(&self, finished: bool) -> BTreeMap<String, String> {
        let cfg = &self.cfg;
        let variant = if self.bundle.flux.config().guidance_embed {
            FluxVariant::Dev
        } else {
            FluxVariant::Schnell
        };
        let mut m = KohyaMetadata::new(
            &cfg.output_name,
            variant,
            cfg.network.rank,
            cfg.network.alpha as f64,
        );
        m.network_dropout = (cfg.network.dropout > 0.0).then_some(cfg.network.dropout);
        m.learning_rate = cfg.learning_rate;
        m.unet_lr = Some(cfg.learning_rate);
        if cfg.network.train_text_encoder {
            m.text_encoder_lr = Some(cfg.text_encoder_lr.unwrap_or(cfg.learning_rate));
        }
        m.optimizer = format!("{:?}", cfg.optimizer.kind);
        m.lr_scheduler = format!("{:?}", cfg.lr_scheduler.kind).to_lowercase();
        m.lr_warmup_steps = cfg.lr_scheduler.warmup_steps(self.total_steps) as usize;
        m.max_train_steps = self.total_steps as usize;
        m.num_epochs = cfg.max_train_epochs.unwrap_or(0) as usize;
        m.num_train_images = self.dataset.len();
        m.num_batches_per_epoch = self.batches_per_epoch;
        m.batch_size = cfg.train_batch_size;
        m.gradient_accumulation_steps = cfg.gradient_accumulation_steps;
        m.gradient_checkpointing = cfg.gradient_checkpointing;
        m.max_grad_norm = cfg.max_grad_norm;
        m.mixed_precision = match cfg.mixed_precision {
            crate::config::Precision::F32 => "no",
            crate::config::Precision::Bf16 => "bf16",
            crate::config::Precision::F16 => "fp16",
        }
        .into();
        m.seed = Some(cfg.seed);
        m.resolution = (
            cfg.dataset.resolution.width as usize,
            cfg.dataset.resolution.height as usize,
        );
        m.cache_latents = true;
        m.caption_dropout_rate = cfg.dataset.caption_dropout_rate;
        m.shuffle_caption = cfg.dataset.shuffle_caption;
        m.keep_tokens = cfg.dataset.keep_tokens;
        m.flip_aug = cfg.dataset.flip_aug;
        m.enable_bucket = cfg.dataset.enable_bucket;
        m.min_bucket_reso = cfg.dataset.min_bucket_reso as usize;
        m.max_bucket_reso = cfg.dataset.max_bucket_reso as usize;
        m.bucket_no_upscale = cfg.dataset.bucket_no_upscale;
        m.noise_offset = (cfg.objective.noise_offset > 0.0).then_some(cfg.objective.noise_offset);
        m.guidance_scale = cfg.objective.guidance_scale;
        m.timestep_sampling = format!("{:?}", cfg.objective.timestep_sampling).to_lowercase();
        m.sigmoid_scale = cfg.objective.sigmoid_scale;
        m.discrete_flow_shift = cfg.objective.discrete_flow_shift;
        m.sd_model_name = Some(self.bundle.name.clone());
        m.training_started_at = self.started_at_unix;
        m.training_finished_at = finished.then(crate::clock::unix_now);
        m.steps = Some(self.progress.step as usize);
        m.epoch = Some(self.progress.epoch as usize);
        m.tag_frequency = self
            .dataset
            .tag_frequency()
            .iter()
            .map(|(dir, tags)| {
                (
                    dir.clone(),
                    tags.iter().map(|(t, c)| (t.clone(), *c as usize)).collect(),
                )
            })
            .collect();
        m.bucket_info = self
            .dataset
            .bucket_info()
            .and_then(|b| serde_json::to_value(b).ok());
        m.dataset_dirs = self
            .dataset
            .dataset_dirs()
            .iter()
            .map(|(dir, info)| {
                (
                    dir.clone(),
                    DatasetDir {
                        n_repeats: info.n_repeats as usize,
                        img_count: info.img_count,
                    },
                )
            })
            .collect();
        m.trigger_phrase = cfg.dataset.trigger_word.clone();
        if let Ok(json) = serde_json::to_string(cfg) {
            m.extra.insert("fluxlora.train_config".into(), json);
        }
        m.to_map()
    }

    fn save_lora(&self, path: &Path, finished: bool) -> Result<()> {
        match &self.network {
            Trainable::Lora(l) => {
                let lora = l.snapshot(&self.cfg.output_name)?;
                let metadata = self.metadata(finished);
                lora_io::save_kohya(path, &lora, &metadata, self.cfg.save_precision.dtype())?;
            }
            Trainable::Full(_) => {
                let weights = self.bundle.flux.merged_weights(&AdapterSet::none())?;
                let dtype = self.cfg.save_precision.dtype();
                save_checkpoint(path, self.bundle.flux.config(), &weights, dtype)?;
            }
        }
        Ok(())
    }

    /// Preview images for every sample prompt with the adapter as it is now.
    pub(crate) fn sample_previews(&self, step: u64) -> Result<Vec<PathBuf>> {
        let adapters = self.network.adapters(0.0);
        let dir = self.cfg.output_dir.join("sample");
        let mut paths = vec![];
        for (i, line) in self.cfg.sample_prompts.iter().enumerate() {
            let spec = PromptSpec::parse(line)
                .map_err(|m| config_error(&format!("sample_prompts[{i}]"), m))?;
            let req = ResolvedRequest::new(&spec.request(self.cfg.seed), &self.bundle)
                .map_err(|e| config_error("sample_prompts", e.to_string()))?;
            let images = generate(&self.bundle, &req, &adapters, &mut |_, _| Ok(()))?;
            let names = [AppliedLora {
                name: self.cfg.output_name.clone(),
                strength: 1.0,
                hash: None,
            }];
            for image in &images {
                let path = dir.join(format!(
                    "{}_{step:06}_{i:02}_{}.png",
                    self.cfg.output_name, req.seed
                ));
                save_png(&path, image, &req.params(0, &self.bundle.name, &names)).map_err(
                    |source| TrainError::Io {
                        path: path.clone(),
                        source,
                    },
                )?;
                paths.push(path);
            }
        }
        Ok(paths)
    }

    /// Mean loss over the validation images at fixed timesteps (0.1 … 0.9) and fixed
    /// noise, with the adapter as it is now: comparable across steps and runs.
    /// `None` without a validation dataset.
    pub fn validation_loss(&mut self) -> Result<Option<f64>> {
        let Some(val) = self.validation.take() else {
            return Ok(None);
        };
        let result = self.loss_on(&val);
        self.validation = Some(val);
        result.map(Some)
    }

    fn loss_on(&mut self, val: &Dataset) -> Result<f64> {
        const TIMESTEPS: [f64; 5] = [0.1, 0.3, 0.5, 0.7, 0.9];
        let adapters = self.network.adapters(0.0);
        let device = self.bundle.device().clone();
        let (mut total, mut count) = (0.0, 0usize);
        for image in 0..val.images().len() {
            let augment = val.plain_augment(image)?;
            let (pixels, _, _) = val.load_pixels(image, &augment)?;
            let pixels = pixels
                .unsqueeze(0)?
                .to_device(&device)?
                .to_dtype(self.bundle.vae()?.dtype())?;
            let x0 = self
                .bundle
                .vae()?
                .encode(&pixels)?
                .to_dtype(candle_core::DType::F32)?;
            let caption = val.fixed_caption(image)?.text;
            let emb = self
                .bundle
                .text()?
                .encode_with(&[caption.as_str()], &adapters)?;
            let cond = TextCond {
                t5: emb.t5.squeeze(0)?,
                pooled: emb.pooled.squeeze(0)?,
            };
            let (_, c, lh, lw) = x0.dims4()?;
            let mut rng = SeededRng::for_name(self.cfg.seed, &format!("validation/{image}"));
            let noise = rng.randn((1, c, lh, lw), &device)?;
            let target = pack_latents(&velocity_target(&x0, &noise)?)?;
            let (txt, y) = (cond.t5.unsqueeze(0)?, cond.pooled.unsqueeze(0)?);
            let (img_ids, txt_ids) = (
                image_ids(1, lh / 2, lw / 2, &device)?,
                text_ids(1, txt.dim(1)?, &device)?,
            );
            let guidance = Tensor::full(self.cfg.objective.guidance_scale as f32, 1, &device)?;
            for t in TIMESTEPS {
                let img = pack_latents(&noised(&x0, &noise, &[t])?)?;
                let timesteps = Tensor::full(t as f32, 1, &device)?;
                let inputs = FluxInputs {
                    img: &img,
                    img_ids: &img_ids,
                    txt: &txt,
                    txt_ids: &txt_ids,
                    timesteps: &timesteps,
                    y: &y,
                    guidance: Some(&guidance),
                };
                let pred = self.bundle.flux.forward(&inputs, &adapters)?.detach();
                total += super::objective::mse(&pred, &target)?.to_scalar::<f32>()? as f64;
                count += 1;
            }
        }
        Ok(total / count.max(1) as f64)
    }

    /// Writes the final LoRA `<output_name>.safetensors`.
    pub(crate) fn finish(&self) -> Result<PathBuf> {
        let path = self
            .cfg
            .output_dir
            .join(format!("{}.safetensors", self.cfg.output_name));
        self.save_lora(&path, true)?;
        Ok(path)
    }

    /// Time since the run was set up.
    pub(super) fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}
