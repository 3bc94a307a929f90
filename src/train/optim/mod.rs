//! Optimizers for LoRA training: AdamW, Lion, SGD with Nesterov momentum (each
//! also with 8-bit block-wise state), Adafactor and Prodigy, plus gradient-norm
//! clipping.
//!
//! Owns: [`OptimizerConfig`] (what a user writes), [`ParamGroup`], the
//! object-safe [`Optimizer`] trait, [`build`], resumable [`OptimizerState`] and
//! [`clip_grad_norm`]. Every optimizer keeps its state (f32, or 8-bit for the
//! 8-bit kinds) on the parameters' device, updates its `Var`s in place, skips
//! parameters without a gradient, and continues bit-identically after
//! `state()` → `load_state()`.
//!
//! Layout: `Groups` (at the end of this file) holds the parameter groups, the
//! per-parameter state and step counts, the step loop and the state keys
//! that every optimizer shares. `elementwise` runs the rules whose state is
//! shaped like the parameter, in f32 or 8 bits: AdamW, Lion and SGD, each a
//! file with its hyper-parameters, update rule and state names. Adafactor
//! (per-group step sizes, factored state) and Prodigy (an optimizer-wide D
//! estimate over all parameters before the update) implement [`Optimizer`]
//! themselves on `Groups`.
//!
//! Must not: compute gradients, accumulate micro-batches, schedule learning
//! rates (the trainer calls [`Optimizer::set_lr`] each step), or read and
//! write files (the trainer stores [`OptimizerState`]).
//!
//! The rules follow PyTorch (`AdamW`, `SGD(nesterov=True)`), lucidrains'
//! `lion-pytorch`, HF transformers' `Adafactor`, `prodigyopt` and
//! bitsandbytes' 8-bit optimizers; see each file for the details and the
//! deliberate differences.

mod adafactor;
mod adamw;
mod elementwise;
mod lion;
mod prodigy;
mod quant8;
mod sgd;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Tensor, Var};
use serde::{Deserialize, Serialize};

use adafactor::Adafactor;
use adamw::AdamW;
use elementwise::ElementwiseOptimizer;
use lion::Lion;
use prodigy::Prodigy;
use sgd::SgdNesterov;

/// Errors of building, stepping and restoring optimizers.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("invalid optimizer setting `{field}`: {message}")]
    InvalidConfig {
        field: &'static str,
        message: String,
    },
    #[error("invalid parameter groups: {0}")]
    InvalidGroups(String),
    #[error("optimizer state does not fit this optimizer: {0}")]
    State(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub(crate) type Result<T> = std::result::Result<T, OptimError>;

/// The optimizer algorithms. Serde names are snake_case; kohya's
/// `--optimizer_type` spellings are accepted as aliases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    #[serde(alias = "AdamW", alias = "adam_w")]
    Adamw,
    #[serde(alias = "AdamW8bit", alias = "adamw_8bit", alias = "adam_w8bit")]
    Adamw8bit,
    #[serde(alias = "Lion")]
    Lion,
    #[serde(alias = "Lion8bit", alias = "lion_8bit")]
    Lion8bit,
    #[serde(alias = "SGDNesterov", alias = "sgdnesterov")]
    SgdNesterov,
    #[serde(
        alias = "SGDNesterov8bit",
        alias = "sgdnesterov8bit",
        alias = "sgd_nesterov_8bit"
    )]
    SgdNesterov8bit,
    #[serde(alias = "Adafactor", alias = "AdaFactor")]
    Adafactor,
    #[serde(alias = "Prodigy")]
    Prodigy,
}

impl OptimizerKind {
    /// The canonical (serde) name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Adamw => "adamw",
            Self::Adamw8bit => "adamw8bit",
            Self::Lion => "lion",
            Self::Lion8bit => "lion8bit",
            Self::SgdNesterov => "sgd_nesterov",
            Self::SgdNesterov8bit => "sgd_nesterov8bit",
            Self::Adafactor => "adafactor",
            Self::Prodigy => "prodigy",
        }
    }

    pub(crate) fn is_8bit(self) -> bool {
        matches!(
            self,
            Self::Adamw8bit | Self::Lion8bit | Self::SgdNesterov8bit
        )
    }
}

