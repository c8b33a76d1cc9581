//! `lucos reset`: clearing records that no longer describe the running kernel, and every
//! page-table entry lucos may have written into it.

use lucos_introspect::{GuestPhysAddr, Machine};

use super::EngineError;
use crate::memory::{self, PatchMem, PatchMemLayout};
use crate::registry::{Header, Registry, HEADER_LEN};

/// What a reset cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetReport {
    /// Bundle records dropped.
    pub records: usize,
    /// Kernel page-table entries into patch memory set back to not present.
    pub entries: usize,
}

/// Clears a registry that does not describe the running kernel: records of an earlier boot
/// (see [`EngineError::StaleRegistry`]), or a mapping that no apply completed (a lucos killed
/// during the first apply). Every kernel page-table entry pointing into patch memory goes,
/// recorded or not ([`memory::entries_into_patch_memory`]): no code can be reached through
/// them, since no bundle of this kernel is applied. Allocated pages stay allocated: the
/// guest may have run code from them, so they are never reused. Refused while the registry
/// holds records of the running kernel (revert those instead).
pub fn reset_registry<M: Machine + ?Sized>(
    m: &mut M,
    (cr3, page_offset_base): (u64, u64),
    patch_gpa: u64,
    patch_size: u64,
) -> Result<ResetReport, EngineError> {
    let layout = PatchMemLayout::new(patch_size)?;
    let base = GuestPhysAddr(patch_gpa);
    let mut hb = [0u8; HEADER_LEN];
    m.read_phys(base + layout.header_offset(), &mut hb)?;
    let header = Header::decode(&hb)?;
    let old = match &header {
        Some(h) => {
            let mut slot = vec![0u8; memory::REGISTRY_SLOT_SIZE];
            m.read_phys(base + layout.slot_offset(h.active), &mut slot)?;
            h.registry(&slot)?
        }
        None => Registry::empty(&layout),
    };
    let mut stale = false;
    for &(pa, value) in &old.pd_entries {
        // Registry records keep bare numbers.
        stale |= m.read_u64(GuestPhysAddr(pa))? != value;
    }
    // A completed mapping that matches the kernel belongs to it (its bundles may run).
    if !stale && old.va_base.is_some() && (!old.map_pending || !old.bundles.is_empty()) {
        return Err(EngineError::NotStale);
    }
    let pm = PatchMem {
        layout,
        gpa: patch_gpa,
        va_base: None,
    };
    let entries = memory::entries_into_patch_memory(&*m, cr3, &pm, page_offset_base)?;
    for &pa in &entries {
        m.write_phys_data(pa, &0u64.to_le_bytes())?;
    }
    let untouched = old.va_base.is_none() && old.bundles.is_empty();
    if header.is_none() || (untouched && entries.is_empty()) {
        return Ok(ResetReport {
            records: 0,
            entries: entries.len(),
        });
    }
    let mut fresh = Registry::empty(&layout);
    fresh.next_free = old.next_free;
    fresh.generation = old.generation + 1;
    fresh.reverted_dropped = old.reverted_dropped + old.bundles.len() as u64;
    let (h, json) = fresh.encode(header.as_ref().expect("checked above"))?;
    m.write_phys_data(base + layout.slot_offset(h.active), &json)?;
    m.write_phys_data(base + layout.header_offset(), &h.encode())?;
    Ok(ResetReport {
        records: old.bundles.len(),
        entries: entries.len(),
    })
}
