//! candle-nn's fused softmax, norms and RoPE with a hand-written backward.
//!
//! The fused kernels have no gradient (shared/research/candle-training.md), and the
//! compositions of basic ops that do have one cost many passes over memory: each op
//! allocates, and its backward adds a zero-initialised gradient per input. Here the
//! forward is the fused kernel on the input's value, and one custom op on the input
//! (a "bridge") hands that result on, so backward runs only the closed-form
//! gradient below, in a few passes:
//! - softmax: dx = y ⊙ (g − Σ g⊙y)
//! - layer norm without affine: dx = (g − mean g − y · mean g⊙y) / σ
//! - RMS norm without scale: dx = r · (g − y · mean g⊙y), r = 1/√(mean x² + ε)
//! - interleaved RoPE, a rotation: dx = the rotation of g by −θ.
//!
//! GELU (tanh form) gets its own f32 CPU kernels instead: candle's evaluates scalar
//! `tanhf` per element and its backward `tanh` and `powf` again (≈ 13 % of a small
//! training step's CPU time). Here 0.5·(1 + tanh u) = σ(2u) is computed through
//! `exp`, split over candle's thread count, forward and backward alike.
//!
//! All over the last dim. Must not: be used where the composed forms are needed for
//! a second derivative (the backward here is not itself differentiable).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, D};

/// Which closed-form gradient the bridge applies.
#[derive(Clone, Debug)]
enum Grad {
    Softmax,
    LayerNorm {
        eps: f64,
    },
    RmsNorm {
        eps: f64,
    },
    /// cos, sin (b, seq, head_dim / 2) of the forward rotation.
    Rope {
        cos: Tensor,
        sin: Tensor,
    },
}

/// softmax(x) over the last dim, fused forward, closed-form backward.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    bridge(&x, y, Grad::Softmax)
}

/// (x − mean) / √(var + eps) over the last dim (no affine), fused forward.
pub(crate) fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    let y = candle_nn::ops::layer_norm(&x.detach(), &ones, &zeros, eps as f32)?;
    bridge(&x, y, Grad::LayerNorm { eps })
}

/// x / √(mean x² + eps) over the last dim (no scale), fused forward.
pub(crate) fn rms_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let ones = Tensor::ones(x.dim(D::Minus1)?, x.dtype(), x.device())?;
    let y = candle_nn::ops::rms_norm(&x.detach(), &ones, eps as f32)?;
    bridge(&x, y, Grad::RmsNorm { eps })
}

/// Interleaved RoPE of x (b, heads, seq, head_dim) by cos, sin (b, seq, head_dim / 2).
pub(crate) fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = candle_nn::rotary_emb::rope_i(&x.detach(), cos, sin)?;
    bridge(
        &x,
        y,
        Grad::Rope {
            cos: cos.clone(),
            sin: sin.clone(),
        },
    )
}

/// GELU, tanh approximation (as Flux's MLP): x·σ(2u), u = √(2/π)·(x + 0.044715·x³).
/// f32 on the CPU uses the kernels below; other dtypes and devices candle's `gelu`.
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == candle_core::DType::F32) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu)
}

const GELU_C: f32 = 0.797_884_6; // √(2/π)
const GELU_A: f32 = 0.044_715;

/// σ(2u) and 2u' at x: the gate and the derivative factor of GELU's tanh form.
#[inline]
fn gelu_parts(x: f32) -> (f32, f32) {
    let u = GELU_C * (x + GELU_A * x * x * x);
    let s = 1.0 / (1.0 + (-2.0 * u).exp());
    (s, 2.0 * GELU_C * (1.0 + 3.0 * GELU_A * x * x))
}

