//! Errors of `lucos build`, and the typed refusals: changes a bundle cannot express yet.
//!
//! A refusal is not a failure of the tool: the diff is well-formed and compiles, but applying
//! it live would silently do something other than what the source says. Each one names the
//! symbol, says why, and says what to do instead.

use std::path::PathBuf;

use thiserror::Error;

use super::report::BuildReport;

/// One change that a bundle cannot carry. All refusals of a build are reported together.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error(
        "`{symbol}` ({file}) changes size from {old} to {new} bytes: lucos cannot change the \
         layout of data the running kernel already uses (a data-transfer feature is coming); \
         keep its type and size, and put new state in a new variable"
    )]
    DataLayout {
        symbol: String,
        file: String,
        old: u64,
        new: u64,
    },
    #[error(
        "`{type_name}` changes layout as {file} sees it: {what}. Its objects outlive a \
         call ({lives}): the running kernel's keep the old layout, and new code compiled \
         against the new one would misread them (a data-transfer feature is coming); keep \
         the type's layout, and put new state in a new variable or a shadow structure"
    )]
    TypeLayout {
        type_name: String,
        file: String,
        what: String,
        /// Why its instances are not only in frames (see `frames`).
        lives: String,
        /// The members the patched layout only drops (nothing else changes): a rebuild
        /// that keeps them ([`super::keep`]) may keep the layout.
        removed: Vec<String>,
    },
    #[error(
        "the initial value of `{symbol}` ({file}) changed: the running kernel's copy holds live \
         state that a patch does not rewrite (a data-transfer feature is coming); change the \
         code that uses it instead"
    )]
    DataInit { symbol: String, file: String },
    #[error(
        "`{function}` ({file}) changed but has no `call __fentry__` at its entry (it is notrace, \
         noinstr or inline), so lucos has no safe site to redirect it{}; move the change into \
         a traceable function", if .detail.is_empty() { String::new() } else { format!(", and {}", .detail) }
    )]
    NoFentry {
        function: String,
        file: String,
        /// Why its callers could not be replaced instead (empty if not applicable).
        detail: String,
    },
    #[error(
        "`{function}` ({file}) changed but cannot be redirected in the running kernel: {reason}"
    )]
    NotRedirectable {
        function: String,
        file: String,
        reason: String,
    },
    #[error(
        "`{function}` ({file}) changes its prototype (parameter and return sizes {what}): \
         callers the bundle does not replace (other files, or code calling through a \
         pointer to it) would pass the old arguments to the new code; keep the prototype \
         and add a new function, or put every caller in the update"
    )]
    Prototype {
        function: String,
        file: String,
        what: String,
    },
    #[error(
        "`{function}` ({file}) failed the run-pre check: {reason}; the kernel tree does not \
         reproduce the running kernel (another compiler, config or source version?), so \
         lucos cannot tell what this diff changes in it; use the tree made for this kernel \
         (`lucos guest build`)"
    )]
    RunPre {
        function: String,
        file: String,
        reason: String,
    },
    #[error(
        "{path} is assembly: lucos compares compiled C functions and cannot build a patch for \
         assembly code; make the fix in C"
    )]
    Assembly { path: String },
    #[error(
        "{path} changed and its assembly output {object} differs: lucos cannot patch assembly \
         code; keep the change out of what assembly files include"
    )]
    AssemblyDependent { path: String, object: String },
    #[error(
        "new code of `{function}` ({file}) needs section {section} ({what}), which a bundle \
         cannot carry yet; a later lucos version will register it with the running kernel"
    )]
    SpecialSection {
        function: String,
        file: String,
        section: String,
        what: String,
    },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("`{from}` ({file}) refers to `{symbol}`, which {reason}")]
    Reference {
        from: String,
        file: String,
        symbol: String,
        reason: String,
    },
    /// The running kernel has no such symbol: another changed file of the update may add
    /// it (`lucos corpus` retries with those files).
    #[error(
        "`{from}` ({file}) refers to `{symbol}`, which the running kernel does not have: {lookup}"
    )]
    Absent {
        from: String,
        file: String,
        symbol: String,
        /// Why the lookup in vmlinux failed.
        lookup: String,
    },
    #[error(
        "new per-CPU variable `{symbol}` ({file}): per-CPU data needs per-CPU allocation, which \
         lucos does not do yet; use an ordinary variable"
    )]
    NewPercpu { symbol: String, file: String },
}

/// Why an object's DWARF could not be read (a compiled object's struct layouts, vmlinux's
/// compile units). The reader's own error stays the source, so a caller can tell a corrupt
/// section from a truncated unit.
#[derive(Debug, Error)]
pub enum DwarfError {
    #[error("it is not a readable ELF object: {source}")]
    Object {
        #[source]
        source: object::read::Error,
    },
    #[error("its section {section} cannot be read: {source}")]
    Section {
        section: &'static str,
        #[source]
        source: object::read::Error,
    },
    #[error("{what}: {source}")]
    Parse {
        /// What was being read: a unit header, a unit's DIEs, a line-table file name.
        what: &'static str,
        #[source]
        source: gimli::Error,
    },
    #[error("it has no .debug_info (use the -dbg package's vmlinux)")]
    NoDebugInfo,
    #[error("no compile unit for init/main.c")]
    NoSourceRoot,
}

