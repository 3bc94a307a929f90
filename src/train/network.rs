//! The trainable network: which linears of the DiT get a LoRA (target presets,
//! block selection, regex include/exclude), its rank/alpha/dropout, and the
//! trainable tensors themselves (`Var`s) wrapped as a [`Lora`] the model applies
//! like any other adapter.
//!
//! Initialisation as kohya's `LoRAModule`: down Kaiming-uniform (a = √5, i.e.
//! U(−1/√in, 1/√in)), up zero, so training starts from the base model exactly.
//!
//! Must not: run the model or the optimizer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::adapter::{AdapterSet, Lora, LoraLayer};
use crate::model::keymap::{is_clip_module, module_group, ModuleGroup};
use crate::model::lora_io;
use crate::model::seeded::SeededRng;

/// Which linears a preset targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetPreset {
    /// Attention projections: double-block qkv/proj, single-block linear1/linear2
    /// (which fuse attention and MLP).
    Attention,
    /// Attention plus the double blocks' MLPs.
    AttentionMlp,
    /// Every linear inside the blocks, modulation included (kohya's default).
    #[default]
    Blocks,
    /// Every linear of the model, embedders and the final layer included.
    AllLinear,
}

/// Which blocks train (kohya's `train_blocks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainBlocks {
    #[default]
    All,
    Double,
    Single,
}

/// LoRA network settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Rank (kohya's `network_dim`).
    pub rank: usize,
    /// Scale numerator (kohya's `network_alpha`); the update is scaled by alpha / rank.
    pub alpha: f32,
    /// Dropout on the down projection's output while training (kohya's `network_dropout`).
    pub dropout: f64,
    pub targets: TargetPreset,
    pub train_blocks: TrainBlocks,
    /// Train a LoRA on the DiT (kohya: off with `network_train_text_encoder_only`).
    pub train_transformer: bool,
    /// Train a LoRA on the CLIP-L text encoder too (kohya: the default unless
    /// `network_train_unet_only`; off here, as Flux recipes recommend).
    pub train_text_encoder: bool,
    /// Regexes on the module path (`double_blocks.3.img_attn.qkv`,
    /// `te1.text_model.encoder.layers.0.mlp.fc1`): when not empty, only matching
    /// modules train.
    pub include: Vec<String>,
    /// Regexes on the module path: matching modules never train.
    pub exclude: Vec<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            dropout: 0.0,
            targets: TargetPreset::Blocks,
            train_blocks: TrainBlocks::All,
            train_transformer: true,
            train_text_encoder: false,
            include: vec![],
            exclude: vec![],
        }
    }
}

impl NetworkConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("network.rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("network.alpha must be > 0, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "network.dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if !self.train_transformer && !self.train_text_encoder {
            return Err("network: train_transformer and train_text_encoder are both off; nothing would train".into());
        }
        for (field, list) in [("include", &self.include), ("exclude", &self.exclude)] {
            for re in list {
                Regex::new(re).map_err(|e| format!("network.{field}: bad regex `{re}`: {e}"))?;
            }
        }
        Ok(())
    }

    /// Whether the linear at `module` (a DiT or CLIP module path) trains under this config.
    pub(crate) fn targets_module(&self, module: &str) -> bool {
        let matches = |list: &[String]| {
            list.iter()
                .any(|re| Regex::new(re).is_ok_and(|r| r.is_match(module)))
        };
        let filtered =
            (self.include.is_empty() || matches(&self.include)) && !matches(&self.exclude);
        if is_clip_module(module) {
            return self.train_text_encoder && filtered;
        }
        if !self.train_transformer {
            return false;
        }
        let group = module_group(module);
        let block_ok = match (self.train_blocks, group) {
            (TrainBlocks::All, _) => true,
            (TrainBlocks::Double, ModuleGroup::Double(_)) => true,
            (TrainBlocks::Single, ModuleGroup::Single(_)) => true,
            (_, ModuleGroup::Other) => self.targets == TargetPreset::AllLinear,
            _ => false,
        };
        let leaf = module.rsplit_once('.').map(|(_, l)| l).unwrap_or(module);
        let preset_ok = match (self.targets, group) {
            (TargetPreset::AllLinear, _) => true,
            (_, ModuleGroup::Other) => false,
            (TargetPreset::Blocks, _) => true,
            (TargetPreset::Attention, ModuleGroup::Double(_)) => module.contains("_attn."),
            (TargetPreset::AttentionMlp, ModuleGroup::Double(_)) => {
                module.contains("_attn.") || module.contains("_mlp.")
            }
            (TargetPreset::Attention | TargetPreset::AttentionMlp, ModuleGroup::Single(_)) => {
                leaf == "linear1" || leaf == "linear2"
            }
        };
        let matches = |list: &[String]| {
            list.iter()
                .any(|re| Regex::new(re).is_ok_and(|r| r.is_match(module)))
        };
        block_ok
            && preset_ok
            && (self.include.is_empty() || matches(&self.include))
            && !matches(&self.exclude)
    }
}

