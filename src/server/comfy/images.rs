//! How IMAGE values travel between nodes inside the daemon, and the files
//! behind them.
//!
//! An IMAGE (and a MASK) value is a JSON list of image references, the same
//! objects ComfyUI's UI outputs use: `[{"filename", "subfolder", "type"}]`,
//! each naming a PNG (or JPEG/WebP) of the output, input or temp folder. A
//! node that makes images writes them into the temp folder and passes their
//! references; Save Image copies them into the output folder, Preview Image
//! into temp, Load Image passes a reference to the input folder. Nothing
//! decoded is held between nodes, so cached outputs cost no memory, and a
//! reference from a client (the bridge) is resolved like any `/view` request:
//! inside its folder or refused.
//!
//! Also here: decoding with limits (uploads, loaded images, dataset images),
//! and ComfyUI's file naming (`<prefix>_<counter:05>_.png`).
//!
//! Must not: serve HTTP.

use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::folders::{FileError, Folders};

/// The largest side of an image the daemon decodes.
pub(crate) const MAX_SIDE: u32 = 8192;

/// One image of an IMAGE value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImageRef {
    pub filename: String,
    #[serde(default)]
    pub subfolder: String,
    #[serde(rename = "type", default = "output")]
    pub kind: String,
}

fn output() -> String {
    "output".into()
}

/// Why an image was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    #[error(
        "expected an IMAGE: a list of {{\"filename\", \"subfolder\", \"type\"}} references ({0})"
    )]
    NotImages(String),
    #[error("image `{name}`: {source}")]
    File { name: String, source: FileError },
    #[error("image `{name}`: {message}")]
    Undecodable { name: String, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The references of an IMAGE value.
pub(crate) fn refs(value: &Value) -> Result<Vec<ImageRef>, ImageError> {
    let refs: Vec<ImageRef> =
        serde_json::from_value(value.clone()).map_err(|e| ImageError::NotImages(e.to_string()))?;
    if refs.is_empty() {
        return Err(ImageError::NotImages("the list is empty".into()));
    }
    Ok(refs)
}

/// The value of these references.
pub(crate) fn value(refs: &[ImageRef]) -> Value {
    serde_json::to_value(refs).unwrap_or_default()
}

/// The file behind a reference, inside its folder.
pub(crate) fn path_of(folders: &Folders, image: &ImageRef) -> Result<PathBuf, ImageError> {
    folders
        .existing(&image.kind, &image.subfolder, &image.filename)
        .map_err(|source| ImageError::File {
            name: image.filename.clone(),
            source,
        })
}

/// Decodes image bytes within the daemon's limits (side, memory).
pub(crate) fn decode(name: &str, bytes: &[u8]) -> Result<image::DynamicImage, ImageError> {
    crate::sample::generate::decode_limited(bytes, MAX_SIDE).map_err(|message| {
        ImageError::Undecodable {
            name: name.to_string(),
            message,
        }
    })
}

/// Reads and decodes the image behind a reference.
pub(crate) fn load(folders: &Folders, image: &ImageRef) -> Result<image::DynamicImage, ImageError> {
    let path = path_of(folders, image)?;
    let bytes = std::fs::read(&path).map_err(|e| ImageError::File {
        name: image.filename.clone(),
        source: FileError::Bad(e.to_string()),
    })?;
    decode(&image.filename, &bytes)
}

/// PNG bytes of an image.
pub(crate) fn encode_png(image: &image::DynamicImage) -> Result<Vec<u8>, ImageError> {
    let mut png = Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| ImageError::Write {
            path: "(memory)".into(),
            source: std::io::Error::other(e),
        })?;
    Ok(png.into_inner())
}

/// A `filename_prefix` split as ComfyUI's `get_save_image_path` does: the part
/// before the last `/` is a subfolder of the folder, which may not climb out.
pub(crate) fn split_prefix(prefix: &str) -> Result<(String, String), ImageError> {
    let bad = |why: &str| ImageError::NotImages(format!("filename_prefix `{prefix}`: {why}"));
    let (sub, stem) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    if stem.is_empty() || stem.contains(['\\', '\0']) || stem.starts_with('.') {
        return Err(bad("needs a file name after the last `/`"));
    }
    if sub.contains(['\\', '\0'])
        || Path::new(sub)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(bad(
            "the subfolder must stay inside the folder (no `..`, `\\` or NUL, not absolute)",
        ));
    }
    Ok((sub.to_string(), stem.to_string()))
}

