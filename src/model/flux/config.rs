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
    /// FLUX.1 \[dev\]: guidance-distilled (`fluxlora bench --config dev` builds it
    /// with seeded weights; checkpoints carry or imply their own config).
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// The weights [`FluxConfig::infer`] reads, with the shapes a checkpoint of
    /// `cfg` has. Each is a broadcast scalar: no memory for full-size tensors.
    fn checkpoint_shapes(cfg: &FluxConfig) -> Result<WeightSource> {
        let (h, mlp) = (cfg.hidden_size, cfg.mlp_hidden());
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("img_in.weight".into(), vec![h, cfg.in_channels]),
            ("txt_in.weight".into(), vec![h, cfg.context_in_dim]),
            ("vector_in.in_layer.weight".into(), vec![h, cfg.vec_in_dim]),
            ("double_blocks.0.img_mlp.0.weight".into(), vec![mlp, h]),
            (
                "double_blocks.0.img_attn.norm.query_norm.scale".into(),
                vec![cfg.head_dim()],
            ),
        ];
        if cfg.qkv_bias {
            shapes.push(("double_blocks.0.img_attn.qkv.bias".into(), vec![3 * h]));
        }
        for i in 0..cfg.depth {
            shapes.push((
                format!("double_blocks.{i}.img_attn.qkv.weight"),
                vec![3 * h, h],
            ));
        }
        for i in 0..cfg.depth_single_blocks {
            shapes.push((
                format!("single_blocks.{i}.linear1.weight"),
                vec![3 * h + mlp, h],
            ));
        }
        if cfg.guidance_embed {
            shapes.push(("guidance_in.in_layer.weight".into(), vec![h, 256]));
        }
        let zero = Tensor::zeros((), DType::U8, &Device::Cpu)?;
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| Ok((name, zero.broadcast_as(shape)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(WeightSource::Tensors(tensors))
    }

    #[test]
    fn presets_are_flux1_and_what_infer_reads_off_their_checkpoints() -> Result<()> {
        // BFL's `FluxParams` for flux-dev / flux-schnell.
        let dev = FluxConfig::dev();
        assert_eq!((dev.hidden_size, dev.num_heads), (3072, 24));
        assert_eq!((dev.depth, dev.depth_single_blocks), (19, 38));
        assert_eq!(dev.axes_dim, [16, 56, 56]);
        assert_eq!(
            (dev.in_channels, dev.vec_in_dim, dev.context_in_dim),
            (64, 768, 4096)
        );
        assert_eq!((dev.head_dim(), dev.mlp_hidden()), (128, 12288));
        assert!(dev.qkv_bias && dev.guidance_embed);
        let schnell = FluxConfig::schnell();
        assert!(!schnell.guidance_embed);
        assert_eq!(
            FluxConfig {
                guidance_embed: true,
                ..schnell.clone()
            },
            dev,
            "schnell differs from dev only in the guidance embedding"
        );
        for cfg in [dev, schnell] {
            cfg.validate()?;
            assert_eq!(FluxConfig::infer(&checkpoint_shapes(&cfg)?)?, cfg);
        }
        Ok(())
    }
}
