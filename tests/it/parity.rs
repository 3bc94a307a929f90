//! Numerical parity against reference fixtures (format: shared/spec/parity-fixtures.md).
//!
//! Runs every folder under `tests/fixtures/parity/` and every folder listed in the
//! colon-separated `FLUXLORA_PARITY_DIRS`. A folder may omit the LoRA or sampling
//! files; those checks are then skipped for it, and the test says so.
//!
//! The `samplers` folder (no `config.json`: not a model fixture) holds float64
//! references of every sampler × schedule on a tanh velocity field, with the
//! ancestral noise to replay (format: its README.md); [`sampler_fixture_matches_reference`]
//! runs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use fluxlora::model::adapter::AdapterSet;
use fluxlora::model::flux::{Flux, FluxConfig, FluxInputs, WeightSource};
use fluxlora::model::lora_io;
use fluxlora::sample::samplers::{NoiseSource, Sampler, SeededNoise};
use fluxlora::sample::schedule::{Scheduler, Shift};
use fluxlora::sample::velocity::{FluxVelocity, Velocity};

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
        let times = Scheduler::Simple.times(steps, tokens, shift);
        let out = Sampler::Euler
            .run(
                &velocity,
                noise,
                &times,
                &mut SeededNoise::new([0]),
                &mut |_, _| Ok(()),
            )
            .map_err(e)?;
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

/// Max |ours − reference| allowed for a sampler fixture's final x: both sides run
/// in float64, so only rounding separates them.
const TOL_SAMPLER_FINAL: f64 = 1e-12;
/// Max |ours − reference| for a schedule's times (ours: continued fraction and
/// bisection; the reference: mpmath at 40 digits).
const TOL_TIMES: f64 = 1e-13;

/// v(x, t) = tanh(x Wᵀ + t b), as the fixture defines it.
struct TanhField {
    w_t: Tensor,
    b: Tensor,
}

impl Velocity for TanhField {
    fn velocity(&self, x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.w_t)?
            .broadcast_add(&(&self.b * t)?)?
            .tanh()
    }
}

/// Replays the fixture's ancestral draws in order; asking for more is an error.
struct Replay {
    draws: Vec<Tensor>,
    used: usize,
}

impl NoiseSource for Replay {
    fn standard_normal(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        let draw = self.draws.get(self.used).ok_or_else(|| {
            candle_core::Error::Msg(format!("the sampler drew more than {} noises", self.used))
        })?;
        self.used += 1;
        if draw.dims() != x.dims() {
            candle_core::bail!("noise {:?} for x {:?}", draw.dims(), x.dims());
        }
        Ok(draw.clone())
    }
}

fn max_abs(ours: &Tensor, reference: &Tensor) -> TestResult<f64> {
    if ours.dims() != reference.dims() {
        return Err(format!(
            "shape {:?} vs reference {:?}",
            ours.dims(),
            reference.dims()
        ));
    }
    (ours - reference)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .map_err(|e| e.to_string())
}

/// Runs one case of the sampler fixture; the line to print.
fn check_sampler_case(
    case: &serde_json::Value,
    st: &HashMap<String, Tensor>,
    field: &TanhField,
) -> TestResult<String> {
    let file = "samplers.safetensors";
    let text = |key: &str| {
        case[key]
            .as_str()
            .ok_or_else(|| format!("cases.json: `{key}` missing in {case}"))
    };
    let name = text("name")?;
    let sampler: Sampler = text("sampler")?
        .parse()
        .map_err(|e| format!("{name}: {e}"))?;
    let scheduler: Scheduler = text("scheduler")?
        .parse()
        .map_err(|e| format!("{name}: {e}"))?;
    let steps = case["steps"]
        .as_u64()
        .ok_or("cases.json: `steps` missing")? as usize;
    let seq_len = case["image_seq_len"]
        .as_u64()
        .ok_or("cases.json: `image_seq_len` missing")? as usize;
    let shift = match &case["shift"] {
        serde_json::Value::Null => None,
        s => Some(Shift {
            base_shift: s["base_shift"].as_f64().ok_or("shift: `base_shift`")?,
            max_shift: s["max_shift"].as_f64().ok_or("shift: `max_shift`")?,
        }),
    };
    let times = scheduler.times(steps, seq_len, shift);
    let ref_times = get(st, &format!("{name}.times"), file)?
        .to_vec1::<f64>()
        .map_err(|e| e.to_string())?;
    if times.len() != ref_times.len() {
        return Err(format!(
            "{name}: {} times, reference {}",
            times.len(),
            ref_times.len()
        ));
    }
    let times_diff = times
        .iter()
        .zip(&ref_times)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let draws = match st.get(&format!("{name}.noise")) {
        Some(all) => (0..all.dim(0).map_err(|e| e.to_string())?)
            .map(|i| all.get(i))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?,
        None => vec![],
    };
    let expected_draws = draws.len();
    let mut replay = Replay { draws, used: 0 };
    let x1 = get(st, "x1", file)?.clone();
    let out = sampler
        .run(field, x1, &times, &mut replay, &mut |_, _| Ok(()))
        .map_err(|e| format!("{name}: {e}"))?;
    if replay.used != expected_draws {
        return Err(format!(
            "{name}: drew {} noises, the reference {expected_draws}",
            replay.used
        ));
    }
    let diff = max_abs(&out, get(st, &format!("{name}.final"), file)?)?;
    let line = format!(
        "{name}: final max abs diff {diff:.2e} (tolerance {TOL_SAMPLER_FINAL:.0e}), times {times_diff:.2e} (tolerance {TOL_TIMES:.0e})"
    );
    if diff.is_nan() || diff > TOL_SAMPLER_FINAL || times_diff.is_nan() || times_diff > TOL_TIMES {
        return Err(line);
    }
    Ok(line)
}

#[test]
fn sampler_fixture_matches_reference() {
    let dir = support::fixture("parity").join("samplers");
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("samplers/cases.json");
    let spec: serde_json::Value = serde_json::from_str(&text).expect("cases.json is JSON");
    let st = load(&dir.join("samplers.safetensors")).expect("samplers.safetensors");
    let field = TanhField {
        w_t: st["W"].t().and_then(|w| w.contiguous()).expect("W"),
        b: st["b"].clone(),
    };
    let cases = spec["cases"].as_array().expect("cases");
    let mut covered = std::collections::HashSet::new();
    let mut failed = vec![];
    for case in cases {
        match check_sampler_case(case, &st, &field) {
            Ok(line) => println!("{line}"),
            Err(msg) => failed.push(msg),
        }
        covered.insert((case["sampler"].to_string(), case["scheduler"].to_string()));
    }
    assert!(
        failed.is_empty(),
        "sampler parity failures:\n{}",
        failed.join("\n")
    );
    // Every sampler × schedule has a reference.
    for sampler in Sampler::ALL {
        for scheduler in Scheduler::ALL {
            let key = (
                format!("\"{}\"", sampler.name()),
                format!("\"{}\"", scheduler.name()),
            );
            assert!(covered.contains(&key), "no reference for {key:?}");
        }
    }
}
