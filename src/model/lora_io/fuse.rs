//! Fusing and splitting: diffusers (and kohya split-qkv) files hold q, k, v (and the
//! single blocks' MLP input) as separate low-rank pairs, BFL has one fused linear.
//! [`build_layer`] turns the parts found for one BFL module into one [`LoraLayer`] on
//! the fused linear; [`split_layer`] cuts such a layer back into per-module parts.
//! Both directions keep the update exact: a file read and written back gives the
//! same tensors bit for bit.

use candle_core::{DType, Tensor};

use super::LoraIoError;
use crate::model::adapter::LoraLayer;
use crate::model::keymap::{self, LinearMap, RowLayout};

/// One low-rank pair with its alpha, shapes checked.
#[derive(Clone)]
pub(super) struct Part {
    pub(super) key: String,
    pub(super) down: Tensor,
    pub(super) up: Tensor,
    pub(super) alpha: f32,
    pub(super) rank: usize,
    pub(super) in_f: usize,
    pub(super) out: usize,
}

/// The parts found for one BFL module.
pub(super) enum Gathered {
    /// The fused BFL tensors themselves.
    Whole(Part),
    /// Parts in BFL row order (diffusers modules or kohya split parts); `None` where
    /// a part is absent.
    Parts(Vec<Option<Part>>),
}

impl Gathered {
    pub(super) fn first_key(&self) -> String {
        match self {
            Gathered::Whole(p) => p.key.clone(),
            Gathered::Parts(v) => v
                .iter()
                .flatten()
                .next()
                .map(|p| p.key.clone())
                .unwrap_or_default(),
        }
    }
}

/// True when two tensors hold the same values bit for bit (same shape and dtype).
fn identical(a: &Tensor, b: &Tensor) -> candle_core::Result<bool> {
    if a.id() == b.id() {
        return Ok(true);
    }
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    let va = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let vb = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// True when every element is +0.0.
fn all_plus_zero(t: &Tensor) -> candle_core::Result<bool> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.iter().all(|x| x.to_bits() == 0))
}

/// The layer on the fused BFL linear `map.bfl` from the parts gathered for it: whole BFL
/// tensors as they are, a diffusers `norm_out` with its halves swapped back, q/k/v(/mlp)
/// parts [fused](fuse).
pub(super) fn build_layer(
    map: &LinearMap,
    gathered: Gathered,
    file: &str,
) -> Result<LoraLayer, LoraIoError> {
    let terr = |source| LoraIoError::Tensor {
        file: file.to_string(),
        source,
    };
    let parts = match gathered {
        // BFL tensors: already in the model's layout.
        Gathered::Whole(p) => {
            return Ok(LoraLayer {
                down: p.down,
                up: p.up,
                alpha: p.alpha,
            })
        }
        Gathered::Parts(parts) => parts,
    };
    match map.layout {
        RowLayout::Same | RowLayout::SwappedHalves => {
            let Some(Some(p)) = parts.into_iter().next() else {
                return Err(LoraIoError::UnknownModule {
                    file: file.to_string(),
                    module: map.bfl.clone(),
                });
            };
            let up = if map.layout == RowLayout::SwappedHalves {
                if p.out % 2 != 0 {
                    return Err(LoraIoError::BadTensor {
                        file: file.to_string(),
                        key: p.key,
                        reason: format!(
                            "{} rows cannot be split into (scale, shift) halves",
                            p.out
                        ),
                    });
                }
                keymap::swap_halves(&p.up).map_err(terr)?
            } else {
                p.up
            };
            Ok(LoraLayer {
                down: p.down,
                up,
                alpha: p.alpha,
            })
        }
        RowLayout::Qkv | RowLayout::QkvMlp => fuse(map, parts, file),
    }
}

