//! The one place that knows how the Flux transformer's module names of Black
//! Forest Labs (BFL; the layout of `flux1-dev.safetensors` and ComfyUI) relate to
//! the names of diffusers' `FluxTransformer2DModel`.
//!
//! Owns: the table of linear modules (BFL path ↔ diffusers path(s), and which output
//! rows each diffusers part covers when BFL fuses several projections into one
//! linear), the kohya-style underscored spellings of both, and the conversion of a
//! whole diffusers-layout transformer state dict into BFL keys.
//!
//! The table follows diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
//! (`loaders/single_file_utils.py`) and ComfyUI's `utils.flux_to_diffusers`:
//! - double block N: `img_attn.qkv` = rows of `attn.to_q | to_k | to_v` (three equal
//!   slices), `txt_attn.qkv` = `attn.add_q_proj | add_k_proj | add_v_proj`;
//! - single block N: `linear1` = `attn.to_q | to_k | to_v | proj_mlp` (hidden, hidden,
//!   hidden, mlp_hidden rows, hidden = in_features);
//! - `final_layer.adaLN_modulation.1` = `norm_out.linear` with its two row halves
//!   swapped (BFL emits (shift, scale), diffusers (scale, shift)).
//!
//! Must not: read files, know about LoRA file formats (that is `lora_io`), or decide
//! devices and dtypes: tensors keep the device and dtype of their source.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use candle_core::Tensor;

/// Flux's MLP ratio: a single block's `proj_mlp` has `4 · hidden` rows. Only used
/// when a LoRA on `linear1` carries no `proj_mlp` part and the size must be guessed.
pub(crate) const FLUX_MLP_RATIO: usize = 4;

/// Errors of the key conversion; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeymapError {
    #[error("missing tensor `{key}` (needed to build `{needed_for}`)")]
    MissingKey { key: String, needed_for: String },
    #[error("tensor `{key}`: {reason}")]
    Shape { key: String, reason: String },
    #[error("tensor `{key}`: {source}")]
    Tensor {
        key: String,
        #[source]
        source: candle_core::Error,
    },
}

/// How the output rows of one BFL linear are laid out over its diffusers parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowLayout {
    /// One diffusers module, same rows.
    Same,
    /// One diffusers module whose two row halves are swapped (`norm_out.linear`).
    SwappedHalves,
    /// Three diffusers modules (q, k, v), three equal row slices.
    Qkv,
    /// Four diffusers modules (q, k, v, mlp): `in_features` rows each for q, k, v,
    /// the rest for the MLP input projection (`single_blocks.N.linear1`).
    QkvMlp,
}

impl RowLayout {
    /// How many diffusers parts make up the BFL module.
    pub(crate) fn parts(self) -> usize {
        match self {
            RowLayout::Same | RowLayout::SwappedHalves => 1,
            RowLayout::Qkv => 3,
            RowLayout::QkvMlp => 4,
        }
    }

    /// The BFL row range of each part for a fused linear of `out_rows` rows and
    /// `in_features` inputs. For [`RowLayout::SwappedHalves`] the single range is the
    /// whole matrix (the permutation is [`swap_halves`]).
    #[allow(clippy::single_range_in_vec_init)] // one part covering all rows is meant
    pub fn part_rows(
        self,
        out_rows: usize,
        in_features: usize,
    ) -> Result<Vec<Range<usize>>, String> {
        match self {
            RowLayout::Same => Ok(vec![0..out_rows]),
            RowLayout::SwappedHalves => {
                if !out_rows.is_multiple_of(2) {
                    return Err(format!("{out_rows} rows cannot be split into two halves"));
                }
                Ok(vec![0..out_rows])
            }
            RowLayout::Qkv => {
                if !out_rows.is_multiple_of(3) {
                    return Err(format!("{out_rows} rows cannot be split into q, k, v"));
                }
                let n = out_rows / 3;
                Ok(vec![0..n, n..2 * n, 2 * n..3 * n])
            }
            RowLayout::QkvMlp => {
                let h = in_features;
                if out_rows <= 3 * h {
                    return Err(format!(
                        "{out_rows} rows leave nothing for the MLP after q, k, v of {h} rows each"
                    ));
                }
                Ok(vec![0..h, h..2 * h, 2 * h..3 * h, 3 * h..out_rows])
            }
        }
    }
}

