//! Helpers shared by the crate's unit tests (compiled only for tests).

use candle_core::Tensor;

/// max |a − b| over all elements.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}

/// ‖a − b‖ / ‖b‖.
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| {
        t.sqr()
            .and_then(|t| t.sum_all())
            .and_then(|t| t.sqrt())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("a norm")
    };
    norm(&(a - b).expect("tensors of one shape")) / norm(b)
}
