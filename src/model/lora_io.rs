//! LoRA files: reading the formats in the wild into one [`Lora`] keyed by BFL module
//! path, and writing kohya and diffusers/peft files.
//!
//! Owns: format detection (kohya `lora_unet_…`, kohya's split-qkv parts, diffusers /
//! peft `lora_A`/`lora_B`, ai-toolkit, OneTrainer `lora_transformer_…`, ComfyUI-style
//! BFL keys), fusing split q/k/v(/mlp) components into the fused BFL linears and
//! splitting them back, alpha handling, kohya's `ss_*` / `modelspec.*` metadata and
//! its `sshs_*` hashes, atomic writes, validation against a model's linear shapes
//! and the `lora inspect` report.
//!
//! Reading rules (checked against kohya-ss/sd-scripts `networks/lora_flux.py`,
//! diffusers `loaders/lora_conversion_utils.py` and `loaders/lora_pipeline.py`,
//! ComfyUI `comfy/lora.py` and `comfy/weight_adapter/lora.py`, ostris/ai-toolkit
//! `toolkit/network_mixins.py`):
//! - scale = alpha / rank; a missing alpha means alpha = rank (scale 1), as ComfyUI,
//!   kohya and diffusers do; peft's `lora_adapter_metadata` (`lora_alpha`,
//!   `alpha_pattern`, `use_rslora`) is honoured when a module has no `.alpha` key;
//! - text-encoder keys are recognised, listed and kept out of the [`Lora`];
//! - every other key that is no LoRA tensor of a known module is listed as unmatched.
//!
//! Must not: apply adapters or touch the model (that is `adapter` / `flux`), or know
//! the BFL ↔ diffusers names itself (that is `keymap`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::adapter::{check_fits, Lora, LoraLayer};
use super::keymap::{self, LinearMap, ModuleGroup, RowLayout};

/// Errors of reading, writing and validating LoRA files. `file` is the path (or the
/// name given to [`parse`]).
#[derive(Debug, thiserror::Error)]
pub enum LoraIoError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a valid safetensors file ({reason})")]
    Corrupt { file: String, reason: String },
    #[error("{file}: `{key}` has no partner `{partner}`")]
    MissingPartner {
        file: String,
        key: String,
        partner: String,
    },
    #[error("{file}: `{key}`: rank mismatch, down is {down:?} but up is {up:?}")]
    RankMismatch {
        file: String,
        key: String,
        down: Vec<usize>,
        up: Vec<usize>,
    },
    #[error("{file}: `{key}`: {reason}")]
    BadTensor {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: `{key}` and `{other}` both give the same LoRA tensor")]
    Duplicate {
        file: String,
        key: String,
        other: String,
    },
    #[error(
        "{file}: unsupported network type {kind} (e.g. key `{key}`); only plain LoRA is supported"
    )]
    Unsupported {
        file: String,
        kind: String,
        key: String,
    },
    #[error("{file}: `{module}` is not a linear module of the Flux transformer")]
    UnknownModule { file: String, module: String },
    #[error("LoRA `{file}` does not fit the model: {}", summarize(.problems))]
    Incompatible { file: String, problems: Vec<String> },
    #[error("{file}: cannot save in {dtype:?}; use f32, f16 or bf16")]
    SaveDtype { file: String, dtype: DType },
    #[error("{file}: {source}")]
    Tensor {
        file: String,
        #[source]
        source: candle_core::Error,
    },
}

fn summarize(problems: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = problems
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > SHOWN {
        s.push_str(&format!("; … and {} more", problems.len() - SHOWN));
    }
    s
}

/// The key layout a file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// kohya sd-scripts: `lora_unet_<bfl path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// diffusers / peft: `transformer.<diffusers path>.lora_A.weight` / `lora_B` (optional `.alpha`).
    Diffusers,
    /// ostris/ai-toolkit: diffusers keys without alpha (metadata `software` names
    /// ai-toolkit), or diffusers paths under `diffusion_model.`.
    AiToolkit,
    /// ComfyUI-style BFL paths: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` or `lora_A`.
    ComfyUi,
    /// kohya-style names over diffusers paths: OneTrainer's `lora_transformer_…`, SimpleTuner's `lycoris_…`.
    OneTrainer,
    /// No transformer LoRA tensor recognised.
    Unknown,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Diffusers => "diffusers/peft",
            LoraFormat::AiToolkit => "ai-toolkit",
            LoraFormat::ComfyUi => "comfyui (BFL keys)",
            LoraFormat::OneTrainer => "onetrainer (lora_transformer_)",
            LoraFormat::Unknown => "unknown",
        })
    }
}

/// A parsed LoRA file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub lora: Lora,
    pub format: LoraFormat,
    /// The safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Text-encoder LoRA keys: recognised, not loaded.
    pub text_encoder: Vec<String>,
    /// Keys that are no LoRA tensor of a known transformer module.
    pub unmatched: Vec<String>,
}

// ---------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------

/// Reads and parses a LoRA safetensors file onto `device`. The LoRA is named after
/// the file stem; errors name the path.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<LoraFile, LoraIoError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LoraIoError::Io {
        file: file.clone(),
        source,
    })?;
    let (tensors, metadata) = decode(&bytes, device, &file)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.clone());
    parse_inner(tensors, metadata, &name, &file)
}

