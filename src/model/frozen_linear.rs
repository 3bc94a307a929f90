//! x·Wᵀ + b for a frozen weight W whose backward computes only the input gradient.
//!
//! candle-core's backward of `Op::Matmul` always computes both operands' gradients,
//! so under a composed `x.matmul(&w.t())` every frozen base weight receives a
//! full-size gradient each training step (as much arithmetic as the forward matmul)
//! that is then thrown away, and the bias add leaves a gradient of the output's size
//! behind for the bias too. [`frozen_linear`] is one custom op on x alone that holds
//! W and b: its forward is candle's own CPU matmul (the `gemm` crate) on the two
//! storages plus the bias, and its backward is the one product grad·W.
//!
//! Must not: be used when W or b train (full fine-tuning needs their gradients), or
//! on devices other than the CPU (the op has only a CPU forward); callers keep the
//! composed matmul for those, which [`applies`] tells them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// Whether the frozen op can stand in for the composed linear: a CPU input that
/// carries a gradient, and a weight and bias that do not.
pub(crate) fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && x.track_op()
        && !weight.track_op()
        && !bias.is_some_and(Tensor::track_op)
        && weight.dtype() == x.dtype()
        && bias.is_none_or(|b| b.dtype() == x.dtype())
}

/// x (m, in) → x·Wᵀ + b (m, out); `weight` (out, in), `bias` (out,), both in x's dtype.
pub(crate) fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias.map(Tensor::contiguous).transpose()?;
    x.apply_op1(FrozenLinear {
        weight: weight.clone(),
        bias,
    })
}

struct FrozenLinear {
    /// (out, in)
    weight: Tensor,
    /// (out,), contiguous
    bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, k_w) = self.weight.dims2()?;
        if k != k_w {
            candle_core::bail!("frozen linear: input has {k} features, the weight takes {k_w}")
        }
        let (w, w_l) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen linear: the weight is not on the CPU")
        };
        // Wᵀ as a strided view: (in, out) over the (out, in) storage.
        let mut out = x.matmul(w, (1, m, n, k), x_l, &w_l.transpose(0, 1)?)?;
        if let Some(b) = &self.bias {
            let (b, b_l) = b.storage_and_layout();
            let Storage::Cpu(b) = &*b else {
                candle_core::bail!("frozen linear: the bias is not on the CPU")
            };
            add_rows(&mut out, b, b_l.start_offset(), n)?;
        }
        Ok((out, Shape::from((m, n))))
    }

    /// d(x·Wᵀ + b)/dx · grad = grad·W; W and b get nothing.
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// out (m, n) row-major += bias (n,) on every row.
fn add_rows(out: &mut CpuStorage, bias: &CpuStorage, offset: usize, n: usize) -> Result<()> {
    fn add<T: Copy + std::ops::Add<Output = T>>(out: &mut [T], bias: &[T]) {
        for row in out.chunks_exact_mut(bias.len()) {
            for (o, &b) in row.iter_mut().zip(bias) {
                *o = *o + b;
            }
        }
    }
    match (out, bias) {
        (CpuStorage::F32(o), CpuStorage::F32(b)) => add(o, &b[offset..offset + n]),
        (CpuStorage::F64(o), CpuStorage::F64(b)) => add(o, &b[offset..offset + n]),
        (CpuStorage::F16(o), CpuStorage::F16(b)) => add(o, &b[offset..offset + n]),
        (CpuStorage::BF16(o), CpuStorage::BF16(b)) => add(o, &b[offset..offset + n]),
        (out, bias) => candle_core::bail!(
            "frozen linear: no bias add for {:?} outputs with a {:?} bias",
            out.dtype(),
            bias.dtype()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::model::adapter::{AdapterSet, Lora, LoraLayer};
    use crate::model::layers::Linear;
    use crate::model::seeded::SeededRng;
    use crate::testing::rel_err;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_input_gradient_equal_the_composed_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(21);
        let x = Var::from_tensor(&rng.randn((7, 5), &dev)?)?;
        let w = rng.randn((3, 5), &dev)?;
        let b = rng.randn(3, &dev)?;
        let probe = rng.randn((7, 3), &dev)?;
        for bias in [None, Some(&b)] {
            let fast = frozen_linear(x.as_tensor(), &w, bias)?;
            let mut slow = x.as_tensor().matmul(&w.t()?)?;
            if let Some(b) = bias {
                slow = slow.broadcast_add(b)?;
            }
            assert!(rel_err(&fast, &slow) < 1e-6, "forward");
            let g_fast = (fast * &probe)?.sum_all()?.backward()?;
            let g_slow = (slow * &probe)?.sum_all()?.backward()?;
            let (gf, gs) = (
                g_fast.get(x.as_tensor()).expect("fast input gradient"),
                g_slow.get(x.as_tensor()).expect("composed input gradient"),
            );
            assert!(rel_err(gf, gs) < 1e-6, "input gradient");
            assert!(g_fast.get(&w).is_none(), "the frozen weight got a gradient");
        }
        Ok(())
    }

    /// Through [`Linear`] with a LoRA: a trainable (Var) weight takes the composed
    /// path, a frozen one the fast op; the adapter's and the input's gradients agree.
    #[test]
    fn adapter_gradients_equal_those_of_the_composed_linear() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(22);
        let (w, b) = (rng.randn((6, 4), &dev)?, rng.randn(6, &dev)?);
        let down = Var::from_tensor(&rng.randn((2, 4), &dev)?)?;
        let up = Var::from_tensor(&rng.randn((6, 2), &dev)?)?;
        let x = Var::from_tensor(&rng.randn((2, 3, 4), &dev)?)?;
        let probe = rng.randn((2, 3, 6), &dev)?;
        let mut lora = Lora::new("l");
        lora.layers = BTreeMap::from([(
            "m".to_string(),
            LoraLayer {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                alpha: 1.0,
            },
        )]);
        let set = AdapterSet::none().with(Arc::new(lora), 0.8);
        let frozen = Linear::new("m", w.clone(), Some(b.clone()));
        let trainable_w = Var::from_tensor(&w)?;
        let composed = Linear::new("m", trainable_w.as_tensor().clone(), Some(b));
        assert!(applies(x.as_tensor(), &w, None));
        assert!(!applies(x.as_tensor(), trainable_w.as_tensor(), None));
        let grads = |lin: &Linear| -> Result<Vec<Tensor>> {
            let y = lin.forward(x.as_tensor(), &set)?;
            assert_eq!(y.dims(), &[2, 3, 6]);
            let g = (y * &probe)?.sum_all()?.backward()?;
            [x.as_tensor(), down.as_tensor(), up.as_tensor()]
                .iter()
                .map(|t| Ok(g.get(t).expect("a gradient").clone()))
                .collect()
        };
        for (fast, slow) in grads(&frozen)?.iter().zip(grads(&composed)?) {
            assert!(fast.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            assert!(rel_err(fast, &slow) < 1e-6, "{}", rel_err(fast, &slow));
        }
        Ok(())
    }
}
