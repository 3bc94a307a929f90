//! ComfyUI's file folders, `output/`, `input/` and `temp/`: in the ComfyUI
//! root given with `--comfy-root`, else in the data dir; the checks of a
//! `(type, subfolder, filename)` a request names (`/view`, uploads); and where
//! the served front end and our extension are ([`FrontEnd`]).
//!
//! Must not: serve HTTP; handlers ask it for a path.

use std::path::{Component, Path, PathBuf};

use crate::config::Settings;
use crate::server::paths::{self, PathError};

/// The three folders ComfyUI names by `type`.
#[derive(Clone, Debug)]
pub struct Folders {
    root: PathBuf,
}

/// Why a requested file was refused (ComfyUI's statuses: 400, 403, 404).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Bad(String),
    #[error("the subfolder leaves its folder")]
    Escapes,
    #[error("no such file")]
    Missing,
}

impl Folders {
    pub fn new(settings: &Settings) -> Self {
        Self {
            root: settings
                .comfy_root
                .clone()
                .unwrap_or_else(|| settings.data_dir.clone()),
        }
    }

    /// The ComfyUI root (or data dir) the folders are in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of `kind` (`output`, `input`, `temp`), made when missing.
    pub fn dir(&self, kind: &str) -> Result<PathBuf, FileError> {
        if !matches!(kind, "output" | "input" | "temp") {
            return Err(FileError::Bad(format!("unknown type `{kind}`")));
        }
        let dir = self.root.join(kind);
        std::fs::create_dir_all(&dir).map_err(|e| FileError::Bad(e.to_string()))?;
        Ok(dir)
    }

    /// The existing file `filename` of `subfolder` of folder `kind`, as
    /// ComfyUI's `/view` resolves it: a filename ending in ` [output]` (or
    /// input, temp) picks the folder; an empty name, one starting with `/` or
    /// containing `..` is refused, as is a subfolder that is absolute, climbs,
    /// or leads out through a link.
    pub fn existing(
        &self,
        kind: &str,
        subfolder: &str,
        filename: &str,
    ) -> Result<PathBuf, FileError> {
        let (name, kind) = annotated(filename, kind);
        if name.is_empty() || name.starts_with('/') || name.contains("..") || name.contains('\\') {
            return Err(FileError::Bad(format!("bad filename `{filename}`")));
        }
        let dir = self.dir(kind)?;
        let sub = Path::new(subfolder);
        if sub
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(FileError::Escapes);
        }
        // Only the basename of the file name counts, as in ComfyUI.
        let base = Path::new(name)
            .file_name()
            .ok_or_else(|| FileError::Bad(format!("bad filename `{filename}`")))?;
        let rel: PathBuf = sub
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect::<PathBuf>()
            .join(base);
        // The path policy: no climbing, and a link may not lead out.
        paths::job_file(&dir, kind, &rel).map_err(|e| match e {
            PathError::LeavesJobFolder => FileError::Escapes,
            _ => FileError::Missing,
        })
    }
}

/// ComfyUI's `annotated_filepath`: `name [output]` names the folder itself.
fn annotated<'a>(filename: &'a str, kind: &'a str) -> (&'a str, &'a str) {
    for k in ["output", "input", "temp"] {
        if let Some(name) = filename.strip_suffix(&format!(" [{k}]")) {
            return (name, k);
        }
    }
    (filename, kind)
}

/// The front-end package version `scripts/get-frontend.sh` installs.
pub(crate) const FRONTEND_VERSION: &str = "1.58.1";

/// Where the front end and our extension are.
#[derive(Clone, Debug)]
pub(crate) struct FrontEnd {
    /// The static folder (holds `index.html`), when there is one.
    pub static_dir: Option<PathBuf>,
    /// Our extension's folder (`js/`), when there is one.
    pub js_dir: Option<PathBuf>,
}

impl FrontEnd {
    /// `--comfy-frontend`, else `<data-dir>/frontend`; `--comfy-js`, else
    /// `./js`, else the `js/` of the checkout the binary was built in.
    pub(crate) fn find(settings: &Settings) -> Self {
        let static_dir = settings
            .comfy_frontend
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("frontend"));
        let built_in = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("js")));
        let js_dir = settings.comfy_js.clone().or_else(|| {
            [Some(PathBuf::from("js")), built_in]
                .into_iter()
                .flatten()
                .find(|d| d.join("fluxlora.js").is_file())
        });
        if settings.comfy_frontend.is_some() && !static_dir.join("index.html").is_file() {
            tracing::warn!(dir = %static_dir.display(), "--comfy-frontend has no index.html");
        }
        Self {
            static_dir: Some(static_dir).filter(|d| d.join("index.html").is_file()),
            js_dir: js_dir.and_then(|d| d.canonicalize().ok()),
        }
    }

    /// The extension's module URLs (every `.js` of `js/` but its tests).
    pub(crate) fn extension_urls(&self) -> Vec<String> {
        let Some(dir) = &self.js_dir else {
            return vec![];
        };
        let mut urls = vec![];
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if path.is_dir() && name != "tests" && !name.starts_with('.') {
                    stack.push(path);
                } else if name.ends_with(".js") {
                    if let Ok(rel) = path.strip_prefix(dir) {
                        let rel: Vec<String> = rel
                            .components()
                            .map(|c| c.as_os_str().to_string_lossy().to_string())
                            .collect();
                        urls.push(format!("/extensions/fluxlora/{}", rel.join("/")));
                    }
                }
            }
        }
        urls.sort();
        urls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_resolve_inside_their_folder_only() {
        let tmp = tempfile::tempdir().unwrap();
        let folders = Folders {
            root: tmp.path().to_path_buf(),
        };
        let out = folders.dir("output").unwrap();
        std::fs::create_dir_all(out.join("a")).unwrap();
        std::fs::write(out.join("a/x.png"), b"x").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), b"s").unwrap();
        assert!(folders.existing("output", "a", "x.png").is_ok());
        assert!(folders.existing("temp", "", "x.png [output]").is_err());
        assert!(folders.existing("input", "a", "x.png [output]").is_ok());
        assert_eq!(
            folders.existing("output", "", "x.png"),
            Err(FileError::Missing)
        );
        for bad in ["../secret.txt", "/etc/passwd", "", "a\\..\\b"] {
            assert!(
                matches!(folders.existing("output", "", bad), Err(FileError::Bad(_))),
                "{bad}"
            );
        }
        for sub in ["..", "/etc", "a/../.."] {
            assert_eq!(
                folders.existing("output", sub, "secret.txt"),
                Err(FileError::Escapes),
                "{sub}"
            );
        }
        std::os::unix::fs::symlink(tmp.path(), out.join("up")).unwrap();
        // Led out through a link: as if it were not there.
        assert_eq!(
            folders.existing("output", "up", "secret.txt"),
            Err(FileError::Missing)
        );
        assert!(matches!(
            folders.existing("models", "", "x.png"),
            Err(FileError::Bad(_))
        ));
    }
}
