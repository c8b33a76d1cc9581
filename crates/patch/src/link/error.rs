//! What can stop a bundle from being planned or linked.

use lucos_introspect::symbols::SymbolError;
use thiserror::Error;

use crate::layout::MAX_REGION_SIZE;

/// Why a resolver could not give an undefined bundle symbol its address in the running
/// kernel. Typed so that callers (and [`LinkError::UnresolvedSymbol`]'s source chain) can
/// tell a missing symbol from an ambiguous one.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// vmlinux's symbol table has no such symbol, or more than one.
    #[error(transparent)]
    Symbol(#[from] SymbolError),
    /// Two modules the bundle patches both define the name at different addresses.
    #[error("`{name}` names several symbols in modules {first} and {second}")]
    AmbiguousInModules {
        name: String,
        first: String,
        second: String,
    },
}

// Not PartialEq: `UnresolvedSymbol` keeps the resolver's error, whose `SymbolError` can
// hold an `io::Error`. Tests match on the variant instead.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("section {section} cannot be loaded: {reason}")]
    UnsupportedSection { section: String, reason: String },
    #[error(
        "unsupported relocation {r_type} at {section}+{offset:#x}; the kernel module loader \
         only applies R_X86_64_NONE/64/32/32S/PC32/PLT32/PC64 — build with -mcmodel=kernel \
         -fno-pic like kernel code"
    )]
    UnsupportedRelocation {
        section: String,
        offset: u64,
        r_type: String,
    },
    #[error(
        "relocation {r_type} at {section}+{offset:#x} against `{symbol}` overflows \
         (value {value:#x}); {hint}"
    )]
    RelocationOverflow {
        section: String,
        offset: u64,
        symbol: String,
        r_type: String,
        value: u64,
        hint: &'static str,
    },
    #[error(
        "relocation {r_type} at {section}+{offset:#x}: the field is not zero before relocation \
         (the kernel refuses this too); was the object already relocated?"
    )]
    RelocationTargetNotZero {
        section: String,
        offset: u64,
        r_type: String,
    },
    #[error("relocation at {section}+{offset:#x} runs past the end of the section; the object is corrupt")]
    RelocationOutOfBounds { section: String, offset: u64 },
    #[error(
        "relocation at {section}+{offset:#x} refers to `{symbol}` in section {target}, which is \
         not loaded ({reason}); move that code or data into a normal section"
    )]
    RelocationToUnloaded {
        section: String,
        offset: u64,
        symbol: String,
        target: String,
        reason: String,
    },
    #[error("cannot resolve `{name}` in the running kernel: {source}")]
    UnresolvedSymbol {
        name: String,
        #[source]
        source: ResolveError,
    },
    #[error("`{name}` is a common symbol; build with -fno-common (as the kernel does)")]
    CommonSymbol { name: String },
    #[error("bad __fentry__ reference at {section}+{offset:#x}: {reason}")]
    BadFentryCall {
        section: String,
        offset: u64,
        reason: String,
    },
    #[error(
        "the {region} region would be {size:#x} bytes, more than the {MAX_REGION_SIZE:#x} allowed"
    )]
    RegionTooLarge { region: &'static str, size: u64 },
    #[error("this plan was made for a different bundle; call plan() on the bundle being linked")]
    PlanMismatch,
    #[error("bad region bases: {reason}")]
    BadRegions { reason: String },
    #[error(
        "jmp rel32 at {site:#x} cannot reach {target:#x} (more than ±2 GiB away); patch memory \
         must be within ±2 GiB of kernel text"
    )]
    JumpOutOfRange { site: u64, target: u64 },
    #[error("cannot apply the bundle's CPU-feature alternatives: {reason}")]
    Alternative { reason: String },
    #[error("the bundle's return site at text+{offset:#x} is {what}; the object and its relocations disagree (rebuild the bundle)")]
    ReturnSite { offset: u64, what: &'static str },
    #[error(
        "the new code makes {count} indirect call(s) or jump(s) through __x86_indirect_thunk_*, and this \
         CPU uses the ITS mitigation, which the kernel applies by rewriting each such site, not the \
         thunk: lucos does not rewrite them yet, so the new code would be unmitigated; it is refused \
         (rewrite the code without indirect calls, or boot the guest without ITS mitigation)"
    )]
    IndirectThunksNeedIts { count: usize },
}
