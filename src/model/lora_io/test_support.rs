//! Fixtures shared by the unit tests of `lora_io`: a reference LoRA in BFL layout,
//! hand-written kohya and diffusers dictionaries of it, and tensor comparisons.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::read::decode;
use crate::model::adapter::{Lora, LoraLayer};

pub(super) const H: usize = 4; // hidden
pub(super) const R: usize = 2; // rank

pub(super) fn dev() -> Device {
    Device::Cpu
}

/// Deterministic, distinct, non-zero values.
pub(super) fn mat(rows: usize, cols: usize, seed: u32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            ((x % 1000) as f32 - 500.0) / 256.0 + 0.001
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &dev()).unwrap()
}

pub(super) fn zeros(rows: usize, cols: usize) -> Tensor {
    Tensor::zeros((rows, cols), DType::F32, &dev()).unwrap()
}

pub(super) fn scalar_t(x: f32) -> Tensor {
    Tensor::new(x, &dev()).unwrap()
}

pub(super) fn rows(t: &Tensor, start: usize, len: usize) -> Tensor {
    t.narrow(0, start, len).unwrap()
}

pub(super) fn bits(t: &Tensor) -> (Vec<usize>, DType, Vec<u64>) {
    let v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (
        t.dims().to_vec(),
        t.dtype(),
        v.iter().map(|x| x.to_bits()).collect(),
    )
}

pub(super) fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// The reference LoRA in BFL layout: (module, in, out, alpha).
pub(super) const MODULES: &[(&str, usize, usize, f32)] = &[
    ("double_blocks.0.img_attn.qkv", H, 3 * H, 4.0),
    ("double_blocks.0.txt_mlp.2", 4 * H, H, 4.0),
    ("single_blocks.1.linear1", H, 7 * H, 4.0),
    ("single_blocks.1.linear2", 5 * H, H, 4.0),
    ("final_layer.adaLN_modulation.1", H, 2 * H, 4.0),
    ("time_in.in_layer", 8, H, 4.0),
];

pub(super) fn reference() -> Lora {
    let mut lora = Lora::new("ref");
    for (i, (m, in_f, out, alpha)) in MODULES.iter().enumerate() {
        lora.layers.insert(
            m.to_string(),
            LoraLayer {
                down: mat(R, *in_f, 2 * i as u32 + 1),
                up: mat(*out, R, 2 * i as u32 + 2),
                alpha: *alpha,
            },
        );
    }
    lora
}

pub(super) fn assert_same_updates(got: &Lora, want: &Lora, what: &str) {
    let got_keys: Vec<_> = got.layers.keys().collect();
    let want_keys: Vec<_> = want.layers.keys().collect();
    assert_eq!(got_keys, want_keys, "{what}: modules");
    for (m, l) in &want.layers {
        let g = &got.layers[m];
        assert_close(
            &g.delta_weight().unwrap(),
            &l.delta_weight().unwrap(),
            &format!("{what}: {m}"),
        );
    }
}

/// Hand-written diffusers names of the reference modules, with the row slices
/// of the BFL up each one takes.
pub(super) fn diffusers_parts(module: &str) -> Vec<(&'static str, usize, usize)> {
    match module {
        "double_blocks.0.img_attn.qkv" => vec![
            ("transformer_blocks.0.attn.to_q", 0, H),
            ("transformer_blocks.0.attn.to_k", H, H),
            ("transformer_blocks.0.attn.to_v", 2 * H, H),
        ],
        "double_blocks.0.txt_mlp.2" => vec![("transformer_blocks.0.ff_context.net.2", 0, H)],
        "single_blocks.1.linear1" => vec![
            ("single_transformer_blocks.1.attn.to_q", 0, H),
            ("single_transformer_blocks.1.attn.to_k", H, H),
            ("single_transformer_blocks.1.attn.to_v", 2 * H, H),
            ("single_transformer_blocks.1.proj_mlp", 3 * H, 4 * H),
        ],
        "single_blocks.1.linear2" => vec![("single_transformer_blocks.1.proj_out", 0, H)],
        "final_layer.adaLN_modulation.1" => vec![("norm_out.linear", 0, 2 * H)],
        "time_in.in_layer" => vec![("time_text_embed.timestep_embedder.linear_1", 0, H)],
        other => panic!("no diffusers names for {other}"),
    }
}

