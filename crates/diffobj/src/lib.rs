//! Building bundles: new kernel code compiled with the target kernel's Kbuild, plus a
//! manifest derived from the target vmlinux (fentry sites, expected bytes, build id).

pub mod diff;
pub mod error;
pub mod kbuild;
pub mod make;
pub mod module;
pub mod target;
pub mod tree;

pub use error::BuildError;
pub use make::{
    find_spec_files, load_symbols, make_bundle, make_bundle_with, make_from_spec_file,
    read_spec_file, BundleSpec,
};
pub use target::{check_undefined, find_fentry_site, kernel_release, replacement_for, target_for};
pub use tree::{KernelTree, TreeError, TreeKind};

/// lucos's cache of downloads and builds: `$LUCOS_CACHE`, else `~/.cache/lucos` (the same
/// place the guest scripts use). `None` when neither is set.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("LUCOS_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/lucos"))
        })
}
