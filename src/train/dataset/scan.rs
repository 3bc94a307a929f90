//! Scanning the configured folders: kohya's `N_name` repeat folders, image
//! files, their caption files and their sizes (read from the headers only).
//!
//! Must not: decode pixels, pick buckets or randomize anything; it returns
//! what is on disk, in a stable (sorted) order, plus what it had to skip.

use std::fs;
use std::path::{Path, PathBuf};

use super::config::{normalize_extension, DatasetConfig, FolderConfig};
use super::DatasetError;

/// Image file extensions read (case-insensitive), as in kohya minus BMP.
pub(crate) const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// An image folder after the repeat convention has been applied.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ImageFolder {
    pub path: PathBuf,
    /// The folder's base name: the key of `ss_tag_frequency` / `ss_dataset_dirs`.
    pub name: String,
    pub num_repeats: u32,
    pub class_tokens: Option<String>,
    pub caption_extension: String,
}

/// One image found on disk.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FoundImage {
    pub folder: usize,
    pub path: PathBuf,
    pub size: (u32, u32),
    /// The caption file's first non-empty line, trimmed; `None` if no file.
    pub caption: Option<String>,
}

/// An image left out of the dataset, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

/// kohya's repeat-folder name `N_name`: `N` (an integer, surrounding spaces
/// allowed) repeats, and `name` (everything after the first `_`) as class
/// tokens; `None` when the part before the first `_` is not an integer.
/// `10_sks dog` → (10, "sks dog"), `3_a_b` → (3, "a_b"), `5` → (5, "").
pub(crate) fn parse_repeat_folder(name: &str) -> Option<(u32, String)> {
    let (count, rest) = match name.split_once('_') {
        Some((c, r)) => (c, r),
        None => (name, ""),
    };
    let count = count.trim();
    let count = count.strip_prefix('+').unwrap_or(count);
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Too many digits for u32: clamp, it is "many repeats" either way.
    let n = count.parse::<u32>().unwrap_or(u32::MAX);
    Some((n, rest.to_string()))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// Image files and subfolders of `dir`, sorted; hidden entries skipped.
fn list_dir(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), DatasetError> {
    let io = |error| DatasetError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let mut images = Vec::new();
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if is_hidden(&path) {
            continue;
        }
        // `metadata` follows symlinks, so linked folders and images count.
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => dirs.push(path),
            Ok(m) if m.is_file() && is_image(&path) => images.push(path),
            _ => {}
        }
    }
    images.sort();
    dirs.sort();
    Ok((images, dirs))
}

/// Everything the scan found.
pub(crate) struct ScanResult {
    pub folders: Vec<ImageFolder>,
    pub images: Vec<FoundImage>,
    pub skipped: Vec<SkippedImage>,
    pub missing_captions: Vec<PathBuf>,
    pub ignored_folders: Vec<PathBuf>,
}

/// Resolves each configured folder into image folders (see
/// `DatasetConfig::folders`), lists images, reads caption files and sizes.
/// A missing folder, or a configured folder that yields no usable image, is
/// an error naming it.
pub(crate) fn scan(cfg: &DatasetConfig) -> Result<ScanResult, DatasetError> {
    let mut out = ScanResult {
        folders: Vec::new(),
        images: Vec::new(),
        skipped: Vec::new(),
        missing_captions: Vec::new(),
        ignored_folders: Vec::new(),
    };
    for entry in &cfg.folders {
        let meta = fs::metadata(&entry.path).map_err(|_| DatasetError::FolderNotFound {
            path: entry.path.clone(),
        })?;
        if !meta.is_dir() {
            return Err(DatasetError::NotAFolder {
                path: entry.path.clone(),
            });
        }
        let before = out.images.len();
        let skipped_before = out.skipped.len();
        let (images, subdirs) = list_dir(&entry.path)?;
        if !images.is_empty() {
            let parsed = parse_repeat_folder(&folder_name(&entry.path));
            let repeat_subdirs: Vec<&PathBuf> = subdirs
                .iter()
                .filter(|d| parse_repeat_folder(&folder_name(d)).is_some_and(|(n, _)| n > 0))
                .collect();
            if !repeat_subdirs.is_empty() {
                tracing::warn!(
                    folder = %entry.path.display(),
                    subfolders = ?repeat_subdirs,
                    "folder holds images itself, so its N_name subfolders are not read; list them in `folders` to use them"
                );
            }
            let folder = image_folder(cfg, entry, &entry.path, parsed);
            add_folder(&mut out, folder, images)?;
        } else {
            for dir in subdirs {
                match parse_repeat_folder(&folder_name(&dir)) {
                    Some((n, tokens)) if n > 0 => {
                        let (images, _) = list_dir(&dir)?;
                        let folder = image_folder(cfg, entry, &dir, Some((n, tokens)));
                        if images.is_empty() {
                            tracing::warn!(folder = %dir.display(), "repeat folder holds no images");
                        }
                        add_folder(&mut out, folder, images)?;
                    }
                    _ => out.ignored_folders.push(dir),
                }
            }
        }
        if out.images.len() == before {
            return Err(DatasetError::EmptyFolder {
                path: entry.path.clone(),
                skipped: out.skipped.len() - skipped_before,
            });
        }
    }
    if !out.ignored_folders.is_empty() {
        tracing::warn!(
            folders = ?out.ignored_folders,
            "ignored subfolders whose names do not start with a repeat count (N_name, N >= 1)"
        );
    }
    Ok(out)
}

