//! Block-wise 8-bit storage of optimizer state tensors (bitsandbytes style).
//!
//! Owns: the dynamic code maps (signed for momenta, unsigned for second
//! moments), block-wise quantise/dequantise, and [`StateTensor`], the storage
//! of one state tensor in either f32 or 8 bits, with its save/load keys.
//!
//! Must not: know any update rule; `elementwise` decodes, the rule updates in
//! f32, and `elementwise` encodes.
//!
//! # Format
//! A state tensor of `n` elements is flattened, padded with zeros to a whole
//! number of blocks of `block_size` elements (default 256, the block size of
//! bitsandbytes' block-wise 8-bit optimizers), and each block is stored as its
//! absolute maximum (`f32`) and one `u8` code per element. The code indexes a
//! sorted table of 256 values in [-1, 1] (signed) or [0, 1] (unsigned); the
//! element is `table[code] * absmax`. Quantisation picks the nearest table
//! value (ties go up).
//!
//! # Code map
//! The dynamic map of Dettmers (2015) as bitsandbytes builds it with 7
//! exponent "decades": for decade `i` in 0..7 the magnitudes
//! `10^(i-6) * m` where `m` runs over the midpoints of `2^i` (signed) or
//! `2^(i+1)` (unsigned) equal steps of [0.1, 1]; signed maps hold each
//! magnitude with both signs. Add 0 and 1: 254 + 2 = 256 values for both.
//! Small values keep a relative precision, large ones are nearly linear.
//! Signed codes never flip the sign of a value: a negative value never
//! rounds to 0 (bitsandbytes corrects the code in the same way).
//!
//! Measured error (test `quant8::tests::error_is_bounded_per_block`, 65,573
//! standard-normal values, block 256; squared values for the unsigned map):
//! signed: max |x − q(x)| = 0.0070·absmax of its block (the bound is half the
//! top-decade spacing 0.9/128), mean 0.0028·absmax, median relative error
//! 1.1% over elements above 1% of absmax; unsigned: max 0.0035·absmax, mean
//! 0.00075·absmax, median relative error 0.75%.
//!
//! Implementation: nearest-code search is eight rounds of binary lifting over
//! the 256 sorted decision thresholds with plain tensor ops (gather, compare,
//! add), so quantisation runs on the parameters' device without custom
//! kernels.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Shape, Tensor};

use super::{OptimError, OptimizerState, Result};

/// Which of the two dynamic maps a state uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapKind {
    /// Values of either sign (first moments, momenta).
    Signed,
    /// Non-negative values (second moments).
    Unsigned,
}

