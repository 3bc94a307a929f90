//! Runtime settings shared by every entry point: which device computes and in
//! which precision, and the daemon's [`Settings`] with their defaults.
//!
//! Must not: load models or open files.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// Where tensors live: the CPU, or a CUDA GPU when built with the `cuda` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub(crate) fn open(self) -> candle_core::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(i) => {
                if cfg!(feature = "cuda") {
                    Device::new_cuda(i)
                } else {
                    candle_core::bail!("this build has no CUDA support: rebuild with `--features cuda` or use `--device cpu`")
                }
            }
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{other}`: use cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Compute precision of the model weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub(crate) fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            other => Err(format!("unknown precision `{other}`: use f32, bf16 or f16")),
        }
    }
}

/// The daemon's settings, with safe defaults (loopback only, no token needed there).
/// `Debug` does not show the token.
#[derive(Clone)]
pub struct Settings {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Jobs, LoRAs and caches live here.
    pub data_dir: PathBuf,
    /// A model file or folder; the built-in tiny model when absent.
    pub model: Option<PathBuf>,
    /// A ComfyUI install: its `models/loras` receives finished LoRAs and is readable.
    pub comfy_root: Option<PathBuf>,
    /// Required on every request when set; required to be set off loopback.
    pub token: Option<String>,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// Largest JSON request body accepted.
    pub max_body_bytes: usize,
    /// Largest upload accepted (`POST /upload/image`; ComfyUI's default is 100 MiB).
    pub max_upload_bytes: usize,
    /// ComfyUI's front end to serve at `/`; `None`: `<data-dir>/frontend` if present.
    pub comfy_frontend: Option<PathBuf>,
    /// The front-end extension folder (`js/`); `None`: found beside the working
    /// directory or the binary.
    pub comfy_js: Option<PathBuf>,
    /// Further folders requests may read (datasets, LoRAs); the data dir is always one.
    pub roots: Vec<PathBuf>,
    /// Browser origins (`scheme://host[:port]`) allowed besides loopback ones.
    pub cors_origins: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 7860,
            data_dir: PathBuf::from("fluxlora-data"),
            model: None,
            comfy_root: None,
            token: std::env::var("FLUXLORA_TOKEN").ok(),
            device: DeviceChoice::Cpu,
            precision: Precision::F32,
            max_body_bytes: 1 << 20,
            max_upload_bytes: 100 << 20,
            comfy_frontend: None,
            comfy_js: None,
            roots: vec![],
            cors_origins: vec![],
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("model", &self.model)
            .field("comfy_root", &self.comfy_root)
            .field("token", &redacted(&self.token))
            .field("device", &self.device)
            .field("precision", &self.precision)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("comfy_frontend", &self.comfy_frontend)
            .field("comfy_js", &self.comfy_js)
            .field("roots", &self.roots)
            .field("cors_origins", &self.cors_origins)
            .finish()
    }
}

/// What `Debug` shows of a secret: whether there is one, never its value.
pub(crate) fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "<redacted>")
}

impl Settings {
    /// Where finished LoRAs go: ComfyUI's `models/loras` when given, else `<data>/loras`.
    pub fn lora_dir(&self) -> PathBuf {
        match &self.comfy_root {
            Some(root) => root.join("models").join("loras"),
            None => self.data_dir.join("loras"),
        }
    }

    /// Folders where model files are looked for (`GET /v1/models`): `<data>/models`
    /// and a ComfyUI install's diffusion-model folders.
    pub(crate) fn model_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.data_dir.join("models")];
        if let Some(root) = &self.comfy_root {
            for sub in ["diffusion_models", "unet", "checkpoints"] {
                dirs.push(root.join("models").join(sub));
            }
        }
        dirs
    }

    /// Every folder a request may read from: the data dir, the LoRA folder,
    /// ComfyUI's input folder (datasets of the ComfyUI nodes) and `--root`s.
    pub(crate) fn read_roots(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.data_dir.clone(), self.lora_dir()];
        if let Some(root) = &self.comfy_root {
            roots.push(root.join("input"));
        }
        roots.extend(self.roots.iter().cloned());
        roots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_precisions() {
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda:1".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(1)));
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().contains("tpu"));
        assert_eq!("BF16".parse::<Precision>(), Ok(Precision::Bf16));
        assert!("f8".parse::<Precision>().is_err());
    }

    #[test]
    fn debug_output_hides_the_token() {
        let settings = Settings {
            token: Some("s3cret-t0ken".into()),
            ..Settings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret-t0ken"), "{shown}");
        assert!(shown.contains(r#"token: Some("<redacted>")"#), "{shown}");
        assert!(shown.contains("host: \"127.0.0.1\""), "{shown}");
        let without = Settings {
            token: None,
            ..Settings::default()
        };
        assert!(format!("{without:?}").contains("token: None"));
    }
}
