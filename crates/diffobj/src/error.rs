//! Errors of bundle building. Each message says what was wrong and what to do.

use std::path::PathBuf;

use lucos_introspect::symbols::SymbolError;
use lucos_patch::BundleError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Tree(#[from] crate::tree::TreeError),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{program}`: {source}; install it (guest/deps.sh installs the kernel build tools)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no source files given; a bundle needs at least one .c file")]
    NoSources,
    #[error("source {path}: {reason}")]
    BadSource { path: PathBuf, reason: String },
    #[error("Kbuild failed to compile {what} ({status}); fix the source. Output:\n{output}")]
    Compile {
        what: String,
        status: String,
        output: String,
    },
    #[error("Kbuild reported success but wrote no {path}; output:\n{output}")]
    NoObject { path: PathBuf, output: String },
    #[error("the compiled object is not a readable ELF file: {source}")]
    BadObject {
        #[source]
        source: object::read::Error,
    },
    #[error("module object {path}: {what}: {source}")]
    BadModule {
        path: PathBuf,
        /// What could not be read: the file as ELF, or which section.
        what: String,
        #[source]
        source: object::read::Error,
    },
    #[error(transparent)]
    Symbols(#[from] SymbolError),
    #[error("`{spec}` is a {kind:?} symbol, not a function; only functions can be redirected")]
    NotAFunction {
        spec: String,
        kind: lucos_introspect::symbols::SymbolKind,
    },
    #[error(
        "`{spec}` has no size in vmlinux (an assembly label?); lucos redirects sized C functions"
    )]
    NoSize { spec: String },
    #[error(
        "`{spec}` is in {section}, which the kernel frees after boot; it cannot be redirected"
    )]
    InitCode { spec: String, section: String },
    #[error(
        "vmlinux has no `__fentry__`: the kernel was built without CONFIG_FUNCTION_TRACER / \
         -mfentry, so no function has a site lucos can redirect"
    )]
    NoFentry,
    #[error("`{spec}` has no __fentry__ site (notrace or inlined); lucos cannot redirect it")]
    NoFentrySite { spec: String },
    #[error("`{spec}` has no __fentry__ site, and its entry cannot take a jmp: {source}")]
    EntryUnsafe {
        spec: String,
        #[source]
        source: lucos_patch::entry::EntryError,
    },
    #[error(
        "`{spec}` has no __fentry__ site, and the first bytes its entry jmp would overwrite \
         hold a relocated field the manifest cannot expect (per-CPU, or cut by the {max}-byte \
         window)"
    )]
    EntryNotExpectable { spec: String, max: usize },
    #[error(
        "`{spec}` calls __fentry__ at {site:#x} but ftrace did not record that site \
         (__mcount_loc), so the call is never turned into a NOP and lucos cannot redirect it; \
         patch a caller instead"
    )]
    SiteNotRecorded { spec: String, site: u64 },
    #[error(
        "the bundle needs kernel symbol `{name}`, which vmlinux cannot provide: {source}{hint}"
    )]
    Unresolved {
        name: String,
        /// What to do about it, after the lookup's own reason.
        hint: String,
        #[source]
        source: Box<SymbolError>,
    },
    #[error(
        "`{spec}` resolves to {addr:#x}, but the engine, looking it up as the manifest names \
         it, would find {found}; qualify the spec as `path/file.c:name`"
    )]
    OldNotUnique {
        spec: String,
        addr: u64,
        found: String,
    },
    #[error(
        "`{spec}` resolves to {addr:#x}, but the engine, looking it up as the manifest names \
         it, would find an error ({source}); qualify the spec as `path/file.c:name`"
    )]
    OldLookupFails {
        spec: String,
        addr: u64,
        #[source]
        source: Box<SymbolError>,
    },
    #[error("resolve entry `{name}` → `{file}` does not match vmlinux: {source}")]
    BadResolve {
        name: String,
        file: String,
        #[source]
        source: Box<SymbolError>,
    },
    #[error("bundle spec {path}: {reason}")]
    SpecFile { path: PathBuf, reason: String },
    #[error("the bundle is not valid: {0}")]
    Bundle(#[from] BundleError),
}