/// The 256 sorted code values of a dynamic map, built in f64 and rounded to f32.
pub(crate) fn dynamic_map(kind: MapKind) -> [f32; 256] {
    let signed = kind == MapKind::Signed;
    let mut values: Vec<f64> = Vec::with_capacity(256);
    for decade in 0..7i32 {
        let steps = if signed {
            1usize << decade
        } else {
            2usize << decade
        };
        let scale = 10f64.powi(decade - 6);
        let width = 0.9 / steps as f64;
        for j in 0..steps {
            // Midpoint of the j-th of `steps` equal intervals of [0.1, 1].
            let m = 0.1 + width * (j as f64 + 0.5);
            values.push(scale * m);
            if signed {
                values.push(-scale * m);
            }
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f64::total_cmp);
    let mut out = [0f32; 256];
    for (o, v) in out.iter_mut().zip(values.iter()) {
        *o = *v as f32;
    }
    out
}

/// Decision thresholds for nearest-value search: `t[k]` is the smallest input
/// that maps to code `k` or above (`t[0]` is never consulted).
fn thresholds(kind: MapKind, values: &[f32; 256]) -> [f32; 256] {
    let mut t = [f32::NEG_INFINITY; 256];
    for k in 1..256 {
        t[k] = ((values[k - 1] as f64 + values[k] as f64) / 2.0) as f32;
        if kind == MapKind::Signed && values[k] == 0.0 {
            // Sign preservation: only x >= 0 may map to the zero code.
            t[k] = 0.0;
        }
    }
    t
}

/// A code map resident on one device.
#[derive(Clone, Debug)]
pub(crate) struct Codebook {
    /// (256,) f32 code values.
    values: Tensor,
    /// (256,) f32 decision thresholds.
    thresholds: Tensor,
}

impl Codebook {
    pub(crate) fn new(kind: MapKind, device: &Device) -> Result<Self> {
        let values = dynamic_map(kind);
        let thr = thresholds(kind, &values);
        Ok(Self {
            values: Tensor::from_slice(&values, 256, device)?,
            thresholds: Tensor::from_slice(&thr, 256, device)?,
        })
    }

    fn on(&self, device: &Device) -> Result<Self> {
        if self.values.device().same_device(device) {
            return Ok(self.clone());
        }
        Ok(Self {
            values: self.values.to_device(device)?,
            thresholds: self.thresholds.to_device(device)?,
        })
    }
}

/// One tensor quantised block-wise to 8 bits.
#[derive(Clone, Debug)]
pub(crate) struct Quantized {
    /// (blocks * block_size,) u8 codes; the padding tail encodes zeros.
    codes: Tensor,
    /// (blocks,) f32 per-block absolute maxima.
    absmax: Tensor,
    shape: Shape,
    block_size: usize,
}

impl Quantized {
    /// Quantises `x` (any float dtype, any shape) with `book`.
    pub(crate) fn quantize(x: &Tensor, book: &Codebook, block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(OptimError::State("block size must be positive".into()));
        }
        let shape = x.shape().clone();
        let n = shape.elem_count();
        let blocks = n.div_ceil(block_size).max(1);
        let book = book.on(x.device())?;
        let flat = x.to_dtype(DType::F32)?.flatten_all()?;
        let flat = flat.pad_with_zeros(0, 0, blocks * block_size - n)?;
        let x = flat.reshape((blocks, block_size))?;
        // (blocks, 1)
        let absmax = x.abs()?.max_keepdim(1)?;
        let normed = x.broadcast_div(&absmax.maximum(f32::MIN_POSITIVE as f64)?)?;
        // Binary lifting over the 256 sorted thresholds: after the loop,
        // idx = max{k : t[k] <= x}, the nearest code.
        let mut idx = normed.zeros_like()?;
        for bit in (0..8).rev() {
            let step = (1u32 << bit) as f64;
            let cand = idx.affine(1.0, step)?;
            let ids = cand.flatten_all()?.to_dtype(DType::U32)?;
            let thr = book
                .thresholds
                .index_select(&ids, 0)?
                .reshape((blocks, block_size))?;
            let take = normed.ge(&thr)?.to_dtype(DType::F32)?.affine(step, 0.0)?;
            idx = (idx + take)?;
        }
        Ok(Self {
            codes: idx.flatten_all()?.to_dtype(DType::U8)?,
            absmax: absmax.flatten_all()?,
            shape,
            block_size,
        })
    }

    /// The f32 tensor these codes stand for, in the original shape.
    pub(crate) fn dequantize(&self, book: &Codebook) -> Result<Tensor> {
        let book = book.on(self.codes.device())?;
        let blocks = self.absmax.elem_count();
        // u32 ids: candle's index_select maps the largest id of the id dtype
        // (255 for u8) to zero, as a padding marker.
        let ids = self.codes.to_dtype(DType::U32)?;
        let vals = book
            .values
            .index_select(&ids, 0)?
            .reshape((blocks, self.block_size))?;
        let x = vals.broadcast_mul(&self.absmax.reshape((blocks, 1))?)?;
        Ok(x.flatten_all()?
            .narrow(0, 0, self.shape.elem_count())?
            .reshape(self.shape.clone())?)
    }

    #[cfg(test)]
    pub(crate) fn codes(&self) -> &Tensor {
        &self.codes
    }
}

