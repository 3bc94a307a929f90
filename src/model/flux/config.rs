//! [`FluxConfig`]: the architecture's hyper-parameters, the FLUX.1 \[dev\] and
//! \[schnell\] presets, and the config inferred from a checkpoint's weight shapes.

use std::path::Path;

use candle_core::Result;
use serde::{Deserialize, Serialize};

use super::weights::WeightSource;

/// Architecture hyper-parameters (the field names of BFL's `FluxParams`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    pub in_channels: usize,
    pub vec_in_dim: usize,
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    pub depth: usize,
    pub depth_single_blocks: usize,
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

impl FluxConfig {
    /// FLUX.1 \[dev\]: guidance-distilled.
    pub(crate) fn dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// FLUX.1 \[schnell\]: timestep-distilled, no guidance embedding.
    pub(crate) fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    pub(crate) fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Checks the sizes fit together; the message names the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            candle_core::bail!(
                "flux config: hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size,
                self.num_heads
            )
        }
        let pe: usize = self.axes_dim.iter().sum();
        if pe != self.head_dim() || self.axes_dim.iter().any(|d| d % 2 != 0) {
            candle_core::bail!(
                "flux config: axes_dim {:?} must be even and sum to the head dim {}",
                self.axes_dim,
                self.head_dim()
            )
        }
        if self.in_channels == 0 || self.vec_in_dim == 0 || self.context_in_dim == 0 {
            candle_core::bail!(
                "flux config: in_channels, vec_in_dim and context_in_dim must be > 0"
            )
        }
        Ok(())
    }

    /// Reads a parity-fixture / BFL-style `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Infers the config from the shapes of BFL-named weights. RoPE axes follow
    /// Flux's split of a 128-wide head ([16, 56, 56]) scaled to the head dim.
    pub(crate) fn infer(weights: &WeightSource) -> Result<Self> {
        let shape = |name: &str| weights.shape(name);
        let img_in = shape("img_in.weight")?;
        let (hidden_size, in_channels) = (img_in[0], img_in[1]);
        let context_in_dim = shape("txt_in.weight")?[1];
        let vec_in_dim = shape("vector_in.in_layer.weight")?[1];
        let mlp = shape("double_blocks.0.img_mlp.0.weight")
            .or_else(|_| shape("single_blocks.0.linear2.weight").map(|s| vec![s[1] - s[0]]))?[0];
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")
            .or_else(|_| shape("single_blocks.0.norm.query_norm.scale"))?[0];
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| weights.contains(&format!("{prefix}.{i}.{}", block_probe(prefix))))
                .count()
        };
        let axes_dim = if head_dim == 128 {
            vec![16, 56, 56]
        } else {
            let first = (head_dim / 8) & !1;
            let rest = ((head_dim - first) / 2) & !1;
            vec![first, rest, head_dim - first - rest]
        };
        let cfg = Self {
            in_channels,
            vec_in_dim,
            context_in_dim,
            hidden_size,
            mlp_ratio: mlp as f64 / hidden_size as f64,
            num_heads: hidden_size / head_dim.max(1),
            depth: count("double_blocks"),
            depth_single_blocks: count("single_blocks"),
            axes_dim,
            theta: 10_000.0,
            qkv_bias: weights.contains("double_blocks.0.img_attn.qkv.bias")
                || weights.contains("single_blocks.0.linear1.bias"),
            guidance_embed: weights.contains("guidance_in.in_layer.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn block_probe(prefix: &str) -> &'static str {
    if prefix == "double_blocks" {
        "img_attn.qkv.weight"
    } else {
        "linear1.weight"
    }
}