#[derive(Debug, Error)]
pub enum DiffError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable Kbuild tree: {reason}; pass the cached guest build \
         (`guest/kernel.sh --print-dir`) or its build/ directory"
    )]
    Tree { path: PathBuf, reason: String },
    #[error("the diff {path} cannot be read: line {line}: {reason}")]
    DiffSyntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("the diff {path} changes no file; give a unified diff (`git diff > fix.patch`)")]
    EmptyDiff { path: PathBuf },
    #[error(
        "`patch -p1` could not apply {path} to this kernel's sources:\n{output}\nis the diff \
         against kernel {release} (paths a/... b/...)?"
    )]
    PatchApply {
        path: PathBuf,
        release: String,
        output: String,
    },
    #[error("cannot run `{tool}`: {source}; install it (Debian: {package})")]
    Tool {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bad Kbuild command file {path}: {reason}; rebuild the guest kernel")]
    CmdFile { path: PathBuf, reason: String },
    #[error(
        "compiling the {which} {object} failed (exit {status}):\n{stderr}{hint}",
        hint = if *.which == "patched" { "\nfix the diff so that it compiles" } else { "\nthe cached kernel tree does not build any more; rebuild it with guest/kernel.sh" }
    )]
    Compile {
        which: &'static str,
        object: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read compiled object {object}: its DWARF cannot be read: {source}")]
    ObjectDwarf {
        object: String,
        #[source]
        source: DwarfError,
    },
    #[error(
        "{path} is not a usable Kbuild tree: cannot read its DWARF compile units: {source}; \
         pass the cached guest build (`guest/kernel.sh --print-dir`) or its build/ directory"
    )]
    VmlinuxDwarf {
        path: PathBuf,
        #[source]
        source: DwarfError,
    },
    #[error("cannot read compiled object {object}: {source}")]
    Elf {
        object: String,
        #[source]
        source: lucos_patch::elf::ElfError,
    },
    #[error("cannot read the kernel's symbols: {0}")]
    Symbols(#[from] lucos_introspect::symbols::SymbolError),
    #[error(transparent)]
    KernelTree(#[from] crate::tree::TreeError),
    #[error("cannot build a bundle:\n{}", list(.refusals))]
    Refused {
        refusals: Vec<Refusal>,
        /// What the build had found when it refused (files, objects, changed functions),
        /// so that a report can still count what the diff changes.
        report: Box<BuildReport>,
    },
    #[error("cannot read the target kernel's identity from vmlinux: {source}")]
    Target {
        #[source]
        source: Box<crate::error::BuildError>,
    },
    #[error(
        "the bundle does not resolve against vmlinux the way the engine will: {source}; this \
         is a lucos bug"
    )]
    SelfCheck {
        #[source]
        source: Box<crate::error::BuildError>,
    },
    #[error("cannot write the bundle: {reason}")]
    Emit { reason: String },
    #[error("cannot write the bundle: unplanned refusal: {source}")]
    UnplannedRefusal {
        #[source]
        source: Refusal,
    },
    #[error("the bundle built does not pass lucos's own checks ({0}); this is a lucos bug")]
    Bundle(#[from] lucos_patch::BundleError),
    #[error("the bundle built cannot be linked ({0}); this is a lucos bug unless the message says otherwise")]
    Link(#[from] lucos_patch::LinkError),
}

fn list(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(|r| format!("  - {r}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Refusal {
    /// The refusal's cause, for grouping refusals of many builds (e.g. a corpus report):
    /// short, stable, one per kind of limit.
    pub fn cause(&self) -> String {
        match self {
            Refusal::DataLayout { .. } => "data size change".into(),
            Refusal::TypeLayout { .. } => "struct layout change".into(),
            Refusal::DataInit { .. } => "changed initial value of writable data".into(),
            Refusal::NoFentry { .. } => "changed function without fentry site".into(),
            Refusal::NotRedirectable { .. } => "function cannot be redirected".into(),
            Refusal::Prototype { .. } => "changed function prototype".into(),
            Refusal::RunPre { .. } => "run-pre mismatch".into(),
            Refusal::Assembly { .. } | Refusal::AssemblyDependent { .. } => "assembly".into(),
            Refusal::SpecialSection { section, .. } => format!("special section {section}"),
            Refusal::File { .. } => "unsupported file".into(),
            Refusal::Reference { .. } | Refusal::Absent { .. } => {
                "reference to a missing symbol".into()
            }
            Refusal::NewPercpu { .. } => "new per-CPU variable".into(),
        }
    }
}

impl DiffError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> DiffError {
        let path = path.into();
        move |source| DiffError::Io {
            action,
            path,
            source,
        }
    }

    /// The refusals, when the build was refused.
    pub fn refusals(&self) -> &[Refusal] {
        match self {
            DiffError::Refused { refusals, .. } => refusals,
            _ => &[],
        }
    }
}
