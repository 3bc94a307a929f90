//! Path confinement: every path a request names is resolved inside the folders
//! the daemon may use, or refused with a [`PathError`] (mapped to HTTP once, in
//! `errors`).
//!
//! - [`resolve_in_roots`]: a file or folder to read (dataset folders, LoRA files).
//! - [`resolve_for_writing`]: a folder that may not exist yet (a cache folder).
//! - [`job_file`]: a file inside a job's folder, by its relative path.
//! - [`has_overlong_name`]: a name no file system takes;
//! - [`lora_in_folder`]: a LoRA of the LoRA folder, by its bare file name;
//!   [`file_names_with`]: what a folder holds (the LoRA folder's files).
//!
//! A path that lies outside as written is refused before the file system is
//! asked, so the answer does not tell whether something exists out there; links
//! are followed, and a link that leads out is refused too.
//!
//! Must not: read or write file contents, or know about HTTP.

use std::path::{Component, Path, PathBuf};

/// Why a path from a request was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PathError {
    #[error("{0} is outside the folders this server may read")]
    OutsideReadable(String),
    #[error("{0} is outside the folders this server may write")]
    OutsideWritable(String),
    #[error("{0}: no such file or folder")]
    Missing(String),
    #[error("{0}: `..` is not allowed here")]
    ParentDir(String),
    #[error("{0}: no existing parent folder")]
    NoParent(String),
    /// The file system could not answer (the working folder, a canonical path).
    #[error("{0}")]
    Unreadable(String),
    #[error("file paths must stay inside the job folder")]
    LeavesJobFolder,
    #[error("no file `{file}` in job {job}")]
    NoJobFile { job: String, file: String },
    /// The job's own folder could not be read: the daemon's fault, not the request's.
    #[error("{0}")]
    JobFolder(String),
    #[error("give a file name from /v1/loras, without folders")]
    NotAFileName,
    #[error("no LoRA `{0}` in the LoRA folder")]
    NoLora(String),
}

/// `path` made absolute against the daemon's working folder.
fn absolute(path: &Path) -> Result<PathBuf, PathError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(|e| PathError::Unreadable(e.to_string()))?
        .join(path))
}

fn inside_roots(roots: &[PathBuf], canonical: &Path) -> bool {
    roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| canonical.starts_with(&r))
}

/// Resolves `path` (absolute, or relative to the daemon's working folder) and checks
/// it lies inside one of `roots` after following symlinks. A path that is outside
/// as written is refused before the file system is asked, so the answer does not
/// tell whether something exists out there.
pub(crate) fn resolve_in_roots(roots: &[PathBuf], path: &Path) -> Result<PathBuf, PathError> {
    let outside = || PathError::OutsideReadable(path.display().to_string());
    let full = absolute(path)?;
    let written = lexically_normal(&full);
    let lexically_inside = roots.iter().any(|r| {
        absolute(r).is_ok_and(|r| written.starts_with(lexically_normal(&r)))
            || r.canonicalize().is_ok_and(|r| written.starts_with(r))
    });
    if !lexically_inside {
        return Err(outside());
    }
    let canonical = full
        .canonicalize()
        .map_err(|_| PathError::Missing(path.display().to_string()))?;
    if inside_roots(roots, &canonical) {
        Ok(canonical)
    } else {
        Err(outside())
    }
}

/// `path` with `.` dropped and `..` taken against the part before it, without
/// asking the file system (links are followed later, by `canonicalize`).
pub(crate) fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Like [`resolve_in_roots`] for a folder that may not exist yet: its nearest
/// existing ancestor must lie inside the roots, and the rest may not contain `..`.
pub(crate) fn resolve_for_writing(roots: &[PathBuf], path: &Path) -> Result<PathBuf, PathError> {
    let full = absolute(path)?;
    if full.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::ParentDir(path.display().to_string()));
    }
    let mut existing = full.as_path();
    let mut rest = vec![];
    while !existing.exists() {
        rest.push(existing.file_name().unwrap_or_default().to_owned());
        existing = existing
            .parent()
            .ok_or_else(|| PathError::NoParent(path.display().to_string()))?;
    }
    let mut canonical = existing
        .canonicalize()
        .map_err(|e| PathError::Unreadable(e.to_string()))?;
    if !inside_roots(roots, &canonical) {
        return Err(PathError::OutsideWritable(path.display().to_string()));
    }
    canonical.extend(rest.iter().rev());
    Ok(canonical)
}

