//! The patched source tree: an overlay of symlinks onto the cached tree, with real copies of
//! only the files the diff changes.
//!
//! Every directory on the way to a changed file is a real directory whose other entries are
//! symlinks to the cached tree, so compiling from the overlay root with Kbuild's own
//! (relative) command line sees exactly the original tree except for the patched files —
//! including `#include "x.h"` lookups next to a patched file. The cached tree is never
//! written; the overlay lives in a temporary directory removed on drop, also on failure.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::error::DiffError;
use super::patchfile::{ChangeKind, FileChange};

/// A patched view of a Kbuild tree. Dropping it deletes it.
pub struct Overlay {
    dir: TempDir,
}

impl Overlay {
    /// Builds the overlay for `changes` and applies `diff` to it with `patch -p1`.
    pub fn create(
        tree: &Path,
        changes: &[FileChange],
        diff: &Path,
        release: &str,
    ) -> Result<Overlay, DiffError> {
        let dir = tempfile::Builder::new()
            .prefix("lucos-diffobj-")
            .tempdir()
            .map_err(DiffError::io(
                "create a temporary directory in",
                std::env::temp_dir(),
            ))?;
        let root = dir.path().join("tree");
        fs::create_dir(&root).map_err(DiffError::io("create", &root))?;
        let overlay = Overlay { dir };

        let mut real_dirs: BTreeSet<PathBuf> = BTreeSet::new();
        real_dirs.insert(PathBuf::new());
        for c in changes {
            let mut p = PathBuf::new();
            let rel = Path::new(&c.path);
            if let Some(parent) = rel.parent() {
                for comp in parent.components() {
                    p.push(comp);
                    real_dirs.insert(p.clone());
                }
            }
        }
        let changed: BTreeSet<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        // Parents before children (BTreeSet order puts "" and "a" before "a/b").
        for d in &real_dirs {
            let target = root.join(d);
            fs::create_dir_all(&target).map_err(DiffError::io("create", &target))?;
            let source = tree.join(d);
            let entries = match fs::read_dir(&source) {
                Ok(e) => e,
                // A directory the diff creates.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DiffError::io("list", &source)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(DiffError::io("list", &source))?;
                let name = entry.file_name();
                let rel = d.join(&name);
                if real_dirs.contains(&rel) {
                    continue;
                }
                let link = target.join(&name);
                let rel_str = rel.to_string_lossy();
                if changed.contains(rel_str.as_ref()) {
                    // Real copies: `patch` rewrites them.
                    fs::copy(entry.path(), &link).map_err(DiffError::io("copy", entry.path()))?;
                } else {
                    std::os::unix::fs::symlink(entry.path(), &link)
                        .map_err(DiffError::io("create a symlink at", &link))?;
                }
            }
        }
        for c in changes.iter().filter(|c| c.kind != ChangeKind::Added) {
            if !root.join(&c.path).is_file() {
                return Err(DiffError::PatchApply {
                    path: diff.to_owned(),
                    release: release.to_string(),
                    output: format!("{} does not exist in the kernel tree", c.path),
                });
            }
        }
        apply(&root, diff, release)?;
        Ok(overlay)
    }

    /// The overlay's root: the patched equivalent of the tree root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("tree")
    }
}

fn apply(root: &Path, diff: &Path, release: &str) -> Result<(), DiffError> {
    let diff_abs = fs::canonicalize(diff).map_err(DiffError::io("read", diff))?;
    let out = Command::new("patch")
        .args([
            "-p1",
            "--batch",
            "--forward",
            "--no-backup-if-mismatch",
            "-r",
            "-",
            "-s",
            "-i",
        ])
        .arg(&diff_abs)
        .current_dir(root)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| DiffError::Tool {
            tool: "patch",
            package: "patch",
            source,
        })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(DiffError::PatchApply {
            path: diff.to_owned(),
            release: release.to_string(),
            output: text.trim_end().to_string(),
        });
    }
    Ok(())
}
