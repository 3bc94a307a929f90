//! Flux's latent packing conventions: (b, c, h, w) latents as (b, tokens, c·4)
//! sequences of 2×2 patches, and the 3-axis position ids of image and text tokens.
//! Sampling and training both feed the model through these.

use candle_core::{DType, Device, Result, Tensor};

/// (b, c, h, w) latents → (b, h/2·w/2, c·4) tokens: 2×2 patches, channel-major (BFL's
/// `b c (h ph) (w pw) -> b (h w) (c ph pw)`).
pub fn pack_latents(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("latent height and width must be even, got {h}×{w}")
    }
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack_latents`] for a latent of `h`×`w` (in latent pixels).
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _n, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

/// Position ids (b, rows·cols, 3) = (0, row, col) for a token grid.
pub fn image_ids(b: usize, rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            data.extend([0f32, r as f32, c as f32]);
        }
    }
    Tensor::from_vec(data, (1, rows * cols, 3), device)?.repeat((b, 1, 1))
}

/// Position ids (b, n, 3) of zeros for text tokens.
pub fn text_ids(b: usize, n: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((b, n, 3), DType::F32, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::seeded::SeededRng;

    #[test]
    fn pack_and_unpack_are_inverse() -> Result<()> {
        let dev = Device::Cpu;
        let x = SeededRng::new(2).randn((2, 4, 6, 8), &dev)?;
        let packed = pack_latents(&x)?;
        assert_eq!(packed.dims(), &[2, 12, 16]);
        let back = unpack_latents(&packed, 6, 8)?;
        assert_eq!((back - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
