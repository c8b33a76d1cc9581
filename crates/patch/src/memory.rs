//! Patch memory: a guest-physical window (an ivshmem BAR) that the guest OS
//! never allocates, mapped by lucos into the guest kernel's address space.
//!
//! Layout (offsets into patch memory):
//! - `0..4K` registry header, then two registry slots (never mapped);
//! - `PT_OFFSET..` one page table per 2 MiB of patch memory (lucos-owned,
//!   hung into the kernel's page directory);
//! - `alloc_start..size` code and data of bundles, allocated per page (reverted
//!   bundles' pages are reused once reclaimed, see `crate::engine::reclaim`),
//!   mapped at `va_base + offset` with per-page permissions.
//!
//! The virtual range is a hole in the kernel-image region
//! `[__START_KERNEL_map, MODULES_VADDR)`: Linux maps only its own image
//! there (`cleanup_highmap()` clears the rest at boot) and never allocates
//! in it later, and it lies within ±2 GiB of kernel text, so `jmp rel32`
//! and `-mcmodel=kernel` code reach both ways. See docs/design.md.

use lucos_introspect::paging::{self, Level, ACCESSED, DIRTY, GLOBAL, NX, PRESENT, PS, RW};
use lucos_introspect::{GuestPhysAddr, GuestVirtAddr, MachineError, PhysMem};

use crate::registry::HEADER_LEN;
use crate::RegionKind;

pub const PAGE: u64 = 4096;
pub const HUGE: u64 = 2 << 20;
pub const REGISTRY_SLOT_SIZE: usize = 126 * 1024;
const PT_OFFSET: u64 = 256 * 1024;
/// `__START_KERNEL_map` and the end of the KASLR kernel-image region
/// (`MODULES_VADDR` = `__START_KERNEL_map` + 1 GiB with RANDOMIZE_BASE).
pub const KERNEL_MAP_START: u64 = 0xffff_ffff_8000_0000;
pub const KERNEL_MAP_END: u64 = 0xffff_ffff_c000_0000;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "patch memory of {0} bytes is too small or not a multiple of 2 MiB (need at least 4 MiB)"
    )]
    BadSize(u64),
    #[error("patch memory is full: the bundle needs {need} bytes, {free} are left. Revert bundles no longer needed and run `lucos reclaim` once they are complete, or restart the VM with a larger --patch-mem")]
    Full { need: u64, free: u64 },
    #[error("no free {size_mib} MiB range for patch memory in the kernel image region next to the kernel ({text:#x}..{end:#x}); use a smaller --patch-mem")]
    NoVirtualRange { size_mib: u64, text: u64, end: u64 },
    #[error("the page-directory entry for {va:#x} is already in use by the guest; lucos will not map patch memory over it")]
    PdEntryInUse { va: u64 },
    #[error("the kernel's direct map has no table for patch memory's physical address (at {va:#x}, the walk stops at the {level:?} level), so the kernel could not rewrite static-branch sites in patch memory; this bundle has such sites. Apply it after a reboot of the guest (its direct map moves with KASLR), or build it without static keys")]
    DirectMapUnreachable { va: u64, level: Level },
    #[error("patch memory at {gpa:#x} is not 2 MiB aligned in guest-physical memory")]
    Unaligned { gpa: u64 },
    #[error("page tables: {0}")]
    Paging(#[from] paging::PagingError),
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Offsets of everything inside patch memory, derived from its size only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchMemLayout {
    pub size: u64,
    pub pt_pages: u64,
    pub alloc_start: u64,
}

impl PatchMemLayout {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < 2 * HUGE || !size.is_multiple_of(HUGE) {
            return Err(MemoryError::BadSize(size));
        }
        let pt_pages = size / HUGE;
        // One more page after the page tables: a page-middle directory for the direct-map
        // alias of the page tables (see `direct_map_entries`).
        let alloc_start = (PT_OFFSET + (pt_pages + 1) * PAGE).next_multiple_of(64 * 1024);
        Ok(PatchMemLayout {
            size,
            pt_pages,
            alloc_start,
        })
    }

    pub fn header_offset(&self) -> u64 {
        0
    }

    pub fn slot_offset(&self, slot: u32) -> u64 {
        PAGE + u64::from(slot) * REGISTRY_SLOT_SIZE as u64
    }

    pub fn pt_offset(&self, chunk: u64) -> u64 {
        PT_OFFSET + chunk * PAGE
    }

    /// The page for a direct-map page-middle directory, after the page tables.
    pub fn dm_offset(&self) -> u64 {
        PT_OFFSET + self.pt_pages * PAGE
    }
}