/// Reads only the `__metadata__` of a safetensors file (cheap: the header alone).
pub fn read_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>, LoraIoError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let io = |source| LoraIoError::Io {
        file: file.clone(),
        source,
    };
    let corrupt = |reason: String| LoraIoError::Corrupt {
        file: file.clone(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| corrupt("shorter than the 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n + 8 > len {
        return Err(corrupt(format!(
            "header length {n} exceeds the file size {len}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let value: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("invalid JSON header: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(md) = value.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in md {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

type Decoded = (HashMap<String, Tensor>, BTreeMap<String, String>);

fn decode(bytes: &[u8], device: &Device, file: &str) -> Result<Decoded, LoraIoError> {
    let corrupt = |reason: String| LoraIoError::Corrupt {
        file: file.to_string(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view.load(device).map_err(|e| LoraIoError::BadTensor {
            file: file.to_string(),
            key: name.clone(),
            reason: e.to_string(),
        })?;
        tensors.insert(name, t);
    }
    Ok((tensors, metadata))
}

/// Parses LoRA tensors (already read) in any supported format; `name` becomes the
/// LoRA's name and labels errors.
pub fn parse(
    tensors: HashMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
    name: &str,
) -> Result<LoraFile, LoraIoError> {
    parse_inner(tensors, metadata, name, name)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
    DownPart(usize),
    UpPart(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Style {
    Kohya,
    OneTrainer,
    ComfyBfl,
    Diffusers,
    DiffusionModelDiffusers,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Bfl(String),
    Diffusers(String),
    /// A CLIP-L text-encoder linear, by our module path (`te1.text_model.…`).
    Clip(String),
}

const ROLE_SUFFIXES: &[(&str, Role)] = &[
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_A.default.weight", Role::Down),
    (".lora_B.default.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// Splits a key into module name and LoRA role.
fn split_role(key: &str) -> Option<(&str, Role)> {
    for (suffix, role) in ROLE_SUFFIXES {
        if let Some(m) = key.strip_suffix(suffix) {
            return Some((m, *role));
        }
    }
    // kohya split_qkv parts: `<name>.lora_down.<i>.weight`.
    let (head, last) = key.rsplit_once('.')?;
    if last != "weight" {
        return None;
    }
    let (head, idx) = head.rsplit_once('.')?;
    let idx: usize = idx.parse().ok()?;
    if let Some(m) = head.strip_suffix(".lora_down") {
        return Some((m, Role::DownPart(idx)));
    }
    if let Some(m) = head.strip_suffix(".lora_up") {
        return Some((m, Role::UpPart(idx)));
    }
    None
}

fn partner_key(key: &str, role: Role) -> String {
    let swap = [
        (".lora_down.weight", ".lora_up.weight"),
        (".lora_up.weight", ".lora_down.weight"),
        (".lora_A.weight", ".lora_B.weight"),
        (".lora_B.weight", ".lora_A.weight"),
        (".lora_A.default.weight", ".lora_B.default.weight"),
        (".lora_B.default.weight", ".lora_A.default.weight"),
        (".lora.down.weight", ".lora.up.weight"),
        (".lora.up.weight", ".lora.down.weight"),
    ];
    for (a, b) in swap {
        if let Some(m) = key.strip_suffix(a) {
            return format!("{m}{b}");
        }
    }
    match role {
        Role::DownPart(i) => key.replace(&format!(".lora_down.{i}."), &format!(".lora_up.{i}.")),
        Role::UpPart(i) => key.replace(&format!(".lora_up.{i}."), &format!(".lora_down.{i}.")),
        _ => format!("{key} (partner)"),
    }
}

fn is_text_encoder_key(key: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "lora_te_",
        "lora_te1_",
        "lora_te2_",
        "lora_te3_",
        "lora_te.",
        "lora_te1.",
        "lora_te2.",
        "lora_te3.",
        "text_encoder.",
        "text_encoder_2.",
        "text_encoders.",
        "text_model.",
        "base_model.model.text_encoder.",
    ];
    PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Names the network type of a key that belongs to a LoRA variant we cannot apply.
fn unsupported_kind(key: &str) -> Option<&'static str> {
    const KINDS: &[(&str, &str)] = &[
        (".lokr_", "LoKr"),
        (".hada_", "LoHa"),
        (".oft_blocks", "OFT"),
        (".oft_r", "OFT"),
        (".oft_R", "OFT"),
        (".boft_", "BOFT"),
        (".dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        (".lora_mid.weight", "LoCon (Tucker)"),
        (".a1.weight", "GLoRA"),
        (".a2.weight", "GLoRA"),
    ];
    KINDS
        .iter()
        .find(|(pat, _)| key.contains(pat))
        .map(|(_, kind)| *kind)
}

fn strip_dotted_prefix(module: &str) -> (&str, bool) {
    let m = module.strip_prefix("base_model.model.").unwrap_or(module);
    for p in ["model.diffusion_model.", "diffusion_model."] {
        if let Some(rest) = m.strip_prefix(p) {
            return (rest, true);
        }
    }
    (m.strip_prefix("transformer.").unwrap_or(m), false)
}

/// Maps a module name (key without role suffix) to its target module and style.
fn classify_module(module: &str) -> Option<(Target, Style)> {
    if let Some(rest) = module.strip_prefix("lora_te1_") {
        return keymap::clip_module_from_kohya(rest).map(|c| (Target::Clip(c), Style::Kohya));
    }
    for p in ["text_encoder.", "base_model.model.text_encoder."] {
        if let Some(rest) = module.strip_prefix(p) {
            return keymap::clip_module_from_diffusers(rest)
                .map(|c| (Target::Clip(c), Style::Diffusers));
        }
    }
    if let Some(rest) = module.strip_prefix("lora_unet_") {
        if let Some(b) = keymap::bfl_from_underscored(rest) {
            return Some((Target::Bfl(b), Style::Kohya));
        }
        return keymap::diffusers_from_underscored(rest)
            .map(|d| (Target::Diffusers(d), Style::Kohya));
    }
    for p in ["lora_transformer_", "lycoris_"] {
        if let Some(rest) = module.strip_prefix(p) {
            return keymap::diffusers_from_underscored(rest)
                .map(|d| (Target::Diffusers(d), Style::OneTrainer));
        }
    }
    let (bare, diffusion_model) = strip_dotted_prefix(module);
    if keymap::linear_from_bfl(bare).is_some() {
        return Some((Target::Bfl(bare.to_string()), Style::ComfyBfl));
    }
    if keymap::linear_from_diffusers(bare).is_some() {
        let style = if diffusion_model {
            Style::DiffusionModelDiffusers
        } else {
            Style::Diffusers
        };
        return Some((Target::Diffusers(bare.to_string()), style));
    }
    None
}

/// The tensors found for one module name.
#[derive(Default)]
struct Entry {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
    down_parts: BTreeMap<usize, (String, Tensor)>,
    up_parts: BTreeMap<usize, (String, Tensor)>,
}

/// One low-rank pair with its alpha, shapes checked.
#[derive(Clone)]
struct Part {
    key: String,
    down: Tensor,
    up: Tensor,
    alpha: f32,
    rank: usize,
    in_f: usize,
    out: usize,
}

/// peft's alpha settings from diffusers' `lora_adapter_metadata`.
struct PeftAlphas {
    lora_alpha: Option<f64>,
    patterns: Vec<(regex::Regex, f64)>,
    rslora: bool,
}

impl PeftAlphas {
    fn from_metadata(
        md: &BTreeMap<String, String>,
        file: &str,
    ) -> Result<Option<Self>, LoraIoError> {
        let Some(raw) = md.get("lora_adapter_metadata") else {
            return Ok(None);
        };
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(raw)
        else {
            return Ok(None);
        };
        let get = |k: &str| obj.get(&format!("transformer.{k}")).or_else(|| obj.get(k));
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(LoraIoError::Unsupported {
                file: file.to_string(),
                kind: "DoRA".into(),
                key: "__metadata__.lora_adapter_metadata.use_dora".into(),
            });
        }
        let mut patterns = Vec::new();
        if let Some(serde_json::Value::Object(pat)) = get("alpha_pattern") {
            for (p, v) in pat {
                let (Some(v), Ok(re)) =
                    (v.as_f64(), regex::Regex::new(&format!(r"^(.*\.)?(?:{p})$")))
                else {
                    continue;
                };
                patterns.push((re, v));
            }
        }
        Ok(Some(Self {
            lora_alpha: get("lora_alpha").and_then(|v| v.as_f64()),
            patterns,
            rslora: get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        }))
    }

    /// The alpha that makes `alpha / rank` equal peft's scale for `module`.
    fn alpha_for(&self, module: &str, rank: usize) -> Option<f32> {
        let a = self
            .patterns
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map(|(_, v)| *v)
            .or(self.lora_alpha)?;
        // rsLoRA scales by alpha / sqrt(r) = (alpha · sqrt(r)) / r.
        let a = if self.rslora {
            a * (rank as f64).sqrt()
        } else {
            a
        };
        Some(a as f32)
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f32> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => candle_core::bail!("expected one value, found {}", v.len()),
    }
}

fn parse_inner(
    tensors: HashMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
    name: &str,
    file: &str,
) -> Result<LoraFile, LoraIoError> {
    let sorted: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let peft = PeftAlphas::from_metadata(&metadata, file)?;
    let mut text_encoder = Vec::new();
    let mut unmatched = Vec::new();
    let mut entries: BTreeMap<Target, Entry> = BTreeMap::new();
    let mut styles: BTreeMap<Style, usize> = BTreeMap::new();

    for (key, tensor) in sorted {
        let clip = split_role(&key)
            .and_then(|(m, _)| classify_module(m))
            .is_some_and(|(t, _)| matches!(t, Target::Clip(_)));
        if is_text_encoder_key(&key) && !clip {
            text_encoder.push(key);
            continue;
        }
        if let Some(kind) = unsupported_kind(&key) {
            return Err(LoraIoError::Unsupported {
                file: file.to_string(),
                kind: kind.to_string(),
                key,
            });
        }
        let Some((module, role)) = split_role(&key) else {
            unmatched.push(key);
            continue;
        };
        let Some((target, style)) = classify_module(module) else {
            unmatched.push(key);
            continue;
        };
        *styles.entry(style).or_default() += 1;
        let entry = entries.entry(target).or_default();
        let slot = match role {
            Role::Down => &mut entry.down,
            Role::Up => &mut entry.up,
            Role::Alpha => &mut entry.alpha,
            Role::DownPart(i) => {
                insert_part(&mut entry.down_parts, i, key, tensor, file)?;
                continue;
            }
            Role::UpPart(i) => {
                insert_part(&mut entry.up_parts, i, key, tensor, file)?;
                continue;
            }
        };
        if let Some((other, _)) = slot {
            return Err(LoraIoError::Duplicate {
                file: file.to_string(),
                key,
                other: other.clone(),
            });
        }
        *slot = Some((key, tensor));
    }

    // Resolve every entry into parts, grouped by BFL module.
    let mut modules: BTreeMap<String, (LinearMap, Gathered)> = BTreeMap::new();
    for (target, entry) in entries {
        let (map, part_index) = match &target {
            Target::Bfl(b) => match keymap::linear_from_bfl(b) {
                Some(map) => (map, None),
                None => continue,
            },
            Target::Diffusers(d) => match keymap::linear_from_diffusers(d) {
                Some((map, i)) => (map, Some(i)),
                None => continue,
            },
            Target::Clip(c) => (
                LinearMap {
                    bfl: c.clone(),
                    diffusers: vec![keymap::clip_diffusers_name(c)],
                    layout: keymap::RowLayout::Same,
                },
                None,
            ),
        };
        let pattern_name = match &target {
            Target::Bfl(b) | Target::Diffusers(b) | Target::Clip(b) => b.clone(),
        };
        let Some(found) = resolve_entry(entry, &pattern_name, peft.as_ref(), file, &mut unmatched)?
        else {
            continue;
        };
        let n_parts = map.layout.parts();
        let duplicate = |key: String, other: String| LoraIoError::Duplicate {
            file: file.to_string(),
            key,
            other,
        };
        let bfl = map.bfl.clone();
        match (found, part_index) {
            (Resolved::Whole(p), None) => {
                if let Some((_, g)) = modules.get(&bfl) {
                    return Err(duplicate(p.key, g.first_key()));
                }
                modules.insert(bfl, (map, Gathered::Whole(p)));
            }
            (Resolved::Split(parts), None) => {
                if let Some((_, g)) = modules.get(&bfl) {
                    return Err(duplicate(first_key(&parts), g.first_key()));
                }
                if parts.len() > n_parts || n_parts == 1 {
                    return Err(LoraIoError::BadTensor {
                        file: file.to_string(),
                        key: first_key(&parts),
                        reason: format!(
                            "{} split parts for `{bfl}`, which fuses {n_parts} projection(s)",
                            parts.len()
                        ),
                    });
                }
                let mut v: Vec<Option<Part>> = parts.into_iter().map(Some).collect();
                v.resize(n_parts, None);
                modules.insert(bfl, (map, Gathered::Parts(v)));
            }
            (Resolved::Whole(p), Some(i)) => {
                let slot = modules
                    .entry(bfl)
                    .or_insert_with(|| (map, Gathered::Parts(vec![None; n_parts])));
                match &mut slot.1 {
                    Gathered::Parts(v) if v.get(i).is_some_and(Option::is_none) => v[i] = Some(p),
                    g => return Err(duplicate(p.key, g.first_key())),
                }
            }
            (Resolved::Split(parts), Some(_)) => {
                return Err(LoraIoError::BadTensor {
                    file: file.to_string(),
                    key: first_key(&parts),
                    reason: "split parts (`lora_down.N`) on a diffusers module".into(),
                });
            }
        }
    }

    let mut lora = Lora::new(name);
    for (bfl, (map, gathered)) in modules {
        let layer = build_layer(&map, gathered, file)?;
        lora.layers.insert(bfl, layer);
    }

    let format = detect_format(&styles, &metadata, &text_encoder);
    unmatched.sort();
    Ok(LoraFile {
        lora,
        format,
        metadata,
        text_encoder,
        unmatched,
    })
}

fn first_key(parts: &[Part]) -> String {
    parts.first().map(|p| p.key.clone()).unwrap_or_default()
}

/// The parts found for one BFL module.
enum Gathered {
    /// The fused BFL tensors themselves.
    Whole(Part),
    /// Parts in BFL row order (diffusers modules or kohya split parts); `None` where
    /// a part is absent.
    Parts(Vec<Option<Part>>),
}

impl Gathered {
    fn first_key(&self) -> String {
        match self {
            Gathered::Whole(p) => p.key.clone(),
            Gathered::Parts(v) => v
                .iter()
                .flatten()
                .next()
                .map(|p| p.key.clone())
                .unwrap_or_default(),
        }
    }
}

fn insert_part(
    map: &mut BTreeMap<usize, (String, Tensor)>,
    i: usize,
    key: String,
    tensor: Tensor,
    file: &str,
) -> Result<(), LoraIoError> {
    if let Some((other, _)) = map.get(&i) {
        return Err(LoraIoError::Duplicate {
            file: file.to_string(),
            key,
            other: other.clone(),
        });
    }
    map.insert(i, (key, tensor));
    Ok(())
}

fn detect_format(
    styles: &BTreeMap<Style, usize>,
    metadata: &BTreeMap<String, String>,
    text_encoder: &[String],
) -> LoraFormat {
    let best = styles
        .iter()
        .max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s)))
        .map(|(s, _)| *s);
    let ai_toolkit = metadata
        .get("software")
        .is_some_and(|s| s.contains("ai-toolkit"));
    match best {
        Some(Style::Kohya) => LoraFormat::Kohya,
        Some(Style::OneTrainer) => LoraFormat::OneTrainer,
        Some(Style::ComfyBfl) => LoraFormat::ComfyUi,
        Some(Style::DiffusionModelDiffusers) => LoraFormat::AiToolkit,
        Some(Style::Diffusers) if ai_toolkit => LoraFormat::AiToolkit,
        Some(Style::Diffusers) => LoraFormat::Diffusers,
        None if text_encoder.iter().any(|k| k.starts_with("lora_te")) => LoraFormat::Kohya,
        None => LoraFormat::Unknown,
    }
}

enum Resolved {
    Whole(Part),
    Split(Vec<Part>),
}

/// Turns the tensors of one module name into checked parts; an alpha without
/// weights is reported as unmatched.
fn resolve_entry(
    entry: Entry,
    pattern_name: &str,
    peft: Option<&PeftAlphas>,
    file: &str,
    unmatched: &mut Vec<String>,
) -> Result<Option<Resolved>, LoraIoError> {
    let alpha = match &entry.alpha {
        Some((key, t)) => Some(scalar(t).map_err(|e| LoraIoError::BadTensor {
            file: file.to_string(),
            key: key.clone(),
            reason: format!("alpha: {e}"),
        })?),
        None => None,
    };
    let whole = entry.down.is_some() || entry.up.is_some();
    let split = !entry.down_parts.is_empty() || !entry.up_parts.is_empty();
    if whole && split {
        let key = entry.down.or(entry.up).map(|(k, _)| k).unwrap_or_default();
        return Err(LoraIoError::BadTensor {
            file: file.to_string(),
            key,
            reason: "both whole and split (`lora_down.N`) tensors for one module".into(),
        });
    }
    let resolve_alpha = |rank: usize| -> f32 {
        alpha
            .or_else(|| peft.and_then(|p| p.alpha_for(pattern_name, rank)))
            .unwrap_or(rank as f32)
    };
    if whole {
        let (down, up) = match (entry.down, entry.up) {
            (Some(d), Some(u)) => (d, u),
            (Some((k, _)), None) => {
                return Err(LoraIoError::MissingPartner {
                    file: file.to_string(),
                    partner: partner_key(&k, Role::Down),
                    key: k,
                })
            }
            (None, Some((k, _))) => {
                return Err(LoraIoError::MissingPartner {
                    file: file.to_string(),
                    partner: partner_key(&k, Role::Up),
                    key: k,
                })
            }
            (None, None) => return Ok(None),
        };
        let part = make_part(down, up, &resolve_alpha, file)?;
        return Ok(Some(Resolved::Whole(part)));
    }
    if split {
        let mut downs = entry.down_parts;
        let mut ups = entry.up_parts;
        let indices: BTreeSet<usize> = downs.keys().chain(ups.keys()).copied().collect();
        let mut parts = Vec::new();
        for (expected, i) in indices.into_iter().enumerate() {
            let (d, u) = (downs.remove(&i), ups.remove(&i));
            let (d, u) = match (d, u) {
                (Some(d), Some(u)) => (d, u),
                (Some((k, _)), None) => {
                    return Err(LoraIoError::MissingPartner {
                        file: file.to_string(),
                        partner: partner_key(&k, Role::DownPart(i)),
                        key: k,
                    })
                }
                (None, Some((k, _))) => {
                    return Err(LoraIoError::MissingPartner {
                        file: file.to_string(),
                        partner: partner_key(&k, Role::UpPart(i)),
                        key: k,
                    })
                }
                (None, None) => continue,
            };
            if i != expected {
                return Err(LoraIoError::BadTensor {
                    file: file.to_string(),
                    key: d.0,
                    reason: format!("split part {i} without part {expected}"),
                });
            }
            parts.push(make_part(d, u, &resolve_alpha, file)?);
        }
        return Ok(Some(Resolved::Split(parts)));
    }
    if let Some((k, _)) = entry.alpha {
        unmatched.push(k);
    }
    Ok(None)
}

fn make_part(
    (down_key, down): (String, Tensor),
    (up_key, up): (String, Tensor),
    resolve_alpha: &dyn Fn(usize) -> f32,
    file: &str,
) -> Result<Part, LoraIoError> {
    let bad = |key: &str, t: &Tensor| LoraIoError::BadTensor {
        file: file.to_string(),
        key: key.to_string(),
        reason: format!("shape {:?} is not a linear LoRA matrix (2-D)", t.dims()),
    };
    let (rank, in_f) = down.dims2().map_err(|_| bad(&down_key, &down))?;
    let (out, rank_up) = up.dims2().map_err(|_| bad(&up_key, &up))?;
    if rank != rank_up {
        return Err(LoraIoError::RankMismatch {
            file: file.to_string(),
            key: down_key,
            down: down.dims().to_vec(),
            up: up.dims().to_vec(),
        });
    }
    if rank == 0 {
        return Err(LoraIoError::BadTensor {
            file: file.to_string(),
            key: down_key,
            reason: "rank 0".into(),
        });
    }
    Ok(Part {
        key: down_key,
        down,
        up,
        alpha: resolve_alpha(rank),
        rank,
        in_f,
        out,
    })
}

/// True when two tensors hold the same values bit for bit (same shape and dtype).
fn identical(a: &Tensor, b: &Tensor) -> candle_core::Result<bool> {
    if a.id() == b.id() {
        return Ok(true);
    }
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    let va = a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let vb = b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// True when every element is +0.0.
fn all_plus_zero(t: &Tensor) -> candle_core::Result<bool> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.iter().all(|x| x.to_bits() == 0))
}

fn build_layer(map: &LinearMap, gathered: Gathered, file: &str) -> Result<LoraLayer, LoraIoError> {
    let terr = |source| LoraIoError::Tensor {
        file: file.to_string(),
        source,
    };
    let parts = match gathered {
        // BFL tensors: already in the model's layout.
        Gathered::Whole(p) => {
            return Ok(LoraLayer {
                down: p.down,
                up: p.up,
                alpha: p.alpha,
            })
        }
        Gathered::Parts(parts) => parts,
    };
    match map.layout {
        RowLayout::Same | RowLayout::SwappedHalves => {
            let Some(Some(p)) = parts.into_iter().next() else {
                return Err(LoraIoError::UnknownModule {
                    file: file.to_string(),
                    module: map.bfl.clone(),
                });
            };
            let up = if map.layout == RowLayout::SwappedHalves {
                if p.out % 2 != 0 {
                    return Err(LoraIoError::BadTensor {
                        file: file.to_string(),
                        key: p.key,
                        reason: format!(
                            "{} rows cannot be split into (scale, shift) halves",
                            p.out
                        ),
                    });
                }
                keymap::swap_halves(&p.up).map_err(terr)?
            } else {
                p.up
            };
            Ok(LoraLayer {
                down: p.down,
                up,
                alpha: p.alpha,
            })
        }
        RowLayout::Qkv | RowLayout::QkvMlp => fuse(map, parts, file),
    }
}

/// Fuses the parts of a q/k/v(/mlp) module into one layer on the fused BFL linear.
///
/// If every present part has the same down matrix and alpha, that down is kept and
/// the ups are stacked (missing parts get zero rows). Otherwise the downs are stacked
/// and each up is placed block-diagonally; when all parts share rank and alpha the
/// fused alpha is n·alpha (same scale, no arithmetic on weights), else each part's
/// alpha/rank is folded into its up block and the fused alpha is the total rank.
fn fuse(map: &LinearMap, parts: Vec<Option<Part>>, file: &str) -> Result<LoraLayer, LoraIoError> {
    let terr = |source| LoraIoError::Tensor {
        file: file.to_string(),
        source,
    };
    let present: Vec<&Part> = parts.iter().flatten().collect();
    let Some(first) = present.first() else {
        return Err(LoraIoError::UnknownModule {
            file: file.to_string(),
            module: map.bfl.clone(),
        });
    };
    let bad = |p: &Part, reason: String| LoraIoError::BadTensor {
        file: file.to_string(),
        key: p.key.clone(),
        reason,
    };
    let in_f = first.in_f;
    for p in &present {
        if p.in_f != in_f {
            return Err(bad(
                p,
                format!("{} input features, but `{}` has {in_f}", p.in_f, first.key),
            ));
        }
    }
    // Rows of each part.
    let qkv: Vec<&Part> = parts.iter().take(3).flatten().collect();
    let qkv_rows = match qkv.first() {
        Some(p) => p.out,
        None => in_f,
    };
    for p in &qkv {
        if p.out != qkv_rows {
            return Err(bad(
                p,
                format!(
                    "{} rows, but q/k/v parts need equal rows ({qkv_rows})",
                    p.out
                ),
            ));
        }
    }
    let sizes: Vec<usize> = match map.layout {
        RowLayout::QkvMlp => {
            let mlp = parts
                .get(3)
                .and_then(|p| p.as_ref().map(|p| p.out))
                .unwrap_or(keymap::FLUX_MLP_RATIO * in_f);
            vec![qkv_rows, qkv_rows, qkv_rows, mlp]
        }
        _ => vec![qkv_rows; parts.len()],
    };
    let same_dtype = present
        .iter()
        .all(|p| p.down.dtype() == first.down.dtype() && p.up.dtype() == first.down.dtype());
    let dtype = if same_dtype {
        first.down.dtype()
    } else {
        DType::F32
    };
    let dev = first.down.device().clone();

    let mut shared = true;
    for p in &present[1..] {
        if p.alpha != first.alpha || !identical(&p.down, &first.down).map_err(terr)? {
            shared = false;
            break;
        }
    }
    if shared {
        let r = first.rank;
        let mut ups = Vec::with_capacity(parts.len());
        for (p, s) in parts.iter().zip(&sizes) {
            ups.push(match p {
                Some(p) => p.up.to_dtype(dtype).map_err(terr)?,
                None => Tensor::zeros((*s, r), dtype, &dev).map_err(terr)?,
            });
        }
        return Ok(LoraLayer {
            down: first.down.to_dtype(dtype).map_err(terr)?,
            up: Tensor::cat(&ups, 0).map_err(terr)?,
            alpha: first.alpha,
        });
    }

    let uniform = present
        .iter()
        .all(|p| p.rank == first.rank && p.alpha == first.alpha);
    let dtype = if uniform { dtype } else { DType::F32 };
    let total: usize = present.iter().map(|p| p.rank).sum();
    let downs = present
        .iter()
        .map(|p| p.down.to_dtype(dtype))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(terr)?;
    let mut rows = Vec::with_capacity(parts.len());
    let mut col = 0;
    for (p, s) in parts.iter().zip(&sizes) {
        let Some(p) = p else {
            rows.push(Tensor::zeros((*s, total), dtype, &dev).map_err(terr)?);
            continue;
        };
        let mut up = p.up.to_dtype(dtype).map_err(terr)?;
        if !uniform {
            up = up
                .affine(p.alpha as f64 / p.rank as f64, 0.0)
                .map_err(terr)?;
        }
        let mut pieces = Vec::with_capacity(3);
        if col > 0 {
            pieces.push(Tensor::zeros((*s, col), dtype, &dev).map_err(terr)?);
        }
        pieces.push(up);
        let right = total - col - p.rank;
        if right > 0 {
            pieces.push(Tensor::zeros((*s, right), dtype, &dev).map_err(terr)?);
        }
        rows.push(Tensor::cat(&pieces, 1).map_err(terr)?);
        col += p.rank;
    }
    let alpha = if uniform {
        first.alpha * present.len() as f32
    } else {
        total as f32
    };
    Ok(LoraLayer {
        down: Tensor::cat(&downs, 0).map_err(terr)?,
        up: Tensor::cat(&rows, 0).map_err(terr)?,
        alpha,
    })
}

// ---------------------------------------------------------------------------------
// Validation and report
// ---------------------------------------------------------------------------------

/// Checks a LoRA against the model's linear shapes, `module → (out_features,
/// in_features)`. Every module the model lacks and every shape mismatch is listed in
/// one [`LoraIoError::Incompatible`] naming the LoRA.
pub fn validate(lora: &Lora, shapes: &BTreeMap<String, (usize, usize)>) -> Result<(), LoraIoError> {
    let mut problems = Vec::new();
    for (module, layer) in &lora.layers {
        match shapes.get(module) {
            None => problems.push(format!("`{module}`: no such module in the model")),
            Some(&(out_f, in_f)) => {
                if let Err(e) = check_fits(module, layer, out_f, in_f) {
                    problems.push(e);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LoraIoError::Incompatible {
            file: lora.name.clone(),
            problems,
        })
    }
}

/// What `fluxlora lora inspect` shows about a LoRA file.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LoraReport {
    pub name: String,
    pub format: LoraFormat,
    pub modules: usize,
    /// rank → number of modules.
    pub ranks: BTreeMap<usize, usize>,
    /// alpha (as written) → number of modules.
    pub alphas: BTreeMap<String, usize>,
    /// Double-stream block indices targeted.
    pub double_blocks: Vec<usize>,
    /// Single-stream block indices targeted.
    pub single_blocks: Vec<usize>,
    pub double_modules: usize,
    pub single_modules: usize,
    /// Modules outside the blocks (embedders, final layer).
    pub other_modules: Vec<String>,
    /// Number of LoRA parameters (down + up elements).
    pub parameters: usize,
    pub text_encoder_keys: Vec<String>,
    pub unmatched: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// Summarises a parsed LoRA file.
pub fn describe(file: &LoraFile) -> LoraReport {
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut doubles = BTreeSet::new();
    let mut singles = BTreeSet::new();
    let (mut n_double, mut n_single) = (0, 0);
    let mut other = Vec::new();
    let mut parameters = 0;
    for (module, layer) in &file.lora.layers {
        *ranks.entry(layer.rank()).or_insert(0) += 1;
        *alphas.entry(format!("{}", layer.alpha)).or_insert(0) += 1;
        parameters += layer.down.elem_count() + layer.up.elem_count();
        match keymap::module_group(module) {
            ModuleGroup::Double(n) => {
                doubles.insert(n);
                n_double += 1;
            }
            ModuleGroup::Single(n) => {
                singles.insert(n);
                n_single += 1;
            }
            ModuleGroup::Other => other.push(module.clone()),
        }
    }
    LoraReport {
        name: file.lora.name.clone(),
        format: file.format,
        modules: file.lora.layers.len(),
        ranks,
        alphas,
        double_blocks: doubles.into_iter().collect(),
        single_blocks: singles.into_iter().collect(),
        double_modules: n_double,
        single_modules: n_single,
        other_modules: other,
        parameters,
        text_encoder_keys: file.text_encoder.clone(),
        unmatched: file.unmatched.clone(),
        metadata: file.metadata.clone(),
    }
}

fn ranges(ix: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ix.len() {
        let start = ix[i];
        let mut end = start;
        while i + 1 < ix.len() && ix[i + 1] == end + 1 {
            i += 1;
            end = ix[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

impl fmt::Display for LoraReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_LIST: usize = 10;
        const MAX_VALUE: usize = 160;
        let counts = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "name:        {}", self.name)?;
        writeln!(f, "format:      {}", self.format)?;
        writeln!(
            f,
            "modules:     {} ({} parameters)",
            self.modules, self.parameters
        )?;
        let ranks: BTreeMap<String, usize> = self
            .ranks
            .iter()
            .map(|(r, n)| (r.to_string(), *n))
            .collect();
        writeln!(f, "rank:        {}", counts(&ranks))?;
        writeln!(f, "alpha:       {}", counts(&self.alphas))?;
        writeln!(
            f,
            "double:      {} modules in blocks {}",
            self.double_modules,
            ranges(&self.double_blocks)
        )?;
        writeln!(
            f,
            "single:      {} modules in blocks {}",
            self.single_modules,
            ranges(&self.single_blocks)
        )?;
        writeln!(
            f,
            "other:       {}",
            if self.other_modules.is_empty() {
                "none".to_string()
            } else {
                self.other_modules.join(", ")
            }
        )?;
        let list = |f: &mut fmt::Formatter<'_>, title: &str, keys: &[String]| -> fmt::Result {
            writeln!(f, "{title:<12} {}", keys.len())?;
            for k in keys.iter().take(MAX_LIST) {
                writeln!(f, "  {k}")?;
            }
            if keys.len() > MAX_LIST {
                writeln!(f, "  … and {} more", keys.len() - MAX_LIST)?;
            }
            Ok(())
        };
        list(f, "text encoder:", &self.text_encoder_keys)?;
        list(f, "unmatched:", &self.unmatched)?;
        writeln!(f, "metadata:    {} entries", self.metadata.len())?;
        for (k, v) in &self.metadata {
            let v: String = if v.chars().count() > MAX_VALUE {
                v.chars().take(MAX_VALUE).chain("…".chars()).collect()
            } else {
                v.clone()
            };
            writeln!(f, "  {k}: {v}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------

fn check_save_dtype(dtype: DType, file: &str) -> Result<(), LoraIoError> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        _ => Err(LoraIoError::SaveDtype {
            file: file.to_string(),
            dtype,
        }),
    }
}

fn to_save(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()
}

fn alpha_tensor(alpha: f32) -> candle_core::Result<Tensor> {
    Tensor::new(alpha, &Device::Cpu)
}

/// The tensors of a kohya file for `lora` (weights in `dtype`, alphas in f32).
pub fn kohya_tensors(lora: &Lora, dtype: DType) -> Result<Vec<(String, Tensor)>, LoraIoError> {
    let file = lora.name.as_str();
    check_save_dtype(dtype, file)?;
    let terr = |source| LoraIoError::Tensor {
        file: file.to_string(),
        source,
    };
    let mut out = Vec::with_capacity(lora.layers.len() * 3);
    for (module, layer) in &lora.layers {
        let name = if keymap::is_clip_module(module) {
            keymap::clip_kohya_name(module)
        } else if keymap::linear_from_bfl(module).is_some() {
            keymap::kohya_name(module)
        } else {
            return Err(LoraIoError::UnknownModule {
                file: file.to_string(),
                module: module.clone(),
            });
        };
        let names = [".lora_down.weight", ".lora_up.weight"];
        push_pair(
            &mut out,
            &name,
            names,
            (&layer.down, &layer.up, layer.alpha),
            dtype,
        )
        .map_err(terr)?;
    }
    Ok(out)
}

/// Appends one module's down, up (named `name` + `suffixes`) and `name.alpha`.
fn push_pair(
    out: &mut Vec<(String, Tensor)>,
    name: &str,
    suffixes: [&str; 2],
    (down, up, alpha): (&Tensor, &Tensor, f32),
    dtype: DType,
) -> candle_core::Result<()> {
    out.push((format!("{name}{}", suffixes[0]), to_save(down, dtype)?));
    out.push((format!("{name}{}", suffixes[1]), to_save(up, dtype)?));
    out.push((format!("{name}.alpha"), alpha_tensor(alpha)?));
    Ok(())
}

/// One diffusers module's share of a fused layer.
struct Component {
    module: String,
    down: Tensor,
    up: Tensor,
    alpha: f32,
}

/// Splits a BFL layer into its diffusers modules. Block-diagonal ups (kohya's
/// split-qkv files, fused diffusers files) are written compactly, each part with its
/// own down rows and alpha / n; otherwise every part shares the down and gets its
/// rows of the up (q/k/v parts whose rows are all zero are left out). Both read back to
/// the same fused layer bit for bit.
fn split_layer(map: &LinearMap, layer: &LoraLayer) -> candle_core::Result<Vec<Component>> {
    match map.layout {
        RowLayout::Same => {
            return Ok(vec![Component {
                module: map.diffusers[0].clone(),
                down: layer.down.clone(),
                up: layer.up.clone(),
                alpha: layer.alpha,
            }])
        }
        RowLayout::SwappedHalves => {
            return Ok(vec![Component {
                module: map.diffusers[0].clone(),
                down: layer.down.clone(),
                up: keymap::swap_halves(&layer.up)?,
                alpha: layer.alpha,
            }])
        }
        RowLayout::Qkv | RowLayout::QkvMlp => {}
    }
    let (rank, in_f) = layer.down.dims2()?;
    let (out, _) = layer.up.dims2()?;
    let rows = map
        .layout
        .part_rows(out, in_f)
        .map_err(candle_core::Error::Msg)?;
    let n = rows.len();

    // Block-diagonal: part j only uses columns j·c .. (j+1)·c.
    let alpha_part = layer.alpha / n as f32;
    if rank % n == 0 && alpha_part * n as f32 == layer.alpha {
        let c = rank / n;
        let mut block_diagonal = true;
        'check: for (j, r) in rows.iter().enumerate() {
            let block = layer.up.narrow(0, r.start, r.len())?;
            for k in 0..n {
                if k != j && !all_plus_zero(&block.narrow(1, k * c, c)?)? {
                    block_diagonal = false;
                    break 'check;
                }
            }
        }
        if block_diagonal {
            let mut parts = Vec::with_capacity(n);
            for (j, r) in rows.iter().enumerate() {
                parts.push(Component {
                    module: map.diffusers[j].clone(),
                    down: layer.down.narrow(0, j * c, c)?,
                    up: layer.up.narrow(0, r.start, r.len())?.narrow(1, j * c, c)?,
                    alpha: alpha_part,
                });
            }
            return Ok(parts);
        }
    }

    let mut parts = Vec::with_capacity(n);
    let mut zero = Vec::with_capacity(n);
    for (j, r) in rows.iter().enumerate() {
        let up = layer.up.narrow(0, r.start, r.len())?;
        // The MLP part is always written: a reader cannot infer its size.
        let is_mlp = map.layout == RowLayout::QkvMlp && j == 3;
        zero.push(!is_mlp && all_plus_zero(&up)?);
        parts.push(Component {
            module: map.diffusers[j].clone(),
            down: layer.down.clone(),
            up,
            alpha: layer.alpha,
        });
    }
    if zero.iter().all(|z| *z) {
        return Ok(parts);
    }
    Ok(parts
        .into_iter()
        .zip(zero)
        .filter(|(_, z)| !z)
        .map(|(p, _)| p)
        .collect())
}

/// The tensors of a diffusers/peft file for `lora`: `transformer.<module>.lora_A.weight`,
/// `lora_B.weight` and an f32 `.alpha` per module (diffusers reads `.alpha` keys into
/// peft's `alpha_pattern`; ComfyUI reads them directly).
pub fn diffusers_tensors(lora: &Lora, dtype: DType) -> Result<Vec<(String, Tensor)>, LoraIoError> {
    let file = lora.name.as_str();
    check_save_dtype(dtype, file)?;
    let terr = |source| LoraIoError::Tensor {
        file: file.to_string(),
        source,
    };
    let mut out = Vec::new();
    for (module, layer) in &lora.layers {
        let (map, prefix) = if keymap::is_clip_module(module) {
            let map = LinearMap {
                bfl: module.clone(),
                diffusers: vec![module.strip_prefix("te1.").unwrap_or(module).to_string()],
                layout: keymap::RowLayout::Same,
            };
            (map, "text_encoder")
        } else if let Some(map) = keymap::linear_from_bfl(module) {
            (map, "transformer")
        } else {
            return Err(LoraIoError::UnknownModule {
                file: file.to_string(),
                module: module.clone(),
            });
        };
        for c in split_layer(&map, layer).map_err(terr)? {
            let name = format!("{prefix}.{}", c.module);
            let names = [".lora_A.weight", ".lora_B.weight"];
            push_pair(&mut out, &name, names, (&c.down, &c.up, c.alpha), dtype).map_err(terr)?;
        }
    }
    Ok(out)
}

/// Writes `lora` as a kohya file: weights in `dtype` (f32, f16 or bf16), alphas in
/// f32, the given metadata plus kohya's `sshs_model_hash` / `sshs_legacy_hash`,
/// atomically.
pub fn save_kohya(
    path: impl AsRef<Path>,
    lora: &Lora,
    metadata: &BTreeMap<String, String>,
    dtype: DType,
) -> Result<(), LoraIoError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let tensors = kohya_tensors(lora, dtype).map_err(|e| relabel(e, &file))?;
    let mut metadata = carried_metadata(metadata);
    let (model_hash, legacy_hash) = kohya_hashes(&tensors, &metadata, &file)?;
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    let bytes = serialize(&tensors, &metadata, &file)?;
    write_atomic(path, &bytes)
}

/// Writes `lora` as a diffusers/peft file (`transformer.` prefix, fused modules split
/// into their diffusers parts, f32 `.alpha` keys), atomically. Adds `format: pt` to
/// the metadata as diffusers does.
pub fn save_diffusers(
    path: impl AsRef<Path>,
    lora: &Lora,
    metadata: &BTreeMap<String, String>,
    dtype: DType,
) -> Result<(), LoraIoError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let tensors = diffusers_tensors(lora, dtype).map_err(|e| relabel(e, &file))?;
    let mut metadata = carried_metadata(metadata);
    metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    let bytes = serialize(&tensors, &metadata, &file)?;
    write_atomic(path, &bytes)
}

/// Metadata passed on to a written file, minus what would be false in it: kohya's
/// `sshs_*` hashes (recomputed by [`save_kohya`]) and diffusers'
/// `lora_adapter_metadata` (alphas are written as `.alpha` keys, and diffusers
/// refuses a file that has both).
fn carried_metadata(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "sshs_model_hash" | "sshs_legacy_hash" | "lora_adapter_metadata"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn relabel(e: LoraIoError, file: &str) -> LoraIoError {
    match e {
        LoraIoError::UnknownModule { module, .. } => LoraIoError::UnknownModule {
            file: file.to_string(),
            module,
        },
        LoraIoError::SaveDtype { dtype, .. } => LoraIoError::SaveDtype {
            file: file.to_string(),
            dtype,
        },
        LoraIoError::Tensor { source, .. } => LoraIoError::Tensor {
            file: file.to_string(),
            source,
        },
        other => other,
    }
}

fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    file: &str,
) -> Result<Vec<u8>, LoraIoError> {
    let info: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    let data = tensors.iter().map(|(k, t)| (k.as_str(), t));
    safetensors::serialize(data, info).map_err(|e| LoraIoError::Corrupt {
        file: file.to_string(),
        reason: format!("cannot serialize: {e}"),
    })
}

/// kohya's `train_util.precalculate_safetensors_hashes`: serialize the tensors with
/// only the `ss_*` metadata, then `sshs_model_hash` = sha256 of everything after the
/// header and `sshs_legacy_hash` = first 8 hex digits of the sha256 of the 64 KiB at
/// offset 1 MiB (sd-webui-additional-networks' hashes).
pub fn kohya_hashes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    file: &str,
) -> Result<(String, String), LoraIoError> {
    let ss: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = serialize(tensors, &ss, file)?;
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0) as usize;
    let data = bytes.get(8 + n..).unwrap_or(&[]);
    let model_hash = hex(&sha256(data));
    let start = 0x10_0000.min(bytes.len());
    let end = (0x10_0000 + 0x1_0000).min(bytes.len());
    let legacy = hex(&sha256(&bytes[start..end]));
    Ok((model_hash, legacy[..8].to_string()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoraIoError> {
    crate::atomic_file::write(path, bytes).map_err(|source| LoraIoError::Io {
        file: path.display().to_string(),
        source,
    })
}

// ---------------------------------------------------------------------------------
// kohya metadata
// ---------------------------------------------------------------------------------

/// Which Flux model a LoRA was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FluxVariant {
    Dev,
    Schnell,
}

/// One dataset folder in `ss_dataset_dirs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetDir {
    pub n_repeats: usize,
    pub img_count: usize,
}

/// The metadata kohya's `train_network.py` / `flux_train_network.py` write into a
/// Flux LoRA (`ss_*`), plus the ModelSpec fields of `library/sai_model_spec.py`
/// (`modelspec.*`). Field values are rendered as Python's `str()` would (`True`,
/// `None`, `0.0001`, `1e-05`, `(1024, 1024)`), because tools parse them that way.
/// The training module fills it; `extra` carries fluxlora's own keys.
#[derive(Clone, Debug)]
pub struct KohyaMetadata {
    pub output_name: String,
    /// `modelspec.title`; defaults to `output_name`.
    pub title: Option<String>,
    pub variant: FluxVariant,
    pub network_dim: usize,
    pub network_alpha: f64,
    pub network_dropout: Option<f64>,
    /// `ss_network_args` (JSON object), written when not empty.
    pub network_args: BTreeMap<String, String>,
    pub learning_rate: f64,
    pub unet_lr: Option<f64>,
    pub text_encoder_lr: Option<f64>,
    /// Optimizer name with arguments, e.g. `AdamW(weight_decay=0.01)`.
    pub optimizer: String,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub max_train_steps: usize,
    pub num_epochs: usize,
    pub num_train_images: usize,
    pub num_reg_images: usize,
    pub num_batches_per_epoch: usize,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub gradient_checkpointing: bool,
    pub max_grad_norm: f64,
    /// `no`, `fp16` or `bf16`.
    pub mixed_precision: String,
    pub seed: Option<u64>,
    /// (width, height).
    pub resolution: (usize, usize),
    pub cache_latents: bool,
    pub caption_dropout_rate: f64,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub flip_aug: bool,
    pub enable_bucket: bool,
    pub min_bucket_reso: usize,
    pub max_bucket_reso: usize,
    pub bucket_no_upscale: bool,
    pub noise_offset: Option<f64>,
    pub guidance_scale: f64,
    pub timestep_sampling: String,
    pub sigmoid_scale: f64,
    pub model_prediction_type: String,
    pub discrete_flow_shift: f64,
    pub weighting_scheme: String,
    pub apply_t5_attn_mask: bool,
    /// Base model file name (`ss_sd_model_name`).
    pub sd_model_name: Option<String>,
    pub vae_name: Option<String>,
    /// Unix seconds.
    pub training_started_at: f64,
    pub training_finished_at: Option<f64>,
    pub session_id: u32,
    pub steps: Option<usize>,
    pub epoch: Option<usize>,
    /// `ss_tag_frequency`: dataset folder → tag → count (see [`tag_frequency`]).
    pub tag_frequency: BTreeMap<String, BTreeMap<String, usize>>,
    pub dataset_dirs: BTreeMap<String, DatasetDir>,
    pub training_comment: Option<String>,
    pub author: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub tags: Option<String>,
    pub trigger_phrase: Option<String>,
    pub usage_hint: Option<String>,
    /// When the file is written, unix seconds (`modelspec.date`).
    pub saved_at: f64,
    /// Further keys written as they are (fluxlora's own training metadata).
    pub extra: BTreeMap<String, String>,
}

impl KohyaMetadata {
    /// Metadata with kohya's defaults for a Flux LoRA of `network_dim` / `network_alpha`.
    pub fn new(
        output_name: impl Into<String>,
        variant: FluxVariant,
        network_dim: usize,
        network_alpha: f64,
    ) -> Self {
        let now = crate::clock::unix_now();
        Self {
            output_name: output_name.into(),
            title: None,
            variant,
            network_dim,
            network_alpha,
            network_dropout: None,
            network_args: BTreeMap::new(),
            learning_rate: 1e-4,
            unet_lr: None,
            text_encoder_lr: None,
            optimizer: "torch.optim.adamw.AdamW".into(),
            lr_scheduler: "constant".into(),
            lr_warmup_steps: 0,
            max_train_steps: 0,
            num_epochs: 1,
            num_train_images: 0,
            num_reg_images: 0,
            num_batches_per_epoch: 0,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            max_grad_norm: 1.0,
            mixed_precision: "bf16".into(),
            seed: None,
            resolution: (1024, 1024),
            cache_latents: true,
            caption_dropout_rate: 0.0,
            shuffle_caption: false,
            keep_tokens: 0,
            flip_aug: false,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_no_upscale: false,
            noise_offset: None,
            guidance_scale: 3.5,
            timestep_sampling: "sigma".into(),
            sigmoid_scale: 1.0,
            model_prediction_type: "sigma_scaled".into(),
            discrete_flow_shift: 3.0,
            weighting_scheme: "uniform".into(),
            apply_t5_attn_mask: false,
            sd_model_name: None,
            vae_name: None,
            training_started_at: now,
            training_finished_at: None,
            session_id: (now.fract() * u32::MAX as f64) as u32,
            steps: None,
            epoch: None,
            tag_frequency: BTreeMap::new(),
            dataset_dirs: BTreeMap::new(),
            training_comment: None,
            author: None,
            description: None,
            license: None,
            tags: None,
            trigger_phrase: None,
            usage_hint: None,
            saved_at: now,
            extra: BTreeMap::new(),
        }
    }

    /// The `ss_*` and `modelspec.*` entries (plus `extra`) as safetensors metadata.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        let opt_f = |v: Option<f64>| v.map(py_float).unwrap_or_else(|| "None".into());
        let b = |v: bool| if v { "True" } else { "False" }.to_string();

        // train_network.py
        put("ss_session_id", self.session_id.to_string());
        put("ss_training_started_at", py_float(self.training_started_at));
        put("ss_output_name", self.output_name.clone());
        put("ss_learning_rate", py_float(self.learning_rate));
        put("ss_text_encoder_lr", opt_f(self.text_encoder_lr));
        put("ss_unet_lr", opt_f(self.unet_lr));
        put("ss_num_train_images", self.num_train_images.to_string());
        put("ss_num_reg_images", self.num_reg_images.to_string());
        put(
            "ss_num_batches_per_epoch",
            self.num_batches_per_epoch.to_string(),
        );
        put("ss_num_epochs", self.num_epochs.to_string());
        put("ss_gradient_checkpointing", b(self.gradient_checkpointing));
        put(
            "ss_gradient_accumulation_steps",
            self.gradient_accumulation_steps.to_string(),
        );
        put("ss_max_train_steps", self.max_train_steps.to_string());
        put("ss_lr_warmup_steps", self.lr_warmup_steps.to_string());
        put("ss_lr_scheduler", self.lr_scheduler.clone());
        put("ss_network_module", "networks.lora_flux".into());
        put("ss_network_dim", self.network_dim.to_string());
        put("ss_network_alpha", py_float(self.network_alpha));
        put("ss_network_dropout", opt_f(self.network_dropout));
        put("ss_mixed_precision", self.mixed_precision.clone());
        put("ss_full_fp16", b(false));
        put("ss_v2", b(false));
        put("ss_base_model_version", "flux1".into());
        put("ss_clip_skip", "None".into());
        put("ss_max_token_length", "None".into());
        put("ss_cache_latents", b(self.cache_latents));
        put(
            "ss_seed",
            self.seed
                .map(|s| s.to_string())
                .unwrap_or_else(|| "None".into()),
        );
        put("ss_noise_offset", opt_f(self.noise_offset));
        put(
            "ss_training_comment",
            self.training_comment
                .clone()
                .unwrap_or_else(|| "None".into()),
        );
        put("ss_optimizer", self.optimizer.clone());
        put("ss_max_grad_norm", py_float(self.max_grad_norm));
        put(
            "ss_caption_dropout_rate",
            py_float(self.caption_dropout_rate),
        );
        put("ss_batch_size_per_device", self.batch_size.to_string());
        put(
            "ss_total_batch_size",
            (self.batch_size * self.gradient_accumulation_steps).to_string(),
        );
        put(
            "ss_resolution",
            format!("({}, {})", self.resolution.0, self.resolution.1),
        );
        put("ss_flip_aug", b(self.flip_aug));
        put("ss_shuffle_caption", b(self.shuffle_caption));
        put("ss_keep_tokens", self.keep_tokens.to_string());
        put("ss_enable_bucket", b(self.enable_bucket));
        put("ss_bucket_no_upscale", b(self.bucket_no_upscale));
        put("ss_min_bucket_reso", self.min_bucket_reso.to_string());
        put("ss_max_bucket_reso", self.max_bucket_reso.to_string());
        let dirs: serde_json::Map<String, serde_json::Value> = self
            .dataset_dirs
            .iter()
            .map(|(k, d)| {
                (
                    k.clone(),
                    serde_json::json!({"n_repeats": d.n_repeats, "img_count": d.img_count}),
                )
            })
            .collect();
        put("ss_dataset_dirs", py_json(&serde_json::Value::Object(dirs)));
        put(
            "ss_tag_frequency",
            py_json(&serde_json::to_value(&self.tag_frequency).unwrap_or_default()),
        );
        if !self.network_args.is_empty() {
            put(
                "ss_network_args",
                py_json(&serde_json::to_value(&self.network_args).unwrap_or_default()),
            );
        }
        if let Some(n) = &self.sd_model_name {
            put("ss_sd_model_name", n.clone());
        }
        if let Some(n) = &self.vae_name {
            put("ss_vae_name", n.clone());
        }
        if let Some(t) = self.training_finished_at {
            put("ss_training_finished_at", py_float(t));
        }
        if let Some(s) = self.steps {
            put("ss_steps", s.to_string());
        }
        if let Some(e) = self.epoch {
            put("ss_epoch", e.to_string());
        }
        // flux_train_network.py update_metadata
        put("ss_model_type", "flux".into());
        put("ss_apply_t5_attn_mask", b(self.apply_t5_attn_mask));
        put("ss_weighting_scheme", self.weighting_scheme.clone());
        put("ss_guidance_scale", py_float(self.guidance_scale));
        put("ss_timestep_sampling", self.timestep_sampling.clone());
        put("ss_sigmoid_scale", py_float(self.sigmoid_scale));
        put(
            "ss_model_prediction_type",
            self.model_prediction_type.clone(),
        );
        put("ss_discrete_flow_shift", py_float(self.discrete_flow_shift));

        // sai_model_spec.py
        let arch = match self.variant {
            FluxVariant::Dev => "flux-1-dev",
            FluxVariant::Schnell => "flux-1-schnell",
        };
        put("modelspec.sai_model_spec", "1.0.1".into());
        put("modelspec.architecture", format!("{arch}/lora"));
        put(
            "modelspec.implementation",
            "https://github.com/black-forest-labs/flux".into(),
        );
        put(
            "modelspec.implementation_version",
            format!("fluxlora/{}", env!("CARGO_PKG_VERSION")),
        );
        put(
            "modelspec.title",
            self.title
                .clone()
                .unwrap_or_else(|| self.output_name.clone()),
        );
        put(
            "modelspec.resolution",
            format!("{}x{}", self.resolution.0, self.resolution.1),
        );
        put("modelspec.date", iso_date(self.saved_at));
        for (k, v) in [
            ("modelspec.author", &self.author),
            ("modelspec.description", &self.description),
            ("modelspec.license", &self.license),
            ("modelspec.tags", &self.tags),
            ("modelspec.trigger_phrase", &self.trigger_phrase),
            ("modelspec.usage_hint", &self.usage_hint),
        ] {
            if let Some(v) = v {
                put(k, v.clone());
            }
        }
        for (k, v) in &self.extra {
            put(k, v.clone());
        }
        m
    }
}

/// kohya's tag counting for `ss_tag_frequency`: each caption is split at commas,
/// tags are trimmed and lower-cased, empty tags skipped.
pub fn tag_frequency<'a>(captions: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut freq = BTreeMap::new();
    for caption in captions {
        for tag in caption.split(',') {
            let tag = tag.trim();
            if !tag.is_empty() {
                *freq.entry(tag.to_lowercase()).or_insert(0) += 1;
            }
        }
    }
    freq
}

/// Python's `repr(float)`: shortest round-trip digits, `.0` on integers, exponent
/// form below 1e-4 and from 1e16 (`1e-05`, `1e+16`).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let exp = x.abs().log10().floor() as i32;
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{x:e}");
        let (mant, e) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match e.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', e),
        };
        format!("{mant}e{sign}{digits:0>2}")
    }
}

/// `json.dumps` spacing (`", "` and `": "`) for the JSON-valued `ss_*` fields.
fn py_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", serde_json::Value::String(k.clone()), py_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        serde_json::Value::Array(a) => {
            format!("[{}]", a.iter().map(py_json).collect::<Vec<_>>().join(", "))
        }
        other => other.to_string(),
    }
}

