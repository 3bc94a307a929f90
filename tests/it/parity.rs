//! Numerical parity against reference fixtures (format: shared/spec/parity-fixtures.md).
//!
//! Runs every folder under `tests/fixtures/parity/` and every folder listed in the
//! colon-separated `FLUXLORA_PARITY_DIRS`. A folder may omit the LoRA or sampling
//! files; those checks are then skipped for it, and the test says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use fluxlora::model::adapter::AdapterSet;
use fluxlora::model::flux::{Flux, FluxConfig, FluxInputs, WeightSource};
use fluxlora::model::lora_io;
use fluxlora::sample::euler::{euler, FluxVelocity};
use fluxlora::sample::schedule::{schedule, Shift};

use crate::support;

type TestResult<T> = Result<T, String>;

const TOL_OUT: f64 = 1e-4;
const TOL_FINAL: f64 = 1e-3;

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    let root = support::fixture("parity");
    if let Ok(entries) = std::fs::read_dir(&root) {
        let mut local: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("config.json").is_file())
            .collect();
        local.sort();
        dirs.extend(local);
    }
    if let Ok(extra) = std::env::var("FLUXLORA_PARITY_DIRS") {
        dirs.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    dirs
}

fn load(path: &Path) -> TestResult<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn get<'a>(map: &'a HashMap<String, Tensor>, name: &str, file: &str) -> TestResult<&'a Tensor> {
    map.get(name)
        .ok_or_else(|| format!("{file}: missing tensor `{name}`"))
}

fn rel_l2(ours: &Tensor, reference: &Tensor) -> TestResult<f64> {
    let f = |r: candle_core::Result<f64>| r.map_err(|e| e.to_string());
    if ours.dims() != reference.dims() {
        return Err(format!(
            "shape {:?} vs reference {:?}",
            ours.dims(),
            reference.dims()
        ));
    }
    let ours = ours.to_dtype(DType::F64).map_err(|e| e.to_string())?;
    let reference = reference.to_dtype(DType::F64).map_err(|e| e.to_string())?;
    let num = f((&ours - &reference)
        .and_then(|d| d.sqr())
        .and_then(|d| d.sum_all())
        .and_then(|d| d.to_scalar::<f64>()))?;
    let den = f(reference
        .sqr()
        .and_then(|d| d.sum_all())
        .and_then(|d| d.to_scalar::<f64>()))?;
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// The comparisons made for one fixture: lines to print and failures.
#[derive(Default)]
struct Checks {
    report: Vec<String>,
    failures: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, ours: &Tensor, reference: &Tensor, tol: f64) -> TestResult<()> {
        let err = rel_l2(ours, reference).map_err(|m| format!("{what}: {m}"))?;
        self.report.push(format!(
            "{what}: relative L2 error {err:.2e} (tolerance {tol:.0e})"
        ));
        // NaN fails too.
        if err.is_nan() || err > tol {
            self.failures
                .push(format!("{what}: relative L2 error {err:.3e} > {tol:.0e}"));
        }
        Ok(())
    }
}

