//! What a build did, for the CLI to print and tests to check; and how it reports progress.

use std::path::PathBuf;
use std::time::Duration;

use lucos_patch::Manifest;

/// The stages of a build, as reported to [`Progress`] and timed in [`Times`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Applying the diff, finding affected objects, compiling original and patched objects.
    Rebuild,
    /// Comparing the objects function by function and choosing what to include.
    Compare,
    /// Writing the bundle: object, expected bytes, manifest, self-check.
    Emit,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Rebuild => "rebuild",
            Stage::Compare => "compare",
            Stage::Emit => "emit",
        }
    }
}

/// Receives progress; the CLI draws bars from it. Called from worker threads too.
pub trait Progress: Sync {
    /// A stage starts with `steps` units of work (0 when unknown).
    fn start(&self, _stage: Stage, _steps: u64) {}
    /// One unit of work of the current stage finished.
    fn step(&self, _stage: Stage, _what: &str) {}
    /// The stage finished.
    fn finish(&self, _stage: Stage, _took: Duration) {}
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Manifest id; default: derived from the diff's file name.
    pub id: Option<String>,
    /// Manifest description; default: names the diff.
    pub description: Option<String>,
    /// Where original comparison objects are cached; default
    /// `${LUCOS_CACHE:-~/.cache/lucos}/diffobj`. A subdirectory per kernel build id is used.
    pub cache_dir: Option<PathBuf>,
    /// Use and fill the cache of original objects.
    pub use_cache: bool,
    /// Compiles run in parallel.
    pub jobs: usize,
    /// Recompile only the objects built from these sources, although changed headers have
    /// other users: a corpus unit measures one file's fix with the headers it needs to
    /// compile, and the headers' effect on their other users is the headers' own unit.
    /// `None` (what `lucos build` uses): every object that depends on a changed file.
    pub only_sources: Option<Vec<String>>,
    /// Changed headers whose users are recompiled only where another changed file (their
    /// own source, or a header outside this list) touches them too: the whole update takes
    /// a header too widely used to recompile everywhere for the changed sources that need
    /// it to compile, and says that its effect on its other users is left out.
    pub narrow_headers: Vec<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            id: None,
            description: None,
            cache_dir: None,
            use_cache: true,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            only_sources: None,
            narrow_headers: Vec::new(),
        }
    }
}

/// Wall time of each stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Times {
    pub rebuild: Duration,
    pub compare: Duration,
    pub emit: Duration,
    pub total: Duration,
}

/// One recompiled object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectReport {
    /// Object path in the tree, e.g. `fs/proc/cmdline.o`.
    pub object: String,
    pub source: String,
    /// The original comparison object came from the cache.
    pub original_cached: bool,
    /// Functions whose code changed (kernel names).
    pub changed: Vec<String>,
    /// Functions only the patched object has.
    pub new_functions: Vec<String>,
    /// Data only the patched object has (including fresh copies of special statics).
    pub new_data: Vec<String>,
    /// Functions that differ only in `__LINE__` values: not changes.
    pub line_only: Vec<String>,
    /// Changed `__init` code and data: it ran at boot, so it is not applied.
    pub not_applicable: Vec<String>,
    /// New dynamic-debug descriptors: carried unregistered, so their call sites stay off
    /// and `/proc/dynamic_debug/control` does not list them.
    pub debug_sites_off: Vec<String>,
}

/// What a build did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Files the diff changes.
    pub files: Vec<String>,
    pub objects: Vec<ObjectReport>,
    /// Assembly objects that depend on a changed file but assemble to the same code.
    pub unchanged_assembly: Vec<String>,
    /// Types whose layout changes but whose instances only frames hold: the bundle's
    /// switches must be consistent (`Manifest::frame_types`).
    pub frame_types: Vec<String>,
    /// Struct members the diff drops that the build kept, unused, so that the live
    /// objects' layout stays (`struct tag.member (file:line)`).
    pub kept_members: Vec<String>,
    /// Types that gain members only in padding holes, every object of which was proven
    /// static and zero there (`Manifest::zeroed` checks them live).
    pub padded_types: Vec<String>,
    /// Static functions whose prototype changes and whose every caller the bundle
    /// replaces: the bundle's switches must be consistent (`Manifest::prototypes`).
    pub prototypes: Vec<String>,
    pub times: Times,
}

/// A bundle and what is in it.
#[derive(Debug, Clone)]
pub struct Built {
    /// The bundle file's bytes (an ELF object with `.lucos.manifest`).
    pub bundle: Vec<u8>,
    pub manifest: Manifest,
    /// `old` labels of the replacements (`name` or `name@file`).
    pub replaced: Vec<String>,
    /// Symbols of the code and data copied into the bundle.
    pub included: Vec<String>,
    /// Kernel symbols the bundle links against.
    pub external: Vec<String>,
    pub report: BuildReport,
}

/// The result of a build that was not refused.
#[derive(Debug, Clone)]
pub enum BuildOutcome {
    Bundle(Box<Built>),
    /// No function changed (only line numbers moved, or nothing in vmlinux uses the
    /// changed files): there is nothing to apply.
    NoChange {
        report: Box<BuildReport>,
        /// Why, e.g. "only __LINE__ values moved (in 1 function(s))".
        reason: String,
    },
}

impl BuildOutcome {
    pub fn report(&self) -> &BuildReport {
        match self {
            BuildOutcome::Bundle(b) => &b.report,
            BuildOutcome::NoChange { report, .. } => report,
        }
    }
}