const _: () = assert!(PAGE + 2 * REGISTRY_SLOT_SIZE as u64 <= PT_OFFSET);
const _: () = assert!(HEADER_LEN as u64 <= PAGE);

/// Patch memory as placed in one guest: where it is physically and, once
/// mapped, virtually.
#[derive(Debug, Clone, Copy)]
pub struct PatchMem {
    pub layout: PatchMemLayout,
    pub gpa: u64,
    pub va_base: Option<u64>,
}

impl PatchMem {
    pub fn va(&self, offset: u64) -> Option<u64> {
        self.va_base.map(|b| b + offset)
    }

    pub fn pa(&self, offset: u64) -> GuestPhysAddr {
        GuestPhysAddr(self.gpa) + offset
    }
}

/// Page-directory entries lucos must install to map patch memory at
/// `va_base`: (entry guest-physical address, value).
pub fn pd_entries_for(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    pm: &PatchMem,
    va_base: u64,
) -> Result<Vec<(GuestPhysAddr, u64)>, MemoryError> {
    let mut out = Vec::new();
    for chunk in 0..pm.layout.pt_pages {
        let va = va_base + chunk * HUGE;
        let walk = paging::walk(mem, cr3, GuestVirtAddr(va))?;
        if walk.stopped_at() != Some(Level::Pd) {
            return Err(MemoryError::PdEntryInUse { va });
        }
        let pd = walk.entry(Level::Pd).expect("walk reached the PD");
        // The kernel's own flags for a page-table entry (_KERNPG_TABLE): with any other,
        // pmd_bad() holds and vmalloc_to_page() (text_poke(), e.g. for static keys) fails.
        let value = pm.pa(pm.layout.pt_offset(chunk)).raw() | PRESENT | RW | ACCESSED | DIRTY;
        out.push((pd.entry_pa, value));
    }
    Ok(out)
}

/// Entries that make lucos's page tables readable through the kernel's direct map
/// (`page_offset_base` + physical address), where the kernel's own page-table walkers
/// read page tables: `vmalloc_to_page()`, which `text_poke()` uses to rewrite code in
/// patch memory (static keys), reads each PTE there. Patch memory is a PCI BAR, which the
/// direct map leaves out; this maps the BAR's first 2 MiB (registry and page tables, no
/// code), read-write and not executable, as a 2 MiB page. Empty when already mapped.
pub fn direct_map_entries(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    pm: &PatchMem,
    page_offset_base: u64,
) -> Result<Vec<(GuestPhysAddr, u64)>, MemoryError> {
    let phys = pm.gpa;
    if !phys.is_multiple_of(HUGE) {
        return Err(MemoryError::Unaligned { gpa: phys });
    }
    let va = page_offset_base.wrapping_add(phys);
    let walk = paging::walk(mem, cr3, GuestVirtAddr(va))?;
    let large = phys | PRESENT | RW | ACCESSED | DIRTY | PS | GLOBAL | NX;
    let table = PRESENT | RW | ACCESSED | DIRTY;
    match walk.stopped_at() {
        None => Ok(Vec::new()),
        Some(Level::Pd) => {
            let pd = walk.entry(Level::Pd).expect("walk reached the PD");
            Ok(vec![(pd.entry_pa, large)])
        }
        Some(Level::Pdpt) => {
            let pud = walk.entry(Level::Pdpt).expect("walk reached the PDPT");
            let pmd = pm.pa(pm.layout.dm_offset());
            let idx = (va >> 21) & 511;
            Ok(vec![
                (pmd + 8 * idx, large),
                (pud.entry_pa, pmd.raw() | table),
            ])
        }
        // A top-level slot of its own (page_offset_base lies near the end of one) or a
        // 4 KiB table: an entry there would not reach every address space, or would be
        // the kernel's to manage.
        Some(level) => Err(MemoryError::DirectMapUnreachable { va, level }),
    }
}