/// What the user configures. Every field but `kind` is optional; an unset
/// field takes the default of the reference implementation for that kind
/// (see the `resolved_*` methods), and a field that does not apply to the
/// kind is rejected by [`OptimizerConfig::validate`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Decoupled (AdamW, Lion, Adafactor, Prodigy) or L2 (SGD) weight decay.
    /// Default 0.01 for AdamW/AdamW8bit (PyTorch, bitsandbytes), else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// (β1, β2). Default (0.9, 0.999) for AdamW and Prodigy, (0.9, 0.99) for Lion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub betas: Option<[f64; 2]>,
    /// AdamW/Prodigy: added to the denominator (default 1e-8). Adafactor: the
    /// regulariser added to squared gradients, HF's `eps[0]` (default 1e-30).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// SGD momentum; default 0.9 (kohya sets it for SGDNesterov).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,

    /// Adafactor: ignore the group lr and use min(1e-2, 1/√t) (default true, as HF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_step: Option<bool>,
    /// Adafactor: multiply the step by max(eps_scale, RMS(param)) (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_parameter: Option<bool>,
    /// Adafactor: relative step min(1e-6·t, 1/√t); needs relative_step (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_init: Option<bool>,
    /// Adafactor: the RMS of an update is clipped to this (default 1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_threshold: Option<f64>,
    /// Adafactor: β2 at step t is 1 − t^decay_rate (default −0.8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_rate: Option<f64>,
    /// Adafactor: first-moment coefficient; unset means no first moment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// Adafactor: lower bound of the parameter scale, HF's `eps[1]` (default 1e-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps_scale: Option<f64>,

    /// Prodigy: initial D estimate (default 1e-6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d0: Option<f64>,
    /// Prodigy: multiplier of the D estimate (default 1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d_coef: Option<f64>,
    /// Prodigy: D grows at most by this factor per step (default unbounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_rate: Option<f64>,
    /// Prodigy: Adam bias correction in the step size (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_bias_correction: Option<bool>,
    /// Prodigy: leave the lr out of the D denominator during warmup (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safeguard_warmup: Option<bool>,
    /// Prodigy: AdamW-style decoupled weight decay (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decouple: Option<bool>,
    /// Prodigy: EMA coefficient of the D statistics (default √β2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta3: Option<f64>,

    /// 8-bit kinds: elements per quantisation block (default 256, the block
    /// size of bitsandbytes' block-wise 8-bit optimizers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// 8-bit kinds: parameters with fewer elements keep f32 state (default
    /// 4096, as bitsandbytes' `min_8bit_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_8bit_size: Option<usize>,
}

use OptimizerKind as K;

