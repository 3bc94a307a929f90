//! The Flux DiT (Black Forest Labs' rectified-flow transformer).
//!
//! Owns, one file each: [`FluxConfig`] with its presets and its inference from a
//! checkpoint's shapes (`config`); the weight sources: BFL single-file keys (as in
//! `flux1-dev.safetensors` and ComfyUI's `models/diffusion_models`), the diffusers
//! layout (converted to BFL names on load by `keymap`, q/k/v fused), seeded weights,
//! dtype handling with fp8 kept in storage, and checkpoint writing (`weights`); the
//! layers: modulation, double- and single-stream blocks, embedders, final adaLN layer,
//! 3-axis RoPE (`blocks`); the latent packing conventions, 2×2 patches and position
//! ids (`packing`); and here, the model itself and its forward pass.
//!
//! Every linear carries its BFL module path (`double_blocks.3.img_attn.qkv`) and asks the
//! [`AdapterSet`] passed to `forward` for LoRA updates, so adapters are applied
//! unmerged and the base weights are never copied or changed.
//!
//! Paths that may carry gradients (a trainable adapter) use differentiable
//! compositions of basic ops; candle-nn's fused softmax, norms and RoPE have no
//! backward and are used only when nothing on the input requires a gradient.
//!
//! Must not: decide devices or dtypes (the caller does), sample, or touch files other
//! than the weight source it is given.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

use super::adapter::AdapterSet;
use super::layers::Linear;
use blocks::{FinalLayer, MlpEmbedder};
use weights::{stored_config, Loader};

mod blocks;
mod config;
mod packing;
mod weights;

pub(crate) use blocks::{timestep_embedding, DoubleBlock, Rope, SingleBlock};
pub use config::FluxConfig;
pub use packing::{image_ids, pack_latents, text_ids, unpack_latents};
pub use weights::{save_checkpoint, WeightSource, CONFIG_METADATA_KEY};

/// One batch of model inputs (packed tokens, see [`pack_latents`]).
pub struct FluxInputs<'a> {
    /// (b, n_img, in_channels)
    pub img: &'a Tensor,
    /// (b, n_img, 3)
    pub img_ids: &'a Tensor,
    /// (b, n_txt, context_in_dim)
    pub txt: &'a Tensor,
    /// (b, n_txt, 3)
    pub txt_ids: &'a Tensor,
    /// (b,) in [0, 1]
    pub timesteps: &'a Tensor,
    /// (b, vec_in_dim)
    pub y: &'a Tensor,
    /// (b,) distilled guidance; required when the config has `guidance_embed`
    pub guidance: Option<&'a Tensor>,
}

/// The embedded inputs every block sees.
pub(crate) struct Embedded {
    pub img: Tensor,
    pub txt: Tensor,
    pub vec: Tensor,
    pub pe: Rope,
}

/// The Flux transformer.
#[derive(Clone, Debug)]
pub struct Flux {
    cfg: FluxConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    pub double_blocks: Vec<DoubleBlock>,
    pub single_blocks: Vec<SingleBlock>,
    final_layer: FinalLayer,
    linear_shapes: BTreeMap<String, (usize, usize)>,
    dtype: DType,
}