/// One BFL linear module and its diffusers counterpart(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearMap {
    /// BFL module path, e.g. `double_blocks.0.img_attn.qkv`.
    pub bfl: String,
    /// Diffusers module paths in BFL row order, e.g. `transformer_blocks.0.attn.to_q`, …
    pub diffusers: Vec<String>,
    pub layout: RowLayout,
}

/// Which part of the network a BFL module belongs to (for reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ModuleGroup {
    Double(usize),
    Single(usize),
    Other,
}

/// (BFL suffix, layout, diffusers suffixes).
type Table = &'static [(&'static str, RowLayout, &'static [&'static str])];

// Inside `double_blocks.N.` / `transformer_blocks.N.`.
const DOUBLE_BLOCK: Table = &[
    ("img_mod.lin", RowLayout::Same, &["norm1.linear"]),
    (
        "img_attn.qkv",
        RowLayout::Qkv,
        &["attn.to_q", "attn.to_k", "attn.to_v"],
    ),
    ("img_attn.proj", RowLayout::Same, &["attn.to_out.0"]),
    ("img_mlp.0", RowLayout::Same, &["ff.net.0.proj"]),
    ("img_mlp.2", RowLayout::Same, &["ff.net.2"]),
    ("txt_mod.lin", RowLayout::Same, &["norm1_context.linear"]),
    (
        "txt_attn.qkv",
        RowLayout::Qkv,
        &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ),
    ("txt_attn.proj", RowLayout::Same, &["attn.to_add_out"]),
    ("txt_mlp.0", RowLayout::Same, &["ff_context.net.0.proj"]),
    ("txt_mlp.2", RowLayout::Same, &["ff_context.net.2"]),
];

// Inside `single_blocks.N.` / `single_transformer_blocks.N.`.
const SINGLE_BLOCK: Table = &[
    (
        "linear1",
        RowLayout::QkvMlp,
        &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    ),
    ("linear2", RowLayout::Same, &["proj_out"]),
    ("modulation.lin", RowLayout::Same, &["norm.linear"]),
];

const TOP_LEVEL: Table = &[
    ("img_in", RowLayout::Same, &["x_embedder"]),
    ("txt_in", RowLayout::Same, &["context_embedder"]),
    (
        "time_in.in_layer",
        RowLayout::Same,
        &["time_text_embed.timestep_embedder.linear_1"],
    ),
    (
        "time_in.out_layer",
        RowLayout::Same,
        &["time_text_embed.timestep_embedder.linear_2"],
    ),
    (
        "vector_in.in_layer",
        RowLayout::Same,
        &["time_text_embed.text_embedder.linear_1"],
    ),
    (
        "vector_in.out_layer",
        RowLayout::Same,
        &["time_text_embed.text_embedder.linear_2"],
    ),
    (
        "guidance_in.in_layer",
        RowLayout::Same,
        &["time_text_embed.guidance_embedder.linear_1"],
    ),
    (
        "guidance_in.out_layer",
        RowLayout::Same,
        &["time_text_embed.guidance_embedder.linear_2"],
    ),
    ("final_layer.linear", RowLayout::Same, &["proj_out"]),
    (
        "final_layer.adaLN_modulation.1",
        RowLayout::SwappedHalves,
        &["norm_out.linear"],
    ),
];

// Non-linear parameters that only change name: (BFL suffix, diffusers suffix).
const DOUBLE_BLOCK_NORMS: &[(&str, &str)] = &[
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
];
const SINGLE_BLOCK_NORMS: &[(&str, &str)] = &[
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
];

const BFL_DOUBLE: &str = "double_blocks.";
const BFL_SINGLE: &str = "single_blocks.";
const DIFF_DOUBLE: &str = "transformer_blocks.";
const DIFF_SINGLE: &str = "single_transformer_blocks.";

/// Splits `prefix` + `N.` + rest; returns (N, rest).
fn split_block<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (idx, tail) = rest.split_once('.')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((idx.parse().ok()?, tail))
}

/// Same for underscored names: `prefix` + `N_` + rest.
fn split_block_underscored<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (idx, tail) = rest.split_once('_')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((idx.parse().ok()?, tail))
}