impl OptimizerConfig {
    /// A config of `kind` with every setting at its default.
    pub fn new(kind: OptimizerKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    pub(crate) fn resolved_weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            K::Adamw | K::Adamw8bit => 0.01,
            _ => 0.0,
        })
    }

    pub(crate) fn resolved_betas(&self) -> (f64, f64) {
        let [b1, b2] = self.betas.unwrap_or(match self.kind {
            K::Lion | K::Lion8bit => [0.9, 0.99],
            _ => [0.9, 0.999],
        });
        (b1, b2)
    }

    pub(crate) fn resolved_eps(&self) -> f64 {
        self.eps.unwrap_or(match self.kind {
            K::Adafactor => 1e-30,
            _ => 1e-8,
        })
    }

    pub(crate) fn resolved_momentum(&self) -> f64 {
        self.momentum.unwrap_or(0.9)
    }

    pub(crate) fn resolved_block_size(&self) -> usize {
        self.block_size.unwrap_or(256)
    }

    pub(crate) fn resolved_min_8bit_size(&self) -> usize {
        self.min_8bit_size.unwrap_or(4096)
    }

    /// Checks ranges and that every set field applies to `kind`; the error
    /// names the first offending field.
    pub fn validate(&self) -> Result<()> {
        let k = self.kind;
        let adam_like = matches!(k, K::Adamw | K::Adamw8bit | K::Prodigy);
        let lion = matches!(k, K::Lion | K::Lion8bit);
        let sgd = matches!(k, K::SgdNesterov | K::SgdNesterov8bit);
        let ada = k == K::Adafactor;
        let prodigy = k == K::Prodigy;
        let applies: &[(&'static str, bool, bool)] = &[
            ("betas", self.betas.is_some(), adam_like || lion),
            ("eps", self.eps.is_some(), adam_like || ada),
            ("momentum", self.momentum.is_some(), sgd),
            ("relative_step", self.relative_step.is_some(), ada),
            ("scale_parameter", self.scale_parameter.is_some(), ada),
            ("warmup_init", self.warmup_init.is_some(), ada),
            ("clip_threshold", self.clip_threshold.is_some(), ada),
            ("decay_rate", self.decay_rate.is_some(), ada),
            ("beta1", self.beta1.is_some(), ada),
            ("eps_scale", self.eps_scale.is_some(), ada),
            ("d0", self.d0.is_some(), prodigy),
            ("d_coef", self.d_coef.is_some(), prodigy),
            ("growth_rate", self.growth_rate.is_some(), prodigy),
            (
                "use_bias_correction",
                self.use_bias_correction.is_some(),
                prodigy,
            ),
            ("safeguard_warmup", self.safeguard_warmup.is_some(), prodigy),
            ("decouple", self.decouple.is_some(), prodigy),
            ("beta3", self.beta3.is_some(), prodigy),
            ("block_size", self.block_size.is_some(), k.is_8bit()),
            ("min_8bit_size", self.min_8bit_size.is_some(), k.is_8bit()),
        ];
        for &(field, set, ok) in applies {
            if set && !ok {
                return Err(bad(field, format!("does not apply to {}", k.name())));
            }
        }
        let wd = self.resolved_weight_decay();
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(bad(
                "weight_decay",
                format!("must be finite and >= 0, got {wd}"),
            ));
        }
        let (b1, b2) = self.resolved_betas();
        for b in [b1, b2] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad("betas", format!("each must be in [0, 1), got {b}")));
            }
        }
        let eps = self.resolved_eps();
        if !(eps.is_finite() && eps > 0.0) {
            return Err(bad("eps", format!("must be finite and > 0, got {eps}")));
        }
        let mu = self.resolved_momentum();
        if !(mu > 0.0 && mu < 1.0) {
            // PyTorch: Nesterov momentum requires a momentum > 0.
            return Err(bad("momentum", format!("must be in (0, 1), got {mu}")));
        }
        if ada {
            let relative = self.relative_step.unwrap_or(true);
            if self.warmup_init.unwrap_or(false) && !relative {
                return Err(bad("warmup_init", "requires relative_step = true".into()));
            }
            let c = self.clip_threshold.unwrap_or(1.0);
            if !(c.is_finite() && c > 0.0) {
                return Err(bad("clip_threshold", format!("must be > 0, got {c}")));
            }
            let dr = self.decay_rate.unwrap_or(-0.8);
            if !(dr.is_finite() && dr <= 0.0) {
                return Err(bad("decay_rate", format!("must be <= 0, got {dr}")));
            }
            if let Some(b) = self.beta1 {
                if !(0.0..1.0).contains(&b) {
                    return Err(bad("beta1", format!("must be in [0, 1), got {b}")));
                }
            }
            let es = self.eps_scale.unwrap_or(1e-3);
            if !(es.is_finite() && es >= 0.0) {
                return Err(bad("eps_scale", format!("must be >= 0, got {es}")));
            }
        }
        if prodigy {
            let d0 = self.d0.unwrap_or(1e-6);
            if !(d0.is_finite() && d0 > 0.0) {
                return Err(bad("d0", format!("must be > 0, got {d0}")));
            }
            let dc = self.d_coef.unwrap_or(1.0);
            if !(dc.is_finite() && dc > 0.0) {
                return Err(bad("d_coef", format!("must be > 0, got {dc}")));
            }
            if let Some(g) = self.growth_rate {
                if g.is_nan() || g < 1.0 {
                    return Err(bad("growth_rate", format!("must be >= 1, got {g}")));
                }
            }
            if let Some(b) = self.beta3 {
                if !(0.0..1.0).contains(&b) {
                    return Err(bad("beta3", format!("must be in [0, 1), got {b}")));
                }
            }
        }
        if k.is_8bit() {
            let bs = self.resolved_block_size();
            if !(16..=65536).contains(&bs) {
                return Err(bad(
                    "block_size",
                    format!("must be in 16..=65536, got {bs}"),
                ));
            }
        }
        Ok(())
    }
}

