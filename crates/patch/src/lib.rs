//! Engine-independent half of live patching: the bundle format (an ELF relocatable object
//! plus a JSON manifest) and a linker that turns a bundle into images for patch memory.
//!
//! Typical use by the engine:
//! 1. [`Bundle::open`] the file (signature checked against a [`TrustStore`]) and check [`Manifest::target`] against the guest kernel;
//! 2. [`plan`] it and allocate the three regions ([`RegionPlan::page_size`] each);
//! 3. [`link`] at those addresses with a resolver for kernel symbols;
//! 4. write the images, then for each replacement check the old function's site with
//!    [`check_fentry_site`] and overwrite it with [`jmp_rel32`] to
//!    [`Linked::new_fn_addr`].

mod alternatives;
mod bundle;
pub mod completion;
pub mod elf;
pub mod engine;
pub mod entry;
pub mod kmod;
mod layout;
mod link;
mod manifest;
pub mod memory;
mod pack;
pub mod policy;
pub mod refs;
pub mod registry;
mod reloc;
mod returns;
mod sections;
pub mod signing;
mod site;
pub mod trust;

pub use alternatives::{apply_alternatives, CpuFeatures};
pub use bundle::{Bundle, BundleError, MANIFEST_SECTION};
pub use engine::{
    page_offset_base, reset_registry, ApplyReport, Consistency, EngineError, Gate, GateScope,
    GateSite, Reclaimed, ResetReport, Retry, RevertReport, Session,
};
pub use layout::{
    DroppedSection, FentrySite, Linked, PlacedSection, RegionKind, RegionPlan, Regions,
    MAX_REGION_SIZE, PAGE_SIZE,
};
pub use link::{link, plan, LinkError, Plan, ResolveError};
pub use manifest::{
    AbsField, Alias, Export, Field, Manifest, Replacement, Rewrite, Target, Zeroed, FORMAT_VERSION,
    MAX_DESCRIPTION, MAX_EXPECT, MAX_FIELDS_OBJECT, MAX_FRAME_TYPES, MAX_NAMES, MAX_PATH,
    MAX_RELEASE, MAX_REPLACEMENTS, MAX_REWRITE, MAX_REWRITES, MAX_SYMBOL, MAX_ZEROED,
};
pub use pack::pack;
pub use reloc::reloc_name;
pub use returns::{apply_returns, return_sites, ReturnMode};
pub use sections::refused_by_name as section_refusal;
pub use signing::{SignatureError, Signer};
pub use site::{check_fentry_site, jmp_rel32, jmp_target, SiteError, SiteKind, ENDBR64, NOP5};
pub use trust::{KeyError, TrustStore};
