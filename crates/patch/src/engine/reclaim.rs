//! Reclaim: a reverted bundle's patch memory goes back to the allocator.
//!
//! The caller decides that nothing references the memory any more (no stack or vCPU, see
//! [`crate::completion`], and no pointer in the data [`crate::refs`] scans). Here the pages
//! are unmapped, so that a reference lucos could not see faults instead of running whatever
//! a later bundle puts there, and recorded as free. A later apply that reuses them
//! overwrites every page whole through the coherent write path (see `stage`).

use lucos_introspect::Machine;

use super::{EngineError, Session};
use crate::memory::{self, PAGE};
use crate::registry::{BundleRecord, BundleState};

/// What one reclaim gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    pub id: String,
    pub bytes: u64,
}

impl<M: Machine + ?Sized> Session<'_, M> {
    /// The guest, for reads the caller makes under the same pause (e.g. pointer scans).
    pub fn machine(&self) -> &M {
        self.m
    }

    /// Frees the memory of the reverted bundle recorded as `rec` (an id may have several
    /// reverted records: the ranges tell them apart).
    pub fn reclaim(&mut self, rec: &BundleRecord) -> Result<Reclaimed, EngineError> {
        let id = rec.id.as_str();
        let (header, mut reg) = self.read_header()?;
        let not = |why: &str| EngineError::NotReclaimable {
            id: id.to_owned(),
            why: why.to_owned(),
        };
        let idx = reg
            .bundles
            .iter()
            .rposition(|b| b.id == id && b.state == BundleState::Reverted && b.ranges == rec.ranges)
            .ok_or_else(|| {
                if reg.find_applied(id).is_some() {
                    not("it is applied; revert it first")
                } else {
                    not("no reverted bundle has this id (see `lucos status`)")
                }
            })?;
        if reg.bundles[idx].reclaimed {
            return Err(not("its memory was reclaimed already"));
        }
        let ranges = reg.bundles[idx].ranges.clone();
        // Pages may not be handed out twice: the registry must own each range alone.
        for r in &ranges {
            let shared = reg.bundles.iter().enumerate().any(|(i, b)| {
                i != idx
                    && !b.reclaimed
                    && b.ranges
                        .iter()
                        .any(|o| o.offset < r.offset + r.len && r.offset < o.offset + o.len)
            });
            if shared || r.offset + r.len > reg.next_free {
                return Err(not(
                    "its ranges overlap another record; the registry is inconsistent",
                ));
            }
        }
        for r in &ranges {
            let mut off = r.offset;
            while off < r.offset + r.len {
                self.m
                    .write_phys_data(memory::pte_pa(&self.pm, off), &0u64.to_le_bytes())?;
                off += PAGE;
            }
            reg.release(r.offset, r.len);
        }
        reg.bundles[idx].reclaimed = true;
        self.commit(&header, &mut reg)?;
        Ok(Reclaimed {
            id: id.to_owned(),
            bytes: ranges.iter().map(|r| r.len).sum(),
        })
    }
}