/// The trainable LoRA: its `Var`s and the [`Lora`] view the model applies.
pub(crate) struct TrainableLora {
    pub lora: Arc<Lora>,
    /// (module, down, up) in module order.
    pub vars: Vec<(String, Var, Var)>,
}

impl TrainableLora {
    /// Creates the network over the targeted modules of `shapes` ((out, in) per module).
    pub(crate) fn new(
        cfg: &NetworkConfig,
        shapes: &BTreeMap<String, (usize, usize)>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut lora = Lora::new("training");
        let mut vars = vec![];
        for (module, &(out_f, in_f)) in shapes {
            if !cfg.targets_module(module) {
                continue;
            }
            let bound = 1.0 / (in_f as f64).sqrt();
            let data =
                SeededRng::for_name(seed, module).uniform_vec(cfg.rank * in_f, -bound, bound);
            let down = Var::from_tensor(&Tensor::from_vec(data, (cfg.rank, in_f), device)?)?;
            let up = Var::from_tensor(&Tensor::zeros((out_f, cfg.rank), DType::F32, device)?)?;
            lora.layers.insert(
                module.clone(),
                LoraLayer {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                    alpha: cfg.alpha,
                },
            );
            vars.push((module.clone(), down, up));
        }
        if vars.is_empty() {
            candle_core::bail!("the network targets no module: check network.targets, train_blocks, include and exclude")
        }
        Ok(Self {
            lora: Arc::new(lora),
            vars,
        })
    }

    /// Every trainable tensor, down then up per module.
    pub(crate) fn params(&self) -> Vec<Var> {
        self.vars
            .iter()
            .flat_map(|(_, d, u)| [d.clone(), u.clone()])
            .collect()
    }

    /// The trainable tensors split into (DiT, CLIP text encoder), for separate learning rates.
    pub(crate) fn param_groups(&self) -> (Vec<Var>, Vec<Var>) {
        let (te, dit): (Vec<_>, Vec<_>) = self.vars.iter().partition(|(m, _, _)| is_clip_module(m));
        let flat = |v: Vec<&(String, Var, Var)>| -> Vec<Var> {
            v.into_iter()
                .flat_map(|(_, d, u)| [d.clone(), u.clone()])
                .collect()
        };
        (flat(dit), flat(te))
    }

    /// Copies weights from a saved LoRA (resume); every module must be present with the same shapes.
    pub(crate) fn load_from(&self, saved: &Lora) -> Result<()> {
        for (module, down, up) in &self.vars {
            let layer = saved.layers.get(module).ok_or_else(|| {
                candle_core::Error::msg(format!("saved LoRA lacks module `{module}`"))
            })?;
            down.set(&layer.down.to_dtype(DType::F32)?.to_device(down.device())?)?;
            up.set(&layer.up.to_dtype(DType::F32)?.to_device(up.device())?)?;
        }
        Ok(())
    }

    /// A snapshot (detached copies) of the current weights, safe to save while training goes on.
    pub(crate) fn snapshot(&self, name: &str) -> Result<Lora> {
        let mut lora = Lora::new(name);
        for (module, down, up) in &self.vars {
            let alpha = self.lora.layers.get(module).map(|l| l.alpha).unwrap_or(1.0);
            lora.layers.insert(
                module.clone(),
                LoraLayer {
                    down: down.as_tensor().detach().copy()?,
                    up: up.as_tensor().detach().copy()?,
                    alpha,
                },
            );
        }
        Ok(lora)
    }
}

/// What a run trains: a LoRA on the frozen base, or every base weight.
pub(crate) enum Trainable {
    Lora(TrainableLora),
    /// Full fine-tuning: the model's own weights (built with `Flux::new_trainable`).
    Full(Vec<(String, Var)>),
}

impl Trainable {
    /// Whether a CLIP text-encoder LoRA trains (its outputs then change every step).
    pub(crate) fn trains_text_encoder(&self) -> bool {
        match self {
            Self::Lora(l) => l.vars.iter().any(|(m, _, _)| is_clip_module(m)),
            Self::Full(_) => false,
        }
    }

    pub(crate) fn params(&self) -> Vec<Var> {
        match self {
            Self::Lora(l) => l.params(),
            Self::Full(w) => w.iter().map(|(_, v)| v.clone()).collect(),
        }
    }

    /// The adapters the model applies while training (empty for full fine-tuning).
    pub(crate) fn adapters(&self, dropout: f64) -> AdapterSet {
        match self {
            Self::Lora(l) => AdapterSet::none()
                .with(l.lora.clone(), 1.0)
                .with_dropout(dropout),
            Self::Full(_) => AdapterSet::none(),
        }
    }

    /// The adapter being trained, as the sampler applies it (none for full fine-tuning,
    /// whose weights are the model itself).
    pub(crate) fn live_lora(&self) -> Option<Arc<Lora>> {
        match self {
            Self::Lora(l) => Some(l.lora.clone()),
            Self::Full(_) => None,
        }
    }