/// The file `rel` (slashes allowed, no `..`, not absolute) of job `job` whose
/// folder is `dir`, canonical; a link may not lead out of the folder.
pub(crate) fn job_file(dir: &Path, job: &str, rel: &Path) -> Result<PathBuf, PathError> {
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(PathError::LeavesJobFolder);
    }
    let missing = || PathError::NoJobFile {
        job: job.to_string(),
        file: rel.display().to_string(),
    };
    let canonical = dir.join(rel).canonicalize().map_err(|_| missing())?;
    let dir = dir
        .canonicalize()
        .map_err(|e| PathError::JobFolder(e.to_string()))?;
    if !canonical.starts_with(&dir) || !canonical.is_file() {
        return Err(missing());
    }
    Ok(canonical)
}

/// The LoRA file `name` (a bare file name, as `GET /v1/loras` lists them) of the
/// LoRA folder `dir`, before it is resolved inside the roots.
pub(crate) fn lora_in_folder(dir: &Path, name: &str) -> Result<PathBuf, PathError> {
    let name = Path::new(name);
    if name.components().count() != 1
        || !matches!(name.components().next(), Some(Component::Normal(_)))
    {
        return Err(PathError::NotAFileName);
    }
    let path = dir.join(name);
    if !path.is_file() {
        return Err(PathError::NoLora(name.display().to_string()));
    }
    Ok(path)
}

/// The longest file or folder name the usual file systems take (`NAME_MAX`), in
/// bytes: a longer one in a request is the client's mistake, refused before the
/// file system fails on it.
pub(crate) const NAME_MAX: usize = 255;

/// Whether a file or folder name in `path` is longer than [`NAME_MAX`].
pub(crate) fn has_overlong_name(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str().len() > NAME_MAX)
}

/// The names of the files directly in `dir` with one of `extensions` (ASCII
/// case-insensitive), sorted; none when `dir` is missing.
pub(crate) fn file_names_with(dir: &Path, extensions: &[&str]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .filter(|e| {
            e.path()
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| extensions.iter().any(|w| x.eq_ignore_ascii_case(w)))
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_roots_and_outside_ones_say_nothing_of_what_exists() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("a.txt");
        std::fs::write(&inside, b"x").unwrap();
        let roots = vec![root.path().to_path_buf()];
        assert_eq!(
            resolve_in_roots(&roots, &inside).unwrap(),
            inside.canonicalize().unwrap()
        );
        let missing = resolve_in_roots(&roots, &root.path().join("b.txt"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no such file"), "{missing}");
        // Outside as written: the same answer whether or not the file exists.
        for outside in ["/etc/passwd", "/no/such/file"] {
            let e = resolve_in_roots(&roots, Path::new(outside))
                .unwrap_err()
                .to_string();
            assert!(e.contains("outside"), "{outside}: {e}");
        }
        let climbing = root.path().join("../../etc/passwd");
        assert!(resolve_in_roots(&roots, &climbing)
            .unwrap_err()
            .to_string()
            .contains("outside"));
        // A link inside that leads out is followed, then refused.
        std::os::unix::fs::symlink("/etc", root.path().join("etc")).unwrap();
        let linked = resolve_in_roots(&roots, &root.path().join("etc/passwd"))
            .unwrap_err()
            .to_string();
        assert!(linked.contains("outside"), "{linked}");
    }
}
