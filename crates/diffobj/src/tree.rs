//! The layout of a cached kernel directory, in one place.
//!
//! Two kinds exist, both written by a script in `guest/`:
//! - **prepared** (`guest/debian.sh`): a distribution's binary kernel. `vmlinux` is its
//!   debug vmlinux, `build/` the same version's source configured with its config and
//!   `make prepare`d only. Objects are compiled on demand; dependencies come from DWARF.
//! - **built** (`guest/kernel.sh`): a kernel lucos compiled itself. `build/` is the whole
//!   Kbuild tree with its objects and `.cmd` files.
//!
//! Both hold `vmlinux` (the target), `build/` (Kbuild) and optionally `release` (the
//! distribution's release string, which the source tree cannot know).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    Prepared,
    Built,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTree {
    /// The cache directory.
    pub dir: PathBuf,
    /// The Kbuild tree.
    pub root: PathBuf,
    pub vmlinux: PathBuf,
    pub kind: TreeKind,
}

/// Why a directory is not a usable kernel tree.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} is not a lucos kernel directory: {reason}{}; pass the directory that \
     `lucos guest build` prints (it holds vmlinux and build/)",
    io_detail(.source)
)]
pub struct TreeError {
    pub path: PathBuf,
    pub reason: String,
    /// The file system's error, when one made the tree unusable.
    #[source]
    pub source: Option<std::io::Error>,
}

/// `" (reason)"` of an I/O error, after the `reason` it caused.
fn io_detail(source: &Option<std::io::Error>) -> String {
    source
        .as_ref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default()
}

impl KernelTree {
    /// Opens a cache directory, or a bare Kbuild tree with vmlinux in it.
    pub fn open(dir: &Path) -> Result<Self, TreeError> {
        let bad = |reason: String| TreeError {
            path: dir.to_owned(),
            reason,
            source: None,
        };
        let dir = std::fs::canonicalize(dir).map_err(|e| TreeError {
            path: dir.to_owned(),
            reason: "cannot open it".into(),
            source: Some(e),
        })?;
        let root = if dir.join("build/Makefile").is_file() {
            dir.join("build")
        } else {
            dir.clone()
        };
        if !root.join("Makefile").is_file() {
            return Err(bad("no Kbuild tree (build/Makefile)".into()));
        }
        let vmlinux = dir.join("vmlinux");
        if !vmlinux.is_file() {
            return Err(bad("no vmlinux".into()));
        }
        if !root.join("include/config/auto.conf").is_file() {
            return Err(bad(
                "its Kbuild tree is not configured (no include/config/auto.conf)".into(),
            ));
        }
        let kind = if root.join("vmlinux.a").is_file() {
            TreeKind::Built
        } else {
            TreeKind::Prepared
        };
        Ok(KernelTree {
            dir,
            root,
            vmlinux,
            kind,
        })
    }

    /// The kernel release (`uname -r`) of the target: the distribution's, when the cache
    /// recorded it, else what Kbuild computed.
    pub fn release(&self) -> Result<String, TreeError> {
        let recorded = self.dir.join("release");
        let path = if recorded.is_file() {
            recorded
        } else {
            self.root.join("include/config/kernel.release")
        };
        std::fs::read_to_string(&path)
            .map(|t| t.trim().to_string())
            .map_err(|e| TreeError {
                path: self.dir.clone(),
                reason: format!("cannot read {}", path.display()),
                source: Some(e),
            })
    }

    /// The kernel's modules (`modules/<release>/kernel/...`, from its image package).
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("modules")
    }

    /// Holds the Kbuild tree for one build until the returned file is dropped. Kbuild
    /// writes `.cmd` and `.d` files into the tree for every object it compiles, and two
    /// builds compiling one object at once (a `lucos build` beside a `lucos corpus`)
    /// interleave them: a corrupt command file, or an object read while another compile
    /// writes it. A second build waits (it says so) instead.
    pub fn lock(&self) -> std::io::Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("build.lock"))?;
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        tracing::warn!(tree = %self.dir.display(), "another lucos build uses this kernel tree: waiting for it");
        file.lock()?;
        Ok(file)
    }

    /// Where per-tree indexes are cached (next to vmlinux, which they are derived from).
    pub fn index_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
