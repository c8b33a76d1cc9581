//! The two Debian source trees of an update, and what changed between them.
//!
//! Each version's `linux-source-6.1` package (Debian's patched tree) is downloaded with apt
//! and unpacked once under `<cache>/src/<version>/`; a `done` marker written last makes it
//! a cache hit, so an interrupted unpack is redone rather than trusted.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The package holding the kernel source of one Debian version.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Its tarball, inside the package.
const TARBALL: &str = "./usr/src/linux-source-6.1.tar.xz";

/// The unpacked source of `version`, downloading and unpacking it if needed.
pub fn ensure(cache: &Path, version: &str) -> Result<PathBuf> {
    if version.is_empty() || !version.chars().all(|c| c.is_ascii_alphanumeric() || ".-+~".contains(c)) {
        bail!("'{version}' is not a Debian package version (e.g. 6.1.190-1)");
    }
    let dir = cache.join("src").join(version);
    let tree = dir.join(SOURCE_PACKAGE);
    if dir.join("done").is_file() {
        return Ok(tree);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = format!("{SOURCE_PACKAGE}={version}");
    let out = Command::new("apt-get")
        .args(["download", &spec])
        .current_dir(&dir)
        .output()
        .context("running apt-get (Debian's apt is needed to fetch kernel sources)")?;
    if !out.status.success() {
        bail!(
            "apt-get download {spec} failed: {}\napt offers these versions (`apt-cache madison \
             {SOURCE_PACKAGE}`; run `apt-get update` if yours is missing)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download wrote no .deb")?;
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -xO {TARBALL} | tar -xJ",
        deb.display()
    );
    let st = Command::new("sh")
        .args(["-c", &script])
        .current_dir(&dir)
        .status()
        .context("running dpkg-deb | tar")?;
    if !st.success() || !tree.join("Makefile").is_file() {
        bail!("unpacking {} failed ({st})", deb.display());
    }
    std::fs::remove_file(&deb)?;
    std::fs::write(dir.join("done"), version)?;
    Ok(tree)
}

/// Paths (relative to the tree roots) of files that differ between `a` and `b`, added and
/// removed files included, sorted.
pub fn changed_files(a: &Path, b: &Path) -> Result<Vec<String>> {
    let out = Command::new("diff")
        .arg("-rqN")
        .arg(a)
        .arg(b)
        .output()
        .context("running diff -rqN (diffutils)")?;
    // diff exits 1 when files differ, 2 on trouble.
    if out.status.code() == Some(2) {
        bail!(
            "diff -rqN {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let prefix = format!("Files {}/", a.display());
    let mut files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (path, _) = rest.split_once(" and ")?;
            Some(path.to_owned())
        })
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The unified diff of one file, with `a/` and `b/` labels as `patch -p1` expects. Empty
/// for a binary file (which a kernel patch cannot carry anyway).
pub fn file_diff(a: &Path, b: &Path, rel: &str) -> Result<String> {
    let out = Command::new("diff")
        .args(["-uN", "--label", &format!("a/{rel}"), "--label", &format!("b/{rel}")])
        .arg(a.join(rel))
        .arg(b.join(rel))
        .output()
        .context("running diff -uN")?;
    if out.status.code() == Some(2) {
        bail!("diff of {rel} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(if text.starts_with("Binary files") { String::new() } else { text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_files_and_diffs_of_two_trees() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d.join("fs/proc")).unwrap();
            std::fs::write(d.join("same.c"), "int same;\n").unwrap();
        }
        std::fs::write(a.join("fs/proc/x.c"), "int x = 1;\n").unwrap();
        std::fs::write(b.join("fs/proc/x.c"), "int x = 2;\n").unwrap();
        std::fs::write(b.join("added.h"), "#define ADDED\n").unwrap();
        assert_eq!(changed_files(&a, &b).unwrap(), vec!["added.h", "fs/proc/x.c"]);
        let d = file_diff(&a, &b, "fs/proc/x.c").unwrap();
        assert!(d.starts_with("--- a/fs/proc/x.c\n+++ b/fs/proc/x.c\n"), "{d}");
        assert!(d.contains("-int x = 1;\n+int x = 2;\n"), "{d}");
        assert!(file_diff(&a, &b, "added.h").unwrap().contains("+#define ADDED"));
    }

    #[test]
    fn odd_versions_are_refused_before_apt_runs() {
        let t = tempfile::tempdir().unwrap();
        let e = ensure(t.path(), "6.1; rm -rf /").unwrap_err();
        assert!(e.to_string().contains("not a Debian package version"), "{e}");
    }
}
