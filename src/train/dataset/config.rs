//! The dataset's settings as a user writes them (kohya / ai-toolkit names),
//! their defaults and their validation.
//!
//! Owns: `DatasetConfig`, `FolderConfig`, `Resolution`, and the derived bucket
//! settings. Must not: touch the file system or images; scanning is `scan`'s job.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::DatasetError;

/// Flux packs 2×2 patches of the 8× VAE latents: image sides must be multiples of 16.
pub const FLUX_PIXEL_MULTIPLE: u32 = 16;
/// The largest side a training image is resized to (the sampler's limit too).
const MAX_SIDE: u32 = crate::sample::generate::MAX_SIDE as u32;

/// Settings of one training dataset. Every field has a default, so `{}` plus
/// `folders` is a complete config. Unknown fields are an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// Image folders. Each entry is a path, or a table
    /// `{ path, num_repeats, caption_extension, class_tokens }`.
    /// A folder that holds images directly is one image folder; if its name
    /// follows kohya's `N_name` convention (e.g. `10_sks dog`) it gives the
    /// repeats (10) and class tokens (`sks dog`). A folder with no images of its
    /// own is a kohya `train_data_dir`: each subfolder named `N_name` is an
    /// image folder and other subfolders are ignored with a warning.
    /// Values given in the table override those from the name. Default: none
    /// (at least one is required).
    pub folders: Vec<FolderConfig>,
    /// Extension of the caption file next to each image (`img.png` →
    /// `img.txt`). When it is `.txt` a missing file is also looked for as
    /// `.caption`, and the other way round. A leading dot is added if missing.
    /// Default `.txt`.
    pub caption_extension: String,
    /// Prepended (as the first tag) to every caption that does not already
    /// contain it as a whole word; `[trigger]` and `[name]` in a caption are
    /// replaced by it (ai-toolkit). A dropped-out caption stays empty.
    /// Default: none.
    pub trigger_word: Option<String>,
    /// Shuffle the separator-delimited tags of each caption every time it is
    /// used, keeping the first `keep_tokens` in place. Default false.
    pub shuffle_caption: bool,
    /// How many leading tags stay in place when shuffling or tag dropout is
    /// on (the trigger word, added afterwards, is not counted). Default 0.
    pub keep_tokens: usize,
    /// Tag separator for shuffling, tag dropout and tag frequency. Default `,`.
    pub caption_separator: String,
    /// Probability of training an item with an empty caption. Default 0.
    pub caption_dropout_rate: f64,
    /// Probability of dropping each non-kept tag. Default 0.
    pub caption_tag_dropout_rate: f64,
    /// Mirror images horizontally with probability 1/2. Default false.
    pub flip_aug: bool,
    /// Crop a random window of the resized image instead of the centre.
    /// Default false.
    pub random_crop: bool,
    /// Training resolution: `512` or `[width, height]`. With buckets its area
    /// is the largest bucket area (`max_area`); without, every image is resized
    /// to cover it and cropped to exactly this size. Default 512.
    pub resolution: Resolution,
    /// Aspect-ratio buckets (kohya `--enable_bucket`). Default true (kohya's
    /// default is false; every Flux recipe turns it on).
    pub enable_bucket: bool,
    /// Smallest bucket side in pixels, rounded down to `bucket_reso_steps`.
    /// Default 256.
    pub min_bucket_reso: u32,
    /// Largest bucket side in pixels, rounded up to `bucket_reso_steps`.
    /// Default 1024.
    pub max_bucket_reso: u32,
    /// Bucket sides are multiples of this; must be a multiple of 16 for Flux.
    /// Default 64.
    pub bucket_reso_steps: u32,
    /// Never upscale: each image gets its own bucket no larger than itself
    /// (area at most `max_area`); `min/max_bucket_reso` are ignored.
    /// Default false.
    pub bucket_no_upscale: bool,
    /// Parse `(word:1.2)`, `(word)`, `[word]` in captions as prompt weights.
    /// When false (kohya's default) brackets are plain text. Default false.
    pub weighted_captions: bool,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            folders: Vec::new(),
            caption_extension: ".txt".into(),
            trigger_word: None,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_separator: ",".into(),
            caption_dropout_rate: 0.0,
            caption_tag_dropout_rate: 0.0,
            flip_aug: false,
            random_crop: false,
            resolution: Resolution::square(512),
            enable_bucket: true,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            weighted_captions: false,
        }
    }
}