fn bad(field: &'static str, message: String) -> OptimError {
    OptimError::InvalidConfig { field, message }
}

/// Trainable tensors that share a learning rate (e.g. the DiT adapter, the
/// text-encoder adapter). `name` keys the group's entries in the saved state:
/// it must be non-empty and use only ASCII letters, digits, `_` and `-`.
#[derive(Clone, Debug)]
pub(crate) struct ParamGroup {
    pub name: String,
    pub params: Vec<Var>,
    pub lr: f64,
}

/// An optimizer over one or more parameter groups. Object safe; `Send` so a
/// training job can own it on its own thread.
pub(crate) trait Optimizer: Send {
    fn kind(&self) -> OptimizerKind;

    /// Updates every parameter that has a gradient in `grads`; the others
    /// (and their state) are left alone.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// Sets the learning rate of group `group` (index in build order).
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()>;

    /// The learning rate last set for `group`.
    fn lr(&self, group: usize) -> Option<f64>;

    /// The step size actually applied, for logging: Prodigy's d·lr,
    /// Adafactor's relative step of the group's first parameter; the plain
    /// lr for the others.
    fn effective_lr(&self, group: usize) -> Option<f64> {
        self.lr(group)
    }

    /// Everything needed to continue bit-identically in a fresh optimizer
    /// built with the same config and groups.
    fn state(&self) -> Result<OptimizerState>;