fn make_map(bfl: String, diff_prefix: &str, layout: RowLayout, diff: &[&str]) -> LinearMap {
    LinearMap {
        bfl,
        diffusers: diff.iter().map(|d| format!("{diff_prefix}{d}")).collect(),
        layout,
    }
}

/// The diffusers counterpart(s) of a BFL linear module path, or `None` if `bfl` is
/// not a linear of the Flux transformer.
pub fn linear_from_bfl(bfl: &str) -> Option<LinearMap> {
    if let Some((n, rest)) = split_block(bfl, BFL_DOUBLE) {
        let (_, layout, diff) = DOUBLE_BLOCK.iter().find(|(b, _, _)| *b == rest)?;
        return Some(make_map(
            bfl.to_string(),
            &format!("{DIFF_DOUBLE}{n}."),
            *layout,
            diff,
        ));
    }
    if let Some((n, rest)) = split_block(bfl, BFL_SINGLE) {
        let (_, layout, diff) = SINGLE_BLOCK.iter().find(|(b, _, _)| *b == rest)?;
        return Some(make_map(
            bfl.to_string(),
            &format!("{DIFF_SINGLE}{n}."),
            *layout,
            diff,
        ));
    }
    let (_, layout, diff) = TOP_LEVEL.iter().find(|(b, _, _)| *b == bfl)?;
    Some(make_map(bfl.to_string(), "", *layout, diff))
}

/// The BFL module a diffusers linear belongs to, and which part of it (index into
/// [`LinearMap::diffusers`]) the diffusers module is.
pub(crate) fn linear_from_diffusers(diffusers: &str) -> Option<(LinearMap, usize)> {
    let find = |table: Table, rest: &str| {
        table.iter().find_map(|(b, layout, diff)| {
            diff.iter()
                .position(|d| *d == rest)
                .map(|part| (*b, *layout, *diff, part))
        })
    };
    if let Some((n, rest)) = split_block(diffusers, DIFF_SINGLE) {
        let (b, layout, diff, part) = find(SINGLE_BLOCK, rest)?;
        let map = make_map(
            format!("{BFL_SINGLE}{n}.{b}"),
            &format!("{DIFF_SINGLE}{n}."),
            layout,
            diff,
        );
        return Some((map, part));
    }
    if let Some((n, rest)) = split_block(diffusers, DIFF_DOUBLE) {
        let (b, layout, diff, part) = find(DOUBLE_BLOCK, rest)?;
        let map = make_map(
            format!("{BFL_DOUBLE}{n}.{b}"),
            &format!("{DIFF_DOUBLE}{n}."),
            layout,
            diff,
        );
        return Some((map, part));
    }
    let (b, layout, diff, part) = find(TOP_LEVEL, diffusers)?;
    Some((make_map(b.to_string(), "", layout, diff), part))
}

fn underscored(s: &str) -> String {
    s.replace('.', "_")
}

/// The BFL path of a kohya-style underscored name (without the `lora_unet_` prefix),
/// e.g. `double_blocks_0_img_attn_qkv` → `double_blocks.0.img_attn.qkv`.
pub(crate) fn bfl_from_underscored(name: &str) -> Option<String> {
    if let Some((n, rest)) = split_block_underscored(name, "double_blocks_") {
        let (b, _, _) = DOUBLE_BLOCK
            .iter()
            .find(|(b, _, _)| underscored(b) == rest)?;
        return Some(format!("{BFL_DOUBLE}{n}.{b}"));
    }
    if let Some((n, rest)) = split_block_underscored(name, "single_blocks_") {
        let (b, _, _) = SINGLE_BLOCK
            .iter()
            .find(|(b, _, _)| underscored(b) == rest)?;
        return Some(format!("{BFL_SINGLE}{n}.{b}"));
    }
    TOP_LEVEL
        .iter()
        .find(|(b, _, _)| underscored(b) == name)
        .map(|(b, _, _)| b.to_string())
}

