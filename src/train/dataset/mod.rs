//! Training dataset: image folders with captions and repeats (kohya's
//! `N_name` convention), aspect-ratio buckets, the deterministic order of
//! each epoch, per-step captions and augmentation, and loading one item as
//! a `(3, h, w)` tensor in [-1, 1].
//!
//! Owns the dataset's randomness: every random choice (epoch order, caption
//! shuffle and dropout, flip, random crop) comes from `(seed, epoch,
//! position)`, so a resumed run sees exactly the same sequence.
//!
//! Must not: touch the VAE or text encoders, hold tensors on an accelerator,
//! or cache anything beyond content hashes (caches live in `train::cache`).

mod bucket;
mod caption;
mod config;
mod scan;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use serde::Serialize;

pub(crate) use bucket::{Bucket, Placement};
pub(crate) use caption::{parse_weighted_caption, CaptionRules, WeightedChunk};
pub use config::{DatasetConfig, FolderConfig, Resolution, FLUX_PIXEL_MULTIPLE};
pub(crate) use scan::SkippedImage;

use crate::model::seeded::SeededRng;
use bucket::{cover_size, crop_offset, BucketGrid};
use caption::{count_tags, shuffle};

/// Errors of the dataset layer; each names the field or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset config: {field}: {message}")]
    Config { field: String, message: String },
    #[error("dataset folder not found: {}", path.display())]
    FolderNotFound { path: PathBuf },
    #[error("dataset folder is not a folder: {}", path.display())]
    NotAFolder { path: PathBuf },
    #[error(
        "no usable images in dataset folder {} ({skipped} unreadable; looked for .jpg .jpeg .png .webp files, or N_name subfolders holding them)",
        path.display()
    )]
    EmptyFolder { path: PathBuf, skipped: usize },
    #[error("no usable images in the dataset ({paths})")]
    EmptyDataset { paths: String },
    #[error("reading {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("caption file is not UTF-8: {}", path.display())]
    CaptionNotUtf8 { path: PathBuf },
    #[error("decoding image {}: {error}", path.display())]
    Image {
        path: PathBuf,
        error: image::ImageError,
    },
    #[error("no image {index}: the dataset has {len}")]
    NoSuchImage { index: usize, len: usize },
    #[error("making the image tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// What scanning left out or had to guess; also logged, once per kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ScanReport {
    /// Unreadable, corrupt, empty, or (with `bucket_no_upscale`) too small images.
    pub skipped: Vec<SkippedImage>,
    /// Images without a caption file (they use class tokens or "").
    pub missing_captions: Vec<PathBuf>,
    /// Subfolders of a `train_data_dir` whose names are not `N_name` with N ≥ 1.
    pub ignored_folders: Vec<PathBuf>,
}

/// Where an image's raw caption came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum CaptionSource {
    File,
    ClassTokens,
    Missing,
}

/// A content hash of an image file's bytes (FNV-1a 64), for cache keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ContentHash(pub u64);

impl ContentHash {
    pub(crate) fn of(bytes: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self(h)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One image of the dataset (counted once, whatever its repeats).
#[derive(Clone, Debug)]
pub(crate) struct DatasetImage {
    pub path: PathBuf,
    /// Base name of its image folder (the `ss_tag_frequency` key).
    pub folder: String,
    pub num_repeats: u32,
    /// `(width, height)` as read from the file header.
    pub size: (u32, u32),
    pub placement: Placement,
    /// The caption as read (first non-empty line), or the class tokens, or "".
    pub caption: String,
    pub caption_source: CaptionSource,
    folder_index: usize,
    hash: OnceLock<ContentHash>,
}

/// One sample of an epoch: which image, and the seed of its random choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchItem {
    /// Index into `Dataset::images()`.
    pub image: usize,
    /// Seeds this use's flip, crop and caption (derived from seed, epoch, position).
    pub seed: u64,
}

/// Items of one bucket, trained together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Batch {
    pub bucket: Bucket,
    pub items: Vec<BatchItem>,
}