/// One configured folder. Deserializes from a plain path string or a table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FolderConfig {
    /// The folder (an image folder or a kohya `train_data_dir`).
    pub path: PathBuf,
    /// Repeats per epoch of each image (overrides the `N_` of the name); ≥ 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_repeats: Option<u32>,
    /// Caption extension for this folder (overrides the dataset's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_extension: Option<String>,
    /// Caption of images without a caption file (overrides the `_name` of the name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_tokens: Option<String>,
}

impl FolderConfig {
    /// A folder with nothing overridden.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            num_repeats: None,
            caption_extension: None,
            class_tokens: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FolderTable {
    path: PathBuf,
    #[serde(default)]
    num_repeats: Option<u32>,
    #[serde(default)]
    caption_extension: Option<String>,
    #[serde(default)]
    class_tokens: Option<String>,
}

impl<'de> Deserialize<'de> for FolderConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FolderVisitor;
        impl<'de> Visitor<'de> for FolderVisitor {
            type Value = FolderConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a folder path or a table with `path`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FolderConfig, E> {
                Ok(FolderConfig::new(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FolderConfig, A::Error> {
                let t = FolderTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FolderConfig {
                    path: t.path,
                    num_repeats: t.num_repeats,
                    caption_extension: t.caption_extension,
                    class_tokens: t.class_tokens,
                })
            }
        }
        deserializer.deserialize_any(FolderVisitor)
    }
}

/// A training resolution; written as `512` (square) or `[width, height]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub width: u32,
    pub height: u32,
}

impl Resolution {
    pub(crate) fn square(side: u32) -> Self {
        Self {
            width: side,
            height: side,
        }
    }

