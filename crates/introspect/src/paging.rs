//! x86-64 4-level page-table walker.
//!
//! lucos resolves guest virtual addresses itself, from the paused vCPU's CR3,
//! so nothing depends on the (possibly compromised or wedged) guest kernel.
//! Everything works over any [`PhysMem`], so tests run on synthetic tables.

use std::fmt;

use serde::Serialize;

use crate::addr::{GuestPhysAddr, GuestVirtAddr};
use crate::machine::{Machine, MachineError, PhysMem};
use crate::regs::VcpuRegs;

/// Page-table entry bits, public so the patcher can build entries.
pub const PRESENT: u64 = 1 << 0;
pub const RW: u64 = 1 << 1;
pub const US: u64 = 1 << 2;
pub const PWT: u64 = 1 << 3;
pub const PCD: u64 = 1 << 4;
pub const ACCESSED: u64 = 1 << 5;
pub const DIRTY: u64 = 1 << 6;
/// Page size: the entry maps a 2 MiB (PD) or 1 GiB (PDPT) page.
pub const PS: u64 = 1 << 7;
pub const GLOBAL: u64 = 1 << 8;
pub const NX: u64 = 1 << 63;
/// Physical-address bits 12..51 of CR3, a table pointer or a 4 KiB leaf.
/// Masks off PCID/flags below and NX, protection keys and LAM bits above.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const EFER_LMA: u64 = 1 << 10;

/// A level of the 4-level hierarchy, outermost first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Level {
    Pml4,
    Pdpt,
    Pd,
    Pt,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];

    /// Bit position of the VA field that indexes this level's table.
    pub fn shift(self) -> u32 {
        match self {
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    /// Index of `va`'s entry in a table of this level (0..512).
    pub fn index(self, va: u64) -> usize {
        ((va >> self.shift()) & 0x1ff) as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// Mask of the frame address in a leaf of this size. Large leaves keep
    /// PAT in bit 12, so their frame starts higher up.
    pub fn frame_mask(self) -> u64 {
        ADDR_MASK & !(self.bytes() - 1)
    }
}

/// A resolved virtual address with the permissions in force for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Translation {
    pub va: GuestVirtAddr,
    pub pa: GuestPhysAddr,
    pub page_size: PageSize,
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level.
    pub user: bool,
    /// NX set at any level (bit 63 is taken as NX: 64-bit Linux runs with EFER.NXE).
    pub nx: bool,
    /// G bit of the leaf entry.
    pub global: bool,
}

impl Translation {
    /// Physical address of the first byte of the page containing `va`.
    pub fn page_pa(&self) -> GuestPhysAddr {
        self.pa.align_down(self.page_size.bytes())
    }

    /// Bytes from `va` to the end of its page.
    pub fn bytes_left_in_page(&self) -> u64 {
        self.page_size.bytes() - (self.va.raw() & (self.page_size.bytes() - 1))
    }
}

/// One entry read during a walk: where it lives and what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WalkEntry {
    pub level: Level,
    /// Guest physical address of the 8-byte entry (edit it to change the mapping).
    pub entry_pa: GuestPhysAddr,
    pub value: u64,
}

impl WalkEntry {
    pub fn present(&self) -> bool {
        self.value & PRESENT != 0
    }

    /// Whether the walk ends here with a page (PT entry or PS at PD/PDPT).
    pub fn is_leaf(&self) -> bool {
        self.present() && (self.level == Level::Pt || self.value & PS != 0)
    }

    /// Physical address of the next table (or the frame of a 4 KiB leaf).
    pub fn table_pa(&self) -> GuestPhysAddr {
        GuestPhysAddr(self.value & ADDR_MASK)
    }
}

/// Every entry a walk read, down to the leaf or the first not-present one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Walk {
    pub va: GuestVirtAddr,
    pub entries: Vec<WalkEntry>,
    /// `None` when the last entry in `entries` is not present.
    pub translation: Option<Translation>,
}

impl Walk {
    pub fn entry(&self, level: Level) -> Option<&WalkEntry> {
        self.entries.iter().find(|e| e.level == level)
    }

