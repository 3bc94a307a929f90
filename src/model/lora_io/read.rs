//! Reading LoRA files: safetensors decoding, key-format detection, alpha handling,
//! and gathering each BFL module's parts for `fuse`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};

use super::fuse::{build_layer, Gathered, Part};
use super::{LoraFile, LoraFormat, LoraIoError};
use crate::model::adapter::Lora;
use crate::model::keymap::{self, LinearMap};

/// Reads and parses a LoRA safetensors file onto `device`. The LoRA is named after
/// the file stem and carries the file's [`tensor_data_hash`]; errors name the path.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<LoraFile, LoraIoError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LoraIoError::Io {
        file: file.clone(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.clone());
    let mut parsed = from_bytes(&bytes, &name, &file, device)?;
    parsed.lora.hash = Some(tensor_data_hash(&bytes));
    Ok(parsed)
}

/// Decodes and parses the bytes of a LoRA safetensors file onto `device`: what
/// [`load`] does once the file is read. `name` becomes the LoRA's name, `file`
/// labels errors.
pub fn from_bytes(
    bytes: &[u8],
    name: &str,
    file: &str,
    device: &Device,
) -> Result<LoraFile, LoraIoError> {
    let (tensors, metadata) = decode(bytes, device, file)?;
    parse_inner(tensors, metadata, name, file)
}

/// The SHA-256 (hex) of a safetensors file's bytes after its header: kohya's
/// `sshs_model_hash` and what A1111 hashes for a LoRA (`addnet_hash_safetensors`
/// in its `modules/hashes.py`). Call on a file that [`decode`] read.
pub fn tensor_data_hash(bytes: &[u8]) -> String {
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let start = usize::try_from(n).map_or(bytes.len(), |n| n.saturating_add(8));
    crate::hex::hex(&super::write::sha256(bytes.get(start..).unwrap_or(&[])))
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

pub(super) fn decode(bytes: &[u8], device: &Device, file: &str) -> Result<Decoded, LoraIoError> {
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

pub(super) fn scalar(t: &Tensor) -> candle_core::Result<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora_io::test_support::*;
    use crate::model::lora_io::{describe, diffusers_tensors, kohya_tensors, save_kohya};

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
}