/// How an optimizer stores one kind of state tensor.
#[derive(Clone, Debug)]
pub(crate) enum Codec {
    /// Plain f32.
    Full,
    /// Block-wise 8-bit with the given map.
    Blockwise { book: Codebook, block_size: usize },
}

/// Settings of 8-bit optimizer state shared by the 8-bit optimizers.
#[derive(Clone, Debug)]
pub(crate) struct Quant8 {
    pub block_size: usize,
    /// Tensors with fewer elements keep f32 state (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: usize,
    pub signed: Codebook,
    pub unsigned: Codebook,
}

impl Quant8 {
    pub(crate) fn new(block_size: usize, min_8bit_size: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            block_size,
            min_8bit_size,
            signed: Codebook::new(MapKind::Signed, device)?,
            unsigned: Codebook::new(MapKind::Unsigned, device)?,
        })
    }

    /// The codec for a state of a parameter of `numel` elements.
    pub(crate) fn codec(q: Option<&Quant8>, kind: MapKind, numel: usize) -> Codec {
        match q {
            Some(q) if numel >= q.min_8bit_size => Codec::Blockwise {
                book: match kind {
                    MapKind::Signed => q.signed.clone(),
                    MapKind::Unsigned => q.unsigned.clone(),
                },
                block_size: q.block_size,
            },
            _ => Codec::Full,
        }
    }
}

/// One state tensor in the storage its codec asks for.
#[derive(Clone, Debug)]
pub(crate) enum StateTensor {
    Full(Tensor),
    Quant(Quantized),
}

impl StateTensor {
    /// Encodes an f32 tensor.
    pub(crate) fn encode(x: Tensor, codec: &Codec) -> Result<Self> {
        Ok(match codec {
            Codec::Full => Self::Full(x),
            Codec::Blockwise { book, block_size } => {
                Self::Quant(Quantized::quantize(&x, book, *block_size)?)
            }
        })
    }

    /// The f32 value.
    pub(crate) fn decode(&self, codec: &Codec) -> Result<Tensor> {
        match (self, codec) {
            (Self::Full(t), _) => Ok(t.clone()),
            (Self::Quant(q), Codec::Blockwise { book, .. }) => q.dequantize(book),
            (Self::Quant(_), Codec::Full) => Err(OptimError::State(
                "8-bit state used with an f32 codec".into(),
            )),
        }
    }

    /// Writes this tensor under `key` (8-bit: `key.codes` and `key.absmax`).
    pub(crate) fn save(&self, key: &str, out: &mut OptimizerState) {
        match self {
            Self::Full(t) => {
                out.tensors.insert(key.to_string(), t.clone());
            }
            Self::Quant(q) => {
                out.tensors.insert(format!("{key}.codes"), q.codes.clone());
                out.tensors
                    .insert(format!("{key}.absmax"), q.absmax.clone());
            }
        }
    }