/// Checks one fixture folder; returns the lines to print (checks run and skipped).
fn check_fixture(dir: &Path) -> TestResult<Vec<String>> {
    let dev = Device::Cpu;
    let e = |e: candle_core::Error| format!("{}: {e}", dir.display());
    let cfg = FluxConfig::from_json_file(&dir.join("config.json")).map_err(e)?;
    let source = WeightSource::open(&dir.join("model.safetensors")).map_err(e)?;
    let model = Flux::new(&cfg, &source, DType::F32, &dev).map_err(e)?;
    let inputs = load(&dir.join("inputs.safetensors"))?;
    let i = |name: &str| get(&inputs, name, "inputs.safetensors");
    let guidance = if cfg.guidance_embed {
        Some(i("guidance")?)
    } else {
        None
    };
    let batch = FluxInputs {
        img: i("img")?,
        img_ids: i("img_ids")?,
        txt: i("txt")?,
        txt_ids: i("txt_ids")?,
        timesteps: i("timesteps")?,
        y: i("y")?,
        guidance,
    };
    let mut checks = Checks::default();

    let expected = load(&dir.join("output.safetensors"))?;
    let out = model.forward(&batch, &AdapterSet::none()).map_err(e)?;
    checks.check(
        "out",
        &out,
        get(&expected, "out", "output.safetensors")?,
        TOL_OUT,
    )?;

    let lora_path = dir.join("lora.safetensors");
    let lora_out_path = dir.join("output_lora.safetensors");
    if lora_path.is_file() && lora_out_path.is_file() {
        let file = lora_io::load(&lora_path, &dev).map_err(|e| e.to_string())?;
        if !file.unmatched.is_empty() {
            return Err(format!(
                "{}: unmatched LoRA keys {:?}",
                lora_path.display(),
                file.unmatched
            ));
        }
        lora_io::validate(&file.lora, model.linear_shapes()).map_err(|e| e.to_string())?;
        let lora = Arc::new(file.lora);
        let expected = load(&lora_out_path)?;
        for (key, strength) in [("out_1.0", 1.0), ("out_0.5", 0.5)] {
            let set = AdapterSet::none().with(lora.clone(), strength);
            let out = model.forward(&batch, &set).map_err(e)?;
            checks.check(
                key,
                &out,
                get(&expected, key, "output_lora.safetensors")?,
                TOL_OUT,
            )?;
        }
    } else {
        checks
            .report
            .push("LoRA check skipped: no lora.safetensors / output_lora.safetensors".into());
    }

    let sampling_json = dir.join("sampling.json");
    let sampling_st = dir.join("sampling.safetensors");
    if sampling_json.is_file() && sampling_st.is_file() {
        let text = std::fs::read_to_string(&sampling_json).map_err(|e| e.to_string())?;
        let spec: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("sampling.json: {e}"))?;
        let steps = spec["steps"]
            .as_u64()
            .ok_or("sampling.json: `steps` missing")? as usize;
        let g = spec["guidance"].as_f64().unwrap_or(1.0);
        let grid = spec["grid"]
            .as_array()
            .ok_or("sampling.json: `grid` missing")?;
        let tokens: usize = grid.iter().filter_map(|v| v.as_u64()).product::<u64>() as usize;
        let shift = if spec["shift"].as_bool().unwrap_or(false) {
            Some(Shift {
                base_shift: spec["base_shift"].as_f64().unwrap_or(0.5),
                max_shift: spec["max_shift"].as_f64().unwrap_or(1.15),
            })
        } else {
            None
        };
        let st = load(&sampling_st)?;
        let noise = get(&st, "noise", "sampling.safetensors")?.clone();
        let velocity = FluxVelocity {
            flux: &model,
            adapters: &AdapterSet::none(),
            img_ids: batch.img_ids,
            txt: batch.txt,
            txt_ids: batch.txt_ids,
            y: batch.y,
            guidance: g,
        };
        let times = schedule(steps, tokens, shift);
        let out = euler(&velocity, noise, &times, &mut |_, _| Ok(())).map_err(e)?;
        checks.check(
            "final",
            &out,
            get(&st, "final", "sampling.safetensors")?,
            TOL_FINAL,
        )?;
    } else {
        checks
            .report
            .push("sampling check skipped: no sampling.json / sampling.safetensors".into());
    }
    if checks.failures.is_empty() {
        Ok(checks.report)
    } else {
        Err(checks.failures.join("; "))
    }
}

#[test]
fn parity_fixtures_match_reference() {
    let dirs = fixture_dirs();
    assert!(
        !dirs.is_empty(),
        "no parity fixtures found under tests/fixtures/parity"
    );
    let mut failed = vec![];
    for dir in &dirs {
        match check_fixture(dir) {
            Ok(lines) => {
                for line in lines {
                    println!("{}: {line}", dir.display());
                }
            }
            Err(msg) => failed.push(format!("{}: {msg}", dir.display())),
        }
    }
    assert!(failed.is_empty(), "parity failures:\n{}", failed.join("\n"));
}