/// The diffusers path of an underscored diffusers name (OneTrainer's
/// `lora_transformer_…`, SimpleTuner's `lycoris_…`, without the prefix), e.g.
/// `single_transformer_blocks_3_attn_to_q` → `single_transformer_blocks.3.attn.to_q`.
pub(crate) fn diffusers_from_underscored(name: &str) -> Option<String> {
    let find = |table: Table, rest: &str| {
        table
            .iter()
            .flat_map(|(_, _, diff)| diff.iter())
            .find(|d| underscored(d) == rest)
            .map(|d| d.to_string())
    };
    // Single first: `single_transformer_blocks_` does not start with
    // `transformer_blocks_`, but keep the order explicit anyway.
    if let Some((n, rest)) = split_block_underscored(name, "single_transformer_blocks_") {
        return find(SINGLE_BLOCK, rest).map(|d| format!("{DIFF_SINGLE}{n}.{d}"));
    }
    if let Some((n, rest)) = split_block_underscored(name, "transformer_blocks_") {
        return find(DOUBLE_BLOCK, rest).map(|d| format!("{DIFF_DOUBLE}{n}.{d}"));
    }
    find(TOP_LEVEL, name)
}

/// kohya's module name for a BFL path: `lora_unet_` + the path with `.` → `_`.
pub(crate) fn kohya_name(bfl: &str) -> String {
    format!("lora_unet_{}", underscored(bfl))
}

/// The block a BFL module path belongs to.
pub(crate) fn module_group(bfl: &str) -> ModuleGroup {
    if let Some((n, _)) = split_block(bfl, BFL_DOUBLE) {
        ModuleGroup::Double(n)
    } else if let Some((n, _)) = split_block(bfl, BFL_SINGLE) {
        ModuleGroup::Single(n)
    } else {
        ModuleGroup::Other
    }
}

/// Every linear module path of a Flux transformer with the given depth, from the
/// tables above (for the tests of the tables and of the trainer's module selection).
#[cfg(test)]
pub(crate) fn bfl_linear_modules(n_double: usize, n_single: usize, guidance: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (b, _, _) in TOP_LEVEL {
        if !guidance && b.starts_with("guidance_in.") {
            continue;
        }
        out.push(b.to_string());
    }
    for n in 0..n_double {
        out.extend(
            DOUBLE_BLOCK
                .iter()
                .map(|(b, _, _)| format!("{BFL_DOUBLE}{n}.{b}")),
        );
    }
    for n in 0..n_single {
        out.extend(
            SINGLE_BLOCK
                .iter()
                .map(|(b, _, _)| format!("{BFL_SINGLE}{n}.{b}")),
        );
    }
    out
}

/// Swaps the two row halves of a tensor (dim 0): (shift, scale) ↔ (scale, shift).
/// The operation is its own inverse.
pub fn swap_halves(t: &Tensor) -> candle_core::Result<Tensor> {
    let rows = t.dim(0)?;
    if rows % 2 != 0 {
        candle_core::bail!("cannot swap the halves of {rows} rows");
    }
    let h = rows / 2;
    Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)
}

/// CLIP-L text-encoder linears: our module path (`te1.text_model.encoder.layers.N.…`,
/// see `model::clip`), kohya's `lora_te1_text_model_encoder_layers_N_…` stem and
/// diffusers/peft's `text_encoder.text_model.encoder.layers.N.…`.
const CLIP_LEAVES: [(&str, &str); 6] = [
    ("self_attn_q_proj", "self_attn.q_proj"),
    ("self_attn_k_proj", "self_attn.k_proj"),
    ("self_attn_v_proj", "self_attn.v_proj"),
    ("self_attn_out_proj", "self_attn.out_proj"),
    ("mlp_fc1", "mlp.fc1"),
    ("mlp_fc2", "mlp.fc2"),
];

/// Our CLIP module path from kohya's stem after `lora_te1_`.
pub(crate) fn clip_module_from_kohya(stem: &str) -> Option<String> {
    let rest = stem.strip_prefix("text_model_encoder_layers_")?;
    let (layer, leaf) = rest.split_once('_')?;
    let layer: usize = layer.parse().ok()?;
    let dotted = CLIP_LEAVES.iter().find(|(u, _)| *u == leaf)?.1;
    Some(format!("te1.text_model.encoder.layers.{layer}.{dotted}"))
}

