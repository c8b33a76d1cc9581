//! The registry in patch memory: two slots and a header that names the active one. A
//! commit writes the inactive slot, then the header, so a reader always finds a whole
//! record; a switch encodes its commit before the pause and writes it inside.

use lucos_introspect::{GuestPhysAddr, Machine};

use super::{EngineError, Session};
use crate::memory;
use crate::registry::{Header, Registry, HEADER_LEN};

/// A registry commit, encoded: the slot's JSON, then the header that activates it.
pub(super) struct PreparedCommit {
    slot: (GuestPhysAddr, Vec<u8>),
    head: (GuestPhysAddr, Vec<u8>),
}

impl<M: Machine + ?Sized> Session<'_, M> {
    pub(super) fn read_header(&self) -> Result<(Header, Registry), EngineError> {
        let mut hb = [0u8; HEADER_LEN];
        self.m
            .read_phys(self.pm.pa(self.pm.layout.header_offset()), &mut hb)?;
        match Header::decode(&hb)? {
            None => Ok((Header::default(), Registry::empty(&self.pm.layout))),
            Some(h) => {
                let mut slot = vec![0u8; memory::REGISTRY_SLOT_SIZE];
                self.m
                    .read_phys(self.pm.pa(self.pm.layout.slot_offset(h.active)), &mut slot)?;
                let reg = h.registry(&slot)?;
                Ok((h, reg))
            }
        }
    }

    /// The registry as stored in the guest's patch memory.
    pub fn registry(&self) -> Result<Registry, EngineError> {
        Ok(self.read_header()?.1)
    }

    /// The exact bytes a commit after `header` would overwrite.
    pub(super) fn snapshot_registry(
        &self,
        header: &Header,
    ) -> Result<Vec<(GuestPhysAddr, Vec<u8>)>, EngineError> {
        let slot = self
            .pm
            .pa(self.pm.layout.slot_offset(1 - header.active.min(1)));
        let head = self.pm.pa(self.pm.layout.header_offset());
        let mut out = Vec::new();
        for (pa, len) in [(slot, memory::REGISTRY_SLOT_SIZE), (head, HEADER_LEN)] {
            let mut b = vec![0u8; len];
            self.m.read_phys(pa, &mut b)?;
            out.push((pa, b));
        }
        Ok(out)
    }

    pub(super) fn commit(
        &mut self,
        header: &Header,
        reg: &mut Registry,
    ) -> Result<(), EngineError> {
        let p = self.prepare_commit(header, reg)?;
        self.write_commit(&p)
    }

    /// The writes that commit `reg` (its generation advanced), encoded: a switch encodes
    /// before the pause and writes inside it.
    pub(super) fn prepare_commit(
        &self,
        header: &Header,
        reg: &mut Registry,
    ) -> Result<PreparedCommit, EngineError> {
        reg.generation += 1;
        reg.prune();
        let (h, json) = reg.encode(header)?;
        Ok(PreparedCommit {
            slot: (self.pm.pa(self.pm.layout.slot_offset(h.active)), json),
            head: (
                self.pm.pa(self.pm.layout.header_offset()),
                h.encode().to_vec(),
            ),
        })
    }

    pub(super) fn write_commit(&mut self, p: &PreparedCommit) -> Result<(), EngineError> {
        // The slot first, then the header that makes it the active one.
        self.m
            .write_phys_data_all(&[(p.slot.0, &p.slot.1), (p.head.0, &p.head.1)])?;
        Ok(())
    }
}
