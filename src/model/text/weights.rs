//! Reading real text-encoder weights: ComfyUI single files (fp16/bf16/fp8, scaled
//! fp8) and diffusers folders (shards + `config.json`), under whatever prefix the
//! file uses, with the T5 and CLIP configs read off the tensor shapes when no
//! `config.json` says them.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::init::Init;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation as ClipActivation, ClipTextConfig};
use candle_transformers::models::t5::{self, ActivationWithOptionalGating, T5EncoderModel};

use crate::model::clip::ClipText;

/// Tensors of one or more safetensors files, found under `prefix`, with fp8
/// weights upcast on load: read on the CPU, NaNs zeroed (as ComfyUI does for
/// fp8 T5), multiplied by a per-tensor `scale_weight` / `weight_scale` when
/// the file has one (ComfyUI "scaled fp8"), then cast and moved.
struct Checkpoint {
    st: MmapedSafetensors,
    prefix: String,
    what: String,
}

impl Checkpoint {
    fn open(files: &[PathBuf], what: &str) -> Result<Self> {
        if files.is_empty() {
            bail!("{what}: no .safetensors file found");
        }
        // SAFETY: the files are memory-mapped read-only; like every mmap user
        // we rely on no one truncating them while the model is loaded.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            candle_core::Error::Msg(format!("{what}: cannot read {}: {e}", show(files)))
        })?;
        Ok(Self {
            st,
            prefix: String::new(),
            what: format!("{what} {}", show(files)),
        })
    }

    /// Sets the prefix to whatever stands before `marker` in the file's keys
    /// (e.g. `text_encoders.t5xxl.transformer.`), or errors naming the marker.
    fn find_prefix(&mut self, marker: &str) -> Result<()> {
        let mut found = None;
        for (name, _) in self.st.tensors() {
            if let Some(p) = name.strip_suffix(marker) {
                if found.as_ref().is_none_or(|f: &String| p.len() < f.len()) {
                    found = Some(p.to_string());
                }
            }
        }
        match found {
            Some(p) => {
                self.prefix = p;
                Ok(())
            }
            None => bail!(
                "{}: no tensor named …{marker}; is this the right file?",
                self.what
            ),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st
            .get(&format!("{}{name}", self.prefix))
            .ok()
            .map(|v| v.shape().to_vec())
    }

    fn need_shape(&self, name: &str) -> Result<Vec<usize>> {
        self.shape(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: missing tensor {}{name}",
                self.what, self.prefix
            ))
        })
    }

    fn count(&self, pattern: impl Fn(usize) -> String) -> usize {
        (0..)
            .take_while(|&i| self.shape(&pattern(i)).is_some())
            .count()
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let key = format!("{}{name}", self.prefix);
        let view = self
            .st
            .get(&key)
            .map_err(|_| candle_core::Error::Msg(format!("{}: missing tensor {key}", self.what)))?;
        let stored = DType::try_from(view.dtype()).ok();
        let ctx = |e: candle_core::Error| {
            candle_core::Error::Msg(format!("{}: tensor {key}: {e}", self.what))
        };
        if stored == Some(DType::F8E4M3) {
            let t = self.st.load(&key, &Device::Cpu).map_err(ctx)?;
            let t = t.to_dtype(DType::F32).map_err(ctx)?;
            let zeros = t.zeros_like()?;
            let mut t = t.ne(&t)?.where_cond(&zeros, &t)?;
            let stem = key.strip_suffix(".weight").unwrap_or(&key);
            for scale_key in [
                format!("{stem}.scale_weight"),
                format!("{stem}.weight_scale"),
            ] {
                if self.st.get(&scale_key).is_ok() {
                    let s = self
                        .st
                        .load(&scale_key, &Device::Cpu)?
                        .to_dtype(DType::F32)?;
                    if s.elem_count() != 1 {
                        bail!(
                            "{}: {scale_key} has {} elements; only per-tensor fp8 scales are supported",
                            self.what,
                            s.elem_count()
                        );
                    }
                    t = t.broadcast_mul(&s.flatten_all()?)?;
                }
            }
            t.to_dtype(dtype)?.to_device(dev)
        } else {
            self.st.load(&key, dev).map_err(ctx)?.to_dtype(dtype)
        }
    }
}

impl SimpleBackend for Checkpoint {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            bail!(
                "{}: tensor {}{name} has shape {:?}, the model expects {:?}",
                self.what,
                self.prefix,
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.st.get(&format!("{}{name}", self.prefix)).is_ok()
    }
}