/// Our CLIP module path from a diffusers/peft path after `text_encoder.`.
pub(crate) fn clip_module_from_diffusers(path: &str) -> Option<String> {
    let rest = path.strip_prefix("text_model.encoder.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    CLIP_LEAVES.iter().find(|(_, d)| *d == leaf)?;
    Some(format!("te1.text_model.encoder.layers.{layer}.{leaf}"))
}

/// Whether `module` is one of our CLIP-L module paths.
pub(crate) fn is_clip_module(module: &str) -> bool {
    module
        .strip_prefix("te1.")
        .is_some_and(|p| clip_module_from_diffusers(p).is_some())
}

/// kohya's name of a CLIP module (`lora_te1_text_model_encoder_layers_0_mlp_fc1`).
pub(crate) fn clip_kohya_name(module: &str) -> String {
    format!("lora_{}", module.replace('.', "_"))
}

/// diffusers/peft's name of a CLIP module (`text_encoder.text_model.encoder.layers.0.mlp.fc1`).
pub(crate) fn clip_diffusers_name(module: &str) -> String {
    format!(
        "text_encoder.{}",
        module.strip_prefix("te1.").unwrap_or(module)
    )
}

/// True if the keys look like a diffusers `FluxTransformer2DModel` state dict rather
/// than a BFL one (also accepts a `transformer.` prefix on every key).
pub(crate) fn is_diffusers_layout<I, S>(keys: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut diffusers = false;
    for k in keys {
        let k = k.as_ref();
        let k = k.strip_prefix("transformer.").unwrap_or(k);
        if k.starts_with(BFL_DOUBLE) || k.starts_with(BFL_SINGLE) {
            return false;
        }
        if k.starts_with(DIFF_DOUBLE)
            || k.starts_with(DIFF_SINGLE)
            || k.starts_with("x_embedder.")
            || k.starts_with("context_embedder.")
        {
            diffusers = true;
        }
    }
    diffusers
}

/// A source of named tensors, eager or lazy (memory-mapped).
pub(crate) trait TensorSource {
    fn tensor_names(&self) -> Vec<String>;
    fn tensor(&self, name: &str) -> candle_core::Result<Tensor>;
    fn contains(&self, name: &str) -> bool {
        self.tensor_names().iter().any(|n| n == name)
    }
}

impl TensorSource for HashMap<String, Tensor> {
    fn tensor_names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
    fn tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
    }
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

/// A memory-mapped safetensors file (or several) read onto one device.
pub(crate) struct MmapSource<'a> {
    pub tensors: &'a candle_core::safetensors::MmapedSafetensors,
    pub device: &'a candle_core::Device,
}

impl TensorSource for MmapSource<'_> {
    fn tensor_names(&self) -> Vec<String> {
        self.tensors.tensors().into_iter().map(|(n, _)| n).collect()
    }
    fn tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        self.tensors.load(name, self.device)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }
}

/// How to build one BFL tensor from diffusers tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Recipe {
    /// The same tensor under another name.
    Rename(String),
    /// Row-wise concatenation of the parts, in order (fused q/k/v(/mlp)).
    Concat(Vec<String>),
    /// The tensor with its two row halves swapped (`norm_out.linear`).
    SwapHalves(String),
}

impl Recipe {
    /// Builds the BFL tensor `target` from `src`.
    pub(crate) fn build<S: TensorSource + ?Sized>(
        &self,
        target: &str,
        src: &S,
    ) -> Result<Tensor, KeymapError> {
        let load = |k: &str| -> Result<Tensor, KeymapError> {
            if !src.contains(k) {
                return Err(KeymapError::MissingKey {
                    key: k.to_string(),
                    needed_for: target.to_string(),
                });
            }
            src.tensor(k).map_err(|source| KeymapError::Tensor {
                key: k.to_string(),
                source,
            })
        };
        match self {
            Recipe::Rename(k) => load(k),
            Recipe::SwapHalves(k) => {
                let t = load(k)?;
                swap_halves(&t).map_err(|source| KeymapError::Tensor {
                    key: k.clone(),
                    source,
                })
            }
            Recipe::Concat(ks) => {
                let parts = ks.iter().map(|k| load(k)).collect::<Result<Vec<_>, _>>()?;
                let (Some(first), Some(first_key)) = (parts.first(), ks.first()) else {
                    return Err(KeymapError::Shape {
                        key: target.to_string(),
                        reason: "nothing to concatenate".into(),
                    });
                };
                let trailing = first.dims().get(1..).map(<[usize]>::to_vec);
                for (k, p) in ks.iter().zip(&parts) {
                    if p.dims().get(1..).map(<[usize]>::to_vec) != trailing {
                        return Err(KeymapError::Shape {
                            key: k.clone(),
                            reason: format!(
                                "shape {:?} does not stack with {:?} of `{}`",
                                p.dims(),
                                first.dims(),
                                first_key
                            ),
                        });
                    }
                }
                Tensor::cat(&parts, 0).map_err(|source| KeymapError::Tensor {
                    key: target.to_string(),
                    source,
                })
            }
        }
    }
}

