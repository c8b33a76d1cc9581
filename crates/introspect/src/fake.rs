//! An in-memory guest for tests: sparse physical memory with a page-table
//! builder, and a [`Machine`] over it. Public so other crates' tests can
//! exercise patching logic without a VM. Builder methods panic on misuse.

use std::collections::HashMap;

use crate::machine::{Machine, MachineError, PhysMem};
use crate::paging::{Level, PageSize, ADDR_MASK, PRESENT, PS, RW, US};
use crate::regs::VcpuRegs;

const PAGE: u64 = 4096;

/// Sparse guest physical memory, backed 4 KiB at a time. Reads of pages
/// never written or allocated fail like unbacked guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMem {
    pages: HashMap<u64, Box<[u8]>>,
    next_table: u64,
}

impl Default for FakeMem {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeMem {
    /// Empty memory; page tables are allocated upward from 1 MiB.
    pub fn new() -> Self {
        FakeMem {
            pages: HashMap::new(),
            next_table: 0x10_0000,
        }
    }

    fn page_mut(&mut self, pa: u64) -> &mut [u8] {
        self.pages
            .entry(pa & !(PAGE - 1))
            .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice())
    }

    /// Writes bytes, backing any page touched.
    pub fn write(&mut self, pa: u64, data: &[u8]) {
        let mut off = 0;
        while off < data.len() {
            let cur = pa + off as u64;
            let in_page = (cur % PAGE) as usize;
            let n = (data.len() - off).min(PAGE as usize - in_page);
            self.page_mut(cur)[in_page..in_page + n].copy_from_slice(&data[off..off + n]);
            off += n;
        }
    }

    pub fn write_u64(&mut self, pa: u64, v: u64) {
        self.write(pa, &v.to_le_bytes());
    }

    /// A fresh zeroed page from the table allocator.
    pub fn alloc_page(&mut self) -> u64 {
        let pa = self.next_table;
        self.next_table += PAGE;
        self.page_mut(pa);
        pa
    }

    /// An empty PML4; its address is a valid CR3.
    pub fn new_pml4(&mut self) -> u64 {
        self.alloc_page()
    }

    /// Maps `va` to `pa` with a leaf of `size`; intermediate tables get
    /// PRESENT|RW|US so the leaf flags decide the permissions.
    pub fn map(&mut self, cr3: u64, va: u64, pa: u64, size: PageSize, leaf_flags: u64) {
        self.map_with(cr3, va, pa, size, leaf_flags, PRESENT | RW | US);
    }

    /// Like [`FakeMem::map`], with explicit flags for tables it creates
    /// (existing tables are reused unchanged).
    pub fn map_with(
        &mut self,
        cr3: u64,
        va: u64,
        pa: u64,
        size: PageSize,
        leaf_flags: u64,
        table_flags: u64,
    ) {
        assert_eq!(va % size.bytes(), 0, "va {va:#x} not aligned to {size:?}");
        assert_eq!(pa % size.bytes(), 0, "pa {pa:#x} not aligned to {size:?}");
        let leaf_level = match size {
            PageSize::Size4K => Level::Pt,
            PageSize::Size2M => Level::Pd,
            PageSize::Size1G => Level::Pdpt,
        };
        let mut table = cr3 & ADDR_MASK;
        for level in Level::ALL {
            let entry_pa = table + 8 * level.index(va) as u64;
            if level == leaf_level {
                let ps = if level == Level::Pt { 0 } else { PS };
                self.write_u64(entry_pa, pa | leaf_flags | ps);
                return;
            }
            let entry = self.read_u64(entry_pa).expect("table page is backed");
            if entry & PRESENT != 0 {
                assert_eq!(entry & PS, 0, "{va:#x}: {level} already maps a large page");
                table = entry & ADDR_MASK;
            } else {
                let new = self.alloc_page();
                self.write_u64(entry_pa, new | table_flags);
                table = new;
            }
        }
    }
}

impl PhysMem for FakeMem {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let len = buf.len() as u64;
        let unbacked = || MachineError::Unbacked { addr: pa, len };
        let mut off = 0;
        while off < buf.len() {
            let cur = pa.checked_add(off as u64).ok_or_else(unbacked)?;
            let in_page = (cur % PAGE) as usize;
            let n = (buf.len() - off).min(PAGE as usize - in_page);
            let page = self
                .pages
                .get(&(cur - in_page as u64))
                .ok_or_else(unbacked)?;
            buf[off..off + n].copy_from_slice(&page[in_page..in_page + n]);
            off += n;
        }
        Ok(())
    }
}

/// A [`Machine`] over [`FakeMem`]: registers and IDT bases are plain fields,
/// and every write is logged so tests can check what a patcher did.
#[derive(Debug, Clone)]
pub struct FakeMachine {
    pub mem: FakeMem,
    pub regs: Vec<VcpuRegs>,
    pub idt_bases: Vec<u64>,
    pub paused: bool,
    /// (pa, data) of every `write_phys`, in order.
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl FakeMachine {
    /// `vcpus` vCPUs with default registers and IDT base 0; starts paused.
    pub fn new(mem: FakeMem, vcpus: usize) -> Self {
        FakeMachine {
            mem,
            regs: vec![VcpuRegs::default(); vcpus],
            idt_bases: vec![0; vcpus],
            paused: true,
            writes: Vec::new(),
        }
    }
}

impl PhysMem for FakeMachine {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        self.mem.read_phys(pa, buf)
    }
}

impl Machine for FakeMachine {
    fn vcpu_count(&self) -> usize {
        self.regs.len()
    }

    fn pause(&mut self) -> Result<(), MachineError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MachineError> {
        self.paused = false;
        Ok(())
    }

    fn is_paused(&mut self) -> Result<bool, MachineError> {
        Ok(self.paused)
    }

    fn vcpu_regs(&mut self, idx: usize) -> Result<VcpuRegs, MachineError> {
        self.regs
            .get(idx)
            .cloned()
            .ok_or(MachineError::NoSuchVcpu(idx))
    }

    fn idt_base(&mut self, idx: usize) -> Result<u64, MachineError> {
        self.idt_bases
            .get(idx)
            .copied()
            .ok_or(MachineError::NoSuchVcpu(idx))
    }

    fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), MachineError> {
        // Like real RAM: only backed memory can be written.
        let mut probe = vec![0u8; data.len()];
        self.mem.read_phys(pa, &mut probe)?;
        self.mem.write(pa, data);
        self.writes.push((pa, data.to_vec()));
        Ok(())
    }
}