    /// Restores a state written by [`Optimizer::state`]; on error nothing
    /// changes.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// Saved optimizer state. Tensor keys are `<group>.<index>.<field>` (8-bit
/// states: `<field>.codes` (u8) and `<field>.absmax` (f32)); scalar keys are
/// `<group>.<index>.step` per parameter that has state, plus optimizer-wide
/// values (Prodigy: `d`, `d_max`, `d_numerator`, `k`).
#[derive(Clone, Debug, Default)]
pub(crate) struct OptimizerState {
    /// [`OptimizerKind::name`] of the optimizer that wrote it.
    pub kind: String,
    pub step: u64,
    pub tensors: BTreeMap<String, Tensor>,
    pub scalars: BTreeMap<String, f64>,
}

const SCALAR_PREFIX: &str = "@scalar/";
const STEP_KEY: &str = "@step";

impl OptimizerState {
    /// The whole state as named tensors for one safetensors file, scalars and
    /// the step included as (1,) f64 tensors: exact, unlike f64 through JSON
    /// (serde_json's default float parsing may be off by one ulp). The kind
    /// has to be stored beside it (e.g. in the checkpoint's JSON).
    pub(crate) fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        for (k, v) in &self.scalars {
            out.insert(
                format!("{SCALAR_PREFIX}{k}"),
                Tensor::from_slice(&[*v], 1, &Device::Cpu)?,
            );
        }
        out.insert(
            STEP_KEY.to_string(),
            Tensor::from_slice(&[self.step as f64], 1, &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Inverse of [`OptimizerState::to_tensors`].
    pub(crate) fn from_tensors(kind: &str, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut st = OptimizerState {
            kind: kind.to_string(),
            ..Default::default()
        };
        let scalar = |t: &Tensor| -> Result<f64> {
            t.to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?
                .first()
                .copied()
                .ok_or_else(|| OptimError::State("empty scalar tensor".into()))
        };
        for (k, t) in tensors {
            if k == STEP_KEY {
                st.step = scalar(&t)? as u64;
            } else if let Some(name) = k.strip_prefix(SCALAR_PREFIX) {
                st.scalars.insert(name.to_string(), scalar(&t)?);
            } else {
                st.tensors.insert(k, t);
            }
        }
        Ok(st)
    }
}

/// Builds the optimizer `cfg` names over `groups`.
pub(crate) fn build(cfg: &OptimizerConfig, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
    cfg.validate()?;
    check_groups(&groups)?;
    let device = groups
        .iter()
        .flat_map(|g| g.params.iter())
        .map(|v| v.device().clone())
        .next()
        .unwrap_or(Device::Cpu);
    let quant = if cfg.kind.is_8bit() {
        Some(quant8::Quant8::new(
            cfg.resolved_block_size(),
            cfg.resolved_min_8bit_size(),
            &device,
        )?)
    } else {
        None
    };
    Ok(match cfg.kind {
        K::Adamw | K::Adamw8bit => {
            Box::new(ElementwiseOptimizer::new(AdamW::new(cfg), groups, quant))
        }
        K::Lion | K::Lion8bit => Box::new(ElementwiseOptimizer::new(Lion::new(cfg), groups, quant)),
        K::SgdNesterov | K::SgdNesterov8bit => Box::new(ElementwiseOptimizer::new(
            SgdNesterov::new(cfg),
            groups,
            quant,
        )),
        K::Adafactor => Box::new(Adafactor::new(cfg, groups)),
        K::Prodigy => Box::new(Prodigy::new(cfg, groups)),
    })
}

fn check_groups(groups: &[ParamGroup]) -> Result<()> {
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for g in groups {
        let ok = !g.name.is_empty()
            && g.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(OptimError::InvalidGroups(format!(
                "group name {:?} must be non-empty ASCII letters, digits, '_' or '-'",
                g.name
            )));
        }
        if !names.insert(g.name.as_str()) {
            return Err(OptimError::InvalidGroups(format!(
                "group name {:?} used twice",
                g.name
            )));
        }
        check_lr(&g.name, g.lr)?;
        for (i, p) in g.params.iter().enumerate() {
            if !p.dtype().is_float() {
                return Err(OptimError::InvalidGroups(format!(
                    "{}.{i} has dtype {:?}; trainable tensors must be floating point",
                    g.name,
                    p.dtype()
                )));
            }
            if !ids.insert(p.id()) {
                return Err(OptimError::InvalidGroups(format!(
                    "{}.{i} appears twice among the groups",
                    g.name
                )));
            }
        }
    }
    Ok(())
}

fn check_lr(group: &str, lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(OptimError::InvalidGroups(format!(
            "learning rate of {group:?} must be finite and >= 0, got {lr}"
        )))
    }
}

/// Scales the gradients of `params` in place so that their joint L2 norm is at
/// most `max_norm`, as PyTorch's `clip_grad_norm_` (factor
/// max_norm / (norm + 1e-6), applied only when below 1). Returns the norm
/// before clipping. A non-finite norm is returned as is and the gradients are
/// left untouched, so the caller can skip the step. Parameters without a
/// gradient are ignored; a parameter listed twice counts once.
pub(crate) fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    params: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(bad(
            "max_norm",
            format!("must be finite and > 0, got {max_norm}"),
        ));
    }
    let mut seen = HashSet::new();
    let mut with_grad = Vec::new();
    let mut sq = Vec::new();
    for p in params {
        if !seen.insert(p.id()) {
            continue;
        }
        if let Some(g) = grads.get(p) {
            sq.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
            with_grad.push(p);
        }
    }
    let total = sum_scalars(&sq)?.sqrt();
    if !total.is_finite() {
        return Ok(total);
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for p in with_grad {
            if let Some(g) = grads.remove(p) {
                let scaled = g.affine(coef, 0.0)?;
                grads.insert(p, scaled);
            }
        }
    }
    Ok(total)
}

/// Sums 0-d tensors into an f64 (see [`scalars_to_host`]).
fn sum_scalars(xs: &[Tensor]) -> Result<f64> {
    Ok(scalars_to_host(xs)?.iter().map(|v| *v as f64).sum())
}

