//! Staging: code, data and page tables written while the guest runs, into memory nothing
//! reaches until the switch; and their rollback.

use lucos_introspect::{GuestPhysAddr, GuestVirtAddr, KernelLayout, KernelSymbols, Machine};

use super::{EngineError, Session, Undo};
use crate::memory::{self, PAGE};
use crate::registry::{Header, RangeRecord, Registry};
use lucos_introspect::paging;

/// The kernel's `page_offset_base`: where its direct map of physical memory starts.
pub fn page_offset_base<M: Machine + ?Sized>(
    m: &M,
    syms: &KernelSymbols,
    layout: &KernelLayout,
) -> Result<u64, EngineError> {
    let pob = syms
        .lookup("page_offset_base")
        .map_err(|source| EngineError::Symbol {
            function: "page_offset_base".into(),
            source,
        })?;
    Ok(paging::read_virt_u64(
        m,
        layout.cr3,
        GuestVirtAddr(layout.live(pob.addr)),
    )?)
}

impl<M: Machine + ?Sized> Session<'_, M> {
    /// Where patch memory is (or will be) mapped, and the page-directory entries this apply
    /// must write: all of a first mapping's, or, after an interrupted one, all it recorded.
    /// The direct map of patch memory's page tables is only needed when the kernel will
    /// rewrite code there itself (`pokes`: the bundle's static-branch sites); on a boot whose
    /// direct map cannot take it, other bundles go without it.
    pub(super) fn mapping(
        &self,
        reg: &Registry,
        pokes: bool,
    ) -> Result<(u64, Vec<(GuestPhysAddr, u64)>), EngineError> {
        if let (true, Some(base)) = (reg.map_pending, reg.va_base) {
            let recorded = reg.pd_entries.iter();
            return Ok((
                base,
                recorded.map(|&(pa, v)| (GuestPhysAddr(pa), v)).collect(),
            ));
        }
        let (base, mut entries) = match reg.va_base {
            Some(b) => (b, Vec::new()),
            None => memory::choose_va_base(
                &*self.m,
                self.layout.cr3,
                &self.pm,
                self.layout.text_start,
                self.layout.image_end,
            )?,
        };
        let pob = page_offset_base(&*self.m, self.syms, &self.layout)?;
        match memory::direct_map_entries(&*self.m, self.layout.cr3, &self.pm, pob) {
            Ok(dm) => entries.extend(dm),
            Err(e @ memory::MemoryError::DirectMapUnreachable { .. }) if !pokes => {
                tracing::info!(error = %e, "patch memory stays out of the direct map");
            }
            Err(e) => return Err(e.into()),
        }
        Ok((base, entries))
    }

    /// Commits the mapping noted in `reg` (pending) before any of its entries is written, so that a lucos
    /// killed while writing them leaves entries the registry knows: the next apply writes
    /// them again, `lucos reset` removes them. The old registry bytes go into `undo`, so a
    /// refused apply still leaves patch memory as it was. Returns the header now current.
    fn record_mapping(
        &mut self,
        header: &Header,
        reg: &mut Registry,
        undo: &mut Undo,
    ) -> Result<Header, EngineError> {
        undo.writes.extend(self.snapshot_registry(header)?);
        self.commit(header, reg)?;
        let (h, now) = self.read_header()?;
        *reg = now;
        Ok(h)
    }

    /// Records a new mapping (if any), then stages; returns the header now current.
    pub(super) fn record_and_stage(
        &mut self,
        header: &Header,
        reg: &mut Registry,
        (new_pd, first, reused): (&[(GuestPhysAddr, u64)], bool, bool),
        staged: &[(RangeRecord, &[u8])],
        undo: &mut Undo,
    ) -> Result<Header, EngineError> {
        let header = if new_pd.is_empty() {
            header.clone()
        } else {
            self.record_mapping(header, reg, undo)?
        };
        self.stage((new_pd, first, reused), staged, undo)?;
        Ok(header)
    }

    fn write_undoable(
        &mut self,
        undo: &mut Undo,
        pa: GuestPhysAddr,
        data: &[u8],
    ) -> Result<(), EngineError> {
        self.write_undoable_as(undo, pa, data, false)
    }

    /// With `coherent`, through the path that drops cached translations of the bytes.
    fn write_undoable_as(
        &mut self,
        undo: &mut Undo,
        pa: GuestPhysAddr,
        data: &[u8],
        coherent: bool,
    ) -> Result<(), EngineError> {
        let mut old = vec![0u8; data.len()];
        self.m.read_phys(pa, &mut old)?;
        undo.writes.push((pa, old));
        if coherent {
            self.m.write_phys(pa, data)?;
        } else {
            self.m.write_phys_data(pa, data)?;
        }
        Ok(())
    }

    /// Writes code, data and page tables; nothing in the guest reaches them
    /// until the sites are switched.
    pub(super) fn stage(
        &mut self,
        (new_pd, first, reused): (&[(GuestPhysAddr, u64)], bool, bool),
        staged: &[(RangeRecord, &[u8])],
        undo: &mut Undo,
    ) -> Result<(), EngineError> {
        let ranges: Vec<&RangeRecord> = staged.iter().map(|(r, _)| r).collect();
        for (r, image) in staged {
            let mut bytes = image.to_vec();
            bytes.resize(r.len as usize, 0);
            // Never-used pages: no vCPU has executed them, so no translation can be stale
            // and the fast data path is coherent enough. Reclaimed pages held a reverted
            // bundle's code, which an engine may still have translated (TCG): every page
            // is overwritten whole, through the coherent path.
            self.write_undoable_as(undo, self.pm.pa(r.offset), &bytes, reused)?;
            let mut ptes = Vec::new();
            let mut off = r.offset;
            while off < r.offset + r.len {
                ptes.push(memory::pte(&self.pm, off, r.kind));
                off += PAGE;
            }
            for (i, pte) in ptes.into_iter().enumerate() {
                let pa = memory::pte_pa(&self.pm, r.offset + i as u64 * PAGE);
                self.write_undoable(undo, pa, &pte.to_le_bytes())?;
            }
        }
        // A first mapping starts the page tables afresh (later applies keep them).
        let chunks = if first { self.pm.layout.pt_pages } else { 0 };
        if first {
            let dm = self.pm.pa(self.pm.layout.dm_offset());
            self.write_undoable(undo, dm, &[0u8; PAGE as usize])?;
        }
        for chunk in 0..chunks {
            // Fresh page tables: only entries written above may be present.
            let pt = self.pm.pa(self.pm.layout.pt_offset(chunk));
            let mut table = vec![0u8; PAGE as usize];
            self.m.read_phys(pt, &mut table)?;
            let keep: Vec<u8> = table
                .chunks(8)
                .zip(0u64..)
                .flat_map(|(e, i)| {
                    let off = chunk * memory::HUGE + i * PAGE;
                    let ours = ranges
                        .iter()
                        .any(|r| off >= r.offset && off < r.offset + r.len);
                    if ours {
                        e.to_vec()
                    } else {
                        vec![0; 8]
                    }
                })
                .collect();
            if keep != table {
                self.write_undoable(undo, pt, &keep)?;
            }
        }
        for &(pa, value) in new_pd {
            self.write_undoable(undo, pa, &value.to_le_bytes())?;
        }
        Ok(())
    }

    pub(super) fn rollback(&mut self, undo: Undo) {
        for (pa, old) in undo.writes.into_iter().rev() {
            if let Err(e) = self.m.write_phys_data(pa, &old) {
                tracing::error!(pa = pa.raw(), error = %e, "rollback write failed");
            }
        }
    }
}