/// The augmentation of one use of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Augment {
    pub flip: bool,
    /// Top-left of the crop window in the resized image, before any flip.
    pub crop_left_top: (u32, u32),
}

/// A caption ready for the text encoders.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Caption {
    /// Plain text; with `weighted_captions` the weighting syntax is removed.
    pub text: String,
    /// With `weighted_captions`: the chunks and their weights.
    pub weighted: Option<Vec<WeightedChunk>>,
}

/// kohya's `ss_dataset_dirs` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct DirInfo {
    pub n_repeats: u32,
    pub img_count: usize,
}

/// kohya's `ss_bucket_info`: `{"buckets": {"0": {"resolution": [w, h],
/// "count": n}}, "mean_img_ar_error": e}`, counts including repeats.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct BucketInfo {
    pub buckets: BTreeMap<usize, BucketCount>,
    pub mean_img_ar_error: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct BucketCount {
    pub resolution: [u32; 2],
    pub count: usize,
}

/// A scanned, bucketed dataset. Cheap to query; pixels are read by [`Dataset::load_pixels`].
#[derive(Clone, Debug)]
pub(crate) struct Dataset {
    config: DatasetConfig,
    rules: CaptionRules,
    images: Vec<DatasetImage>,
    /// Used buckets, sorted by (width, height).
    buckets: Vec<Bucket>,
    /// For each bucket, its images (each once).
    members: Vec<Vec<usize>>,
    tag_frequency: BTreeMap<String, BTreeMap<String, u64>>,
    dirs: BTreeMap<String, DirInfo>,
}

impl Dataset {
    /// Validates `config`, scans its folders (image headers only) and puts
    /// every image in a bucket. Skipped images and missing captions are
    /// logged (one warning each).
    pub(crate) fn scan(config: &DatasetConfig) -> Result<Self, DatasetError> {
        Self::scan_reporting(config).map(|(dataset, _)| dataset)
    }

    /// [`Dataset::scan`], also returning the [`ScanReport`] it logs.
    fn scan_reporting(config: &DatasetConfig) -> Result<(Self, ScanReport), DatasetError> {
        let spec = config.bucket_spec()?;
        let found = scan::scan(config)?;
        let grid = BucketGrid::new(&spec);
        let mut report = ScanReport {
            skipped: found.skipped,
            missing_captions: found.missing_captions,
            ignored_folders: found.ignored_folders,
        };

        let mut images = Vec::with_capacity(found.images.len());
        for img in found.images {
            let folder = &found.folders[img.folder];
            let Some(placement) = grid.place(img.size.0, img.size.1) else {
                report.skipped.push(SkippedImage {
                    path: img.path,
                    reason: format!(
                        "{}x{} is smaller than one bucket step ({})",
                        img.size.0, img.size.1, spec.steps
                    ),
                });
                continue;
            };
            let (caption, caption_source) = match (img.caption, &folder.class_tokens) {
                (Some(c), _) => (c, CaptionSource::File),
                (None, Some(t)) => (t.clone(), CaptionSource::ClassTokens),
                (None, None) => (String::new(), CaptionSource::Missing),
            };
            images.push(DatasetImage {
                path: img.path,
                folder: folder.name.clone(),
                num_repeats: folder.num_repeats,
                size: img.size,
                placement,
                caption,
                caption_source,
                folder_index: img.folder,
                hash: OnceLock::new(),
            });
        }
        if images.is_empty() {
            let paths: Vec<String> = config
                .folders
                .iter()
                .map(|f| f.path.display().to_string())
                .collect();
            return Err(DatasetError::EmptyDataset {
                paths: paths.join(", "),
            });
        }
        log_report(&report, &images);

        let mut buckets: Vec<Bucket> = images.iter().map(|i| i.placement.bucket).collect();
        buckets.sort();
        buckets.dedup();
        let mut members = vec![Vec::new(); buckets.len()];
        for (i, img) in images.iter().enumerate() {
            if let Ok(b) = buckets.binary_search(&img.placement.bucket) {
                members[b].push(i);
            }
        }

        let mut tag_frequency: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for img in &images {
            let entry = tag_frequency.entry(img.folder.clone()).or_default();
            count_tags([img.caption.as_str()], &config.caption_separator, entry);
        }
        let mut dirs: BTreeMap<String, DirInfo> = BTreeMap::new();
        for (fi, folder) in found.folders.iter().enumerate() {
            let count = images.iter().filter(|i| i.folder_index == fi).count();
            let mut key = folder.name.clone();
            let mut n = 2;
            while dirs.contains_key(&key) {
                key = format!("{} ({n})", folder.name);
                n += 1;
            }
            dirs.insert(
                key,
                DirInfo {
                    n_repeats: folder.num_repeats,
                    img_count: count,
                },
            );
        }

        let dataset = Self {
            config: config.clone(),
            rules: CaptionRules::from_config(config),
            images,
            buckets,
            members,
            tag_frequency,
            dirs,
        };
        tracing::info!(
            images = dataset.images.len(),
            items_per_epoch = dataset.len(),
            buckets = dataset.buckets.len(),
            "dataset scanned"
        );
        Ok((dataset, report))
    }