/// The values of 0-d tensors, with one device round trip when they share a
/// device.
fn scalars_to_host(xs: &[Tensor]) -> Result<Vec<f32>> {
    if xs.is_empty() {
        return Ok(Vec::new());
    }
    let flat: Vec<Tensor> = xs
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.reshape(1))
        .collect::<candle_core::Result<_>>()?;
    Ok(match Tensor::cat(&flat, 0) {
        Ok(t) => t.to_vec1()?,
        Err(_) => flat
            .iter()
            .map(|t| t.to_device(&Device::Cpu)?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?
            .concat(),
    })
}

// ---------------------------------------------------------------------------
// Shared bookkeeping of the optimizers: groups, per-parameter slots, the step
// loop, state keys.

/// One parameter and its optimizer state (`None` until its first gradient).
struct Slot<S> {
    var: Var,
    state: Option<S>,
    /// Updates this parameter received (PyTorch's per-parameter `step`).
    steps: u64,
}

struct Group<S> {
    name: String,
    lr: f64,
    slots: Vec<Slot<S>>,
}

/// The groups of one optimizer with the optimizer-wide step count.
struct Groups<S> {
    groups: Vec<Group<S>>,
    steps: u64,
}

impl<S: Clone> Groups<S> {
    fn new(groups: Vec<ParamGroup>) -> Self {
        Self {
            groups: groups
                .into_iter()
                .map(|g| Group {
                    name: g.name,
                    lr: g.lr,
                    slots: g
                        .params
                        .into_iter()
                        .map(|var| Slot {
                            var,
                            state: None,
                            steps: 0,
                        })
                        .collect(),
                })
                .collect(),
            steps: 0,
        }
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        let n = self.groups.len();
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| OptimError::InvalidGroups(format!("no group {group} (have {n})")))?;
        check_lr(&g.name, lr)?;
        g.lr = lr;
        Ok(())
    }

    fn lr(&self, group: usize) -> Option<f64> {
        self.groups.get(group).map(|g| g.lr)
    }

    /// One step of a per-parameter rule and its count. For each parameter
    /// with a gradient, `update(group, lr, p, g, state, steps)` gets its
    /// group's index and learning rate, its f32 value and detached f32
    /// gradient, its state (`None` before its first update) and the updates
    /// it had so far, and returns its new value and state, which are stored.
    /// Parameters without a gradient, and their state, are left alone.
    #[allow(clippy::type_complexity)]
    fn step(
        &mut self,
        grads: &GradStore,
        mut update: impl FnMut(usize, f64, Tensor, Tensor, Option<&S>, u64) -> Result<(Tensor, S)>,
    ) -> Result<()> {
        for (gi, group) in self.groups.iter_mut().enumerate() {
            let lr = group.lr;
            for slot in &mut group.slots {
                let Some(g) = gradient(grads, &slot.var)? else {
                    continue;
                };
                let p = f32_value(&slot.var)?;
                let (p, state) = update(gi, lr, p, g, slot.state.as_ref(), slot.steps)?;
                write_back(&slot.var, &p)?;
                slot.state = Some(state);
                slot.steps += 1;
            }
        }
        self.steps += 1;
        Ok(())
    }

    /// Writes the per-slot states with `save(state, key_prefix, out)`.
    fn save(
        &self,
        kind: OptimizerKind,
        mut save: impl FnMut(&S, &str, &mut OptimizerState),
    ) -> OptimizerState {
        let mut out = OptimizerState {
            kind: kind.name().to_string(),
            step: self.steps,
            ..Default::default()
        };
        for g in &self.groups {
            for (i, s) in g.slots.iter().enumerate() {
                if let Some(st) = &s.state {
                    let prefix = format!("{}.{i}", g.name);
                    out.scalars.insert(format!("{prefix}.step"), s.steps as f64);
                    save(st, &prefix, &mut out);
                }
            }
        }
        out
    }

    /// Reads per-slot states with `load(key_prefix, var, state, used_keys)`
    /// and returns them with the keys used, without changing `self`.
    #[allow(clippy::type_complexity)]
    fn load(
        &self,
        kind: OptimizerKind,
        st: &OptimizerState,
        mut load: impl FnMut(&str, &Var, &OptimizerState, &mut BTreeSet<String>) -> Result<S>,
    ) -> Result<(Vec<Vec<(Option<S>, u64)>>, BTreeSet<String>)> {
        if st.kind != kind.name() {
            return Err(OptimError::State(format!(
                "state was written by {:?}, this optimizer is {}",
                st.kind,
                kind.name()
            )));
        }
        let mut used = BTreeSet::new();
        let mut all = Vec::new();
        for g in &self.groups {
            let mut slots = Vec::new();
            for (i, s) in g.slots.iter().enumerate() {
                let prefix = format!("{}.{i}", g.name);
                let step_key = format!("{prefix}.step");
                match st.scalars.get(&step_key) {
                    Some(steps) => {
                        used.insert(step_key);
                        let state = load(&prefix, &s.var, st, &mut used)?;
                        slots.push((Some(state), *steps as u64));
                    }
                    None => slots.push((None, 0)),
                }
            }
            all.push(slots);
        }
        Ok((all, used))
    }

    /// Installs what [`Groups::load`] returned.
    fn commit(&mut self, loaded: Vec<Vec<(Option<S>, u64)>>, steps: u64) {
        for (g, slots) in self.groups.iter_mut().zip(loaded) {
            for (s, (state, n)) in g.slots.iter_mut().zip(slots) {
                s.state = state;
                s.steps = n;
            }
        }
        self.steps = steps;
    }
}