fn image_folder(
    cfg: &DatasetConfig,
    entry: &FolderConfig,
    path: &Path,
    parsed: Option<(u32, String)>,
) -> ImageFolder {
    let (name_repeats, name_tokens) = match parsed {
        Some((n, tokens)) if n > 0 => (Some(n), Some(tokens)),
        _ => (None, None),
    };
    let class_tokens = entry
        .class_tokens
        .clone()
        .or(name_tokens)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    ImageFolder {
        path: path.to_path_buf(),
        name: folder_name(path),
        num_repeats: entry.num_repeats.or(name_repeats).unwrap_or(1),
        class_tokens,
        caption_extension: normalize_extension(
            entry
                .caption_extension
                .as_deref()
                .unwrap_or(&cfg.caption_extension),
        ),
    }
}

fn add_folder(
    out: &mut ScanResult,
    folder: ImageFolder,
    images: Vec<PathBuf>,
) -> Result<(), DatasetError> {
    let index = out.folders.len();
    for path in images {
        let size = match read_size(&path) {
            Ok((w, h)) if w > 0 && h > 0 => (w, h),
            Ok((w, h)) => {
                out.skipped.push(SkippedImage {
                    path,
                    reason: format!("empty image ({w}x{h})"),
                });
                continue;
            }
            Err(reason) => {
                out.skipped.push(SkippedImage { path, reason });
                continue;
            }
        };
        let caption = read_caption(&path, &folder.caption_extension)?;
        if caption.is_none() {
            out.missing_captions.push(path.clone());
        }
        out.images.push(FoundImage {
            folder: index,
            path,
            size,
            caption,
        });
    }
    out.folders.push(folder);
    Ok(())
}

/// Width and height from the file's header, format guessed from the content.
fn read_size(path: &Path) -> Result<(u32, u32), String> {
    image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

/// The caption file of `image` (`stem` + extension; for `.txt` also
/// `.caption` and the other way round): its first non-empty line, trimmed.
/// An empty file gives an empty caption; a file that is not UTF-8 is an error.
pub(crate) fn read_caption(image: &Path, extension: &str) -> Result<Option<String>, DatasetError> {
    let mut candidates = vec![extension.to_string()];
    match extension {
        ".txt" => candidates.push(".caption".into()),
        ".caption" => candidates.push(".txt".into()),
        _ => {}
    }
    for ext in candidates {
        let mut name = image.file_stem().unwrap_or_default().to_os_string();
        name.push(&ext);
        let path = image.with_file_name(name);
        if !path.is_file() {
            continue;
        }
        let bytes = fs::read(&path).map_err(|error| DatasetError::Io {
            path: path.clone(),
            error,
        })?;
        let text = String::from_utf8(bytes)
            .map_err(|_| DatasetError::CaptionNotUtf8 { path: path.clone() })?;
        let text = text.trim_start_matches('\u{feff}');
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        return Ok(Some(first.to_string()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_folder_names_follow_kohya() {
        assert_eq!(
            parse_repeat_folder("10_sks dog"),
            Some((10, "sks dog".into()))
        );
        assert_eq!(parse_repeat_folder("3_a_b"), Some((3, "a_b".into())));
        assert_eq!(parse_repeat_folder("5"), Some((5, String::new())));
        assert_eq!(parse_repeat_folder(" 7 _x"), Some((7, "x".into())));
        assert_eq!(parse_repeat_folder("0_none"), Some((0, "none".into())));
        assert_eq!(parse_repeat_folder("dog_10"), None);
        assert_eq!(parse_repeat_folder("images"), None);
        assert_eq!(parse_repeat_folder("-2_x"), None);
        assert_eq!(parse_repeat_folder("1.5_x"), None);
    }
}