    /// `width × height`: kohya's `max_area` for buckets.
    pub(crate) fn area(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

impl Serialize for Resolution {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.width == self.height {
            s.serialize_u32(self.width)
        } else {
            [self.width, self.height].serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ResolutionVisitor;
        impl<'de> Visitor<'de> for ResolutionVisitor {
            type Value = Resolution;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a side in pixels (512) or [width, height]")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Resolution, E> {
                let side = u32::try_from(v).map_err(|_| E::custom("resolution is too large"))?;
                Ok(Resolution::square(side))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Resolution, E> {
                let v = u64::try_from(v).map_err(|_| E::custom("resolution must be positive"))?;
                self.visit_u64(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Resolution, A::Error> {
                let width: u32 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let height: u32 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<u32>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Resolution { width, height })
            }
        }
        deserializer.deserialize_any(ResolutionVisitor)
    }
}

/// The bucket settings after validation and kohya's rounding of min/max.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BucketSpec {
    pub enabled: bool,
    pub resolution: Resolution,
    pub min_reso: u32,
    pub max_reso: u32,
    pub steps: u32,
    pub no_upscale: bool,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> DatasetError {
    DatasetError::Config {
        field: field.into(),
        message: message.into(),
    }
}

fn check_rate(field: &str, v: f64) -> Result<(), DatasetError> {
    if !(0.0..=1.0).contains(&v) {
        return Err(invalid(
            field,
            format!("{v} is not a probability in [0, 1]"),
        ));
    }
    Ok(())
}

/// `txt` → `.txt`; the empty string is refused by validation.
pub(crate) fn normalize_extension(ext: &str) -> String {
    let ext = ext.trim();
    if ext.starts_with('.') {
        ext.to_string()
    } else {
        format!(".{ext}")
    }
}

impl DatasetConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), DatasetError> {
        self.bucket_spec().map(|_| ())
    }

    /// Validates and derives the bucket settings. Like kohya, a
    /// `min_bucket_reso` / `max_bucket_reso` that is not a multiple of
    /// `bucket_reso_steps` is rounded (down / up) with a warning.
    pub(crate) fn bucket_spec(&self) -> Result<BucketSpec, DatasetError> {
        if self.folders.is_empty() {
            return Err(invalid("folders", "at least one folder is required"));
        }
        for (i, f) in self.folders.iter().enumerate() {
            if f.path.as_os_str().is_empty() {
                return Err(invalid(format!("folders[{i}].path"), "is empty"));
            }
            if f.num_repeats == Some(0) {
                return Err(invalid(
                    format!("folders[{i}].num_repeats"),
                    "must be at least 1",
                ));
            }
            if let Some(ext) = &f.caption_extension {
                if ext.trim().trim_start_matches('.').is_empty() {
                    return Err(invalid(
                        format!("folders[{i}].caption_extension"),
                        "is empty",
                    ));
                }
            }
        }
        if self
            .caption_extension
            .trim()
            .trim_start_matches('.')
            .is_empty()
        {
            return Err(invalid("caption_extension", "is empty"));
        }
        if self.caption_separator.is_empty() {
            return Err(invalid("caption_separator", "is empty"));
        }
        if let Some(t) = &self.trigger_word {
            if t.trim().is_empty() {
                return Err(invalid("trigger_word", "is blank; leave it out instead"));
            }
        }
        check_rate("caption_dropout_rate", self.caption_dropout_rate)?;
        check_rate("caption_tag_dropout_rate", self.caption_tag_dropout_rate)?;

        let res = self.resolution;
        if res.width < FLUX_PIXEL_MULTIPLE || res.height < FLUX_PIXEL_MULTIPLE {
            return Err(invalid(
                "resolution",
                format!("{}x{} is smaller than 16 pixels", res.width, res.height),
            ));
        }
        if res.width > MAX_SIDE || res.height > MAX_SIDE {
            return Err(invalid(
                "resolution",
                format!(
                    "{}x{}: a side may be at most {MAX_SIDE} pixels",
                    res.width, res.height
                ),
            ));
        }
        if !self.enable_bucket {
            if !res.width.is_multiple_of(FLUX_PIXEL_MULTIPLE)
                || !res.height.is_multiple_of(FLUX_PIXEL_MULTIPLE)
            {
                return Err(invalid(
                    "resolution",
                    format!(
                        "{}x{}: without buckets both sides must be multiples of 16 for Flux",
                        res.width, res.height
                    ),
                ));
            }
            return Ok(BucketSpec {
                enabled: false,
                resolution: res,
                min_reso: 0,
                max_reso: 0,
                steps: FLUX_PIXEL_MULTIPLE,
                no_upscale: false,
            });
        }

        let steps = self.bucket_reso_steps;
        if steps == 0 || !steps.is_multiple_of(FLUX_PIXEL_MULTIPLE) {
            return Err(invalid(
                "bucket_reso_steps",
                format!("{steps} is not a positive multiple of 16 (Flux packs 2x2 patches of 8x latents)"),
            ));
        }
        for (field, value) in [
            ("bucket_reso_steps", steps),
            ("min_bucket_reso", self.min_bucket_reso),
            ("max_bucket_reso", self.max_bucket_reso),
        ] {
            if value > MAX_SIDE {
                return Err(invalid(
                    field,
                    format!("{value} is more than {MAX_SIDE} pixels"),
                ));
            }
        }
        if self.min_bucket_reso == 0 {
            return Err(invalid("min_bucket_reso", "must be positive"));
        }
        let mut min_reso = self.min_bucket_reso;
        if !min_reso.is_multiple_of(steps) {
            let adjusted = (min_reso - min_reso % steps).max(steps);
            tracing::warn!(
                from = min_reso,
                to = adjusted,
                "min_bucket_reso rounded down to a multiple of bucket_reso_steps"
            );
            min_reso = adjusted;
        }
        let mut max_reso = self.max_bucket_reso;
        if !max_reso.is_multiple_of(steps) {
            let adjusted = max_reso + steps - max_reso % steps;
            tracing::warn!(
                from = max_reso,
                to = adjusted,
                "max_bucket_reso rounded up to a multiple of bucket_reso_steps"
            );
            max_reso = adjusted;
        }
        if max_reso < min_reso {
            return Err(invalid(
                "max_bucket_reso",
                format!("{max_reso} is smaller than min_bucket_reso {min_reso}"),
            ));
        }
        if !self.bucket_no_upscale {
            if res.width.min(res.height) < min_reso {
                return Err(invalid(
                    "min_bucket_reso",
                    format!(
                        "{min_reso} is larger than the resolution's smaller side {}; lower it or raise resolution",
                        res.width.min(res.height)
                    ),
                ));
            }
            if res.width.max(res.height) > max_reso {
                return Err(invalid(
                    "max_bucket_reso",
                    format!(
                        "{max_reso} is smaller than the resolution's larger side {}; raise it or lower resolution",
                        res.width.max(res.height)
                    ),
                ));
            }
        }
        if (res.area() as f64).sqrt() < steps as f64 {
            return Err(invalid(
                "resolution",
                format!(
                    "{}x{} is smaller than one bucket step ({steps})",
                    res.width, res.height
                ),
            ));
        }
        Ok(BucketSpec {
            enabled: true,
            resolution: res,
            min_reso,
            max_reso,
            steps,
            no_upscale: self.bucket_no_upscale,
        })
    }
}
