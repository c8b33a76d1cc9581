//! The layout types shared by [`crate::plan`] and [`crate::link`]: regions, placed sections
//! and the linked images.

use std::collections::{BTreeMap, HashMap};

/// Guest page size; every region starts on a page boundary.
pub const PAGE_SIZE: u64 = 4096;
/// Largest region accepted. Patches are small; this keeps a corrupt `.bss` size from
/// turning into a giant allocation.
pub const MAX_REGION_SIZE: u64 = 64 << 20;

/// One of the three load regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    /// Code: map read + execute.
    Text,
    /// Read-only data: map read-only, no execute.
    Rodata,
    /// Writable data and `.bss`: map read + write, no execute.
    Data,
}

impl RegionKind {
    pub fn name(self) -> &'static str {
        match self {
            RegionKind::Text => "text",
            RegionKind::Rodata => "rodata",
            RegionKind::Data => "data",
        }
    }
}

/// A section placed at `offset` inside its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedSection {
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub(crate) index: usize,
}

/// Layout of one region. `size` is exact; allocate [`RegionPlan::page_size`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionPlan {
    pub kind: RegionKind,
    pub size: u64,
    pub sections: Vec<PlacedSection>,
}

impl RegionPlan {
    /// `size` rounded up to whole pages (0 for an empty region, which needs no memory).
    pub fn page_size(&self) -> u64 {
        self.size.div_ceil(PAGE_SIZE) * PAGE_SIZE
    }
}

/// A section left out of the image on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedSection {
    pub name: String,
    pub reason: &'static str,
}

/// A `call __fentry__` in new code that the linker replaces by the NOP5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FentrySite {
    pub function: String,
    pub section: String,
    /// Offset of the call instruction inside `section`.
    pub offset: u64,
    pub(crate) index: usize,
}

/// Guest virtual base address of each region (page-aligned; ignored for empty regions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regions {
    pub text: u64,
    pub rodata: u64,
    pub data: u64,
}

impl Regions {
    pub fn base(&self, kind: RegionKind) -> u64 {
        match kind {
            RegionKind::Text => self.text,
            RegionKind::Rodata => self.rodata,
            RegionKind::Data => self.data,
        }
    }
}

/// The linked images, ready to be written at [`Linked::regions`].
#[derive(Debug, Clone)]
pub struct Linked {
    pub regions: Regions,
    pub text: Vec<u8>,
    pub rodata: Vec<u8>,
    pub data: Vec<u8>,
    /// Placed address of each defined function and object. A name defined by several local
    /// symbols (statics from different files after `ld -r`) is left out as ambiguous.
    pub symbols: HashMap<String, u64>,
    /// What each undefined symbol resolved to (weak misses resolve to 0).
    pub resolved: BTreeMap<String, u64>,
}

impl Linked {
    /// Placed address of function `name`, e.g. a replacement's `new`.
    pub fn new_fn_addr(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).copied()
    }
}