/// ISO-8601 date-time (UTC, seconds) of a unix time, kohya's `modelspec.date` form.
fn iso_date(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data` (kohya's metadata hashes).
fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: usize = 4; // hidden
    const R: usize = 2; // rank

    fn dev() -> Device {
        Device::Cpu
    }

    /// Deterministic, distinct, non-zero values.
    fn mat(rows: usize, cols: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                ((x % 1000) as f32 - 500.0) / 256.0 + 0.001
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &dev()).unwrap()
    }

    fn zeros(rows: usize, cols: usize) -> Tensor {
        Tensor::zeros((rows, cols), DType::F32, &dev()).unwrap()
    }

    fn scalar_t(x: f32) -> Tensor {
        Tensor::new(x, &dev()).unwrap()
    }

    fn rows(t: &Tensor, start: usize, len: usize) -> Tensor {
        t.narrow(0, start, len).unwrap()
    }

    fn bits(t: &Tensor) -> (Vec<usize>, DType, Vec<u64>) {
        let v = t
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        (
            t.dims().to_vec(),
            t.dtype(),
            v.iter().map(|x| x.to_bits()).collect(),
        )
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// The reference LoRA in BFL layout: (module, in, out, alpha).
    const MODULES: &[(&str, usize, usize, f32)] = &[
        ("double_blocks.0.img_attn.qkv", H, 3 * H, 4.0),
        ("double_blocks.0.txt_mlp.2", 4 * H, H, 4.0),
        ("single_blocks.1.linear1", H, 7 * H, 4.0),
        ("single_blocks.1.linear2", 5 * H, H, 4.0),
        ("final_layer.adaLN_modulation.1", H, 2 * H, 4.0),
        ("time_in.in_layer", 8, H, 4.0),
    ];

    fn reference() -> Lora {
        let mut lora = Lora::new("ref");
        for (i, (m, in_f, out, alpha)) in MODULES.iter().enumerate() {
            lora.layers.insert(
                m.to_string(),
                LoraLayer {
                    down: mat(R, *in_f, 2 * i as u32 + 1),
                    up: mat(*out, R, 2 * i as u32 + 2),
                    alpha: *alpha,
                },
            );
        }
        lora
    }

    fn assert_same_updates(got: &Lora, want: &Lora, what: &str) {
        let got_keys: Vec<_> = got.layers.keys().collect();
        let want_keys: Vec<_> = want.layers.keys().collect();
        assert_eq!(got_keys, want_keys, "{what}: modules");
        for (m, l) in &want.layers {
            let g = &got.layers[m];
            assert_close(
                &g.delta_weight().unwrap(),
                &l.delta_weight().unwrap(),
                &format!("{what}: {m}"),
            );
        }
    }

    /// Hand-written diffusers names of the reference modules, with the row slices
    /// of the BFL up each one takes.
    fn diffusers_parts(module: &str) -> Vec<(&'static str, usize, usize)> {
        match module {
            "double_blocks.0.img_attn.qkv" => vec![
                ("transformer_blocks.0.attn.to_q", 0, H),
                ("transformer_blocks.0.attn.to_k", H, H),
                ("transformer_blocks.0.attn.to_v", 2 * H, H),
            ],
            "double_blocks.0.txt_mlp.2" => vec![("transformer_blocks.0.ff_context.net.2", 0, H)],
            "single_blocks.1.linear1" => vec![
                ("single_transformer_blocks.1.attn.to_q", 0, H),
                ("single_transformer_blocks.1.attn.to_k", H, H),
                ("single_transformer_blocks.1.attn.to_v", 2 * H, H),
                ("single_transformer_blocks.1.proj_mlp", 3 * H, 4 * H),
            ],
            "single_blocks.1.linear2" => vec![("single_transformer_blocks.1.proj_out", 0, H)],
            "final_layer.adaLN_modulation.1" => vec![("norm_out.linear", 0, 2 * H)],
            "time_in.in_layer" => vec![("time_text_embed.timestep_embedder.linear_1", 0, H)],
            other => panic!("no diffusers names for {other}"),
        }
    }

    /// diffusers-layout up for a part: norm_out has its halves swapped.
    fn diffusers_up(module: &str, up: &Tensor, start: usize, len: usize) -> Tensor {
        if module == "final_layer.adaLN_modulation.1" {
            Tensor::cat(&[rows(up, H, H), rows(up, 0, H)], 0).unwrap()
        } else {
            rows(up, start, len)
        }
    }

    fn kohya_dict(lora: &Lora) -> HashMap<String, Tensor> {
        let mut sd = HashMap::new();
        for (m, l) in &lora.layers {
            let k = format!("lora_unet_{}", m.replace('.', "_"));
            sd.insert(format!("{k}.lora_down.weight"), l.down.clone());
            sd.insert(format!("{k}.lora_up.weight"), l.up.clone());
            sd.insert(format!("{k}.alpha"), scalar_t(l.alpha));
        }
        sd
    }

    /// `prefix` + diffusers names, `lora_A`/`lora_B`; alpha as `.alpha` keys, or
    /// folded into B (ai-toolkit writes no alpha).
    fn diffusers_dict(lora: &Lora, prefix: &str, with_alpha: bool) -> HashMap<String, Tensor> {
        let mut sd = HashMap::new();
        for (m, l) in &lora.layers {
            for (name, start, len) in diffusers_parts(m) {
                let mut up = diffusers_up(m, &l.up, start, len);
                if !with_alpha {
                    up = up.affine(l.scale(), 0.0).unwrap();
                }
                sd.insert(format!("{prefix}{name}.lora_A.weight"), l.down.clone());
                sd.insert(format!("{prefix}{name}.lora_B.weight"), up);
                if with_alpha {
                    sd.insert(format!("{prefix}{name}.alpha"), scalar_t(l.alpha));
                }
            }
        }
        sd
    }

    #[test]
    fn every_format_parses_to_the_same_lora() {
        let want = reference();
        let md = BTreeMap::new();

        let f = parse(kohya_dict(&want), md.clone(), "k").unwrap();
        assert_eq!(f.format, LoraFormat::Kohya);
        assert!(f.unmatched.is_empty(), "{:?}", f.unmatched);
        assert_same_updates(&f.lora, &want, "kohya");

        for (prefix, a, b) in [
            ("diffusion_model.", "lora_down", "lora_up"),
            ("diffusion_model.", "lora_A", "lora_B"),
            ("", "lora_A", "lora_B"),
        ] {
            let mut sd = HashMap::new();
            for (m, l) in &want.layers {
                sd.insert(format!("{prefix}{m}.{a}.weight"), l.down.clone());
                sd.insert(format!("{prefix}{m}.{b}.weight"), l.up.clone());
                sd.insert(format!("{prefix}{m}.alpha"), scalar_t(l.alpha));
            }
            let f = parse(sd, md.clone(), "c").unwrap();
            assert_eq!(f.format, LoraFormat::ComfyUi);
            assert_same_updates(&f.lora, &want, &format!("comfy {prefix}{a}"));
        }

        for prefix in ["transformer.", "", "base_model.model."] {
            let f = parse(diffusers_dict(&want, prefix, true), md.clone(), "d").unwrap();
            assert_eq!(f.format, LoraFormat::Diffusers, "{prefix}");
            assert!(f.unmatched.is_empty(), "{:?}", f.unmatched);
            assert_same_updates(&f.lora, &want, &format!("diffusers {prefix:?}"));
        }

        // ai-toolkit: no alpha (scale 1), its software metadata.
        let mut ai_md = BTreeMap::new();
        ai_md.insert(
            "software".to_string(),
            r#"{"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.1.0"}"#.to_string(),
        );
        let f = parse(diffusers_dict(&want, "transformer.", false), ai_md, "a").unwrap();
        assert_eq!(f.format, LoraFormat::AiToolkit);
        assert_same_updates(&f.lora, &want, "ai-toolkit");
        let f = parse(
            diffusers_dict(&want, "diffusion_model.", false),
            md.clone(),
            "a2",
        )
        .unwrap();
        assert_eq!(f.format, LoraFormat::AiToolkit);
        assert_same_updates(&f.lora, &want, "ai-toolkit diffusion_model.");

        // OneTrainer: kohya-style names over diffusers paths.
        let mut sd = HashMap::new();
        for (m, l) in &want.layers {
            for (name, start, len) in diffusers_parts(m) {
                let k = format!("lora_transformer_{}", name.replace('.', "_"));
                sd.insert(format!("{k}.lora_down.weight"), l.down.clone());
                sd.insert(
                    format!("{k}.lora_up.weight"),
                    diffusers_up(m, &l.up, start, len),
                );
                sd.insert(format!("{k}.alpha"), scalar_t(l.alpha));
            }
        }
        let f = parse(sd, md.clone(), "o").unwrap();
        assert_eq!(f.format, LoraFormat::OneTrainer);
        assert_same_updates(&f.lora, &want, "onetrainer");

        // peft with lora_alpha in diffusers' adapter metadata, no `.alpha` keys.
        let mut peft_md = BTreeMap::new();
        peft_md.insert(
            "lora_adapter_metadata".to_string(),
            r#"{"transformer.r": 2, "transformer.lora_alpha": 4, "transformer.alpha_pattern": {}}"#
                .to_string(),
        );
        let sd: HashMap<String, Tensor> = diffusers_dict(&want, "transformer.", true)
            .into_iter()
            .filter(|(k, _)| !k.ends_with(".alpha"))
            .collect();
        let f = parse(sd, peft_md, "p").unwrap();
        assert_eq!(f.format, LoraFormat::Diffusers);
        assert_same_updates(&f.lora, &want, "peft metadata alpha");
    }

    #[test]
    fn whole_bfl_layers_are_taken_as_they_are() {
        // Fused BFL tensors read whole are not split or re-fused: the same bits come out.
        let want = reference();
        let f = parse(kohya_dict(&want), BTreeMap::new(), "k").unwrap();
        for (m, l) in &want.layers {
            assert_eq!(bits(&f.lora.layers[m].down), bits(&l.down), "{m}");
            assert_eq!(bits(&f.lora.layers[m].up), bits(&l.up), "{m}");
        }
    }

    fn kohya_file_tensors() -> HashMap<String, Tensor> {
        let mut sd = kohya_dict(&reference());
        // A kohya split_qkv module: down (4·1, in), block-diagonal up, alpha 8.
        let n = 4;
        let c = 1;
        let down = mat(n * c, H, 77);
        let sizes = [H, H, H, 4 * H];
        let mut blocks = Vec::new();
        for (j, s) in sizes.iter().enumerate() {
            let mut pieces = Vec::new();
            if j > 0 {
                pieces.push(zeros(*s, j * c));
            }
            pieces.push(mat(*s, c, 80 + j as u32));
            if j + 1 < n {
                pieces.push(zeros(*s, (n - j - 1) * c));
            }
            blocks.push(Tensor::cat(&pieces, 1).unwrap());
        }
        let up = Tensor::cat(&blocks, 0).unwrap();
        sd.insert(
            "lora_unet_single_blocks_0_linear1.lora_down.weight".into(),
            down,
        );
        sd.insert(
            "lora_unet_single_blocks_0_linear1.lora_up.weight".into(),
            up,
        );
        sd.insert(
            "lora_unet_single_blocks_0_linear1.alpha".into(),
            scalar_t(8.0),
        );
        // A shared-down qkv whose v rows are all zero, odd alpha.
        let up = Tensor::cat(&[mat(2 * H, R, 90), zeros(H, R)], 0).unwrap();
        sd.insert(
            "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight".into(),
            mat(R, H, 91),
        );
        sd.insert(
            "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight".into(),
            up,
        );
        sd.insert(
            "lora_unet_double_blocks_1_txt_attn_qkv.alpha".into(),
            scalar_t(3.0),
        );
        sd
    }

    fn read_raw(path: &Path) -> (HashMap<String, Tensor>, BTreeMap<String, String>) {
        let bytes = std::fs::read(path).unwrap();
        decode(&bytes, &dev(), "test").unwrap()
    }

    #[test]
    fn kohya_to_diffusers_to_kohya_is_bit_exact() {
        for dtype in [DType::F32, DType::BF16] {
            let original: HashMap<String, Tensor> = kohya_file_tensors()
                .into_iter()
                .map(|(k, t)| {
                    let t = if k.ends_with(".alpha") {
                        t
                    } else {
                        t.to_dtype(dtype).unwrap()
                    };
                    (k, t)
                })
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let f = parse(original.clone(), BTreeMap::new(), "orig").unwrap();
            let dpath = dir.path().join("d.safetensors");
            save_diffusers(&dpath, &f.lora, &BTreeMap::new(), dtype).unwrap();
            let d = load(&dpath, &dev()).unwrap();
            assert_eq!(d.format, LoraFormat::Diffusers);
            assert!(d.unmatched.is_empty(), "{:?}", d.unmatched);
            let (raw_d, _) = read_raw(&dpath);
            // Compact block-diagonal parts, zero v part left out.
            assert_eq!(
                raw_d["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"].dims(),
                &[1, H]
            );
            assert!(!raw_d
                .contains_key("transformer.transformer_blocks.1.attn.add_v_proj.lora_A.weight"));

            let kpath = dir.path().join("k.safetensors");
            save_kohya(&kpath, &d.lora, &BTreeMap::new(), dtype).unwrap();
            let (back, md) = read_raw(&kpath);
            assert!(md.contains_key("sshs_model_hash"));
            let mut want_keys: Vec<_> = original.keys().cloned().collect();
            let mut got_keys: Vec<_> = back.keys().cloned().collect();
            want_keys.sort();
            got_keys.sort();
            assert_eq!(got_keys, want_keys, "{dtype:?}");
            for (k, t) in &original {
                assert_eq!(bits(&back[k]), bits(t), "{dtype:?} {k}");
            }
        }
    }

    #[test]
    fn diffusers_to_kohya_to_diffusers_keeps_separate_downs() {
        // ai-toolkit style: q, k, v each with their own down, no alpha.
        let mut sd = HashMap::new();
        for (j, p) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            sd.insert(
                format!("transformer.transformer_blocks.2.attn.{p}.lora_A.weight"),
                mat(R, H, 10 + j as u32),
            );
            sd.insert(
                format!("transformer.transformer_blocks.2.attn.{p}.lora_B.weight"),
                mat(H, R, 20 + j as u32),
            );
        }
        let f = parse(sd.clone(), BTreeMap::new(), "a").unwrap();
        let l = &f.lora.layers["double_blocks.2.img_attn.qkv"];
        assert_eq!(l.rank(), 3 * R);
        assert_eq!(l.alpha, (3 * R) as f32);
        let dir = tempfile::tempdir().unwrap();
        let kpath = dir.path().join("k.safetensors");
        save_kohya(&kpath, &f.lora, &BTreeMap::new(), DType::F32).unwrap();
        let k = load(&kpath, &dev()).unwrap();
        let dpath = dir.path().join("d.safetensors");
        save_diffusers(&dpath, &k.lora, &BTreeMap::new(), DType::F32).unwrap();
        let (back, _) = read_raw(&dpath);
        for (key, t) in &sd {
            assert_eq!(bits(&back[key]), bits(t), "{key}");
            let alpha = key
                .replace(".lora_A.weight", ".alpha")
                .replace(".lora_B.weight", ".alpha");
            assert_eq!(scalar(&back[&alpha]).unwrap(), R as f32);
        }
    }

    /// The per-component update scale_j · B_j · A_j.
    fn part_delta(down: &Tensor, up: &Tensor, alpha: f32) -> Tensor {
        let r = down.dim(0).unwrap();
        (up.matmul(down).unwrap() * (alpha as f64 / r as f64)).unwrap()
    }

    #[test]
    fn fused_update_equals_the_parts_on_their_rows() {
        // linear1 from diffusers parts with different downs, ranks and alphas; k missing.
        let parts = [
            ("attn.to_q", 2usize, 1.0f32, H, 0usize),
            ("attn.to_v", 3, 6.0, H, 2 * H),
            ("proj_mlp", 1, 0.5, 4 * H, 3 * H),
        ];
        let mut sd = HashMap::new();
        for (i, (name, r, alpha, out, _)) in parts.iter().enumerate() {
            let p = format!("transformer.single_transformer_blocks.0.{name}");
            sd.insert(format!("{p}.lora_A.weight"), mat(*r, H, 100 + i as u32));
            sd.insert(format!("{p}.lora_B.weight"), mat(*out, *r, 200 + i as u32));
            sd.insert(format!("{p}.alpha"), scalar_t(*alpha));
        }
        let f = parse(sd.clone(), BTreeMap::new(), "s").unwrap();
        let l = &f.lora.layers["single_blocks.0.linear1"];
        assert_eq!(l.in_out(), (H, 7 * H));
        assert_eq!(l.rank(), 6);
        assert_eq!(l.alpha, 6.0);
        let delta = l.delta_weight().unwrap();
        for (name, _, alpha, out, start) in parts {
            let p = format!("transformer.single_transformer_blocks.0.{name}");
            let want = part_delta(
                &sd[&format!("{p}.lora_A.weight")],
                &sd[&format!("{p}.lora_B.weight")],
                alpha,
            );
            assert_close(&rows(&delta, start, out), &want, name);
        }
        assert_close(&rows(&delta, H, H), &zeros(H, H), "missing k");

        // Same parts through a kohya file and back: the update is unchanged.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.safetensors");
        save_kohya(&path, &f.lora, &BTreeMap::new(), DType::F32).unwrap();
        let k = load(&path, &dev()).unwrap();
        assert_close(
            &k.lora.layers["single_blocks.0.linear1"]
                .delta_weight()
                .unwrap(),
            &delta,
            "kohya",
        );
        let path = dir.path().join("d.safetensors");
        save_diffusers(&path, &k.lora, &BTreeMap::new(), DType::F32).unwrap();
        let d = load(&path, &dev()).unwrap();
        assert_close(
            &d.lora.layers["single_blocks.0.linear1"]
                .delta_weight()
                .unwrap(),
            &delta,
            "diffusers",
        );
    }

    #[test]
    fn shared_down_parts_fuse_by_stacking_ups() {
        let down = mat(R, H, 1);
        let mut sd = HashMap::new();
        for (j, p) in ["add_q_proj", "add_k_proj"].iter().enumerate() {
            sd.insert(
                format!("transformer.transformer_blocks.0.attn.{p}.lora_A.weight"),
                down.clone(),
            );
            sd.insert(
                format!("transformer.transformer_blocks.0.attn.{p}.lora_B.weight"),
                mat(H, R, 5 + j as u32),
            );
        }
        let f = parse(sd.clone(), BTreeMap::new(), "s").unwrap();
        let l = &f.lora.layers["double_blocks.0.txt_attn.qkv"];
        assert_eq!(l.rank(), R);
        assert_eq!(l.alpha, R as f32);
        assert_eq!(bits(&l.down), bits(&down));
        let d = l.delta_weight().unwrap();
        let want_k = part_delta(
            &down,
            &sd["transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight"],
            R as f32,
        );
        assert_close(&rows(&d, H, H), &want_k, "k");
        assert_close(&rows(&d, 2 * H, H), &zeros(H, H), "v");
    }

    #[test]
    fn kohya_split_parts_keep_their_training_scale() {
        // `lora_down.N` / `lora_up.N`: each part rank 2 with the module's alpha 1.
        let mut sd = HashMap::new();
        let k = "lora_unet_double_blocks_0_img_attn_qkv";
        for j in 0..3 {
            sd.insert(format!("{k}.lora_down.{j}.weight"), mat(R, H, 30 + j));
            sd.insert(format!("{k}.lora_up.{j}.weight"), mat(H, R, 40 + j));
        }
        sd.insert(format!("{k}.alpha"), scalar_t(1.0));
        let f = parse(sd.clone(), BTreeMap::new(), "split").unwrap();
        assert_eq!(f.format, LoraFormat::Kohya);
        let l = &f.lora.layers["double_blocks.0.img_attn.qkv"];
        assert_eq!(l.alpha, 3.0);
        let d = l.delta_weight().unwrap();
        for j in 0..3usize {
            let want = part_delta(
                &sd[&format!("{k}.lora_down.{j}.weight")],
                &sd[&format!("{k}.lora_up.{j}.weight")],
                1.0,
            );
            assert_close(&rows(&d, j * H, H), &want, "split part");
        }
    }

    #[test]
    fn missing_alpha_defaults_to_rank_and_peft_metadata_is_honoured() {
        let mut sd = HashMap::new();
        sd.insert("lora_unet_img_in.lora_down.weight".into(), mat(3, 8, 1));
        sd.insert("lora_unet_img_in.lora_up.weight".into(), mat(H, 3, 2));
        let f = parse(sd, BTreeMap::new(), "k").unwrap();
        assert_eq!(f.lora.layers["img_in"].alpha, 3.0);
        assert_eq!(f.lora.layers["img_in"].scale(), 1.0);

        let mut sd = HashMap::new();
        for m in ["x_embedder", "context_embedder", "proj_out"] {
            sd.insert(format!("transformer.{m}.lora_A.weight"), mat(4, 8, 1));
            sd.insert(format!("transformer.{m}.lora_B.weight"), mat(H, 4, 2));
        }
        let f = parse(sd.clone(), BTreeMap::new(), "d").unwrap();
        assert!(f.lora.layers.values().all(|l| l.alpha == 4.0));

        let mut md = BTreeMap::new();
        md.insert(
            "lora_adapter_metadata".into(),
            r#"{"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"context_embedder": 2}, "transformer.use_rslora": false}"#.into(),
        );
        let f = parse(sd.clone(), md, "p").unwrap();
        assert_eq!(f.lora.layers["img_in"].alpha, 8.0);
        assert_eq!(f.lora.layers["txt_in"].alpha, 2.0);
        assert_eq!(f.lora.layers["final_layer.linear"].alpha, 8.0);

        let mut md = BTreeMap::new();
        md.insert(
            "lora_adapter_metadata".into(),
            r#"{"lora_alpha": 8, "use_rslora": true}"#.into(),
        );
        let f = parse(sd.clone(), md, "rs").unwrap();
        // rsLoRA: scale = 8 / sqrt(4) = 4.
        assert!((f.lora.layers["img_in"].scale() - 4.0).abs() < 1e-6);

        let mut md = BTreeMap::new();
        md.insert(
            "lora_adapter_metadata".into(),
            r#"{"transformer.use_dora": true}"#.into(),
        );
        let err = parse(sd, md, "dora").unwrap_err().to_string();
        assert!(err.contains("unsupported network type DoRA"), "{err}");
    }

    #[test]
    fn clip_text_encoder_loras_load_and_round_trip() {
        let module = "te1.text_model.encoder.layers.0.mlp.fc1";
        let mut sd = kohya_dict(&reference());
        sd.insert(
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(),
            mat(2, 8, 3),
        );
        sd.insert(
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight".into(),
            mat(16, 2, 4),
        );
        sd.insert(
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha".into(),
            scalar_t(1.0),
        );
        let f = parse(sd, BTreeMap::new(), "te").unwrap();
        assert!(f.text_encoder.is_empty() && f.unmatched.is_empty());
        let layer = &f.lora.layers[module];
        assert_eq!((layer.rank(), layer.alpha), (2, 1.0));
        // kohya → diffusers → kohya keeps the CLIP layer bit for bit.
        let diffusers: HashMap<String, Tensor> = diffusers_tensors(&f.lora, DType::F32)
            .unwrap()
            .into_iter()
            .collect();
        assert!(diffusers
            .contains_key("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"));
        let back = parse(diffusers, BTreeMap::new(), "d").unwrap();
        let kohya: HashMap<String, Tensor> = kohya_tensors(&back.lora, DType::F32)
            .unwrap()
            .into_iter()
            .collect();
        let up = &kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"];
        assert_eq!(
            up.to_vec2::<f32>().unwrap(),
            layer.up.to_vec2::<f32>().unwrap()
        );
        // A missing partner is named.
        let mut bad = HashMap::new();
        bad.insert(
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
            mat(2, 8, 1),
        );
        let err = parse(bad, BTreeMap::new(), "bad").unwrap_err().to_string();
        assert!(err.contains("lora_B"), "{err}");
    }

    #[test]
    fn unmatched_and_text_encoder_keys_are_reported() {
        let mut sd = kohya_dict(&reference());
        sd.insert(
            "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight".into(),
            mat(R, H, 1),
        );
        sd.insert(
            "transformer.some.unknown.lora_A.weight".into(),
            mat(R, H, 1),
        );
        sd.insert("random_key".into(), mat(1, 1, 1));
        sd.insert("lora_unet_img_in.alpha".into(), scalar_t(2.0));
        sd.insert("diffusion_model.img_in.diff_b".into(), mat(1, H, 1));
        // T5 (second text encoder) LoRA keys are recognised but not loaded.
        let te = [
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight",
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q.alpha",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
        ];
        for k in te {
            sd.insert(k.into(), mat(1, 1, 1));
        }
        let f = parse(sd, BTreeMap::new(), "u").unwrap();
        assert_eq!(f.lora.layers.len(), MODULES.len());
        assert_eq!(
            f.unmatched,
            vec![
                "diffusion_model.img_in.diff_b",
                "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight",
                "lora_unet_img_in.alpha",
                "random_key",
                "transformer.some.unknown.lora_A.weight",
            ]
        );
        let mut want_te: Vec<String> = te.iter().map(|s| s.to_string()).collect();
        want_te.sort();
        assert_eq!(f.text_encoder, want_te);
        let report = describe(&f);
        assert_eq!(report.text_encoder_keys.len(), 4);
        assert_eq!(report.unmatched.len(), 5);
        let text = report.to_string();
        assert!(text.contains("random_key"), "{text}");
    }

    #[test]
    fn errors_name_the_key() {
        let mut sd = HashMap::new();
        sd.insert("lora_unet_img_in.lora_down.weight".into(), mat(R, 8, 1));
        let err = parse(sd, BTreeMap::new(), "f.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.safetensors"), "{err}");
        assert!(err.contains("lora_unet_img_in.lora_up.weight"), "{err}");

        let mut sd = HashMap::new();
        sd.insert("transformer.x_embedder.lora_B.weight".into(), mat(H, R, 1));
        let err = parse(sd, BTreeMap::new(), "f").unwrap_err().to_string();
        assert!(
            err.contains("transformer.x_embedder.lora_A.weight"),
            "{err}"
        );

        let mut sd = HashMap::new();
        sd.insert("lora_unet_img_in.lora_down.weight".into(), mat(R, 8, 1));
        sd.insert("lora_unet_img_in.lora_up.weight".into(), mat(H, R + 1, 1));
        let err = parse(sd, BTreeMap::new(), "f").unwrap_err();
        assert!(matches!(err, LoraIoError::RankMismatch { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("lora_unet_img_in.lora_down.weight"));

        let mut sd = HashMap::new();
        sd.insert(
            "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1".into(),
            mat(2, 2, 1),
        );
        let err = parse(sd, BTreeMap::new(), "f").unwrap_err().to_string();
        assert!(err.contains("unsupported network type LoKr"), "{err}");
        assert!(
            err.contains("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1"),
            "{err}"
        );

        let mut sd = HashMap::new();
        sd.insert("lora_unet_img_in.hada_w1_a".into(), mat(2, 2, 1));
        let err = parse(sd, BTreeMap::new(), "f").unwrap_err().to_string();
        assert!(err.contains("LoHa"), "{err}");
    }

    #[test]
    fn truncated_or_garbage_files_give_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken_lora.safetensors");
        save_kohya(&path, &reference(), &BTreeMap::new(), DType::F32).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 3, bytes.len() / 2, 40, 7, 0] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = load(&path, &dev()).unwrap_err().to_string();
            assert!(err.contains("broken_lora.safetensors"), "cut {cut}: {err}");
        }
        std::fs::write(&path, b"this is not a safetensors file at all, just text").unwrap();
        let err = load(&path, &dev()).unwrap_err().to_string();
        assert!(err.contains("broken_lora.safetensors"), "{err}");
        assert!(read_metadata(&path).is_err());
        let err = load(dir.path().join("absent.safetensors"), &dev())
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.safetensors"), "{err}");
    }

    #[test]
    fn validate_names_the_modules() {
        let lora = reference();
        let mut shapes: BTreeMap<String, (usize, usize)> = MODULES
            .iter()
            .map(|(m, in_f, out, _)| (m.to_string(), (*out, *in_f)))
            .collect();
        validate(&lora, &shapes).unwrap();
        shapes.insert("single_blocks.1.linear2".into(), (H, 6 * H));
        shapes.remove("time_in.in_layer");
        let err = validate(&lora, &shapes).unwrap_err().to_string();
        assert!(err.contains("ref"), "{err}");
        assert!(err.contains("single_blocks.1.linear2"), "{err}");
        assert!(err.contains("time_in.in_layer"), "{err}");
        assert!(!err.contains("img_attn.qkv"), "{err}");
    }

    #[test]
    fn metadata_round_trips_through_a_saved_file() {
        let mut meta = KohyaMetadata::new("my_lora", FluxVariant::Dev, 16, 16.0);
        meta.learning_rate = 1e-5;
        meta.max_train_steps = 1500;
        meta.training_started_at = 1_723_456_789.123_456;
        meta.saved_at = 1_723_456_789.0;
        meta.sd_model_name = Some("flux1-dev.safetensors".into());
        meta.tag_frequency.insert(
            "10_dog".into(),
            tag_frequency(["A dog, grass", "dog,  sky ,"]),
        );
        meta.extra.insert("fluxlora_job".into(), "abc".into());
        let map = meta.to_map();
        assert_eq!(map["ss_network_module"], "networks.lora_flux");
        assert_eq!(map["ss_network_dim"], "16");
        assert_eq!(map["ss_network_alpha"], "16.0");
        assert_eq!(map["ss_learning_rate"], "1e-05");
        assert_eq!(map["ss_base_model_version"], "flux1");
        assert_eq!(map["ss_training_started_at"], "1723456789.123456");
        assert_eq!(
            map["ss_tag_frequency"],
            r#"{"10_dog": {"a dog": 1, "dog": 1, "grass": 1, "sky": 1}}"#
        );
        assert_eq!(map["ss_resolution"], "(1024, 1024)");
        assert_eq!(map["modelspec.architecture"], "flux-1-dev/lora");
        assert_eq!(map["modelspec.date"], "2024-08-12T09:59:49");
        assert_eq!(map["modelspec.title"], "my_lora");
        assert_eq!(map["ss_gradient_checkpointing"], "False");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save_kohya(&path, &reference(), &map, DType::F16).unwrap();
        let f = load(&path, &dev()).unwrap();
        for (k, v) in &map {
            assert_eq!(f.metadata.get(k), Some(v), "{k}");
        }
        assert_eq!(read_metadata(&path).unwrap(), f.metadata);
        // Converting carries the training metadata but not the stale hashes.
        let dpath = dir.path().join("d.safetensors");
        let mut carried = f.metadata.clone();
        carried.insert("lora_adapter_metadata".into(), "{}".into());
        save_diffusers(&dpath, &f.lora, &carried, DType::F32).unwrap();
        let d = read_metadata(&dpath).unwrap();
        assert_eq!(d["ss_network_dim"], "16");
        assert_eq!(d["format"], "pt");
        assert!(!d.contains_key("sshs_model_hash") && !d.contains_key("lora_adapter_metadata"));
        std::fs::remove_file(&dpath).unwrap();
        // kohya's hash is the sha256 of the data after the header.
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(f.metadata["sshs_model_hash"], hex(&sha256(&bytes[8 + n..])));
        assert_eq!(f.metadata["sshs_legacy_hash"].len(), 8);
        assert_eq!(f.lora.layers["time_in.in_layer"].down.dtype(), DType::F16);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn report_counts_groups() {
        let f = parse(kohya_dict(&reference()), BTreeMap::new(), "r").unwrap();
        let r = describe(&f);
        assert_eq!(r.modules, 6);
        assert_eq!(r.double_blocks, vec![0]);
        assert_eq!(r.single_blocks, vec![1]);
        assert_eq!((r.double_modules, r.single_modules), (2, 2));
        assert_eq!(
            r.other_modules,
            vec!["final_layer.adaLN_modulation.1", "time_in.in_layer"]
        );
        assert_eq!(r.ranks.get(&R), Some(&6));
        assert!(r.to_string().contains("format:      kohya"));
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert!(serde_json::to_string(&r)
            .unwrap()
            .contains("\"format\":\"kohya\""));
    }

    #[test]
    fn save_rejects_bad_dtype_and_unknown_modules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let err = save_kohya(&path, &reference(), &BTreeMap::new(), DType::U8).unwrap_err();
        assert!(matches!(err, LoraIoError::SaveDtype { .. }));
        let mut lora = reference();
        lora.layers.insert(
            "not.a.module".into(),
            LoraLayer {
                down: mat(1, 1, 1),
                up: mat(1, 1, 1),
                alpha: 1.0,
            },
        );
        let err = save_diffusers(&path, &lora, &BTreeMap::new(), DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not.a.module") && err.contains("x.safetensors"),
            "{err}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn helpers_match_python() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(&[b'a'; 1000])),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
        for (x, s) in [
            (1e-5, "1e-05"),
            (1e-4, "0.0001"),
            (16.0, "16.0"),
            (3.5, "3.5"),
            (1e16, "1e+16"),
            (2.5e-7, "2.5e-07"),
            (123456789012345.6, "123456789012345.6"),
            (0.0, "0.0"),
        ] {
            assert_eq!(py_float(x), s);
        }
        assert_eq!(iso_date(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(951_782_400.0 + 86_399.0), "2000-02-29T23:59:59");
    }
}