/// The BFL key of one diffusers key and how to build it. Keys that are not part of
/// the Flux transformer give `None`.
pub(crate) fn bfl_recipe_for_diffusers_key(key: &str) -> Option<(String, Recipe)> {
    // Linear weights and biases.
    for param in ["weight", "bias"] {
        let Some(module) = key.strip_suffix(&format!(".{param}")) else {
            continue;
        };
        if let Some((map, _)) = linear_from_diffusers(module) {
            let target = format!("{}.{param}", map.bfl);
            let recipe = match map.layout {
                RowLayout::Same => Recipe::Rename(key.to_string()),
                RowLayout::SwappedHalves => Recipe::SwapHalves(key.to_string()),
                RowLayout::Qkv | RowLayout::QkvMlp => Recipe::Concat(
                    map.diffusers
                        .iter()
                        .map(|d| format!("{d}.{param}"))
                        .collect(),
                ),
            };
            return Some((target, recipe));
        }
    }
    // QK norms.
    if let Some((n, rest)) = split_block(key, DIFF_SINGLE) {
        let (b, _) = SINGLE_BLOCK_NORMS.iter().find(|(_, d)| *d == rest)?;
        return Some((
            format!("{BFL_SINGLE}{n}.{b}"),
            Recipe::Rename(key.to_string()),
        ));
    }
    if let Some((n, rest)) = split_block(key, DIFF_DOUBLE) {
        let (b, _) = DOUBLE_BLOCK_NORMS.iter().find(|(_, d)| *d == rest)?;
        return Some((
            format!("{BFL_DOUBLE}{n}.{b}"),
            Recipe::Rename(key.to_string()),
        ));
    }
    None
}

/// The plan for converting a diffusers-layout state dict to BFL keys: every BFL key
/// with its recipe, plus the source keys that belong to no known parameter (they
/// are kept under their own name by [`convert_diffusers_to_bfl`]). A `transformer.`
/// prefix on the source keys is handled.
pub(crate) fn diffusers_to_bfl_plan<S: AsRef<str>>(
    names: &[S],
) -> (BTreeMap<String, Recipe>, Vec<String>) {
    let prefix =
        if !names.is_empty() && names.iter().all(|n| n.as_ref().starts_with("transformer.")) {
            "transformer."
        } else {
            ""
        };
    let mut plan = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in names {
        let name = name.as_ref();
        let bare = &name[prefix.len()..];
        match bfl_recipe_for_diffusers_key(bare) {
            Some((target, recipe)) => {
                let recipe = match recipe {
                    Recipe::Rename(k) => Recipe::Rename(format!("{prefix}{k}")),
                    Recipe::SwapHalves(k) => Recipe::SwapHalves(format!("{prefix}{k}")),
                    Recipe::Concat(ks) => {
                        Recipe::Concat(ks.into_iter().map(|k| format!("{prefix}{k}")).collect())
                    }
                };
                plan.insert(target, recipe);
            }
            None => unknown.push(name.to_string()),
        }
    }
    unknown.sort();
    (plan, unknown)
}

/// Converts a whole diffusers-layout Flux transformer state dict into BFL keys:
/// q/k/v(/mlp) weights and biases fused by row concatenation, `norm_out.linear`
/// halves swapped, QK-norm scales renamed. Keys that belong to no known parameter
/// are passed through unchanged so the model loader's missing-key errors stay
/// truthful. Errors name the missing or misshapen key.
pub(crate) fn convert_diffusers_to_bfl<S: TensorSource + ?Sized>(
    src: &S,
) -> Result<HashMap<String, Tensor>, KeymapError> {
    let names = src.tensor_names();
    let (plan, unknown) = diffusers_to_bfl_plan(&names);
    let mut out = HashMap::with_capacity(plan.len() + unknown.len());
    for (target, recipe) in &plan {
        out.insert(target.clone(), recipe.build(target, src)?);
    }
    for k in unknown {
        let t = src.tensor(&k).map_err(|source| KeymapError::Tensor {
            key: k.clone(),
            source,
        })?;
        out.insert(k, t);
    }
    Ok(out)
}

