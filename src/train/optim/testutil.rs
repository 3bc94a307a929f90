//! Test helpers for the optimizer tests: small tensors, synthetic gradients,
//! least-squares problems and the save/resume harness. Test-only.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::{build, OptimizerConfig, ParamGroup, Result};

/// Deterministic uniform values in [-1, 1).
pub(crate) fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// A gradient for step `step`, already rounded to f32 values.
pub(crate) fn synthetic_grad(n: usize, step: u64) -> Vec<f64> {
    uniform(n, 1000 + step)
        .into_iter()
        .map(|v| (v * 0.7 + 0.1) as f64)
        .collect()
}

pub(crate) fn tensor(v: &[f64]) -> Tensor {
    let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    Tensor::from_vec(v32, v.len(), &Device::Cpu).expect("cpu tensor")
}

pub(crate) fn var(v: &[f64]) -> Var {
    Var::from_tensor(&tensor(v)).expect("cpu var")
}

pub(crate) fn group(name: &str, params: Vec<Var>, lr: f64) -> ParamGroup {
    ParamGroup {
        name: name.to_string(),
        params,
        lr,
    }
}

pub(crate) fn grads(pairs: &[(&Var, &[f64])]) -> GradStore {
    let mut g = GradStore::default();
    for (v, vals) in pairs {
        let t = tensor(vals).reshape(v.shape()).expect("grad shape");
        g.insert(v, t);
    }
    g
}

pub(crate) fn values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

/// Asserts |got − want| ≤ tol·max(1, |want|) elementwise.
pub(crate) fn assert_close(v: &Var, want: &[f64], tol: f64, what: &str) {
    let got = values(v);
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w} (err {err:e})"
        );
    }
}

pub(crate) fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// min ‖X·W − Y‖² / n with X (rows, inp), a planted W* (inp, out), W from 0.
pub(crate) struct LeastSquares {
    x: Tensor,
    y: Tensor,
    pub w: Var,
}

impl LeastSquares {
    pub(crate) fn new(rows: usize, inp: usize, out: usize, seed: u64) -> Self {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(uniform(rows * inp, seed), (rows, inp), &dev).expect("x");
        let w_star = Tensor::from_vec(uniform(inp * out, seed + 1), (inp, out), &dev).expect("w*");
        let y = x.matmul(&w_star).expect("y");
        let w = Var::zeros((inp, out), DType::F32, &dev).expect("w");
        Self { x, y, w }
    }

    pub(crate) fn loss(&self) -> Result<Tensor> {
        Ok(self
            .x
            .matmul(self.w.as_tensor())?
            .sub(&self.y)?
            .sqr()?
            .mean_all()?)
    }
}

/// Runs `steps` optimizer steps on a 32×6 → 4 problem; returns the first and
/// last loss.
pub(crate) fn least_squares_run(
    cfg: &OptimizerConfig,
    lr: f64,
    steps: usize,
) -> Result<(f64, f64)> {
    let ls = LeastSquares::new(32, 6, 4, 3);
    let mut opt = build(cfg, vec![group("w", vec![ls.w.clone()], lr)])?;
    let first = ls.loss()?.to_scalar::<f32>()? as f64;
    for _ in 0..steps {
        let loss = ls.loss()?;
        let g = loss.backward()?;
        opt.step(&g)?;
    }
    let last = ls.loss()?.to_scalar::<f32>()? as f64;
    println!("{:?}: loss {first:.4e} -> {last:.4e}", cfg.kind);
    Ok((first, last))
}

/// As [`least_squares_run`] on a 128×64 → 64 problem (a 4096-element weight);
/// returns the final weight and (first, last) loss.
pub(crate) fn least_squares_big(
    cfg: &OptimizerConfig,
    lr: f64,
    steps: usize,
) -> Result<(Vec<f32>, (f64, f64))> {
    let ls = LeastSquares::new(128, 64, 64, 11);
    let mut opt = build(cfg, vec![group("w", vec![ls.w.clone()], lr)])?;
    let first = ls.loss()?.to_scalar::<f32>()? as f64;
    for _ in 0..steps {
        let g = ls.loss()?.backward()?;
        opt.step(&g)?;
    }
    let last = ls.loss()?.to_scalar::<f32>()? as f64;
    Ok((values(&ls.w), (first, last)))
}