/// Fuses the parts of a q/k/v(/mlp) module into one layer on the fused BFL linear.
///
/// If every present part has the same down matrix and alpha, that down is kept and
/// the ups are stacked (missing parts get zero rows). Otherwise the downs are stacked
/// and each up is placed block-diagonally; when all parts share rank and alpha the
/// fused alpha is n·alpha (same scale, no arithmetic on weights), else each part's
/// alpha/rank is folded into its up block and the fused alpha is the total rank.
fn fuse(map: &LinearMap, parts: Vec<Option<Part>>, file: &str) -> Result<LoraLayer, LoraIoError> {
    let terr = |source| LoraIoError::Tensor {
        file: file.to_string(),
        source,
    };
    let present: Vec<&Part> = parts.iter().flatten().collect();
    let Some(first) = present.first() else {
        return Err(LoraIoError::UnknownModule {
            file: file.to_string(),
            module: map.bfl.clone(),
        });
    };
    let bad = |p: &Part, reason: String| LoraIoError::BadTensor {
        file: file.to_string(),
        key: p.key.clone(),
        reason,
    };
    let in_f = first.in_f;
    for p in &present {
        if p.in_f != in_f {
            return Err(bad(
                p,
                format!("{} input features, but `{}` has {in_f}", p.in_f, first.key),
            ));
        }
    }
    // Rows of each part.
    let qkv: Vec<&Part> = parts.iter().take(3).flatten().collect();
    let qkv_rows = match qkv.first() {
        Some(p) => p.out,
        None => in_f,
    };
    for p in &qkv {
        if p.out != qkv_rows {
            return Err(bad(
                p,
                format!(
                    "{} rows, but q/k/v parts need equal rows ({qkv_rows})",
                    p.out
                ),
            ));
        }
    }
    let sizes: Vec<usize> = match map.layout {
        RowLayout::QkvMlp => {
            let mlp = parts
                .get(3)
                .and_then(|p| p.as_ref().map(|p| p.out))
                .unwrap_or(keymap::FLUX_MLP_RATIO * in_f);
            vec![qkv_rows, qkv_rows, qkv_rows, mlp]
        }
        _ => vec![qkv_rows; parts.len()],
    };
    let same_dtype = present
        .iter()
        .all(|p| p.down.dtype() == first.down.dtype() && p.up.dtype() == first.down.dtype());
    let dtype = if same_dtype {
        first.down.dtype()
    } else {
        DType::F32
    };
    let dev = first.down.device().clone();

    let mut shared = true;
    for p in &present[1..] {
        if p.alpha != first.alpha || !identical(&p.down, &first.down).map_err(terr)? {
            shared = false;
            break;
        }
    }
    if shared {
        let r = first.rank;
        let mut ups = Vec::with_capacity(parts.len());
        for (p, s) in parts.iter().zip(&sizes) {
            ups.push(match p {
                Some(p) => p.up.to_dtype(dtype).map_err(terr)?,
                None => Tensor::zeros((*s, r), dtype, &dev).map_err(terr)?,
            });
        }
        return Ok(LoraLayer {
            down: first.down.to_dtype(dtype).map_err(terr)?,
            up: Tensor::cat(&ups, 0).map_err(terr)?,
            alpha: first.alpha,
        });
    }

    let uniform = present
        .iter()
        .all(|p| p.rank == first.rank && p.alpha == first.alpha);
    let dtype = if uniform { dtype } else { DType::F32 };
    let total: usize = present.iter().map(|p| p.rank).sum();
    let downs = present
        .iter()
        .map(|p| p.down.to_dtype(dtype))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(terr)?;
    let mut rows = Vec::with_capacity(parts.len());
    let mut col = 0;
    for (p, s) in parts.iter().zip(&sizes) {
        let Some(p) = p else {
            rows.push(Tensor::zeros((*s, total), dtype, &dev).map_err(terr)?);
            continue;
        };
        let mut up = p.up.to_dtype(dtype).map_err(terr)?;
        if !uniform {
            up = up
                .affine(p.alpha as f64 / p.rank as f64, 0.0)
                .map_err(terr)?;
        }
        let mut pieces = Vec::with_capacity(3);
        if col > 0 {
            pieces.push(Tensor::zeros((*s, col), dtype, &dev).map_err(terr)?);
        }
        pieces.push(up);
        let right = total - col - p.rank;
        if right > 0 {
            pieces.push(Tensor::zeros((*s, right), dtype, &dev).map_err(terr)?);
        }
        rows.push(Tensor::cat(&pieces, 1).map_err(terr)?);
        col += p.rank;
    }
    let alpha = if uniform {
        first.alpha * present.len() as f32
    } else {
        total as f32
    };
    Ok(LoraLayer {
        down: Tensor::cat(&downs, 0).map_err(terr)?,
        up: Tensor::cat(&rows, 0).map_err(terr)?,
        alpha,
    })
}

