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