#[cfg(test)]
mod clip_name_tests {
    use super::*;

    #[test]
    fn clip_names_round_trip_through_kohya_and_diffusers() {
        let m = "te1.text_model.encoder.layers.11.self_attn.out_proj";
        assert!(is_clip_module(m));
        let k = clip_kohya_name(m);
        assert_eq!(
            k,
            "lora_te1_text_model_encoder_layers_11_self_attn_out_proj"
        );
        assert_eq!(
            clip_module_from_kohya(k.strip_prefix("lora_te1_").unwrap()).as_deref(),
            Some(m)
        );
        let d = clip_diffusers_name(m);
        assert_eq!(
            d,
            "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"
        );
        assert_eq!(
            clip_module_from_diffusers(d.strip_prefix("text_encoder.").unwrap()).as_deref(),
            Some(m)
        );
        assert!(clip_module_from_kohya("text_model_encoder_layers_0_mlp_fc9").is_none());
        assert!(!is_clip_module("double_blocks.0.img_attn.qkv"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn every_bfl_linear_round_trips_through_diffusers_names() {
        for bfl in bfl_linear_modules(2, 2, true) {
            let map = linear_from_bfl(&bfl).unwrap_or_else(|| panic!("{bfl} unmapped"));
            assert_eq!(map.diffusers.len(), map.layout.parts());
            for (i, d) in map.diffusers.iter().enumerate() {
                let (back, part) =
                    linear_from_diffusers(d).unwrap_or_else(|| panic!("{d} unmapped"));
                assert_eq!(back.bfl, bfl);
                assert_eq!(part, i);
                let u = d.replace('.', "_");
                assert_eq!(diffusers_from_underscored(&u).as_deref(), Some(d.as_str()));
            }
            let k = kohya_name(&bfl);
            let u = k.strip_prefix("lora_unet_").unwrap();
            assert_eq!(bfl_from_underscored(u).as_deref(), Some(bfl.as_str()));
        }
    }

    #[test]
    fn table_matches_diffusers_converter() {
        let m = linear_from_bfl("double_blocks.7.txt_attn.qkv").unwrap();
        assert_eq!(
            m.diffusers,
            [
                "transformer_blocks.7.attn.add_q_proj",
                "transformer_blocks.7.attn.add_k_proj",
                "transformer_blocks.7.attn.add_v_proj"
            ]
        );
        let m = linear_from_bfl("single_blocks.12.linear1").unwrap();
        assert_eq!(m.layout, RowLayout::QkvMlp);
        assert_eq!(m.diffusers[3], "single_transformer_blocks.12.proj_mlp");
        let (m, p) = linear_from_diffusers("proj_out").unwrap();
        assert_eq!((m.bfl.as_str(), p), ("final_layer.linear", 0));
        let (m, _) = linear_from_diffusers("single_transformer_blocks.0.proj_out").unwrap();
        assert_eq!(m.bfl, "single_blocks.0.linear2");
        let (m, _) = linear_from_diffusers("norm_out.linear").unwrap();
        assert_eq!(m.layout, RowLayout::SwappedHalves);
        assert_eq!(
            linear_from_bfl("vector_in.out_layer").unwrap().diffusers,
            ["time_text_embed.text_embedder.linear_2"]
        );
        assert!(linear_from_bfl("double_blocks.0.img_attn.norm").is_none());
        assert!(linear_from_diffusers("transformer_blocks.x.attn.to_q").is_none());
        assert_eq!(
            module_group("single_blocks.3.linear2"),
            ModuleGroup::Single(3)
        );
        assert_eq!(module_group("img_in"), ModuleGroup::Other);
    }

    #[test]
    fn part_rows() {
        assert_eq!(
            RowLayout::Qkv.part_rows(12, 4).unwrap(),
            vec![0..4, 4..8, 8..12]
        );
        assert_eq!(
            RowLayout::QkvMlp.part_rows(28, 4).unwrap(),
            vec![0..4, 4..8, 8..12, 12..28]
        );
        assert!(RowLayout::QkvMlp.part_rows(12, 4).is_err());
        assert!(RowLayout::Qkv.part_rows(10, 4).is_err());
    }

    fn t(rows: usize, cols: usize, base: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| base + i as f32).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }
    fn b(rows: usize, base: f32) -> Tensor {
        let v: Vec<f32> = (0..rows).map(|i| base + i as f32).collect();
        Tensor::from_vec(v, rows, &Device::Cpu).unwrap()
    }

    #[test]
    fn converts_a_diffusers_state_dict() {
        let h = 4;
        let mut sd: HashMap<String, Tensor> = HashMap::new();
        for (i, p) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            sd.insert(
                format!("transformer_blocks.0.attn.{p}.weight"),
                t(h, h, 100.0 * i as f32),
            );
            sd.insert(
                format!("transformer_blocks.0.attn.{p}.bias"),
                b(h, 10.0 * i as f32),
            );
            sd.insert(
                format!("single_transformer_blocks.0.attn.{p}.weight"),
                t(h, h, 7.0 * i as f32),
            );
            sd.insert(
                format!("single_transformer_blocks.0.attn.{p}.bias"),
                b(h, i as f32),
            );
        }
        sd.insert(
            "single_transformer_blocks.0.proj_mlp.weight".into(),
            t(4 * h, h, -1.0),
        );
        sd.insert(
            "single_transformer_blocks.0.proj_mlp.bias".into(),
            b(4 * h, -1.0),
        );
        sd.insert(
            "single_transformer_blocks.0.attn.norm_q.weight".into(),
            b(2, 0.0),
        );
        sd.insert(
            "transformer_blocks.0.attn.norm_added_k.weight".into(),
            b(2, 0.0),
        );
        sd.insert("norm_out.linear.weight".into(), t(2 * h, h, 0.0));
        sd.insert("norm_out.linear.bias".into(), b(2 * h, 0.0));
        sd.insert("x_embedder.weight".into(), t(h, 3, 0.0));
        sd.insert("some_future_param".into(), b(1, 0.0));
        assert!(is_diffusers_layout(sd.keys()));

        let out = convert_diffusers_to_bfl(&sd).unwrap();
        let qkv = out.get("double_blocks.0.img_attn.qkv.weight").unwrap();
        assert_eq!(qkv.dims(), &[3 * h, h]);
        let k_rows = qkv.narrow(0, h, h).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(k_rows, t(h, h, 100.0).to_vec2::<f32>().unwrap());
        let lin1 = out.get("single_blocks.0.linear1.bias").unwrap();
        assert_eq!(lin1.dims(), &[7 * h]);
        assert!(out.contains_key("single_blocks.0.norm.query_norm.scale"));
        assert!(out.contains_key("double_blocks.0.txt_attn.norm.key_norm.scale"));
        assert!(out.contains_key("img_in.weight"));
        assert!(out.contains_key("some_future_param"));
        let ada = out
            .get("final_layer.adaLN_modulation.1.bias")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ada, vec![4.0, 5.0, 6.0, 7.0, 0.0, 1.0, 2.0, 3.0]);
        assert_eq!(ada.len(), 2 * h);
        assert_eq!(qkv.dtype(), DType::F32);
    }

    #[test]
    fn missing_part_is_named() {
        let mut sd: HashMap<String, Tensor> = HashMap::new();
        sd.insert("transformer_blocks.0.attn.to_q.weight".into(), t(4, 4, 0.0));
        sd.insert("transformer_blocks.0.attn.to_v.weight".into(), t(4, 4, 0.0));
        let err = convert_diffusers_to_bfl(&sd).unwrap_err().to_string();
        assert!(
            err.contains("transformer_blocks.0.attn.to_k.weight"),
            "{err}"
        );
        assert!(err.contains("double_blocks.0.img_attn.qkv.weight"), "{err}");
    }

    #[test]
    fn layout_detection() {
        assert!(!is_diffusers_layout([
            "double_blocks.0.img_attn.qkv.weight",
            "img_in.weight"
        ]));
        assert!(is_diffusers_layout(["transformer.x_embedder.weight"]));
        assert!(!is_diffusers_layout(Vec::<String>::new()));
    }
}
