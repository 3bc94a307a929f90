//! The optimizer shared by the update rules whose state is a few tensors
//! shaped like the parameter: AdamW, Lion and SGD with Nesterov momentum,
//! each with f32 state or, for the 8-bit kinds, block-wise 8-bit state.
//!
//! Owns: [`ElementwiseRule`] (what a rule file provides: its kinds, the names
//! and code maps of its state tensors, its per-parameter update) and
//! [`ElementwiseOptimizer`], which steps the groups with a rule, decoding each
//! state before and encoding it after the update, and saves and loads the
//! states under `<group>.<index>.<name>`.
//!
//! Must not: hold any rule's arithmetic (that is the rule's file) or any
//! quantisation detail (that is `quant8`).

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::quant8::{Codec, MapKind, Quant8, StateTensor};
use super::{check_all_used, Groups, Optimizer, OptimizerKind, OptimizerState, ParamGroup, Result};

/// A per-parameter update rule with state tensors shaped like the parameter.
pub(super) trait ElementwiseRule: Send {
    /// The kind of this rule with f32 state.
    const KIND: OptimizerKind;
    /// The kind of this rule with 8-bit state.
    const KIND_8BIT: OptimizerKind;
    /// Each state tensor's name in the saved state and its 8-bit code map, in
    /// the order [`ElementwiseRule::update`] takes and returns them.
    const STATE: &'static [(&'static str, MapKind)];

    /// The new value and state of one parameter, from its f32 value `p`, its
    /// f32 gradient `g`, its decoded state (`None` before its first update),
    /// its group's learning rate and the number of updates it had so far.
    fn update(
        &self,
        p: Tensor,
        g: Tensor,
        state: Option<&[Tensor]>,
        lr: f64,
        steps: u64,
    ) -> Result<(Tensor, Vec<Tensor>)>;
}

/// An [`ElementwiseRule`] over parameter groups; 8-bit state when built with
/// 8-bit settings.
pub(super) struct ElementwiseOptimizer<R> {
    rule: R,
    groups: Groups<Vec<StateTensor>>,
    quant: Option<Quant8>,
}

impl<R: ElementwiseRule> ElementwiseOptimizer<R> {
    pub(super) fn new(rule: R, groups: Vec<ParamGroup>, quant: Option<Quant8>) -> Self {
        Self {
            rule,
            groups: Groups::new(groups),
            quant,
        }
    }
}

/// The codec of each state tensor of a parameter of `numel` elements.
fn codecs<R: ElementwiseRule>(quant: Option<&Quant8>, numel: usize) -> Vec<Codec> {
    R::STATE
        .iter()
        .map(|&(_, map)| Quant8::codec(quant, map, numel))
        .collect()
}

impl<R: ElementwiseRule> Optimizer for ElementwiseOptimizer<R> {
    fn kind(&self) -> OptimizerKind {
        if self.quant.is_some() {
            R::KIND_8BIT
        } else {
            R::KIND
        }
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let (rule, quant) = (&self.rule, self.quant.as_ref());
        self.groups.step(grads, |_, lr, p, g, state, steps| {
            let codecs = codecs::<R>(quant, p.elem_count());
            let decoded = match state {
                Some(tensors) => Some(
                    tensors
                        .iter()
                        .zip(&codecs)
                        .map(|(t, codec)| t.decode(codec))
                        .collect::<Result<Vec<_>>>()?,
                ),
                None => None,
            };
            let (p, state) = rule.update(p, g, decoded.as_deref(), lr, steps)?;
            let encoded = state
                .into_iter()
                .zip(&codecs)
                .map(|(t, codec)| StateTensor::encode(t, codec))
                .collect::<Result<_>>()?;
            Ok((p, encoded))
        })
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.groups.set_lr(group, lr)
    }

    fn lr(&self, group: usize) -> Option<f64> {
        self.groups.lr(group)
    }

    fn state(&self) -> Result<OptimizerState> {
        Ok(self.groups.save(self.kind(), |tensors, prefix, out| {
            for ((name, _), t) in R::STATE.iter().zip(tensors) {
                t.save(&format!("{prefix}.{name}"), out);
            }
        }))
    }

    fn load_state(&mut self, st: &OptimizerState) -> Result<()> {
        let quant = self.quant.as_ref();
        let (loaded, used) = self.groups.load(self.kind(), st, |prefix, var, st, used| {
            let codecs = codecs::<R>(quant, var.elem_count());
            R::STATE
                .iter()
                .zip(&codecs)
                .map(|((name, _), codec)| {
                    let key = format!("{prefix}.{name}");
                    StateTensor::load(&key, st, codec, var.shape(), var.device(), used)
                })
                .collect()
        })?;
        check_all_used(st, &used)?;
        self.groups.commit(loaded, st.step);
        Ok(())
    }
}
