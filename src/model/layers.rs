//! Building blocks shared by the model files: the adapter-aware [`Linear`] (with the
//! frozen-weight fast path while training), and layer norm / softmax on candle's
//! fused kernels, given a closed-form backward by `fused_grad` (candle's fused
//! kernels have none: shared/research/candle-training.md); an affine layer norm
//! that trains stays a differentiable composition of basic ops.
//!
//! Must not: know any architecture's key names.

use candle_core::{DType, Result, Tensor, D};

use super::adapter::AdapterSet;
use super::frozen_linear::{self, frozen_linear};
use super::fused_grad;

/// A linear layer that knows its module path and applies the adapters for it.
/// Its weight may be stored in a narrower dtype (fp8) and is upcast per call.
#[derive(Clone, Debug)]
pub struct Linear {
    module: String,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` (out, in), `bias` (out,).
    pub(crate) fn new(module: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            module: module.into(),
            weight,
            bias,
        }
    }

    pub(crate) fn module(&self) -> &str {
        &self.module
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out_features, in_features)
    pub(crate) fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// x (…, in) → (…, out) = x·Wᵀ + b + adapter updates.
    pub(crate) fn forward(&self, x: &Tensor, adapters: &AdapterSet) -> Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(x.dtype()))
            .transpose()?;
        let y = if frozen_linear::applies(x, &w, bias.as_ref()) {
            // Training through a frozen base: only the input gradient is computed.
            let (in_f, out_f) = (w.dim(1)?, w.dim(0)?);
            let mut dims = x.dims().to_vec();
            let rows = x.elem_count() / in_f.max(1);
            let y = frozen_linear(&x.reshape((rows, in_f))?, &w, bias.as_ref())?;
            if let Some(last) = dims.last_mut() {
                *last = out_f;
            }
            y.reshape(dims)?
        } else {
            let y = x.broadcast_matmul(&w.t()?)?;
            match &bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        adapters.apply(&self.module, x, y)
    }
}

/// True when gradients may flow through any of `xs`.
pub(crate) fn tracks(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

/// LayerNorm over the last dim, computed in f32 and returned in x's dtype, with
/// optional affine (weight, bias).
pub(crate) fn layer_norm(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let normed = match affine {
        // Flux's norms: the fused kernel, with a closed-form backward when tracked.
        None => fused_grad::layer_norm(&xf, eps)?,
        Some((w, b)) if tracks(&[&xf, w, b]) => {
            let mean = xf.mean_keepdim(D::Minus1)?;
            let centered = xf.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            centered
                .broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&w.to_dtype(DType::F32)?)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?
        }
        Some((w, b)) => candle_nn::ops::layer_norm(
            &xf.contiguous()?,
            &w.to_dtype(DType::F32)?,
            &b.to_dtype(DType::F32)?,
            eps as f32,
        )?,
    };
    normed.to_dtype(dtype)
}

/// Softmax over the last dim: the fused kernel, with a closed-form backward when tracked.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    fused_grad::softmax_last(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::seeded::SeededRng;
    use candle_core::{Device, Var};

    #[test]
    fn fused_and_differentiable_forms_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = SeededRng::new(1).randn((3, 5, 8), &dev)?;
        let w = SeededRng::new(2).randn(8, &dev)?;
        let b = SeededRng::new(3).randn(8, &dev)?;
        let xv = Var::from_tensor(&x)?;
        for affine in [None, Some((&w, &b))] {
            let fused = layer_norm(&x, affine, 1e-5)?;
            let slow = layer_norm(xv.as_tensor(), affine, 1e-5)?;
            let d = (fused - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "layer norm: {d}");
        }
        let d = (softmax_last(&x)? - softmax_last(xv.as_tensor())?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "softmax: {d}");
        Ok(())
    }
}