    /// Detached f32 copies of the trainable weights under stable names (kohya keys
    /// for a LoRA, BFL keys for the full model): what a resumable state stores.
    pub(crate) fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Self::Lora(l) => {
                let lora = l.snapshot("state")?;
                lora_io::kohya_tensors(&lora, DType::F32).map_err(candle_core::Error::wrap)
            }
            Self::Full(w) => w
                .iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
                .collect(),
        }
    }

    /// Restores weights written by [`Trainable::state_tensors`].
    pub(crate) fn load_state_tensors(&self, tensors: HashMap<String, Tensor>) -> Result<()> {
        match self {
            Self::Lora(l) => {
                let file = lora_io::parse(tensors, Default::default(), "state")
                    .map_err(candle_core::Error::wrap)?;
                l.load_from(&file.lora)
            }
            Self::Full(w) => {
                for (name, var) in w {
                    let t = tensors.get(name).ok_or_else(|| {
                        candle_core::Error::msg(format!("saved state lacks weight `{name}`"))
                    })?;
                    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::keymap::bfl_linear_modules;

    fn shapes() -> BTreeMap<String, (usize, usize)> {
        bfl_linear_modules(2, 2, true)
            .into_iter()
            .map(|m| (m, (8, 4)))
            .collect()
    }

    fn selected(cfg: &NetworkConfig) -> Vec<String> {
        shapes()
            .into_keys()
            .filter(|m| cfg.targets_module(m))
            .collect()
    }

    #[test]
    fn presets_select_the_expected_modules() {
        let attn = selected(&NetworkConfig {
            targets: TargetPreset::Attention,
            ..Default::default()
        });
        assert!(attn.contains(&"double_blocks.0.img_attn.qkv".to_string()));
        assert!(attn.contains(&"single_blocks.1.linear1".to_string()));
        assert!(!attn.iter().any(|m| m.contains("_mlp") || m.contains("mod")));
        let blocks = selected(&NetworkConfig::default());
        assert!(blocks.contains(&"double_blocks.1.txt_mod.lin".to_string()));
        assert!(!blocks
            .iter()
            .any(|m| m.starts_with("img_in") || m.starts_with("final_layer")));
        let all = selected(&NetworkConfig {
            targets: TargetPreset::AllLinear,
            ..Default::default()
        });
        assert_eq!(all.len(), shapes().len());
    }

    #[test]
    fn text_encoder_modules_train_only_when_asked() {
        let clip = "te1.text_model.encoder.layers.0.self_attn.q_proj";
        assert!(!NetworkConfig::default().targets_module(clip));
        let te_only = NetworkConfig {
            train_transformer: false,
            train_text_encoder: true,
            ..Default::default()
        };
        assert!(te_only.targets_module(clip));
        assert!(!te_only.targets_module("double_blocks.0.img_attn.qkv"));
        let none = NetworkConfig {
            train_transformer: false,
            ..Default::default()
        };
        assert!(none.validate().unwrap_err().contains("nothing would train"));
    }

    #[test]
    fn blocks_and_regexes_narrow_the_selection() {
        let single = selected(&NetworkConfig {
            train_blocks: TrainBlocks::Single,
            ..Default::default()
        });
        assert!(single.iter().all(|m| m.starts_with("single_blocks.")));
        let some = selected(&NetworkConfig {
            include: vec![r"^double_blocks\.0\.".into()],
            exclude: vec![r"_mod\.".into()],
            ..Default::default()
        });
        assert!(some
            .iter()
            .all(|m| m.starts_with("double_blocks.0.") && !m.contains("_mod.")));
        assert!(!some.is_empty());
        let bad = NetworkConfig {
            include: vec!["(".into()],
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("network.include"));
    }

    #[test]
    fn init_is_down_uniform_up_zero_and_deterministic() -> Result<()> {
        let cfg = NetworkConfig {
            rank: 2,
            ..Default::default()
        };
        let a = TrainableLora::new(&cfg, &shapes(), 1, &Device::Cpu)?;
        let b = TrainableLora::new(&cfg, &shapes(), 1, &Device::Cpu)?;
        for ((_, da, ua), (_, db, _)) in a.vars.iter().zip(&b.vars) {
            assert_eq!(
                da.as_tensor().to_vec2::<f32>()?,
                db.as_tensor().to_vec2::<f32>()?
            );
            assert_eq!(ua.as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
            let max = da.as_tensor().abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(max > 0.0 && max <= 0.5);
        }
        // The Lora view shares storage with the Vars: an update is seen at once.
        let (module, _, up) = &a.vars[0];
        up.set(&Tensor::ones(up.shape(), DType::F32, &Device::Cpu)?)?;
        let seen = a.lora.layers[module].up.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(seen, up.as_tensor().elem_count() as f32);
        Ok(())
    }
}