/// Every kernel page-table entry that points into patch memory, whether or not a registry
/// records it: the page-directory entries of the kernel-image region that hang one of
/// lucos's page tables, and the direct-map entries of [`direct_map_entries`]. Only lucos
/// writes such entries (the kernel never maps the BAR), so these are what `lucos reset`
/// clears.
pub fn entries_into_patch_memory(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    pm: &PatchMem,
    page_offset_base: u64,
) -> Result<Vec<GuestPhysAddr>, MemoryError> {
    let tables = pm.pa(pm.layout.pt_offset(0)).raw()..pm.pa(pm.layout.dm_offset() + PAGE).raw();
    let mut out = Vec::new();
    let walk = paging::walk(mem, cr3, GuestVirtAddr(KERNEL_MAP_START))?;
    if let Some(pd) = walk.entry(Level::Pd) {
        let base = pd.entry_pa.align_down(PAGE);
        let mut page = vec![0u8; PAGE as usize];
        mem.read_phys(base, &mut page)?;
        for (i, e) in page.chunks(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if v & PRESENT != 0 && v & PS == 0 && tables.contains(&(v & paging::ADDR_MASK)) {
                out.push(base + 8 * i as u64);
            }
        }
    }
    let walk = paging::walk(
        mem,
        cr3,
        GuestVirtAddr(page_offset_base.wrapping_add(pm.gpa)),
    )?;
    for e in &walk.entries {
        let target = e.value & paging::ADDR_MASK;
        let ours = match e.level {
            Level::Pdpt => {
                e.present() && !e.is_leaf() && target == pm.pa(pm.layout.dm_offset()).raw()
            }
            Level::Pd => e.is_leaf() && target == pm.gpa,
            _ => false,
        };
        if ours {
            out.push(e.entry_pa);
        }
    }
    Ok(out)
}

/// Picks a 2 MiB-aligned virtual range for patch memory in the kernel-image
/// region, after the kernel (or before it), whose page-directory entries are
/// all not present; returns it with the entries to install.
pub fn choose_va_base(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    pm: &PatchMem,
    kernel_text: u64,
    kernel_end: u64,
) -> Result<(u64, Vec<(GuestPhysAddr, u64)>), MemoryError> {
    let size = pm.layout.size;
    let after = kernel_end.next_multiple_of(HUGE) + HUGE;
    let before = (kernel_text.saturating_sub(size + HUGE)) & !(HUGE - 1);
    let candidates = [
        (after + size <= KERNEL_MAP_END).then_some(after),
        (before >= KERNEL_MAP_START + HUGE).then_some(before),
    ];
    for base in candidates.into_iter().flatten() {
        if let Ok(entries) = pd_entries_for(mem, cr3, pm, base) {
            return Ok((base, entries));
        }
    }
    Err(MemoryError::NoVirtualRange {
        size_mib: size >> 20,
        text: kernel_text,
        end: kernel_end,
    })
}

/// Page-table entry for one page of patch memory with the permissions of
/// its kind: text read+execute, rodata read-only, data read+write, never
/// user-accessible, never writable and executable at once.
pub fn pte(pm: &PatchMem, offset: u64, kind: RegionKind) -> u64 {
    let base = pm.pa(offset).raw() | PRESENT | ACCESSED | DIRTY | GLOBAL;
    match kind {
        RegionKind::Text => base,
        RegionKind::Rodata => base | NX,
        RegionKind::Data => base | RW | NX,
    }
}

