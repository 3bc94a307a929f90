//! LoRA adapters applied unmerged on top of frozen base weights.
//!
//! Owns: [`LoraLayer`] (one low-rank update for one linear), [`Lora`] (a named set
//! of layer updates keyed by the Black Forest Labs module path, e.g.
//! `double_blocks.0.img_attn.qkv`), [`AdapterSet`] (several LoRAs with strengths)
//! and merging a set into base weights for export.
//!
//! The base model never changes when adapters come and go: a linear layer asks the
//! `AdapterSet` passed to `forward` for the updates of its module path and adds
//!   y = x·Wᵀ + b + Σᵢ sᵢ · (αᵢ/rᵢ) · (x·Aᵢᵀ)·Bᵢᵀ.
//! Swapping or re-weighting adapters is therefore a cheap change of a small struct.
//! A trainable adapter is an ordinary [`Lora`] whose tensors are `candle_core::Var`s
//! (a `Var` shares storage with the tensor handed out by `as_tensor`), so gradients
//! reach it and in-place optimizer updates are seen by the sampler at once.
//!
//! Must not: read or write files (that is `lora_io`), know about key formats.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

/// One low-rank update ΔW = (alpha / rank) · up · down for one linear layer.
#[derive(Clone, Debug)]
pub struct LoraLayer {
    /// (rank, in_features), kohya's `lora_down`, peft's `lora_A`.
    pub down: Tensor,
    /// (out_features, rank), kohya's `lora_up`, peft's `lora_B`.
    pub up: Tensor,
    /// Scale numerator; the update is scaled by `alpha / rank`.
    pub alpha: f32,
}

impl LoraLayer {
    pub(crate) fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// alpha / rank: the factor that multiplies up·down.
    pub(crate) fn scale(&self) -> f64 {
        let rank = self.rank();
        if rank == 0 {
            0.0
        } else {
            self.alpha as f64 / rank as f64
        }
    }

    /// (in_features, out_features) of the layer this update fits.
    pub(crate) fn in_out(&self) -> (usize, usize) {
        let in_f = self.down.dims().get(1).copied().unwrap_or(0);
        let out_f = self.up.dims().first().copied().unwrap_or(0);
        (in_f, out_f)
    }

    /// The dense update scale · up · down, (out, in), in f32.
    pub(crate) fn delta_weight(&self) -> Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        up.matmul(&down)? * self.scale()
    }

    /// x (…, in) → strength · scale · (x·downᵀ)·upᵀ, (…, out), in x's dtype;
    /// with `dropout` > 0 the rank-space activations are dropped (training only).
    pub(crate) fn apply(&self, x: &Tensor, strength: f64, dropout: f64) -> Result<Tensor> {
        let down = self.down.to_dtype(x.dtype())?;
        let up = self.up.to_dtype(x.dtype())?;
        let mut h = x.broadcast_matmul(&down.t()?)?;
        if dropout > 0.0 {
            h = candle_nn::ops::dropout(&h, dropout as f32)?;
        }
        // Scaled in rank space: (…, rank) values rather than (…, out).
        (h * (strength * self.scale()))?.broadcast_matmul(&up.t()?)
    }
}

/// A LoRA: updates for a set of linear layers, keyed by the BFL module path.
#[derive(Clone, Debug, Default)]
pub struct Lora {
    /// Human-readable name (file stem for loaded files).
    pub name: String,
    /// For a loaded file: the SHA-256 (hex) of its tensor data after the
    /// safetensors header, kohya's `sshs_model_hash` and A1111's LoRA hash.
    pub hash: Option<String>,
    pub layers: BTreeMap<String, LoraLayer>,
}

impl Lora {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            hash: None,
            layers: BTreeMap::new(),
        }
    }
}

/// Several LoRAs with strengths, applied unmerged. Cheap to clone and to edit.
#[derive(Clone, Debug, Default)]
pub struct AdapterSet {
    entries: Vec<(Arc<Lora>, f64)>,
    /// Dropout applied to every entry's rank-space activations (the trainer's
    /// `network.dropout`; zero for sampling).
    dropout: f64,
}

