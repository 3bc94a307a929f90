//! Deterministic weights: a `VarBuilder` backend that makes every tensor from a
//! fixed seed and the tensor's name, honouring the layer's init hint.
//!
//! Owns the reproducible random numbers of the project (tiny model weights,
//! sampling noise): the same seed gives the same numbers on every machine and
//! every version, independent of candle's own RNG.
//!
//! Must not: allocate on a device other than the one asked for.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// SplitMix64: a small, well-mixed, portable generator.
#[derive(Clone, Debug)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one named stream under `seed` (FNV-1a of the name mixed in).
    pub(crate) fn for_name(seed: u64, name: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = Self::new(seed ^ h.rotate_left(17));
        rng.next_u64();
        rng
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub(crate) fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect()
    }

    pub(crate) fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (hi - lo) * self.uniform()) as f32)
            .collect()
    }

    /// A standard-normal tensor of `shape` (f32 on `device`).
    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data = self.normal_vec(shape.elem_count(), 0.0, 1.0);
        Tensor::from_vec(data, shape, device)
    }
}

/// Weights made from `(seed, name)`; see the module doc.
pub(crate) struct SeededInit {
    pub seed: u64,
}

impl SeededInit {
    pub(crate) fn var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SeededInit { seed }), dtype, device.clone())
    }
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = s.elem_count();
        let mut rng = SeededRng::for_name(self.seed, name);
        let data = match h {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => rng.normal_vec(n, mean, stdev),
            Init::Uniform { lo, up } => rng.uniform_vec(n, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = fan.for_shape(&s).max(1) as f64;
                let std = non_linearity.gain() / fan.sqrt();
                match dist {
                    NormalOrUniform::Normal => rng.normal_vec(n, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        rng.uniform_vec(n, -bound, bound)
                    }
                }
            }
        };
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded weights need a shape: {name} was asked for without one")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_name_give_same_numbers() {
        let a = SeededRng::for_name(7, "x").normal_vec(4, 0.0, 1.0);
        let b = SeededRng::for_name(7, "x").normal_vec(4, 0.0, 1.0);
        let c = SeededRng::for_name(7, "y").normal_vec(4, 0.0, 1.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_has_unit_moments() {
        let v = SeededRng::new(1).normal_vec(20_000, 0.0, 1.0);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