/// Guest-physical address of the PTE that maps patch-memory `offset`.
pub fn pte_pa(pm: &PatchMem, offset: u64) -> GuestPhysAddr {
    pm.pa(pm.layout.pt_offset(offset / HUGE)) + ((offset % HUGE) / PAGE) * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_consistent() {
        let l = PatchMemLayout::new(8 << 20).unwrap();
        assert_eq!(l.pt_pages, 4);
        assert!(l.alloc_start >= l.pt_offset(4));
        assert_eq!(l.alloc_start % PAGE, 0);
        assert!(l.slot_offset(1) + REGISTRY_SLOT_SIZE as u64 <= l.pt_offset(0));
        assert!(PatchMemLayout::new(3 << 20).is_err());
        assert!(PatchMemLayout::new(2 << 20).is_err());
    }

    /// A kernel image mapped with 2 MiB pages at `text..end`, as Linux does.
    fn kernel_at(text: u64, end: u64) -> (lucos_introspect::fake::FakeMem, u64) {
        use lucos_introspect::fake::FakeMem;
        use lucos_introspect::PageSize;
        let mut mem = FakeMem::new();
        let cr3 = mem.new_pml4();
        let mut va = text;
        while va < end {
            mem.map(cr3, va, 0x100_0000 + (va - text), PageSize::Size2M, 0);
            va += HUGE;
        }
        (mem, cr3)
    }

    fn pm(size: u64) -> PatchMem {
        PatchMem {
            layout: PatchMemLayout::new(size).unwrap(),
            gpa: 0xfe00_0000,
            va_base: None,
        }
    }

    #[test]
    fn range_goes_after_the_kernel_or_before_it_when_the_kernel_is_high() {
        let low = (0xffff_ffff_8100_0000, 0xffff_ffff_8240_0000);
        let (mem, cr3) = kernel_at(low.0, low.1);
        let (base, pd) = choose_va_base(&mem, cr3, &pm(16 << 20), low.0, low.1).unwrap();
        assert_eq!(
            base, 0xffff_ffff_8260_0000,
            "first 2 MiB boundary after _end, plus a guard"
        );
        assert_eq!(pd.len(), 8);
        // KASLR can put the kernel at the top of the region: no room after it.
        let high = (0xffff_ffff_be60_0000, 0xffff_ffff_bfa2_0000);
        let (mem, cr3) = kernel_at(high.0, high.1);
        let (base, _) = choose_va_base(&mem, cr3, &pm(16 << 20), high.0, high.1).unwrap();
        assert_eq!(base, 0xffff_ffff_bd40_0000, "below _text, with a guard");
        assert!(base + (16 << 20) < high.0);
        // Nothing fits: a clear error naming the size.
        let err = choose_va_base(&mem, cr3, &pm(1 << 30), high.0, high.1).unwrap_err();
        assert!(err.to_string().contains("1024 MiB"), "{err}");
    }

    #[test]
    fn ptes_never_writable_and_executable() {
        let pm = PatchMem {
            layout: PatchMemLayout::new(8 << 20).unwrap(),
            gpa: 0xfe00_0000,
            va_base: Some(0xffff_ffff_a000_0000),
        };
        let t = pte(&pm, 0x80000, RegionKind::Text);
        assert_eq!(t & !0xfff & !NX, 0xfe08_0000);
        assert!(t & RW == 0 && t & NX == 0);
        let r = pte(&pm, 0x80000, RegionKind::Rodata);
        assert!(r & RW == 0 && r & NX != 0);
        let d = pte(&pm, 0x80000, RegionKind::Data);
        assert!(d & RW != 0 && d & NX != 0);
        for e in [t, r, d] {
            assert_eq!(e & lucos_introspect::paging::US, 0, "never user-accessible");
        }
    }

    /// page_offset_base 1 GiB below the end of a top-level slot: patch memory's physical
    /// address (near 4 GiB) lands in the next slot, which the kernel never populated.
    #[test]
    fn direct_map_in_an_empty_top_level_slot_is_refused_by_name() {
        use lucos_introspect::PageSize;
        let (mut mem, cr3) = kernel_at(0xffff_ffff_8100_0000, 0xffff_ffff_8240_0000);
        let slot_end = 0xffff_8900_0000_0000u64;
        let pob = slot_end - (1 << 30);
        mem.map(cr3, pob, 0, PageSize::Size2M, PRESENT | RW);
        let err = direct_map_entries(&mem, cr3, &pm(16 << 20), pob).unwrap_err();
        assert!(
            matches!(err, MemoryError::DirectMapUnreachable { level: Level::Pml4, va } if va == pob + 0xfe00_0000),
            "{err}"
        );
        // Inside a populated slot, the PDPT entry gets a table of lucos's own.
        let low = slot_end - (512 << 30);
        mem.map(cr3, low, 0, PageSize::Size2M, PRESENT | RW);
        let entries = direct_map_entries(&mem, cr3, &pm(16 << 20), low).unwrap();
        assert_eq!(entries.len(), 2);
    }
}