    /// Level of the not-present entry that stopped the walk, if any.
    pub fn stopped_at(&self) -> Option<Level> {
        match self.translation {
            Some(_) => None,
            None => self.entries.last().map(|e| e.level),
        }
    }
}

/// Piece of a virtual range that is physically contiguous (never crosses a page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PhysChunk {
    pub va: GuestVirtAddr,
    pub pa: GuestPhysAddr,
    pub len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    #[error("virtual address {va:#x} is not canonical (bits 63..47 must all equal bit 47); check the address")]
    NonCanonical { va: u64 },
    #[error("virtual address {va:#x} is not mapped: its {level} entry is not present")]
    NotMapped { va: u64, level: Level },
    #[error("the {level} entry {value:#x} for {va:#x} has a reserved bit (PS) set; CR3 is probably wrong")]
    ReservedBit { va: u64, level: Level, value: u64 },
    #[error("cannot read the {level} entry at guest physical {entry_pa:#x} while walking {va:#x}; CR3 is probably wrong")]
    TableRead {
        va: u64,
        level: Level,
        entry_pa: u64,
        #[source]
        source: MachineError,
    },
    #[error("cannot read guest physical {pa:#x} (virtual {va:#x})")]
    DataRead {
        va: u64,
        pa: u64,
        #[source]
        source: MachineError,
    },
    #[error("cannot write guest physical {pa:#x} (virtual {va:#x})")]
    DataWrite {
        va: u64,
        pa: u64,
        #[source]
        source: MachineError,
    },
    #[error("virtual range {va:#x}+{len:#x} wraps around the end of the address space")]
    RangeOverflow { va: u64, len: u64 },
    #[error("paging is off (CR0.PG clear): the vCPU is not running the kernel yet; retry once the guest has booted")]
    PagingDisabled,
    #[error("the vCPU is not in 64-bit long mode (CR4.PAE={pae}, EFER.LMA={lma}); lucos only handles x86-64 kernels, retry once the guest has booted")]
    NotLongMode { pae: bool, lma: bool },
    #[error("the guest uses 5-level paging (CR4.LA57), which lucos does not walk; boot the guest with `no5lvl` or a CPU model without la57")]
    FiveLevelPaging,
}

/// Refuses vCPU states this walker cannot handle: no paging, legacy or
/// PAE-only modes, and LA57 (where CR3 points at a PML5, not a PML4).
pub fn check_paging_mode(regs: &VcpuRegs) -> Result<(), PagingError> {
    if regs.cr0 & CR0_PG == 0 {
        return Err(PagingError::PagingDisabled);
    }
    let pae = regs.cr4 & CR4_PAE != 0;
    let lma = regs.efer & EFER_LMA != 0;
    if !pae || !lma {
        return Err(PagingError::NotLongMode { pae, lma });
    }
    if regs.cr4 & CR4_LA57 != 0 {
        return Err(PagingError::FiveLevelPaging);
    }
    Ok(())
}

/// Whether bits 63..47 of `va` are all equal (48-bit canonical form).
pub fn is_canonical(va: GuestVirtAddr) -> bool {
    let top = va.raw() >> 47;
    top == 0 || top == 0x1_ffff
}

