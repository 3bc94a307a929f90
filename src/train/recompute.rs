//! Loss and gradients of one batch, optionally with gradient checkpointing by
//! block recomputation.
//!
//! Plain mode keeps every activation of the forward pass for backward. Checkpointed
//! mode runs the blocks once without keeping their activations (only each block's
//! input survives), then walks the blocks backwards: each block is recomputed with
//! its input as a `Var`, `sum(out · grad_out)` is back-propagated to get the block's
//! parameter gradients and the gradient of its input, which becomes the next
//! `grad_out`. The shared conditioning vector gets its gradient summed over blocks;
//! the embedders get theirs last through a surrogate `Σ emb · grad`. Peak memory is
//! then one block's activations instead of all of them.
//!
//! Must not: update parameters (the optimizer does).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::objective::mse;
use crate::model::adapter::AdapterSet;
use crate::model::flux::{Flux, FluxInputs};

/// The batch loss (MSE of the prediction against `target`) and the gradients of
/// `params`, `scale`·loss being what is differentiated (1 / accumulation steps).
/// The returned store holds only the parameters' gradients, detached, so no forward
/// graph outlives this call.
pub(crate) fn loss_and_grads(
    flux: &Flux,
    inputs: &FluxInputs,
    adapters: &AdapterSet,
    target: &Tensor,
    scale: f64,
    checkpointing: bool,
    params: &[Var],
) -> Result<(f32, GradStore)> {
    let mut param_grads = GradStore::default();
    if !checkpointing {
        let pred = flux.forward(inputs, adapters)?;
        let loss = mse(&pred, target)?;
        let grads = (&loss * scale)?.backward()?;
        keep_params(&mut param_grads, &grads, params)?;
        return Ok((loss.to_scalar::<f32>()?, param_grads));
    }

    let emb = flux.embed(inputs, adapters)?;
    let vec = emb.vec.detach();
    let pe = &emb.pe;

    // Forward without keeping activations: only block inputs survive.
    let mut img = emb.img.detach();
    let mut txt = emb.txt.detach();
    let mut double_inputs = Vec::with_capacity(flux.double_blocks.len());
    for block in &flux.double_blocks {
        double_inputs.push((img.clone(), txt.clone()));
        let (i, t) = block.forward(&img, &txt, &vec, pe, adapters)?;
        img = i.detach();
        txt = t.detach();
    }
    let n_txt = txt.dim(1)?;
    let mut x = Tensor::cat(&[&txt, &img], 1)?;
    let mut single_inputs = Vec::with_capacity(flux.single_blocks.len());
    for block in &flux.single_blocks {
        single_inputs.push(x.clone());
        x = block.forward(&x, &vec, pe, adapters)?.detach();
    }

    // Head: the loss and the gradient at the last block's output.
    let x_var = Var::from_tensor(&x)?;
    let vec_var = Var::from_tensor(&vec)?;
    let pred = flux.head(x_var.as_tensor(), n_txt, vec_var.as_tensor(), adapters)?;
    let loss = mse(&pred, target)?;
    let mut grads = (&loss * scale)?.backward()?;
    let mut grad_x = take(&mut grads, x_var.as_tensor())?;
    let mut grad_vec = take(&mut grads, vec_var.as_tensor())?;
    keep_params(&mut param_grads, &grads, params)?;
    drop(grads);

    // Backwards through the single blocks, recomputing each.
    for (block, input) in flux.single_blocks.iter().zip(single_inputs).rev() {
        let xv = Var::from_tensor(&input)?;
        let vv = Var::from_tensor(&vec)?;
        let out = block.forward(xv.as_tensor(), vv.as_tensor(), pe, adapters)?;
        let mut g = out.mul(&grad_x)?.sum_all()?.backward()?;
        grad_x = take(&mut g, xv.as_tensor())?;
        grad_vec = (grad_vec + take(&mut g, vv.as_tensor())?)?;
        keep_params(&mut param_grads, &g, params)?;
    }

    // The joint sequence splits back into text and image streams.
    let n_img = grad_x.dim(1)? - n_txt;
    let mut grad_txt = grad_x.narrow(1, 0, n_txt)?;
    let mut grad_img = grad_x.narrow(1, n_txt, n_img)?;
    for (block, (img_in, txt_in)) in flux.double_blocks.iter().zip(double_inputs).rev() {
        let iv = Var::from_tensor(&img_in)?;
        let tv = Var::from_tensor(&txt_in)?;
        let vv = Var::from_tensor(&vec)?;
        let (img_out, txt_out) =
            block.forward(iv.as_tensor(), tv.as_tensor(), vv.as_tensor(), pe, adapters)?;
        let surrogate =
            (img_out.mul(&grad_img)?.sum_all()? + txt_out.mul(&grad_txt)?.sum_all()?)?;
        let mut g = surrogate.backward()?;
        grad_img = take(&mut g, iv.as_tensor())?;
        grad_txt = take(&mut g, tv.as_tensor())?;
        grad_vec = (grad_vec + take(&mut g, vv.as_tensor())?)?;
        keep_params(&mut param_grads, &g, params)?;
    }

    // Finally the embedders, through the graph kept from `embed`.
    let surrogate = ((emb.img.mul(&grad_img)?.sum_all()? + emb.txt.mul(&grad_txt)?.sum_all()?)?
        + emb.vec.mul(&grad_vec)?.sum_all()?)?;
    if surrogate.track_op() {
        keep_params(&mut param_grads, &surrogate.backward()?, params)?;
    }
    Ok((loss.to_scalar::<f32>()?, param_grads))
}