impl Flux {
    /// Builds the model from `source`, storing weights in `dtype` (fp8 weights stay fp8).
    pub fn new(
        cfg: &FluxConfig,
        source: &WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, source, dtype, device, false)
    }

    /// The model with every weight a trainable `Var` (f32 master weights for full
    /// fine-tuning); [`Flux::trainable_weights`] hands them to an optimizer.
    pub(crate) fn new_trainable(
        cfg: &FluxConfig,
        source: &WeightSource,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, source, DType::F32, device, true)
    }

    fn build(
        cfg: &FluxConfig,
        source: &WeightSource,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut ld = Loader {
            source,
            dtype,
            device,
            shapes: BTreeMap::new(),
            trainable,
        };
        let h = cfg.hidden_size;
        let img_in = ld.linear("img_in", cfg.in_channels, h, true)?;
        let time_in = MlpEmbedder::new(&mut ld, "time_in", 256, h)?;
        let vector_in = MlpEmbedder::new(&mut ld, "vector_in", cfg.vec_in_dim, h)?;
        let guidance_in = if cfg.guidance_embed {
            Some(MlpEmbedder::new(&mut ld, "guidance_in", 256, h)?)
        } else {
            None
        };
        let txt_in = ld.linear("txt_in", cfg.context_in_dim, h, true)?;
        let double_blocks = (0..cfg.depth)
            .map(|i| DoubleBlock::new(&mut ld, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.depth_single_blocks)
            .map(|i| SingleBlock::new(&mut ld, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer = FinalLayer::new(&mut ld, cfg)?;
        Ok(Self {
            cfg: cfg.clone(),
            img_in,
            txt_in,
            time_in,
            vector_in,
            guidance_in,
            double_blocks,
            single_blocks,
            final_layer,
            linear_shapes: ld.shapes,
            dtype,
        })
    }

    /// Loads a checkpoint file or folder. The config comes from the file's
    /// `fluxlora.flux_config` metadata when we wrote it, else from the weight shapes.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let source = WeightSource::open(path)?;
        let stored = match &source {
            WeightSource::Mmap { files, .. } => stored_config(&files[0])?,
            _ => None,
        };
        let cfg = match stored {
            Some(cfg) => cfg,
            None => FluxConfig::infer(&source)?,
        };
        Self::new(&cfg, &source, dtype, device)
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every linear's BFL module path and (out_features, in_features): what a LoRA may target.
    pub fn linear_shapes(&self) -> &BTreeMap<String, (usize, usize)> {
        &self.linear_shapes
    }

    /// Every linear layer, in construction order (for merging and export).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.img_in];
        out.extend([&self.time_in.in_layer, &self.time_in.out_layer]);
        out.extend([&self.vector_in.in_layer, &self.vector_in.out_layer]);
        if let Some(g) = &self.guidance_in {
            out.extend([&g.in_layer, &g.out_layer]);
        }
        out.push(&self.txt_in);
        for b in &self.double_blocks {
            for s in [&b.img, &b.txt] {
                out.extend([&s.modulation, &s.qkv, &s.proj, &s.mlp_in, &s.mlp_out]);
            }
        }
        for b in &self.single_blocks {
            out.extend([&b.linear1, &b.linear2, &b.modulation]);
        }
        out.extend([&self.final_layer.linear, &self.final_layer.ada_ln]);
        out
    }

    /// Every weight under its BFL name, with `adapters` merged into the linears
    /// (W + Σ sᵢ·ΔWᵢ): the base for `lora merge` and for exporting a fine-tune.
    pub(crate) fn merged_weights(&self, adapters: &AdapterSet) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        for l in self.linears() {
            out.push((
                format!("{}.weight", l.module()),
                adapters.merged_weight(l.module(), l.weight())?,
            ));
            if let Some(b) = l.bias() {
                out.push((format!("{}.bias", l.module()), b.clone()));
            }
        }
        let norms = |prefix: String, q: &Tensor, k: &Tensor| {
            [
                (format!("{prefix}.query_norm.scale"), q.clone()),
                (format!("{prefix}.key_norm.scale"), k.clone()),
            ]
        };
        for (i, b) in self.double_blocks.iter().enumerate() {
            for (s, st) in [("img", &b.img), ("txt", &b.txt)] {
                out.extend(norms(
                    format!("double_blocks.{i}.{s}_attn.norm"),
                    &st.query_norm,
                    &st.key_norm,
                ));
            }
        }
        for (i, b) in self.single_blocks.iter().enumerate() {
            out.extend(norms(
                format!("single_blocks.{i}.norm"),
                &b.query_norm,
                &b.key_norm,
            ));
        }
        Ok(out)
    }

    /// Every weight as a `Var` with its BFL name, when the model was built with
    /// [`Flux::new_trainable`]; `None` otherwise.
    pub(crate) fn trainable_weights(&self) -> Result<Option<Vec<(String, candle_core::Var)>>> {
        let weights = self.merged_weights(&AdapterSet::none())?;
        if !weights.iter().all(|(_, t)| t.is_variable()) {
            return Ok(None);
        }
        weights
            .into_iter()
            .map(|(n, t)| Ok((n, candle_core::Var::from_tensor(&t)?)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Input embeddings and RoPE: the state before the first block.
    pub(crate) fn embed(&self, inp: &FluxInputs, ad: &AdapterSet) -> Result<Embedded> {
        let dtype = self.dtype;
        let img = self.img_in.forward(&inp.img.to_dtype(dtype)?, ad)?;
        let txt = self.txt_in.forward(&inp.txt.to_dtype(dtype)?, ad)?;
        let t_emb = timestep_embedding(inp.timesteps, 256)?.to_dtype(dtype)?;
        let mut vec = self.time_in.forward(&t_emb, ad)?;
        if let Some(g_in) = &self.guidance_in {
            let g = inp.guidance.ok_or_else(|| {
                candle_core::Error::msg(
                    "this model is guidance-distilled (dev): a guidance value is required",
                )
            })?;
            let g_emb = timestep_embedding(g, 256)?.to_dtype(dtype)?;
            vec = (vec + g_in.forward(&g_emb, ad)?)?;
        }
        vec = (vec + self.vector_in.forward(&inp.y.to_dtype(dtype)?, ad)?)?;
        let ids = Tensor::cat(&[inp.txt_ids, inp.img_ids], 1)?;
        let pe = Rope::new(&ids, &self.cfg.axes_dim, self.cfg.theta)?;
        Ok(Embedded { img, txt, vec, pe })
    }

    /// The final layer on the image tokens of the joint sequence.
    pub(crate) fn head(
        &self,
        x: &Tensor,
        n_txt: usize,
        vec: &Tensor,
        ad: &AdapterSet,
    ) -> Result<Tensor> {
        let n_img = x.dim(1)? - n_txt;
        let img = x.narrow(1, n_txt, n_img)?;
        self.final_layer.forward(&img, vec, ad)
    }

    /// The velocity prediction (b, n_img, in_channels) for `inp` with `adapters` applied.
    pub fn forward(&self, inp: &FluxInputs, adapters: &AdapterSet) -> Result<Tensor> {
        let Embedded {
            mut img,
            mut txt,
            vec,
            pe,
        } = self.embed(inp, adapters)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &vec, &pe, adapters)?;
        }
        let n_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            x = block.forward(&x, &vec, &pe, adapters)?;
        }
        self.head(&x, n_txt, &vec, adapters)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::adapter::{Lora, LoraLayer};
    use crate::model::seeded::SeededRng;
    use crate::testing::rel_err;
    use candle_core::Var;
    use std::sync::Arc;

    fn tiny_config(guidance: bool) -> FluxConfig {
        FluxConfig {
            in_channels: 8,
            vec_in_dim: 12,
            context_in_dim: 10,
            hidden_size: 32,
            mlp_ratio: 2.0,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 1,
            axes_dim: vec![4, 6, 6],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: guidance,
        }
    }

    struct Batch {
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        y: Tensor,
        g: Tensor,
    }

    fn batch(cfg: &FluxConfig, dev: &Device) -> Result<Batch> {
        let mut rng = SeededRng::new(3);
        Ok(Batch {
            img: rng.randn((2, 6, cfg.in_channels), dev)?,
            img_ids: image_ids(2, 2, 3, dev)?,
            txt: rng.randn((2, 4, cfg.context_in_dim), dev)?,
            txt_ids: text_ids(2, 4, dev)?,
            t: Tensor::new(&[0.3f32, 0.9], dev)?,
            y: rng.randn((2, cfg.vec_in_dim), dev)?,
            g: Tensor::new(&[3.5f32, 1.0], dev)?,
        })
    }

    impl Batch {
        fn inputs(&self) -> FluxInputs<'_> {
            FluxInputs {
                img: &self.img,
                img_ids: &self.img_ids,
                txt: &self.txt,
                txt_ids: &self.txt_ids,
                timesteps: &self.t,
                y: &self.y,
                guidance: Some(&self.g),
            }
        }
    }

    /// A LoRA of Vars on every linear, with non-zero up so every path is live.
    type LoraVars = Vec<(String, Var, Var)>;

    fn var_lora(model: &Flux, dev: &Device) -> Result<(Lora, LoraVars)> {
        let mut lora = Lora::new("trainable");
        let mut vars = vec![];
        let mut rng = SeededRng::new(11);
        for (module, &(out_f, in_f)) in model.linear_shapes() {
            let down = Var::from_tensor(&(rng.randn((2, in_f), dev)? * 0.1)?)?;
            let up = Var::from_tensor(&(rng.randn((out_f, 2), dev)? * 0.1)?)?;
            lora.layers.insert(
                module.clone(),
                LoraLayer {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                    alpha: 1.0,
                },
            );
            vars.push((module.clone(), down, up));
        }
        Ok((lora, vars))
    }

    #[test]
    fn forward_shapes_and_guidance_requirement() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(true);
        let model = Flux::new(&cfg, &WeightSource::Seeded(1), DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let out = model.forward(&b.inputs(), &AdapterSet::none())?;
        assert_eq!(out.dims(), &[2, 6, cfg.in_channels]);
        let mut no_guidance = b.inputs();
        no_guidance.guidance = None;
        let err = model
            .forward(&no_guidance, &AdapterSet::none())
            .unwrap_err();
        assert!(err.to_string().contains("guidance"), "{err}");
        Ok(())
    }

    #[test]
    fn fused_inference_path_matches_differentiable_path() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(true);
        let model = Flux::new(&cfg, &WeightSource::Seeded(1), DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let fused = model.forward(&b.inputs(), &AdapterSet::none())?;
        // Making the input a Var routes every op through the differentiable forms.
        let img = Var::from_tensor(&b.img)?;
        let mut inputs = b.inputs();
        inputs.img = img.as_tensor();
        let slow = model.forward(&inputs, &AdapterSet::none())?;
        let err = rel_err(&slow, &fused);
        assert!(err < 1e-5, "fused vs differentiable: {err}");
        Ok(())
    }

    #[test]
    fn every_adapter_tensor_receives_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(true);
        let model = Flux::new(&cfg, &WeightSource::Seeded(1), DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let (lora, vars) = var_lora(&model, &dev)?;
        let adapters = AdapterSet::none().with(Arc::new(lora), 1.0);
        let out = model.forward(&b.inputs(), &adapters)?;
        let grads = out.sqr()?.mean_all()?.backward()?;
        assert_eq!(vars.len(), model.linears().len());
        for (module, down, up) in &vars {
            for (which, var) in [("down", down), ("up", up)] {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{module}.{which}: no gradient"));
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0, "{module}.{which}: zero gradient");
            }
        }
        Ok(())
    }

    #[test]
    fn adapter_strength_zero_is_the_base_and_merge_equals_unmerged() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_config(false);
        let source = WeightSource::Seeded(5);
        let model = Flux::new(&cfg, &source, DType::F32, &dev)?;
        let b = batch(&cfg, &dev)?;
        let mut inputs = b.inputs();
        inputs.guidance = None;
        let (lora, _vars) = var_lora(&model, &dev)?;
        let lora = Arc::new(lora);
        let base = model.forward(&inputs, &AdapterSet::none())?;
        let zero = model.forward(&inputs, &AdapterSet::none().with(lora.clone(), 0.0))?;
        assert_eq!(rel_err(&zero, &base), 0.0);
        let set = AdapterSet::none().with(lora, 0.7);
        let unmerged = model.forward(&inputs, &set)?;
        assert!(
            rel_err(&unmerged, &base) > 1e-3,
            "the LoRA must change the output"
        );
        let all: HashMap<String, Tensor> = model.merged_weights(&set)?.into_iter().collect();
        let merged = Flux::new(&cfg, &WeightSource::Tensors(all), DType::F32, &dev)?;
        let out = merged.forward(&inputs, &AdapterSet::none())?;
        let err = rel_err(&out, &unmerged);
        assert!(err < 1e-5, "merged vs unmerged: {err}");
        Ok(())
    }
}