    /// Reads a tensor written by [`StateTensor::save`] for a state of `shape`
    /// on `device`, marking the keys it used.
    pub fn load(
        key: &str,
        st: &OptimizerState,
        codec: &Codec,
        shape: &Shape,
        device: &Device,
        used: &mut BTreeSet<String>,
    ) -> Result<Self> {
        match codec {
            Codec::Full => Ok(Self::Full(super::load_tensor(
                st,
                key,
                DType::F32,
                shape,
                device,
                used,
            )?)),
            Codec::Blockwise { block_size, .. } => {
                let n = shape.elem_count();
                let blocks = n.div_ceil(*block_size).max(1);
                let codes = super::load_tensor(
                    st,
                    &format!("{key}.codes"),
                    DType::U8,
                    &Shape::from(blocks * block_size),
                    device,
                    used,
                )?;
                let absmax = super::load_tensor(
                    st,
                    &format!("{key}.absmax"),
                    DType::F32,
                    &Shape::from(blocks),
                    device,
                    used,
                )?;
                Ok(Self::Quant(Quantized {
                    codes,
                    absmax,
                    shape: shape.clone(),
                    block_size: *block_size,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        // Box-Muller over a small LCG: deterministic, no extra crates.
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (next(), next());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn maps_are_sorted_and_complete() {
        for kind in [MapKind::Signed, MapKind::Unsigned] {
            let m = dynamic_map(kind);
            assert!(
                m.windows(2).all(|w| w[0] < w[1]),
                "{kind:?} not strictly sorted"
            );
            assert_eq!(m[255], 1.0);
            assert!(m.contains(&0.0));
        }
        let s = dynamic_map(MapKind::Signed);
        assert!(s[0] < -0.99 && s[0] > -1.0);
        assert_eq!(s.iter().filter(|v| **v > 0.0).count(), 128);
        let u = dynamic_map(MapKind::Unsigned);
        assert_eq!(u[0], 0.0);
        // Smallest non-zero magnitudes: 1e-6 times the first midpoint.
        assert!((u[1] as f64 - 1e-6 * (0.1 + 0.9 / 4.0)).abs() < 1e-12);
    }

    #[test]
    fn error_is_bounded_per_block() -> Result<()> {
        let dev = Device::Cpu;
        let n = 65536 + 37; // a ragged last block
        let block = 256;
        for kind in [MapKind::Signed, MapKind::Unsigned] {
            let mut data = normal(n, 7);
            if kind == MapKind::Unsigned {
                data.iter_mut().for_each(|x| *x = *x * *x);
            }
            let book = Codebook::new(kind, &dev)?;
            let x = Tensor::from_slice(&data, (n,), &dev)?;
            let q = Quantized::quantize(&x, &book, block)?;
            let back: Vec<f32> = q.dequantize(&book)?.to_vec1()?;
            let bound = match kind {
                MapKind::Signed => 0.0071,
                MapKind::Unsigned => 0.0036,
            };
            let (mut worst, mut sum_err, mut rel) = (0f64, 0f64, Vec::new());
            for (b, chunk) in data.chunks(block).enumerate() {
                let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                for (i, v) in chunk.iter().enumerate() {
                    let e = (*v as f64 - back[b * block + i] as f64).abs();
                    assert!(
                        e <= bound * amax,
                        "{kind:?} block {b}: err {e} > {bound}·{amax}"
                    );
                    worst = worst.max(e / amax);
                    sum_err += e / amax;
                    if v.abs() as f64 > 0.01 * amax {
                        rel.push(e / v.abs() as f64);
                    }
                }
            }
            rel.sort_by(f64::total_cmp);
            println!(
                "{kind:?}: max err/absmax {worst:.5}, mean err/absmax {:.5}, median rel err (>1% absmax) {:.4}",
                sum_err / n as f64,
                rel[rel.len() / 2]
            );
        }
        Ok(())
    }

    #[test]
    fn quantisation_picks_the_nearest_code_and_keeps_signs() -> Result<()> {
        let dev = Device::Cpu;
        let map = dynamic_map(MapKind::Signed);
        let book = Codebook::new(MapKind::Signed, &dev)?;
        // Block of 4: absmax 1, so the values are normalised already.
        let xs = [1.0f32, -1e-9, 3e-9, 0.3333];
        let q = Quantized::quantize(&Tensor::new(&xs, &dev)?, &book, 4)?;
        let codes: Vec<u8> = q.codes().to_vec1()?;
        for (x, c) in xs.iter().zip(&codes) {
            let got = map[*c as usize];
            let nearest = map
                .iter()
                .copied()
                .min_by(|a, b| (a - x).abs().total_cmp(&(b - x).abs()))
                .unwrap_or(0.0);
            if *x < 0.0 {
                assert!(got < 0.0, "negative {x} lost its sign: {got}");
            } else {
                assert_eq!(got, nearest, "x = {x}");
            }
        }
        // All-zero blocks stay zero (no division by a zero absmax).
        let z = Quantized::quantize(&Tensor::zeros(10, DType::F32, &dev)?, &book, 4)?;
        let back: Vec<f32> = z.dequantize(&book)?.to_vec1()?;
        assert!(back.iter().all(|v| *v == 0.0));
        Ok(())
    }
}