    /// Every image once, in scan order (folders in config order, files sorted).
    pub(crate) fn images(&self) -> &[DatasetImage] {
        &self.images
    }

    /// Items per epoch: each image counted `num_repeats` times.
    pub(crate) fn len(&self) -> usize {
        self.images.iter().map(|i| i.num_repeats as usize).sum()
    }

    /// Batches per epoch: per bucket, ⌈items / batch_size⌉ (a batch never
    /// mixes buckets, so the last batch of a bucket may be short). A
    /// `batch_size` of 0 counts as 1.
    pub(crate) fn steps_per_epoch(&self, batch_size: usize) -> usize {
        let bs = batch_size.max(1);
        self.members
            .iter()
            .map(|m| {
                let items: usize = m.iter().map(|&i| self.images[i].num_repeats as usize).sum();
                items.div_ceil(bs)
            })
            .sum()
    }

    /// The batches of `epoch`, like kohya: each bucket's items (every image
    /// `num_repeats` times) are shuffled and cut into batches of
    /// `batch_size` (0 counts as 1), then the order of all batches is
    /// shuffled. The same `(seed, epoch)` always gives the same batches.
    pub(crate) fn epoch_batches(&self, epoch: u64, batch_size: usize, seed: u64) -> Vec<Batch> {
        let bs = batch_size.max(1);
        let mut rng = SeededRng::for_name(seed, &format!("dataset/epoch/{epoch}"));
        let mut batches: Vec<(Bucket, Vec<usize>)> = Vec::new();
        for (b, members) in self.buckets.iter().zip(&self.members) {
            let mut items: Vec<usize> = members
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, self.images[i].num_repeats as usize))
                .collect();
            shuffle(&mut items, &mut rng);
            for chunk in items.chunks(bs) {
                batches.push((*b, chunk.to_vec()));
            }
        }
        shuffle(&mut batches, &mut rng);
        let mut position = 0u64;
        batches
            .into_iter()
            .map(|(bucket, items)| Batch {
                bucket,
                items: items
                    .into_iter()
                    .map(|image| {
                        let name = format!("dataset/item/{epoch}/{position}");
                        position += 1;
                        BatchItem {
                            image,
                            seed: SeededRng::for_name(seed, &name).next_u64(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// True when every use of every caption is the same text (no shuffle,
    /// no dropout), so text embeddings can be cached once per image.
    pub(crate) fn captions_are_static(&self) -> bool {
        self.rules.is_static()
    }

    /// True unless `random_crop`: latents can be cached per image (and per
    /// flip).
    pub(crate) fn latents_are_cacheable(&self) -> bool {
        !self.config.random_crop
    }

    fn image(&self, index: usize) -> Result<&DatasetImage, DatasetError> {
        self.images.get(index).ok_or(DatasetError::NoSuchImage {
            index,
            len: self.images.len(),
        })
    }

    /// The caption of one use of an image (see `CaptionRules::apply`).
    pub(crate) fn caption(&self, item: &BatchItem) -> Result<Caption, DatasetError> {
        let img = self.image(item.image)?;
        let mut rng = SeededRng::for_name(item.seed, "caption");
        Ok(self.finish_caption(self.rules.apply(&img.caption, &mut rng)))
    }

    /// The caption of an image with no randomness applied (trigger word
    /// included): what every use gives when `captions_are_static()`.
    pub(crate) fn fixed_caption(&self, image: usize) -> Result<Caption, DatasetError> {
        let img = self.image(image)?;
        Ok(self.finish_caption(self.rules.fixed(&img.caption)))
    }

    fn finish_caption(&self, text: String) -> Caption {
        if self.config.weighted_captions {
            let chunks = parse_weighted_caption(&text);
            Caption {
                text: chunks.iter().map(|c| c.text.as_str()).collect(),
                weighted: Some(chunks),
            }
        } else {
            Caption {
                text,
                weighted: None,
            }
        }
    }

    /// The flip and crop of one use of an image.
    pub(crate) fn augment(&self, item: &BatchItem) -> Result<Augment, DatasetError> {
        let img = self.image(item.image)?;
        let flip = self.config.flip_aug && SeededRng::for_name(item.seed, "flip").uniform() < 0.5;
        let mut crop_rng = SeededRng::for_name(item.seed, "crop");
        let rng = self.config.random_crop.then_some(&mut crop_rng);
        let crop_left_top = crop_offset(img.placement.resized, img.placement.bucket, rng);
        Ok(Augment {
            flip,
            crop_left_top,
        })
    }

    /// The centre crop without flip: the augmentation of a cached latent.
    pub(crate) fn plain_augment(&self, image: usize) -> Result<Augment, DatasetError> {
        let img = self.image(image)?;
        Ok(Augment {
            flip: false,
            crop_left_top: crop_offset(img.placement.resized, img.placement.bucket, None),
        })
    }

    /// Decodes an image, converts it to RGB (alpha dropped, like kohya),
    /// resizes it to cover its bucket with Lanczos3 (the `image` crate widens
    /// the kernel when shrinking, so downscaling is anti-aliased like kohya's
    /// INTER_AREA), crops the bucket at `augment.crop_left_top`, flips if
    /// asked. Returns `(3, h, w)` f32 in [-1, 1] on the CPU, the decoded size
    /// and the content hash of the file (computed once per image).
    pub(crate) fn load_pixels(
        &self,
        image: usize,
        augment: &Augment,
    ) -> Result<(Tensor, (u32, u32), ContentHash), DatasetError> {
        let img = self.image(image)?;
        let bytes = read_bytes(&img.path)?;
        let hash = *img.hash.get_or_init(|| ContentHash::of(&bytes));
        let decoded = decode(&img.path, bytes)?;
        let rgb = decoded.to_rgb8();
        drop(decoded);
        let original = rgb.dimensions();
        let bucket = img.placement.bucket;
        let resized_size = if original == img.size {
            img.placement.resized
        } else {
            // The file changed since the scan: cover the same bucket anyway.
            cover_size(original, bucket)
        };
        let resized = if rgb.dimensions() == resized_size {
            rgb
        } else {
            imageops::resize(&rgb, resized_size.0, resized_size.1, FilterType::Lanczos3)
        };
        let left = augment
            .crop_left_top
            .0
            .min(resized_size.0.saturating_sub(bucket.width));
        let top = augment
            .crop_left_top
            .1
            .min(resized_size.1.saturating_sub(bucket.height));
        let mut cropped =
            imageops::crop_imm(&resized, left, top, bucket.width, bucket.height).to_image();
        if augment.flip {
            imageops::flip_horizontal_in_place(&mut cropped);
        }
        let pixels = rgb_to_tensor(&cropped)?;
        Ok((pixels, original, hash))
    }

    /// The content hash of an image file (read once, then remembered).
    pub(crate) fn content_hash(&self, image: usize) -> Result<ContentHash, DatasetError> {
        let img = self.image(image)?;
        if let Some(h) = img.hash.get() {
            return Ok(*h);
        }
        let bytes = read_bytes(&img.path)?;
        Ok(*img.hash.get_or_init(|| ContentHash::of(&bytes)))
    }

    /// kohya's `ss_tag_frequency`: `{folder name: {tag: count}}` over the raw
    /// captions (class tokens for images without a caption file), tags
    /// lower-cased; folders of the same name are merged.
    pub(crate) fn tag_frequency(&self) -> &BTreeMap<String, BTreeMap<String, u64>> {
        &self.tag_frequency
    }

    /// kohya's `ss_dataset_dirs`: `{folder name: {n_repeats, img_count}}`;
    /// a repeated name gets ` (2)`, ` (3)`… as kohya does.
    pub(crate) fn dataset_dirs(&self) -> &BTreeMap<String, DirInfo> {
        &self.dirs
    }

    /// kohya's `ss_bucket_info` (bucket ids are positions in the sorted list of buckets in use);
    /// `None` without buckets, where kohya writes `null`.
    pub(crate) fn bucket_info(&self) -> Option<BucketInfo> {
        if !self.config.enable_bucket {
            return None;
        }
        let buckets = self
            .buckets
            .iter()
            .zip(&self.members)
            .enumerate()
            .map(|(i, (b, m))| {
                let count = m.iter().map(|&i| self.images[i].num_repeats as usize).sum();
                (
                    i,
                    BucketCount {
                        resolution: [b.width, b.height],
                        count,
                    },
                )
            })
            .collect();
        let sum: f64 = self
            .images
            .iter()
            .map(|i| i.placement.aspect_error(i.size).abs())
            .sum();
        Some(BucketInfo {
            buckets,
            mean_img_ar_error: sum / self.images.len().max(1) as f64,
        })
    }
}

fn log_report(report: &ScanReport, images: &[DatasetImage]) {
    if !report.skipped.is_empty() {
        let list: Vec<String> = report
            .skipped
            .iter()
            .map(|s| format!("{} ({})", s.path.display(), s.reason))
            .collect();
        tracing::warn!(
            count = report.skipped.len(),
            "skipped unusable images: {}",
            list.join("; ")
        );
    }
    if !report.missing_captions.is_empty() {
        const SHOWN: usize = 5;
        let class_tokens = images
            .iter()
            .filter(|i| i.caption_source == CaptionSource::ClassTokens)
            .count();
        let shown: Vec<String> = report
            .missing_captions
            .iter()
            .take(SHOWN)
            .map(|p| p.display().to_string())
            .collect();
        let more = report.missing_captions.len().saturating_sub(SHOWN);
        tracing::warn!(
            count = report.missing_captions.len(),
            using_class_tokens = class_tokens,
            "images without a caption file use their folder's class tokens, or an empty caption: {}{}",
            shown.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        );
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DatasetError> {
    std::fs::read(path).map_err(|error| DatasetError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn decode(path: &Path, bytes: Vec<u8>) -> Result<image::DynamicImage, DatasetError> {
    let err = |error| DatasetError::Image {
        path: path.to_path_buf(),
        error,
    };
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(image::ImageError::IoError(e)))?;
    if reader.format().is_none() {
        if let Ok(format) = image::ImageFormat::from_path(path) {
            reader.set_format(format);
        }
    }
    reader.decode().map_err(err)
}

/// HWC u8 → CHW f32 in [-1, 1].
fn rgb_to_tensor(img: &image::RgbImage) -> Result<Tensor, DatasetError> {
    let (w, h) = img.dimensions();
    let n = w as usize * h as usize;
    let mut data = vec![0f32; 3 * n];
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * n + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(
        data,
        (3, h as usize, w as usize),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests;