fn show(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        many => format!(
            "{} (+{} more)",
            many.first()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            many.len().saturating_sub(1)
        ),
    }
}

/// The safetensors files of a model: the file itself, or every `*.safetensors`
/// in a folder (diffusers shards), sorted.
fn safetensors_files(path: &Path, what: &str) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("{what}: {} does not exist", path.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{what}: no .safetensors file in {}", path.display());
    }
    Ok(files)
}

fn read_json(path: &Path, what: &str) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(format!("{what}: {}: {e}", path.display())))
}

pub(super) fn load_t5(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(T5EncoderModel, t5::Config)> {
    let what = "T5 encoder";
    let mut ckpt = Checkpoint::open(&safetensors_files(path, what)?, what)?;
    ckpt.find_prefix("encoder.final_layer_norm.weight")?;
    let config_json = if path.is_dir() {
        read_json(&path.join("config.json"), what)?
    } else {
        None
    };
    let cfg = match config_json {
        Some(json) => serde_json::from_value::<t5::Config>(json).map_err(|e| {
            candle_core::Error::Msg(format!("{what}: {}/config.json: {e}", path.display()))
        })?,
        None => infer_t5_config(&ckpt)?,
    };
    let vb = VarBuilder::from_backend(Box::new(ckpt), dtype, device.clone());
    Ok((T5EncoderModel::load(vb, &cfg)?, cfg))
}

/// A T5 v1.1 encoder config read off the tensor shapes (ComfyUI single files
/// carry no config).
fn infer_t5_config(ckpt: &Checkpoint) -> Result<t5::Config> {
    let embed = match ckpt.shape("shared.weight") {
        Some(s) => s,
        None => ckpt.need_shape("encoder.embed_tokens.weight")?,
    };
    let [vocab_size, d_model] = embed[..] else {
        bail!("{}: embedding has shape {embed:?}", ckpt.what);
    };
    let attn = "encoder.block.0.layer.0.SelfAttention";
    let bias = ckpt.need_shape(&format!("{attn}.relative_attention_bias.weight"))?;
    let [buckets, num_heads] = bias[..] else {
        bail!("{}: relative_attention_bias has shape {bias:?}", ckpt.what);
    };
    let inner = ckpt.need_shape(&format!("{attn}.q.weight"))?[0];
    let num_layers = ckpt.count(|i| format!("encoder.block.{i}.layer.0.SelfAttention.q.weight"));
    let ff = "encoder.block.0.layer.1.DenseReluDense";
    let (gated, d_ff) = match ckpt.shape(&format!("{ff}.wi_0.weight")) {
        Some(s) => (true, s[0]),
        None => (false, ckpt.need_shape(&format!("{ff}.wi.weight"))?[0]),
    };
    if num_heads == 0 || inner % num_heads != 0 {
        bail!(
            "{}: {inner} attention width for {num_heads} heads",
            ckpt.what
        );
    }
    Ok(t5::Config {
        vocab_size,
        d_model,
        d_kv: inner / num_heads,
        d_ff,
        num_layers,
        num_decoder_layers: None,
        num_heads,
        relative_attention_num_buckets: buckets,
        relative_attention_max_distance: 128,
        dropout_rate: 0.0,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: ActivationWithOptionalGating {
            gated,
            // T5 v1.1 (Flux's T5-XXL) is gated-gelu (tanh form); v1.0 is relu.
            activation: if gated {
                candle_nn::Activation::NewGelu
            } else {
                candle_nn::Activation::Relu
            },
        },
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: false,
        use_cache: false,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: None,
    })
}

pub(super) fn load_clip(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(ClipText, ClipTextConfig)> {
    let what = "CLIP text encoder";
    let mut ckpt = Checkpoint::open(&safetensors_files(path, what)?, what)?;
    ckpt.find_prefix("text_model.final_layer_norm.weight")?;
    let config_json = if path.is_dir() {
        read_json(&path.join("config.json"), what)?
    } else {
        None
    };
    let cfg = infer_clip_config(&ckpt, config_json.as_ref())?;
    let vb = VarBuilder::from_backend(Box::new(ckpt), dtype, device.clone());
    Ok((ClipText::new(vb, &cfg)?, cfg))
}

/// A CLIP text config from the tensor shapes, with the head count and the
/// activation from a diffusers `config.json` when there is one, else one head
/// per 64 channels (true of OpenAI's and OpenCLIP's text towers: L 12, bigG 20).
fn infer_clip_config(
    ckpt: &Checkpoint,
    json: Option<&serde_json::Value>,
) -> Result<ClipTextConfig> {
    let tm = "text_model";
    let tok = ckpt.need_shape(&format!("{tm}.embeddings.token_embedding.weight"))?;
    let [vocab_size, embed_dim] = tok[..] else {
        bail!("{}: token_embedding has shape {tok:?}", ckpt.what);
    };
    let max_position_embeddings =
        ckpt.need_shape(&format!("{tm}.embeddings.position_embedding.weight"))?[0];
    let num_hidden_layers =
        ckpt.count(|i| format!("{tm}.encoder.layers.{i}.self_attn.q_proj.weight"));
    let intermediate_size = ckpt.need_shape(&format!("{tm}.encoder.layers.0.mlp.fc1.weight"))?[0];
    let mut num_attention_heads = embed_dim / 64;
    if let Some(json) = json {
        if let Some(h) = json.get("num_attention_heads").and_then(|v| v.as_u64()) {
            num_attention_heads = h as usize;
        }
        if let Some(act) = json.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "quick_gelu" {
                bail!(
                    "{}: hidden_act {act:?} is not supported (only quick_gelu, as CLIP-L)",
                    ckpt.what
                );
            }
        }
    }
    if num_attention_heads == 0 || embed_dim % num_attention_heads != 0 {
        bail!(
            "{}: cannot split {embed_dim} channels into heads",
            ckpt.what
        );
    }
    Ok(ClipTextConfig {
        vocab_size,
        embed_dim,
        activation: ClipActivation::QuickGelu,
        intermediate_size,
        max_position_embeddings,
        pad_with: None,
        num_hidden_layers,
        num_attention_heads,
        projection_dim: embed_dim,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::adapter::AdapterSet;
    use crate::model::text::test_support::{write_tiny_clip_vocab, write_word_tokenizer_json};
    use crate::model::text::{tiny_t5_config, TextEncoderPaths, TextEncoders};
    use crate::testing::max_abs_diff;

    /// Writes the tiny encoders' tensors as a ComfyUI-style fp8 T5 single file
    /// and a diffusers-style CLIP folder, and checks that `load` reads them
    /// back and computes what the originals compute.
    #[test]
    fn load_reads_real_layouts_and_upcasts_fp8() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().expect("tempdir");
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let tiny = TextEncoders::tiny_from_varbuilder(vb)?;
        // Deterministic values (VarMap's own init is random, and zero for T5's
        // layer norms).
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            let t = if name.ends_with("layer_norm.weight") {
                var.ones_like()?
            } else {
                (crate::model::seeded::SeededRng::for_name(11, name).randn(var.shape(), &dev)?
                    * 0.3)?
            };
            var.set(&t)?;
        }
        let mut t5_tensors = HashMap::new();
        let mut clip_tensors = HashMap::new();
        for (name, var) in varmap.data().lock().expect("varmap").iter() {
            let t = var.as_tensor().clone();
            if let Some(rest) = name.strip_prefix("t5.") {
                t5_tensors.insert(rest.to_string(), t.to_dtype(DType::F8E4M3)?);
            } else if let Some(rest) = name.strip_prefix("clip_l.") {
                clip_tensors.insert(rest.to_string(), t.to_dtype(DType::F16)?);
            }
        }
        // ComfyUI's scaled-fp8 marker tensors must not confuse the loader.
        t5_tensors.insert(
            "scaled_fp8".to_string(),
            Tensor::zeros(2, DType::F8E4M3, &dev)?,
        );
        let t5_file = dir.path().join("t5xxl_fp8_e4m3fn.safetensors");
        candle_core::safetensors::save(&t5_tensors, &t5_file)?;
        let clip_dir = dir.path().join("text_encoder");
        std::fs::create_dir(&clip_dir).expect("mkdir");
        candle_core::safetensors::save(&clip_tensors, clip_dir.join("model.safetensors"))?;
        std::fs::write(
            clip_dir.join("config.json"),
            r#"{"num_attention_heads": 4, "hidden_act": "quick_gelu", "hidden_size": 32}"#,
        )
        .expect("config");
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).expect("mkdir");
        write_tiny_clip_vocab(&tok_dir);
        let t5_tok = dir.path().join("tokenizer.json");
        write_word_tokenizer_json(&t5_tok);

        let mut ckpt = Checkpoint::open(std::slice::from_ref(&t5_file), "T5 encoder")?;
        ckpt.find_prefix("encoder.final_layer_norm.weight")?;
        let mut want_cfg = tiny_t5_config();
        (want_cfg.pad_token_id, want_cfg.eos_token_id) = (0, 1);
        assert_eq!(infer_t5_config(&ckpt)?, want_cfg);

        let paths = TextEncoderPaths {
            t5: t5_file.clone(),
            clip: clip_dir,
            t5_tokenizer: t5_tok,
            clip_tokenizer: tok_dir,
        };
        let enc = TextEncoders::load(&paths, 4, &dev, DType::F32)?;
        assert_eq!(
            (enc.t5_dim(), enc.pooled_dim(), enc.t5_max_len()),
            (32, 32, 4)
        );
        let (t5_ids, clip_ids, trunc) = enc.tokenize("a red dot red")?;
        assert_eq!(t5_ids, vec![5, 9, 12, 1]);
        assert_eq!(trunc.t5_dropped, 1);
        assert_eq!(&clip_ids[..2], &[8, 3]);

        // fp8 weights (NaN-free after upcast) give close T5 outputs.
        let ids = Tensor::new(&[[5u32, 9, 12, 1]], &dev)?;
        let want = tiny.t5.clone().forward(&ids)?;
        let got = enc.t5.clone().forward(&ids)?;
        let scale = want.abs()?.mean_all()?.to_scalar::<f32>()?;
        let err = (&want - &got)?.abs()?.mean_all()?.to_scalar::<f32>()?;
        // (measured 0.17: e4m3 keeps 3 mantissa bits; the loader itself is
        // checked exactly below)
        assert!(err / scale < 0.3, "fp8 round trip too far: {}", err / scale);
        // and the loader itself is exact: stored fp8 values, upcast
        let (name, stored) = t5_tensors.iter().next().expect("a tensor");
        let mut ckpt = Checkpoint::open(std::slice::from_ref(&paths.t5), "T5 encoder")?;
        ckpt.find_prefix("encoder.final_layer_norm.weight")?;
        let loaded = ckpt.load(name, DType::F32, &dev)?;
        assert_eq!(max_abs_diff(&loaded, &stored.to_dtype(DType::F32)?), 0.0);
        // f16 CLIP weights give (nearly) the same hidden states.
        let ids = Tensor::new(&[[8u32, 3, 6, 9, 9]], &dev)?;
        let want = tiny.clip.forward(&ids, &AdapterSet::none())?;
        let got = enc.clip.forward(&ids, &AdapterSet::none())?;
        assert!(max_abs_diff(&want, &got) < 1e-2);
        let out = enc.encode(&["a red dot"])?;
        assert_eq!(out.t5.dims(), &[1, 4, 32]);
        assert_eq!(out.pooled.dims(), &[1, 32]);
        Ok(())
    }

    #[test]
    fn diffusers_t5_config_json_parses() {
        // text_encoder_2/config.json of the FLUX.1 diffusers repos (T5 v1.1 XXL)
        let json = r#"{"architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
            "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
            "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
            "is_encoder_decoder": true, "is_gated_act": true, "layer_norm_epsilon": 1e-06,
            "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
            "output_past": true, "pad_token_id": 0, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": 32, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 32128}"#;
        let cfg: t5::Config = serde_json::from_str(json).expect("config");
        assert_eq!(
            (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv),
            (4096, 24, 64, 64)
        );
        assert!(cfg.feed_forward_proj.gated);
        assert_eq!(
            cfg.feed_forward_proj.activation,
            candle_nn::Activation::NewGelu
        );
    }

    #[test]
    fn fp8_nans_are_zeroed_and_scales_applied() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("w.safetensors");
        // 0x7f is NaN in e4m3fn
        let raw = [0x38u8, 0x7f, 0x40, 0xb8];
        let w = Tensor::from_raw_buffer(&raw, DType::F8E4M3, &[2, 2], &dev)?;
        let mut m = HashMap::new();
        m.insert("x.layer.weight".to_string(), w);
        m.insert(
            "x.layer.scale_weight".to_string(),
            Tensor::new(&[2f32], &dev)?,
        );
        candle_core::safetensors::save(&m, &file)?;
        let mut ckpt = Checkpoint::open(&[file], "test")?;
        ckpt.find_prefix("layer.weight")?;
        assert_eq!(ckpt.prefix, "x.");
        let t = ckpt.load("layer.weight", DType::F32, &dev)?;
        assert_eq!(
            t.flatten_all()?.to_vec1::<f32>()?,
            vec![2.0, 0.0, 4.0, -2.0]
        );
        Ok(())
    }
}