/// One diffusers module's share of a fused layer.
pub(super) struct Component {
    pub(super) module: String,
    pub(super) down: Tensor,
    pub(super) up: Tensor,
    pub(super) alpha: f32,
}

/// Splits a BFL layer into its diffusers modules. Block-diagonal ups (kohya's
/// split-qkv files, fused diffusers files) are written compactly, each part with its
/// own down rows and alpha / n; otherwise every part shares the down and gets its
/// rows of the up (q/k/v parts whose rows are all zero are left out). Both read back to
/// the same fused layer bit for bit.
pub(super) fn split_layer(
    map: &LinearMap,
    layer: &LoraLayer,
) -> candle_core::Result<Vec<Component>> {
    match map.layout {
        RowLayout::Same => {
            return Ok(vec![Component {
                module: map.diffusers[0].clone(),
                down: layer.down.clone(),
                up: layer.up.clone(),
                alpha: layer.alpha,
            }])
        }
        RowLayout::SwappedHalves => {
            return Ok(vec![Component {
                module: map.diffusers[0].clone(),
                down: layer.down.clone(),
                up: keymap::swap_halves(&layer.up)?,
                alpha: layer.alpha,
            }])
        }
        RowLayout::Qkv | RowLayout::QkvMlp => {}
    }
    let (rank, in_f) = layer.down.dims2()?;
    let (out, _) = layer.up.dims2()?;
    let rows = map
        .layout
        .part_rows(out, in_f)
        .map_err(candle_core::Error::Msg)?;
    let n = rows.len();

    // Block-diagonal: part j only uses columns j·c .. (j+1)·c.
    let alpha_part = layer.alpha / n as f32;
    if rank % n == 0 && alpha_part * n as f32 == layer.alpha {
        let c = rank / n;
        let mut block_diagonal = true;
        'check: for (j, r) in rows.iter().enumerate() {
            let block = layer.up.narrow(0, r.start, r.len())?;
            for k in 0..n {
                if k != j && !all_plus_zero(&block.narrow(1, k * c, c)?)? {
                    block_diagonal = false;
                    break 'check;
                }
            }
        }
        if block_diagonal {
            let mut parts = Vec::with_capacity(n);
            for (j, r) in rows.iter().enumerate() {
                parts.push(Component {
                    module: map.diffusers[j].clone(),
                    down: layer.down.narrow(0, j * c, c)?,
                    up: layer.up.narrow(0, r.start, r.len())?.narrow(1, j * c, c)?,
                    alpha: alpha_part,
                });
            }
            return Ok(parts);
        }
    }

    let mut parts = Vec::with_capacity(n);
    let mut zero = Vec::with_capacity(n);
    for (j, r) in rows.iter().enumerate() {
        let up = layer.up.narrow(0, r.start, r.len())?;
        // The MLP part is always written: a reader cannot infer its size.
        let is_mlp = map.layout == RowLayout::QkvMlp && j == 3;
        zero.push(!is_mlp && all_plus_zero(&up)?);
        parts.push(Component {
            module: map.diffusers[j].clone(),
            down: layer.down.clone(),
            up,
            alpha: layer.alpha,
        });
    }
    if zero.iter().all(|z| *z) {
        return Ok(parts);
    }
    Ok(parts
        .into_iter()
        .zip(zero)
        .filter(|(_, z)| !z)
        .map(|(p, _)| p)
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::model::lora_io::read::scalar;
    use crate::model::lora_io::test_support::*;
    use crate::model::lora_io::{load, parse, save_diffusers, save_kohya, LoraFormat};

    #[test]
    fn kohya_to_diffusers_to_kohya_is_bit_exact() {
        for dtype in [DType::F32, DType::BF16] {
            let original: HashMap<String, Tensor> = kohya_file_tensors()
                .into_iter()
                .map(|(k, t)| {
                    let t = if k.ends_with(".alpha") {
                        t
                    } else {
                        t.to_dtype(dtype).unwrap()
                    };
                    (k, t)
                })
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let f = parse(original.clone(), BTreeMap::new(), "orig").unwrap();
            let dpath = dir.path().join("d.safetensors");
            save_diffusers(&dpath, &f.lora, &BTreeMap::new(), dtype).unwrap();
            let d = load(&dpath, &dev()).unwrap();
            assert_eq!(d.format, LoraFormat::Diffusers);
            assert!(d.unmatched.is_empty(), "{:?}", d.unmatched);
            let (raw_d, _) = read_raw(&dpath);
            // Compact block-diagonal parts, zero v part left out.
            assert_eq!(
                raw_d["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"].dims(),
                &[1, H]
            );
            assert!(!raw_d
                .contains_key("transformer.transformer_blocks.1.attn.add_v_proj.lora_A.weight"));

            let kpath = dir.path().join("k.safetensors");
            save_kohya(&kpath, &d.lora, &BTreeMap::new(), dtype).unwrap();
            let (back, md) = read_raw(&kpath);
            assert!(md.contains_key("sshs_model_hash"));
            let mut want_keys: Vec<_> = original.keys().cloned().collect();
            let mut got_keys: Vec<_> = back.keys().cloned().collect();
            want_keys.sort();
            got_keys.sort();
            assert_eq!(got_keys, want_keys, "{dtype:?}");
            for (k, t) in &original {
                assert_eq!(bits(&back[k]), bits(t), "{dtype:?} {k}");
            }
        }
    }

    #[test]
    fn diffusers_to_kohya_to_diffusers_keeps_separate_downs() {
        // ai-toolkit style: q, k, v each with their own down, no alpha.
        let mut sd = HashMap::new();
        for (j, p) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            sd.insert(
                format!("transformer.transformer_blocks.2.attn.{p}.lora_A.weight"),
                mat(R, H, 10 + j as u32),
            );
            sd.insert(
                format!("transformer.transformer_blocks.2.attn.{p}.lora_B.weight"),
                mat(H, R, 20 + j as u32),
            );
        }
        let f = parse(sd.clone(), BTreeMap::new(), "a").unwrap();
        let l = &f.lora.layers["double_blocks.2.img_attn.qkv"];
        assert_eq!(l.rank(), 3 * R);
        assert_eq!(l.alpha, (3 * R) as f32);
        let dir = tempfile::tempdir().unwrap();
        let kpath = dir.path().join("k.safetensors");
        save_kohya(&kpath, &f.lora, &BTreeMap::new(), DType::F32).unwrap();
        let k = load(&kpath, &dev()).unwrap();
        let dpath = dir.path().join("d.safetensors");
        save_diffusers(&dpath, &k.lora, &BTreeMap::new(), DType::F32).unwrap();
        let (back, _) = read_raw(&dpath);
        for (key, t) in &sd {
            assert_eq!(bits(&back[key]), bits(t), "{key}");
            let alpha = key
                .replace(".lora_A.weight", ".alpha")
                .replace(".lora_B.weight", ".alpha");
            assert_eq!(scalar(&back[&alpha]).unwrap(), R as f32);
        }
    }

    #[test]
    fn fused_update_equals_the_parts_on_their_rows() {
        // linear1 from diffusers parts with different downs, ranks and alphas; k missing.
        let parts = [
            ("attn.to_q", 2usize, 1.0f32, H, 0usize),
            ("attn.to_v", 3, 6.0, H, 2 * H),
            ("proj_mlp", 1, 0.5, 4 * H, 3 * H),
        ];
        let mut sd = HashMap::new();
        for (i, (name, r, alpha, out, _)) in parts.iter().enumerate() {
            let p = format!("transformer.single_transformer_blocks.0.{name}");
            sd.insert(format!("{p}.lora_A.weight"), mat(*r, H, 100 + i as u32));
            sd.insert(format!("{p}.lora_B.weight"), mat(*out, *r, 200 + i as u32));
            sd.insert(format!("{p}.alpha"), scalar_t(*alpha));
        }
        let f = parse(sd.clone(), BTreeMap::new(), "s").unwrap();
        let l = &f.lora.layers["single_blocks.0.linear1"];
        assert_eq!(l.in_out(), (H, 7 * H));
        assert_eq!(l.rank(), 6);
        assert_eq!(l.alpha, 6.0);
        let delta = l.delta_weight().unwrap();
        for (name, _, alpha, out, start) in parts {
            let p = format!("transformer.single_transformer_blocks.0.{name}");
            let want = part_delta(
                &sd[&format!("{p}.lora_A.weight")],
                &sd[&format!("{p}.lora_B.weight")],
                alpha,
            );
            assert_close(&rows(&delta, start, out), &want, name);
        }
        assert_close(&rows(&delta, H, H), &zeros(H, H), "missing k");

        // Same parts through a kohya file and back: the update is unchanged.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.safetensors");
        save_kohya(&path, &f.lora, &BTreeMap::new(), DType::F32).unwrap();
        let k = load(&path, &dev()).unwrap();
        assert_close(
            &k.lora.layers["single_blocks.0.linear1"]
                .delta_weight()
                .unwrap(),
            &delta,
            "kohya",
        );
        let path = dir.path().join("d.safetensors");
        save_diffusers(&path, &k.lora, &BTreeMap::new(), DType::F32).unwrap();
        let d = load(&path, &dev()).unwrap();
        assert_close(
            &d.lora.layers["single_blocks.0.linear1"]
                .delta_weight()
                .unwrap(),
            &delta,
            "diffusers",
        );
    }

    #[test]
    fn shared_down_parts_fuse_by_stacking_ups() {
        let down = mat(R, H, 1);
        let mut sd = HashMap::new();
        for (j, p) in ["add_q_proj", "add_k_proj"].iter().enumerate() {
            sd.insert(
                format!("transformer.transformer_blocks.0.attn.{p}.lora_A.weight"),
                down.clone(),
            );
            sd.insert(
                format!("transformer.transformer_blocks.0.attn.{p}.lora_B.weight"),
                mat(H, R, 5 + j as u32),
            );
        }
        let f = parse(sd.clone(), BTreeMap::new(), "s").unwrap();
        let l = &f.lora.layers["double_blocks.0.txt_attn.qkv"];
        assert_eq!(l.rank(), R);
        assert_eq!(l.alpha, R as f32);
        assert_eq!(bits(&l.down), bits(&down));
        let d = l.delta_weight().unwrap();
        let want_k = part_delta(
            &down,
            &sd["transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight"],
            R as f32,
        );
        assert_close(&rows(&d, H, H), &want_k, "k");
        assert_close(&rows(&d, 2 * H, H), &zeros(H, H), "v");
    }

    #[test]
    fn kohya_split_parts_keep_their_training_scale() {
        // `lora_down.N` / `lora_up.N`: each part rank 2 with the module's alpha 1.
        let mut sd = HashMap::new();
        let k = "lora_unet_double_blocks_0_img_attn_qkv";
        for j in 0..3 {
            sd.insert(format!("{k}.lora_down.{j}.weight"), mat(R, H, 30 + j));
            sd.insert(format!("{k}.lora_up.{j}.weight"), mat(H, R, 40 + j));
        }
        sd.insert(format!("{k}.alpha"), scalar_t(1.0));
        let f = parse(sd.clone(), BTreeMap::new(), "split").unwrap();
        assert_eq!(f.format, LoraFormat::Kohya);
        let l = &f.lora.layers["double_blocks.0.img_attn.qkv"];
        assert_eq!(l.alpha, 3.0);
        let d = l.delta_weight().unwrap();
        for j in 0..3usize {
            let want = part_delta(
                &sd[&format!("{k}.lora_down.{j}.weight")],
                &sd[&format!("{k}.lora_up.{j}.weight")],
                1.0,
            );
            assert_close(&rows(&d, j * H, H), &want, "split part");
        }
    }
}
