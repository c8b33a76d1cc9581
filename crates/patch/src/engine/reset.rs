//! Clearing records that belong to an earlier boot of the guest.

use lucos_introspect::Machine;

use super::EngineError;
use crate::memory::{self, PatchMemLayout};
use crate::registry::{Header, Registry, HEADER_LEN};

/// Clears a registry whose records belong to an earlier boot (see
/// [`EngineError::StaleRegistry`]), and any of its page-directory entries
/// that survived. Allocated pages stay allocated: the guest may have run
/// code from them, so they are never reused.
pub fn reset_stale_registry<M: Machine + ?Sized>(
    m: &mut M,
    patch_gpa: u64,
    patch_size: u64,
) -> Result<usize, EngineError> {
    let layout = PatchMemLayout::new(patch_size)?;
    let mut hb = [0u8; HEADER_LEN];
    m.read_phys(patch_gpa + layout.header_offset(), &mut hb)?;
    let Some(header) = Header::decode(&hb)? else {
        return Ok(0);
    };
    let mut slot = vec![0u8; memory::REGISTRY_SLOT_SIZE];
    m.read_phys(patch_gpa + layout.slot_offset(header.active), &mut slot)?;
    let old = header.registry(&slot)?;
    let mut ours = Vec::new();
    for &(pa, value) in &old.pd_entries {
        if m.read_u64(pa)? == value {
            ours.push(pa);
        }
    }
    if ours.len() == old.pd_entries.len() {
        return Err(EngineError::NotStale);
    }
    // Entries that still point at lucos's page tables are leftovers of the
    // dropped records (no code can jump there: the kernel lost the others).
    for pa in ours {
        m.write_phys_data(pa, &0u64.to_le_bytes())?;
    }
    let mut fresh = Registry::empty(&layout);
    fresh.next_free = old.next_free;
    fresh.generation = old.generation + 1;
    fresh.reverted_dropped = old.reverted_dropped + old.bundles.len() as u64;
    let (h, json) = fresh.encode(&header)?;
    m.write_phys_data(patch_gpa + layout.slot_offset(h.active), &json)?;
    m.write_phys_data(patch_gpa + layout.header_offset(), &h.encode())?;
    Ok(old.bundles.len())
}