impl AdapterSet {
    /// The empty set: the base model alone.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn with(mut self, lora: Arc<Lora>, strength: f64) -> Self {
        self.push(lora, strength);
        self
    }

    pub(crate) fn push(&mut self, lora: Arc<Lora>, strength: f64) {
        self.entries.push((lora, strength));
    }

    /// The same set with LoRA dropout while training.
    pub(crate) fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// The updates that apply to the layer at `module` with their strengths;
    /// strength-zero entries are skipped so they cost nothing.
    pub(crate) fn layers_for<'a>(
        &'a self,
        module: &'a str,
    ) -> impl Iterator<Item = (&'a LoraLayer, f64)> + 'a {
        self.entries
            .iter()
            .filter(|(_, s)| *s != 0.0)
            .filter_map(move |(lora, s)| lora.layers.get(module).map(|l| (l, *s)))
    }

    /// Adds the set's updates for `module` to a linear output: y + Σ sᵢ·ΔWᵢ·x.
    /// Several updates run as one stacked pair of products, x·[A₁; A₂; …]ᵀ then
    /// ·[c₁B₁ | c₂B₂ | …]ᵀ with cᵢ = sᵢ·αᵢ/rᵢ: two matmuls and one add instead of
    /// two matmuls, a scale and an add per adapter.
    pub(crate) fn apply(&self, module: &str, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let layers: Vec<(&LoraLayer, f64)> = self.layers_for(module).collect();
        match layers.as_slice() {
            [] => Ok(y),
            [(layer, strength)] => y + layer.apply(x, *strength, self.dropout)?,
            many => {
                let downs = many
                    .iter()
                    .map(|(l, _)| l.down.to_dtype(x.dtype()))
                    .collect::<Result<Vec<_>>>()?;
                let ups = many
                    .iter()
                    .map(|(l, s)| l.up.to_dtype(x.dtype())? * (s * l.scale()))
                    .collect::<Result<Vec<_>>>()?;
                let mut h = x.broadcast_matmul(&Tensor::cat(&downs, 0)?.t()?)?;
                if self.dropout > 0.0 {
                    h = candle_nn::ops::dropout(&h, self.dropout as f32)?;
                }
                y + h.broadcast_matmul(&Tensor::cat(&ups, 1)?.t()?)?
            }
        }
    }

    /// W + Σ sᵢ·ΔWᵢ for the layer at `module`, in `weight`'s dtype (computed in f32).
    pub(crate) fn merged_weight(&self, module: &str, weight: &Tensor) -> Result<Tensor> {
        let mut w = weight.to_dtype(DType::F32)?;
        let mut touched = false;
        for (layer, strength) in self.layers_for(module) {
            w = (w + (layer.delta_weight()? * strength)?)?;
            touched = true;
        }
        if touched {
            w.to_dtype(weight.dtype())
        } else {
            Ok(weight.clone())
        }
    }
}

/// Checks that a layer update fits a linear of shape (out, in); used by loaders so a
/// wrong-shape LoRA fails at load time naming the module, not deep inside a matmul.
pub(crate) fn check_fits(
    module: &str,
    layer: &LoraLayer,
    out_f: usize,
    in_f: usize,
) -> std::result::Result<(), String> {
    let (li, lo) = layer.in_out();
    let rank_ok = layer.up.dims().get(1).copied() == Some(layer.rank())
        && layer.down.rank() == 2
        && layer.up.rank() == 2;
    if !rank_ok {
        return Err(format!(
            "{module}: down {:?} and up {:?} do not form a low-rank pair",
            layer.down.dims(),
            layer.up.dims()
        ));
    }
    if li != in_f || lo != out_f {
        return Err(format!(
            "{module}: LoRA maps {li} → {lo} features but the layer maps {in_f} → {out_f}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::seeded::SeededRng;
    use crate::testing::rel_err;
    use candle_core::Device;

    #[test]
    fn stacked_adapters_equal_the_sum_of_their_updates() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(41);
        let x = rng.randn((2, 3, 6), &dev)?;
        let y = rng.randn((2, 3, 5), &dev)?;
        let mut set = AdapterSet::none();
        let mut expected = y.clone();
        for (i, (rank, strength)) in [(2, 0.7), (3, -1.2), (1, 0.3)].into_iter().enumerate() {
            let layer = LoraLayer {
                down: rng.randn((rank, 6), &dev)?,
                up: rng.randn((5, rank), &dev)?,
                alpha: 1.5,
            };
            expected = (expected + layer.apply(&x, strength, 0.0)?)?;
            let mut lora = Lora::new(format!("l{i}"));
            lora.layers.insert("m".into(), layer);
            set.push(Arc::new(lora), strength);
        }
        let stacked = set.apply("m", &x, y)?;
        assert!(rel_err(&stacked, &expected) < 1e-6);
        // ΔW·x written out for one adapter checks the single path's scaling too.
        let (layer, s) = set.layers_for("m").next().expect("a layer");
        let dense = x.broadcast_matmul(&(layer.delta_weight()? * s)?.t()?)?;
        assert!(rel_err(&layer.apply(&x, s, 0.0)?, &dense) < 1e-6);
        Ok(())
    }
}