/// Errors if `st` holds keys nobody read (a state of other groups or settings).
fn check_all_used(st: &OptimizerState, used: &BTreeSet<String>) -> Result<()> {
    let extra: Vec<&String> = st
        .tensors
        .keys()
        .chain(st.scalars.keys())
        .filter(|k| !used.contains(*k))
        .collect();
    if extra.is_empty() {
        Ok(())
    } else {
        Err(OptimError::State(format!(
            "unexpected entries {extra:?} (different groups or settings?)"
        )))
    }
}

/// A saved tensor of the given dtype and shape, moved to `device`.
fn load_tensor(
    st: &OptimizerState,
    key: &str,
    dtype: DType,
    shape: &Shape,
    device: &Device,
    used: &mut BTreeSet<String>,
) -> Result<Tensor> {
    let t = st
        .tensors
        .get(key)
        .ok_or_else(|| OptimError::State(format!("missing tensor {key}")))?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(OptimError::State(format!(
            "{key}: expected {dtype:?} {shape:?}, found {:?} {:?}",
            t.dtype(),
            t.shape()
        )));
    }
    used.insert(key.to_string());
    Ok(t.to_device(device)?)
}

fn load_scalar(st: &OptimizerState, key: &str, used: &mut BTreeSet<String>) -> Result<f64> {
    let v = st
        .scalars
        .get(key)
        .copied()
        .ok_or_else(|| OptimError::State(format!("missing scalar {key}")))?;
    used.insert(key.to_string());
    Ok(v)
}

/// The parameter's value in f32 (a copy only when it is not f32 already),
/// detached: update arithmetic must not build a graph.
fn f32_value(var: &Var) -> Result<Tensor> {
    Ok(var.as_detached_tensor().to_dtype(DType::F32)?)
}

/// The gradient of `var` in f32, detached. A leaf's gradient from `backward`
/// still refers to the forward graph; kept in optimizer state it would chain
/// every step's graph to the next and memory would grow without bound.
fn gradient(grads: &GradStore, var: &Var) -> Result<Option<Tensor>> {
    match grads.get(var.as_tensor()) {
        Some(g) => Ok(Some(g.detach().to_dtype(DType::F32)?)),
        None => Ok(None),
    }
}

/// Writes an f32 result back into the parameter in its own dtype.
fn write_back(var: &Var, new: &Tensor) -> Result<()> {
    var.set(&new.to_dtype(var.dtype())?)?;
    Ok(())
}

/// `x * (1 - factor)`, skipped when factor is 0.
fn decay(x: Tensor, factor: f64) -> Result<Tensor> {
    if factor == 0.0 {
        Ok(x)
    } else {
        Ok(x.affine(1.0 - factor, 0.0)?)
    }
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
