//! Weight formats of the transformer: the diffusers layout loads to the same model
//! as the BFL layout; fp8 weights stay fp8 in memory and compute like their f32
//! upcast; bf16 runs close to f32. Uses the committed parity fixture as reference.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fluxlora::model::adapter::AdapterSet;
use fluxlora::model::flux::{Flux, FluxConfig, FluxInputs, WeightSource};
use fluxlora::model::keymap::{linear_from_bfl, swap_halves, RowLayout};

use crate::support::{self, rel_err};

fn fixture() -> PathBuf {
    support::fixture("parity/dev_b2_grid3x5")
}

fn inputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("inputs.safetensors"), &Device::Cpu).unwrap()
}

fn run(model: &Flux, i: &HashMap<String, Tensor>) -> Tensor {
    let batch = FluxInputs {
        img: &i["img"],
        img_ids: &i["img_ids"],
        txt: &i["txt"],
        txt_ids: &i["txt_ids"],
        timesteps: &i["timesteps"],
        y: &i["y"],
        guidance: i.get("guidance"),
    };
    model
        .forward(&batch, &AdapterSet::none())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The diffusers name of a BFL QK-norm scale.
fn diffusers_norm(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["double_blocks", i, stream, "norm", which, "scale"] => {
            let added = if *stream == "txt_attn" { "added_" } else { "" };
            let qk = if *which == "query_norm" { "q" } else { "k" };
            Some(format!(
                "transformer_blocks.{i}.attn.norm_{added}{qk}.weight"
            ))
        }
        ["single_blocks", i, "norm", which, "scale"] => {
            let qk = if *which == "query_norm" { "q" } else { "k" };
            Some(format!(
                "single_transformer_blocks.{i}.attn.norm_{qk}.weight"
            ))
        }
        _ => None,
    }
}

/// BFL weights rewritten in diffusers' layout: fused linears split into parts,
/// `norm_out` halves swapped, QK-norm scales renamed, under a `transformer.` prefix
/// as some exports have.
fn to_diffusers(bfl: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in bfl {
        if let Some(d) = diffusers_norm(name) {
            out.insert(format!("transformer.{d}"), t.clone());
            continue;
        }
        let (module, kind) = name.rsplit_once('.').unwrap();
        let map = linear_from_bfl(module).unwrap_or_else(|| panic!("no diffusers name for {name}"));
        let in_f = bfl[&format!("{module}.weight")].dim(1).unwrap();
        let rows = map.layout.part_rows(t.dim(0).unwrap(), in_f).unwrap();
        for (d, r) in map.diffusers.iter().zip(rows) {
            let mut part = t.narrow(0, r.start, r.len()).unwrap();
            if map.layout == RowLayout::SwappedHalves {
                part = swap_halves(&part).unwrap();
            }
            out.insert(format!("transformer.{d}.{kind}"), part);
        }
    }
    out
}

#[test]
fn diffusers_layout_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let bfl =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&to_diffusers(&bfl), &path).unwrap();

    let cfg = FluxConfig::from_json_file(&fixture().join("config.json")).unwrap();
    let source = WeightSource::open(&path).unwrap();
    let model = Flux::new(&cfg, &source, DType::F32, &Device::Cpu).unwrap();
    let expected =
        candle_core::safetensors::load(fixture().join("output.safetensors"), &Device::Cpu).unwrap();
    let err = rel_err(&run(&model, &inputs()), &expected["out"]);
    assert!(err < 1e-4, "diffusers layout: relative error {err}");
}

#[test]
fn fp8_weights_stay_fp8_and_compute_like_their_upcast() {
    let dir = tempfile::tempdir().unwrap();
    let bfl =
        candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let fp8: HashMap<String, Tensor> = bfl
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F8E4M3).unwrap()))
        .collect();
    let upcast: HashMap<String, Tensor> = fp8
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    let path = dir.path().join("flux-fp8.safetensors");
    candle_core::safetensors::save(&fp8, &path).unwrap();

    let cfg = FluxConfig::from_json_file(&fixture().join("config.json")).unwrap();
    let model = Flux::new(
        &cfg,
        &WeightSource::open(&path).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(model
        .linears()
        .iter()
        .all(|l| l.weight().dtype() == DType::F8E4M3));
    let reference = Flux::new(
        &cfg,
        &WeightSource::Tensors(upcast),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let i = inputs();
    let err = rel_err(&run(&model, &i), &run(&reference, &i));
    assert!(err < 1e-6, "fp8 storage vs upcast weights: {err}");
}

#[test]
fn bf16_compute_is_close_to_f32() {
    let cfg = FluxConfig::from_json_file(&fixture().join("config.json")).unwrap();
    let source = WeightSource::open(&fixture().join("model.safetensors")).unwrap();
    let f32_model = Flux::new(&cfg, &source, DType::F32, &Device::Cpu).unwrap();
    let bf16_model = Flux::new(&cfg, &source, DType::BF16, &Device::Cpu).unwrap();
    let i = inputs();
    let err = rel_err(&run(&bf16_model, &i), &run(&f32_model, &i));
    println!("bf16 vs f32 relative error {err:.2e}");
    assert!(err < 3e-2, "bf16 vs f32: {err}");
}