/// out[i] = f(x[i]) (or f(x[i], g[i])), split over candle's CPU thread count.
fn par_map(x: &[f32], g: Option<&[f32]>, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let threads = candle_core::utils::get_num_threads().max(1);
    let chunk = x.len().div_ceil(threads).max(4096);
    std::thread::scope(|scope| {
        for (i, o) in out.chunks_mut(chunk).enumerate() {
            let xs = &x[i * chunk..i * chunk + o.len()];
            let gs = g.map(|g| &g[i * chunk..i * chunk + o.len()]);
            let f = &f;
            scope.spawn(move || match gs {
                Some(gs) => o
                    .iter_mut()
                    .zip(xs.iter().zip(gs))
                    .for_each(|(o, (&x, &g))| *o = f(x, g)),
                None => o.iter_mut().zip(xs).for_each(|(o, &x)| *o = f(x, 0.0)),
            });
        }
    });
    out
}

/// The contiguous f32 values of a CPU storage under `l`.
fn f32_values<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("gelu: input is not contiguous"),
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = par_map(f32_values(x, l)?, None, |x, _| x * gelu_parts(x).0);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        Ok(Some(x.detach().apply_op2_no_bwd(&g, &GeluGrad)?))
    }
}

/// dx = g · (σ(2u) + x·σ(2u)·(1 − σ(2u))·2u').
struct GeluGrad;

impl candle_core::CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, gs) = (f32_values(x, x_l)?, f32_values(g, g_l)?);
        if xs.len() != gs.len() {
            candle_core::bail!("gelu backward: {} inputs, {} gradients", xs.len(), gs.len())
        }
        let dx = par_map(xs, Some(gs), |x, g| {
            let (s, du) = gelu_parts(x);
            g * (s + x * s * (1.0 - s) * du)
        });
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// The op on `x` whose value is `y` (computed already) and whose backward is `grad`.
fn bridge(x: &Tensor, y: Tensor, grad: Grad) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(Bridge {
        value: Mutex::new(Some(y)),
        grad,
    })
}

struct Bridge {
    /// The fused result, taken (and so freed) by the forward, which copies it out.
    value: Mutex<Option<Tensor>>,
    grad: Grad,
}

impl Bridge {
    fn take(&self, x_l: &Layout) -> Result<Tensor> {
        let y = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::msg("fused-grad bridge: poisoned lock"))?
            .take()
            .ok_or_else(|| candle_core::Error::msg("fused-grad bridge: forward ran twice"))?;
        if y.dims() != x_l.dims() {
            candle_core::bail!(
                "fused-grad bridge: value {:?} for an input {:?}",
                y.dims(),
                x_l.dims()
            )
        }
        Ok(y.contiguous()?)
    }
}

/// The storage of a contiguous tensor `y` as a fresh copy, and its shape.
fn copy_out<S: BackendStorage>(
    y: &Tensor,
    pick: impl Fn(&Storage) -> Option<&S>,
) -> Result<(S, Shape)> {
    let (storage, layout) = y.storage_and_layout();
    let s = pick(&storage)
        .ok_or_else(|| candle_core::Error::msg("fused-grad bridge: value on another device"))?;
    let copy = match layout.contiguous_offsets() {
        Some((0, end)) if end == layout.shape().elem_count() => s.try_clone(layout)?,
        _ => candle_core::bail!("fused-grad bridge: value is not a whole contiguous buffer"),
    };
    Ok((copy, layout.shape().clone()))
}