/// Removes and returns the gradient of `t`, detached (zeros when it received none).
fn take(grads: &mut GradStore, t: &Tensor) -> Result<Tensor> {
    match grads.remove(t) {
        Some(g) => Ok(g.detach()),
        None => t.zeros_like(),
    }
}

/// Adds the (detached) gradients of `params` found in `from` to `into`.
pub(crate) fn keep_params(into: &mut GradStore, from: &GradStore, params: &[Var]) -> Result<()> {
    for p in params {
        if let Some(g) = from.get(p.as_tensor()) {
            let g = g.detach();
            let sum = match into.remove(p.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            into.insert(p.as_tensor(), sum);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flux::{image_ids, text_ids, FluxConfig, WeightSource};
    use crate::model::seeded::SeededRng;
    use crate::train::network::{NetworkConfig, TargetPreset, TrainableLora};
    use candle_core::{DType, Device};

    #[test]
    fn checkpointed_gradients_equal_plain_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = FluxConfig {
            in_channels: 8,
            vec_in_dim: 12,
            context_in_dim: 10,
            hidden_size: 32,
            mlp_ratio: 2.0,
            num_heads: 2,
            depth: 2,
            depth_single_blocks: 2,
            axes_dim: vec![4, 6, 6],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        };
        let flux = Flux::new(&cfg, &WeightSource::Seeded(3), DType::F32, &dev)?;
        let net = NetworkConfig {
            rank: 2,
            targets: TargetPreset::AllLinear,
            ..NetworkConfig::default()
        };
        let lora = TrainableLora::new(&net, flux.linear_shapes(), 1, &dev)?;
        // Non-zero ups so every path carries gradient.
        for (_, _, up) in &lora.vars {
            up.set(&(SeededRng::new(4).randn(up.shape(), &dev)? * 0.1)?)?;
        }
        let adapters = AdapterSet::none().with(lora.lora.clone(), 1.0);
        let mut rng = SeededRng::new(9);
        let (img, txt, y) = (
            rng.randn((2, 6, 8), &dev)?,
            rng.randn((2, 3, 10), &dev)?,
            rng.randn((2, 12), &dev)?,
        );
        let (img_ids, txt_ids) = (image_ids(2, 2, 3, &dev)?, text_ids(2, 3, &dev)?);
        let t = Tensor::new(&[0.2f32, 0.7], &dev)?;
        let g = Tensor::new(&[1.0f32, 1.0], &dev)?;
        let inputs = FluxInputs {
            img: &img,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            timesteps: &t,
            y: &y,
            guidance: Some(&g),
        };
        let target = rng.randn((2, 6, 8), &dev)?;
        let params = lora.params();
        let (l1, plain) = loss_and_grads(&flux, &inputs, &adapters, &target, 0.5, false, &params)?;
        let (l2, ckpt) = loss_and_grads(&flux, &inputs, &adapters, &target, 0.5, true, &params)?;
        assert!((l1 - l2).abs() < 1e-6 * l1.abs().max(1.0), "{l1} vs {l2}");
        for p in lora.params() {
            let a = plain.get(p.as_tensor()).expect("plain gradient");
            let b = ckpt.get(p.as_tensor()).expect("checkpointed gradient");
            let num = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let den = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            assert!(den > 0.0, "zero gradient");
            assert!(num / den < 1e-4, "relative difference {}", num / den);
        }
        Ok(())
    }
}