/// diffusers-layout up for a part: norm_out has its halves swapped.
pub(super) fn diffusers_up(module: &str, up: &Tensor, start: usize, len: usize) -> Tensor {
    if module == "final_layer.adaLN_modulation.1" {
        Tensor::cat(&[rows(up, H, H), rows(up, 0, H)], 0).unwrap()
    } else {
        rows(up, start, len)
    }
}

pub(super) fn kohya_dict(lora: &Lora) -> HashMap<String, Tensor> {
    let mut sd = HashMap::new();
    for (m, l) in &lora.layers {
        let k = format!("lora_unet_{}", m.replace('.', "_"));
        sd.insert(format!("{k}.lora_down.weight"), l.down.clone());
        sd.insert(format!("{k}.lora_up.weight"), l.up.clone());
        sd.insert(format!("{k}.alpha"), scalar_t(l.alpha));
    }
    sd
}

/// `prefix` + diffusers names, `lora_A`/`lora_B`; alpha as `.alpha` keys, or
/// folded into B (ai-toolkit writes no alpha).
pub(super) fn diffusers_dict(
    lora: &Lora,
    prefix: &str,
    with_alpha: bool,
) -> HashMap<String, Tensor> {
    let mut sd = HashMap::new();
    for (m, l) in &lora.layers {
        for (name, start, len) in diffusers_parts(m) {
            let mut up = diffusers_up(m, &l.up, start, len);
            if !with_alpha {
                up = up.affine(l.scale(), 0.0).unwrap();
            }
            sd.insert(format!("{prefix}{name}.lora_A.weight"), l.down.clone());
            sd.insert(format!("{prefix}{name}.lora_B.weight"), up);
            if with_alpha {
                sd.insert(format!("{prefix}{name}.alpha"), scalar_t(l.alpha));
            }
        }
    }
    sd
}

pub(super) fn kohya_file_tensors() -> HashMap<String, Tensor> {
    let mut sd = kohya_dict(&reference());
    // A kohya split_qkv module: down (4·1, in), block-diagonal up, alpha 8.
    let n = 4;
    let c = 1;
    let down = mat(n * c, H, 77);
    let sizes = [H, H, H, 4 * H];
    let mut blocks = Vec::new();
    for (j, s) in sizes.iter().enumerate() {
        let mut pieces = Vec::new();
        if j > 0 {
            pieces.push(zeros(*s, j * c));
        }
        pieces.push(mat(*s, c, 80 + j as u32));
        if j + 1 < n {
            pieces.push(zeros(*s, (n - j - 1) * c));
        }
        blocks.push(Tensor::cat(&pieces, 1).unwrap());
    }
    let up = Tensor::cat(&blocks, 0).unwrap();
    sd.insert(
        "lora_unet_single_blocks_0_linear1.lora_down.weight".into(),
        down,
    );
    sd.insert(
        "lora_unet_single_blocks_0_linear1.lora_up.weight".into(),
        up,
    );
    sd.insert(
        "lora_unet_single_blocks_0_linear1.alpha".into(),
        scalar_t(8.0),
    );
    // A shared-down qkv whose v rows are all zero, odd alpha.
    let up = Tensor::cat(&[mat(2 * H, R, 90), zeros(H, R)], 0).unwrap();
    sd.insert(
        "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight".into(),
        mat(R, H, 91),
    );
    sd.insert(
        "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight".into(),
        up,
    );
    sd.insert(
        "lora_unet_double_blocks_1_txt_attn_qkv.alpha".into(),
        scalar_t(3.0),
    );
    sd
}

pub(super) fn read_raw(path: &Path) -> (HashMap<String, Tensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    decode(&bytes, &dev(), "test").unwrap()
}

/// The per-component update scale_j · B_j · A_j.
pub(super) fn part_delta(down: &Tensor, up: &Tensor, alpha: f32) -> Tensor {
    let r = down.dim(0).unwrap();
    (up.matmul(down).unwrap() * (alpha as f64 / r as f64)).unwrap()
}