impl CustomOp1 for Bridge {
    fn name(&self) -> &'static str {
        "fused-grad-bridge"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, x_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take(x_l)?;
        copy_out(&y, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(&self, _x: &CudaStorage, x_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let y = self.take(x_l)?;
        copy_out(&y, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let y = res.detach();
        let dx = match &self.grad {
            Grad::Softmax => {
                let dot = (g * &y)?.sum_keepdim(D::Minus1)?;
                (g.broadcast_sub(&dot)? * &y)?
            }
            Grad::LayerNorm { eps } => {
                let x = x.detach();
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                    .sqrt()?
                    .recip()?;
                let gy = (g * &y)?.mean_keepdim(D::Minus1)?;
                let gm = g.mean_keepdim(D::Minus1)?;
                g.broadcast_sub(&gm)?
                    .sub(&y.broadcast_mul(&gy)?)?
                    .broadcast_mul(&rstd)?
            }
            Grad::RmsNorm { eps } => {
                let x = x.detach();
                let r = (x.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                    .sqrt()?
                    .recip()?;
                let gy = (g * &y)?.mean_keepdim(D::Minus1)?;
                g.sub(&y.broadcast_mul(&gy)?)?.broadcast_mul(&r)?
            }
            Grad::Rope { cos, sin } => {
                candle_nn::rotary_emb::rope_i(&g.contiguous()?, cos, &sin.neg()?)?
            }
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::seeded::SeededRng;
    use crate::testing::rel_err;
    use candle_core::{Device, Var};

    /// The gradient of Σ f(x)·probe through `fast` and through `slow` (composed).
    fn grads(
        x: &Var,
        probe: &Tensor,
        fast: impl Fn(&Tensor) -> Result<Tensor>,
        slow: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(f32, f32)> {
        let (yf, ys) = (fast(x.as_tensor())?, slow(x.as_tensor())?);
        let value = rel_err(&yf, &ys);
        let gf = (yf * probe)?.sum_all()?.backward()?;
        let gs = (ys * probe)?.sum_all()?.backward()?;
        let (gf, gs) = (
            gf.get(x.as_tensor()).expect("fast gradient"),
            gs.get(x.as_tensor()).expect("composed gradient"),
        );
        assert!(gs.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok((value, rel_err(gf, gs)))
    }

    #[test]
    fn gradients_equal_those_of_the_composed_forms() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(31);
        let x = Var::from_tensor(&((rng.randn((2, 3, 5, 8), &dev)? * 2.0)? + 0.5)?)?;
        let probe = rng.randn((2, 3, 5, 8), &dev)?;
        let eps = 1e-6;
        let checks: [(&str, (f32, f32)); 3] = [
            (
                "softmax",
                grads(&x, &probe, softmax_last, |x| {
                    candle_nn::ops::softmax(x, D::Minus1)
                })?,
            ),
            (
                "layer norm",
                grads(
                    &x,
                    &probe,
                    |x| layer_norm(x, eps),
                    |x| {
                        let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                        c.broadcast_div(&(var + eps)?.sqrt()?)
                    },
                )?,
            ),
            (
                "rms norm",
                grads(
                    &x,
                    &probe,
                    |x| rms_norm(x, eps),
                    |x| {
                        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
                        x.broadcast_div(&r)
                    },
                )?,
            ),
        ];
        for (what, (value, grad)) in checks {
            assert!(value < 1e-5, "{what} forward: {value}");
            assert!(grad < 1e-4, "{what} gradient: {grad}");
        }
        // RoPE against the rotation written out on (even, odd) pairs.
        let angles = rng.randn((2, 5, 4), &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (value, grad) = grads(
            &x,
            &probe,
            |x| rope_i(x, &cos, &sin),
            |x| {
                let pairs = x.reshape((2, 3, 5, 4, 2))?;
                let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
                let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
                let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
                let r0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
                let r1 = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&c)?)?;
                Tensor::stack(&[r0, r1], 4)?.reshape((2, 3, 5, 8))
            },
        )?;
        assert!(value < 1e-5, "rope forward: {value}");
        assert!(grad < 1e-5, "rope gradient: {grad}");
        Ok(())
    }

    #[test]
    fn gelu_and_its_gradient_equal_candles() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(33);
        // Wide enough to split over threads; large |x| checks the saturated tails.
        let x = Var::from_tensor(&(rng.randn((3, 9000), &dev)? * 4.0)?)?;
        let probe = rng.randn((3, 9000), &dev)?;
        let (value, grad) = grads(&x, &probe, gelu_tanh, |x| x.gelu())?;
        assert!(value < 1e-6, "gelu forward: {value}");
        assert!(grad < 1e-5, "gelu gradient: {grad}");
        Ok(())
    }

    #[test]
    fn untracked_inputs_get_the_fused_result_itself() -> Result<()> {
        let x = SeededRng::new(32).randn((3, 4), &Device::Cpu)?;
        let y = softmax_last(&x)?;
        assert!(!y.track_op());
        let direct = candle_nn::ops::softmax_last_dim(&x)?;
        assert_eq!(rel_err(&y, &direct), 0.0);
        Ok(())
    }
}