/// Writes PNGs into folder `kind`/`subfolder` as `<stem>_<counter:05>_.png`,
/// the counter continuing after the highest one there (ComfyUI's naming), each
/// written atomically; returns their references.
pub(crate) fn save_pngs(
    folders: &Folders,
    kind: &str,
    subfolder: &str,
    stem: &str,
    pngs: &[Vec<u8>],
) -> Result<Vec<ImageRef>, ImageError> {
    let escapes = || ImageError::File {
        name: stem.to_string(),
        source: FileError::Escapes,
    };
    let folder = folders
        .dir(kind)
        .map_err(|source| ImageError::File {
            name: stem.to_string(),
            source,
        })?
        .canonicalize()
        .map_err(|_| escapes())?;
    // The path policy for writes: the subfolder's nearest existing part lies
    // inside the folder once links are followed (a link may not lead out).
    let dir = crate::server::paths::resolve_for_writing(
        std::slice::from_ref(&folder),
        &folder.join(subfolder),
    )
    .map_err(|_| escapes())?;
    let write_error = |path: &Path, source| ImageError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| write_error(&dir, e))?;
    let mut counter = next_counter(&dir, stem);
    let mut saved = Vec::with_capacity(pngs.len());
    for png in pngs {
        // A concurrent writer may have taken the number: skip past it.
        let (name, path) = loop {
            let name = format!("{stem}_{counter:05}_.png");
            let path = dir.join(&name);
            counter += 1;
            if !path.exists() {
                break (name, path);
            }
        };
        crate::atomic_file::write(&path, png).map_err(|e| write_error(&path, e))?;
        saved.push(ImageRef {
            filename: name,
            subfolder: subfolder.to_string(),
            kind: kind.to_string(),
        });
    }
    Ok(saved)
}

/// One more than the highest `<stem>_<n>_` counter in `dir` (1 when none).
fn next_counter(dir: &Path, stem: &str) -> u64 {
    let highest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(stem)?.strip_prefix('_')?;
            rest.split('_').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    highest + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn folders(root: &Path) -> Folders {
        Folders::new(&Settings {
            data_dir: root.to_path_buf(),
            ..Settings::default()
        })
    }

    fn png(side: u32) -> Vec<u8> {
        encode_png(&image::DynamicImage::new_rgb8(side, side)).unwrap()
    }

    #[test]
    fn saved_images_are_numbered_like_comfyui_and_resolve_back() {
        let tmp = tempfile::tempdir().unwrap();
        let f = folders(tmp.path());
        let (sub, stem) = split_prefix("runs/zorbly").unwrap();
        let first = save_pngs(&f, "output", &sub, &stem, &[png(16), png(16)]).unwrap();
        let names: Vec<&str> = first.iter().map(|r| r.filename.as_str()).collect();
        assert_eq!(names, ["zorbly_00001_.png", "zorbly_00002_.png"]);
        let again = save_pngs(&f, "output", &sub, &stem, &[png(16)]).unwrap();
        assert_eq!(again[0].filename, "zorbly_00003_.png");
        let value = value(&first);
        let back = refs(&value).unwrap();
        assert_eq!(back, first);
        assert_eq!(load(&f, &back[0]).unwrap().width(), 16);
    }

    #[test]
    fn bad_prefixes_references_and_bytes_are_refused() {
        for bad in ["../x", "/abs/x", "a/../../x", "a/", "", ".hidden"] {
            assert!(split_prefix(bad).is_err(), "{bad}");
        }
        assert!(refs(&serde_json::json!("x.png")).is_err());
        assert!(refs(&serde_json::json!([])).is_err());
        let tmp = tempfile::tempdir().unwrap();
        let f = folders(tmp.path());
        let escape = ImageRef {
            filename: "x.png".into(),
            subfolder: "../..".into(),
            kind: "output".into(),
        };
        assert!(matches!(
            path_of(&f, &escape),
            Err(ImageError::File {
                source: FileError::Escapes,
                ..
            })
        ));
        assert!(decode("junk", b"not an image at all").is_err());
        let truncated = &png(32)[..40];
        assert!(decode("cut", truncated).is_err());
    }

    #[test]
    fn decoding_refuses_images_beyond_the_side_limit() {
        // A PNG header claiming 100000 x 1 pixels: refused before allocating.
        let big = encode_png(&image::DynamicImage::new_luma8(MAX_SIDE + 1, 1)).unwrap();
        let err = decode("wide", &big).unwrap_err().to_string();
        assert!(err.contains("wide"), "{err}");
    }
}
