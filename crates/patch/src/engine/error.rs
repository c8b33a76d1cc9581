use lucos_introspect::{KaslrError, MachineError, PagingError, SymbolError};

use crate::memory::MemoryError;
use crate::registry::RegistryError;
use crate::{BundleError, LinkError, SiteError};

/// Why an apply or revert was refused or failed. Refusals leave the guest
/// untouched; failures after staging were rolled back.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "bundle '{0}' was not checked against a trust store; open it with Bundle::open \
         (lucos apply does), which verifies its signature"
    )]
    Unverified(String),
    #[error("bundle '{id}' was built for kernel build id {bundle}, but the guest runs {live}; rebuild the bundle against this kernel")]
    WrongKernel {
        id: String,
        bundle: String,
        live: String,
    },
    #[error("bundle '{0}' is already applied; revert it first (`lucos revert`) or give the new bundle another id")]
    AlreadyApplied(String),
    #[error("no applied bundle '{id}' (applied: {})", if applied.is_empty() { "none".to_owned() } else { applied.join(", ") })]
    NotApplied { id: String, applied: Vec<String> },
    #[error("cannot revert '{id}': bundle '{newer}' replaced `{function}` after it; revert '{newer}' first (reverts go newest first per function)")]
    RevertOrder {
        id: String,
        function: String,
        newer: String,
    },
    #[error("`{function}`: {source}")]
    Symbol {
        function: String,
        source: SymbolError,
    },
    #[error("`{function}` is not a function of the running kernel (vmlinux, or the module named); only functions can be replaced")]
    NotAFunction { function: String },
    #[error(
        "`{function}` is in module {module}, which is not loaded; load it first (`modprobe \
         {module}` in the guest) and apply again"
    )]
    ModuleNotLoaded { function: String, module: String },
    #[error("`{function}`: module {module} is {state}, not live; wait until it has loaded")]
    ModuleNotLive {
        function: String,
        module: String,
        state: String,
    },
    #[error("reading the guest's modules: {0}")]
    Modules(#[from] lucos_introspect::ModuleError),
    #[error("registering the bundle with the kernel: {0}")]
    Kmod(#[from] crate::kmod::KmodError),
    #[error("`{function}`: {source}")]
    Site { function: String, source: SiteError },
    #[error("`{function}` at {site:#x} already jumps to {target:#x}, which no applied lucos bundle wrote; another tool owns this function, refusing")]
    ForeignRedirect {
        function: String,
        site: u64,
        target: u64,
    },
    #[error("`{function}` at {addr:#x} does not hold the bytes the bundle expects: expected {expected}, live {live}. The bundle was built for different code (or alternatives/jump labels rewrote it); rebuild it against this kernel")]
    ExpectMismatch {
        function: String,
        addr: u64,
        expected: String,
        live: String,
    },
    #[error(
        "vCPU {vcpu} is executing inside the patch site of `{function}` (rip {rip:#x}); retry"
    )]
    RipInSite {
        vcpu: usize,
        rip: u64,
        function: String,
    },
    #[error("the site of `{function}` at {site:#x} changed while lucos was preparing ({expected} -> {found}); someone else is patching this kernel, retry")]
    SiteChanged {
        function: String,
        site: u64,
        expected: String,
        found: String,
    },
    #[error("patch memory moved from guest-physical {mapped:#x} to {now:#x} (the guest reassigned the PCI BAR) after lucos mapped it; the applied patches' page tables point to the old address, so lucos refuses to touch them. Restart the VM")]
    PatchMemoryMoved { mapped: u64, now: u64 },
    #[error("patch memory holds records of an earlier boot of this guest: the page-directory entry at guest-physical {pa:#x} no longer holds {value:#x}. Those patches are gone with that kernel; clear the records with `lucos reset`")]
    StaleRegistry { pa: u64, value: u64 },
    #[error("the patch registry describes the running kernel; nothing to reset (revert bundles with `lucos revert`)")]
    NotStale,
    #[error("`{first}` and `{second}` are the same function in the running kernel; list it once")]
    SameSiteTwice { first: String, second: String },
    #[error("the VM did not resume after the switch ({0}); the change was made and recorded. Run `lucos resume` to continue the guest")]
    ResumeFailed(MachineError),
    #[error("{error}; the VM then did not resume ({resume}) and is still paused. Run `lucos resume` to continue the guest")]
    StillPaused {
        error: Box<EngineError>,
        resume: MachineError,
    },
    #[error("the linked bundle has no function `{0}` for its manifest")]
    MissingNew(String),
    #[error("cannot find read-only object `{object}` to rewrite in the running kernel: {source}; rebuild the bundle against this kernel")]
    RewriteSymbol {
        object: String,
        #[source]
        source: crate::ResolveError,
    },
    #[error("read-only object `{object}` at {addr:#x} does not hold what the bundle expects (first difference at byte {offset}): the bundle was built for other code, or another bundle rewrote it; revert that one first or rebuild against this kernel")]
    RewriteMismatch {
        object: String,
        addr: u64,
        offset: usize,
    },
    #[error("writable object `{object}` at {addr:#x} no longer holds its boot-time value at byte {offset}, where the update changes its initial value: the kernel or a user (a tunable) changed it since boot, and lucos will not overwrite live state; set it back to its boot value first, or build the update without this change")]
    FieldChanged {
        object: String,
        addr: u64,
        offset: usize,
    },
    #[error("`{object}` at {addr:#x} holds {found:02x?} where the bundle's new code reads a member the running kernel's layout does not have, which must be zero: something wrote its padding; this bundle cannot be applied to this kernel")]
    NotZeroed {
        object: String,
        addr: u64,
        found: Vec<u8>,
    },
    #[error("read-only object `{object}` at {addr:#x} changed since bundle `{id}` rewrote it; lucos will not overwrite what it did not write (reboot, or restore it by hand)")]
    RewriteChanged {
        id: String,
        object: String,
        addr: u64,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("reading guest memory: {0}")]
    Paging(#[from] PagingError),
    #[error(transparent)]
    Kaslr(#[from] KaslrError),
    #[error("kernel symbols: {0}")]
    Symbols(#[from] SymbolError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot reclaim '{id}': {why}")]
    NotReclaimable { id: String, why: String },
    #[error("consistent switch gave up after {tries} pauses ({paused_us} us paused in all): at every one, a task was in code the switch must not change under it ({holders}): a replaced function, with --consistent, or the first bytes of a function redirected at its entry; the guest was left unchanged. Retry when it is idle, or give more --tries")]
    NotQuiescent {
        tries: u32,
        paused_us: u64,
        holders: String,
    },
    #[error("checking the stacks inside the pause: {0}; the guest was left unchanged")]
    Gate(String),
    #[error("`{function}` has no fentry site, and its entry cannot take a jmp in the running kernel: {source}")]
    Entry {
        function: String,
        #[source]
        source: crate::entry::EntryError,
    },
    #[error("`{function}` has no fentry site; the bundle expects a jmp over its first {manifest} bytes (site at +{site}), but vmlinux's instructions there end at +{vmlinux}. The bundle was built for another kernel or by a broken tool; rebuild it")]
    EntryMismatch {
        function: String,
        site: u32,
        manifest: usize,
        vmlinux: u32,
    },
    #[error("`{function}` is redirected at its entry (it has no fentry site), so the switch needs every stack checked inside the pause, and this caller set no check up (Session::set_gate); apply it with `lucos apply`")]
    EntryNeedsStackCheck { function: String },
    #[error("bundle '{id}' changes the layout of `{type_name}`, whose objects live only in the frames of the functions it replaces: that is safe only if no task is in that code at the switch, and this caller set no consistent check up (Session::set_gate with GateScope::Functions); apply and revert it with `lucos apply` and `lucos revert`, which check every stack")]
    FrameTypeNeedsConsistency { id: String, type_name: String },
    #[error("bundle '{id}' changes the prototype of `{function}` and replaces all its callers: an old caller still running would pass the new code the old arguments, so that is safe only if no task is in that code at the switch, and this caller set no consistent check up (Session::set_gate with GateScope::Functions); apply and revert it with `lucos apply` and `lucos revert`, which check every stack")]
    PrototypeNeedsConsistency { id: String, function: String },
}