/// Walks `va` through the tables at `cr3`, recording every entry read.
/// A not-present entry is not an error here: the caller gets the entries
/// (and so the address where a new one must be written).
pub fn walk(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    va: GuestVirtAddr,
) -> Result<Walk, PagingError> {
    if !is_canonical(va) {
        return Err(PagingError::NonCanonical { va: va.raw() });
    }
    let mut table = GuestPhysAddr(cr3 & ADDR_MASK);
    let mut entries = Vec::with_capacity(4);
    let (mut writable, mut user, mut nx) = (true, true, false);
    for level in Level::ALL {
        let entry_pa = table + 8 * level.index(va.raw()) as u64;
        let value = mem
            .read_u64(entry_pa)
            .map_err(|source| PagingError::TableRead {
                va: va.raw(),
                level,
                entry_pa: entry_pa.raw(),
                source,
            })?;
        entries.push(WalkEntry {
            level,
            entry_pa,
            value,
        });
        if value & PRESENT == 0 {
            return Ok(Walk {
                va,
                entries,
                translation: None,
            });
        }
        writable &= value & RW != 0;
        user &= value & US != 0;
        nx |= value & NX != 0;
        let size = match level {
            Level::Pml4 if value & PS != 0 => {
                return Err(PagingError::ReservedBit {
                    va: va.raw(),
                    level,
                    value,
                })
            }
            Level::Pdpt if value & PS != 0 => PageSize::Size1G,
            Level::Pd if value & PS != 0 => PageSize::Size2M,
            Level::Pt => PageSize::Size4K,
            _ => {
                table = GuestPhysAddr(value & ADDR_MASK);
                continue;
            }
        };
        let translation = Translation {
            va,
            pa: GuestPhysAddr((value & size.frame_mask()) | (va.raw() & (size.bytes() - 1))),
            page_size: size,
            writable,
            user,
            nx,
            global: value & GLOBAL != 0,
        };
        return Ok(Walk {
            va,
            entries,
            translation: Some(translation),
        });
    }
    unreachable!("a walk always ends at the PT level")
}

/// Translates `va`, failing with the level whose entry is not present.
pub fn translate(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    va: GuestVirtAddr,
) -> Result<Translation, PagingError> {
    let w = walk(mem, cr3, va)?;
    match w.translation {
        Some(t) => Ok(t),
        None => Err(PagingError::NotMapped {
            va: va.raw(),
            level: w.stopped_at().unwrap_or(Level::Pml4),
        }),
    }
}

/// Splits `[va, va+len)` into physically contiguous chunks, one per page
/// touched. Fails before returning anything if any byte is unmapped, so a
/// writer never applies half a write.
pub fn virt_to_phys_ranges(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    va: GuestVirtAddr,
    len: usize,
) -> Result<Vec<PhysChunk>, PagingError> {
    if len > 0 && va.checked_add(len as u64 - 1).is_none() {
        return Err(PagingError::RangeOverflow {
            va: va.raw(),
            len: len as u64,
        });
    }
    let mut chunks = Vec::new();
    let mut done = 0usize;
    while done < len {
        let cur = va + done as u64;
        let t = translate(mem, cr3, cur)?;
        let n = (len - done).min(t.bytes_left_in_page() as usize);
        chunks.push(PhysChunk {
            va: cur,
            pa: t.pa,
            len: n,
        });
        done += n;
    }
    Ok(chunks)
}

/// Reads guest virtual memory, following the mapping page by page.
pub fn read_virt(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    va: GuestVirtAddr,
    buf: &mut [u8],
) -> Result<(), PagingError> {
    let mut off = 0;
    for c in virt_to_phys_ranges(mem, cr3, va, buf.len())? {
        mem.read_phys(c.pa, &mut buf[off..off + c.len])
            .map_err(|source| PagingError::DataRead {
                va: c.va.raw(),
                pa: c.pa.raw(),
                source,
            })?;
        off += c.len;
    }
    Ok(())
}

/// Reads a little-endian u64 at a guest virtual address.
pub fn read_virt_u64(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    va: GuestVirtAddr,
) -> Result<u64, PagingError> {
    let mut b = [0u8; 8];
    read_virt(mem, cr3, va, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Writes guest virtual memory through the machine's coherent writes,
/// ignoring page protections (the VMM writes physical memory). The whole
/// range is resolved first; nothing is written if any page is unmapped.
pub fn write_virt(
    machine: &mut (impl Machine + ?Sized),
    cr3: u64,
    va: GuestVirtAddr,
    data: &[u8],
) -> Result<(), PagingError> {
    let chunks = virt_to_phys_ranges(&*machine, cr3, va, data.len())?;
    let mut off = 0;
    for c in chunks {
        machine
            .write_phys(c.pa, &data[off..off + c.len])
            .map_err(|source| PagingError::DataWrite {
                va: c.va.raw(),
                pa: c.pa.raw(),
                source,
            })?;
        off += c.len;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
