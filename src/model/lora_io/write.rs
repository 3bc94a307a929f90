//! Writing LoRA files: kohya (`lora_unet_…`, fused BFL modules) and diffusers/peft
//! (`transformer.…`, fused modules split by [`split_layer`]), weights in f32, f16 or
//! bf16 and alphas in f32, with the metadata map the caller gives, kohya's `sshs_*`
//! hashes, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::fuse::split_layer;
use super::LoraIoError;
use crate::hex::hex;
use crate::model::adapter::Lora;
use crate::model::keymap::{self, LinearMap};

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

/// SHA-256 of `data` (kohya's metadata hashes).
pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::adapter::LoraLayer;
    use crate::model::lora_io::test_support::*;
    use crate::model::lora_io::{load, read_metadata};

    /// Metadata as a training run writes it (`train::metadata` renders these).
    fn training_like_metadata() -> BTreeMap<String, String> {
        [
            ("ss_network_module", "networks.lora_flux"),
            ("ss_network_dim", "16"),
            ("ss_network_alpha", "16.0"),
            ("ss_learning_rate", "1e-05"),
            ("ss_base_model_version", "flux1"),
            (
                "ss_tag_frequency",
                r#"{"10_dog": {"a dog": 1, "dog": 1, "grass": 1, "sky": 1}}"#,
            ),
            ("modelspec.architecture", "flux-1-dev/lora"),
            ("modelspec.date", "2024-08-12T09:59:49"),
            ("fluxlora_job", "abc"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn metadata_round_trips_through_a_saved_file() {
        let map = training_like_metadata();
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
    fn hash_helpers_match_python() {
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
    }
}
