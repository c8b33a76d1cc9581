//! An in-memory guest for tests: sparse physical memory with a page-table
//! builder, and a [`Machine`] over it. Public so other crates' tests can
//! exercise patching logic without a VM. Builder methods panic on misuse.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;

use crate::addr::GuestPhysAddr;
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
            let entry = self
                .read_u64(GuestPhysAddr(entry_pa))
                .expect("table page is backed");
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
    fn read_phys(&self, pa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MachineError> {
        let len = buf.len() as u64;
        let unbacked = || MachineError::Unbacked {
            addr: pa.raw(),
            len,
        };
        let mut off = 0;
        while off < buf.len() {
            let cur = pa.raw().checked_add(off as u64).ok_or_else(unbacked)?;
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
/// and every write is logged so tests can check what a patcher did. Like a real VM
/// for lucos, it refuses register reads and code writes while running: registers are
/// only meaningful from a stopped vCPU, and code must be written with the VM stopped
/// (QEMU's gdbstub). Data writes and reads work either way.
#[derive(Debug, Clone)]
pub struct FakeMachine {
    pub mem: FakeMem,
    pub regs: Vec<VcpuRegs>,
    pub idt_bases: Vec<u64>,
    pub paused: bool,
    /// (pa, data) of every write, code or data, in order.
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

impl FakeMachine {
    fn check_paused(&self) -> Result<(), MachineError> {
        if self.paused {
            Ok(())
        } else {
            Err(MachineError::NotPaused)
        }
    }

    fn store(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        // Like real RAM: only backed memory can be written.
        let mut probe = vec![0u8; data.len()];
        self.mem.read_phys(pa, &mut probe)?;
        self.mem.write(pa.raw(), data);
        self.writes.push((pa.raw(), data.to_vec()));
        Ok(())
    }
}

impl PhysMem for FakeMachine {
    fn read_phys(&self, pa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MachineError> {
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
        self.check_paused()?;
        self.regs
            .get(idx)
            .cloned()
            .ok_or(MachineError::NoSuchVcpu(idx))
    }

    fn idt_base(&mut self, idx: usize) -> Result<u64, MachineError> {
        self.check_paused()?;
        self.idt_bases
            .get(idx)
            .copied()
            .ok_or(MachineError::NoSuchVcpu(idx))
    }

    fn write_phys(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        self.check_paused()?;
        self.store(pa, data)
    }

    fn write_phys_data(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        self.store(pa, data)
    }
}

/// A call of [`Machine`] that a [`Failing`] machine can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Pause,
    Resume,
    IsPaused,
    /// `vcpu_regs` and `vcpu_rip`.
    Registers,
    /// `write_phys`: coherent (code) writes.
    CodeWrite,
    /// `write_phys_data`.
    DataWrite,
    /// Writes of either kind, counted together.
    Write,
}

const CALLS: usize = 7;

/// How a chosen call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails without reaching the machine beneath.
    Refused,
    /// Reaches the machine beneath, then reports failure: a reply lost after the VM acted.
    ReplyLost,
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    call: Call,
    nth: usize,
    and_later: bool,
    fault: Fault,
}

/// A failing read: the `nth` read overlapping `range` (counted from 1 per rule).
#[derive(Debug)]
struct ReadRule {
    range: Range<u64>,
    nth: usize,
    seen: Cell<usize>,
}

/// A [`Machine`] that passes every call to another and makes chosen ones fail: a VM that
/// goes away, a reply lost, a lucos killed at some write, a read of some memory refused.
/// Calls are counted per [`Call`] from 1; a rule with `nth` 0 never fires (handy in
/// tables of cases). Reads are chosen by the memory they touch instead: which read of
/// patch memory is the n-th overall depends on page walks the test should not know about.
pub struct Failing<'a, M: Machine + ?Sized> {
    inner: &'a mut M,
    rules: Vec<Rule>,
    counts: [usize; CALLS],
    /// Reads take `&self`, so their rules count through cells.
    reads: Vec<ReadRule>,
}

impl<'a, M: Machine + ?Sized> Failing<'a, M> {
    pub fn new(inner: &'a mut M) -> Self {
        Failing {
            inner,
            rules: Vec::new(),
            counts: [0; CALLS],
            reads: Vec::new(),
        }
    }

    /// The `nth` `read_phys` that overlaps guest-physical `range` fails (nothing is read).
    pub fn fail_read(mut self, range: Range<u64>, nth: usize) -> Self {
        self.reads.push(ReadRule {
            range,
            nth,
            seen: Cell::new(0),
        });
        self
    }

    /// How many reads overlapping the range of read rule `i` (in the order added) were
    /// made so far, the failed one included.
    pub fn reads_seen(&self, i: usize) -> usize {
        self.reads[i].seen.get()
    }

    fn rule(mut self, call: Call, nth: usize, and_later: bool, fault: Fault) -> Self {
        self.rules.push(Rule {
            call,
            nth,
            and_later,
            fault,
        });
        self
    }

    /// The `nth` call of `call` fails without effect.
    pub fn fail(self, call: Call, nth: usize) -> Self {
        self.rule(call, nth, false, Fault::Refused)
    }

    /// The `nth` call of `call` and every later one fail without effect: a lucos killed
    /// there, whose later writes (its own rollback included) never reach the guest.
    pub fn fail_from(self, call: Call, nth: usize) -> Self {
        self.rule(call, nth, true, Fault::Refused)
    }

    /// The `nth` call of `call` takes effect but reports failure.
    pub fn lose_reply(self, call: Call, nth: usize) -> Self {
        self.rule(call, nth, false, Fault::ReplyLost)
    }

    /// How many calls of `call` were made so far.
    pub fn count(&self, call: Call) -> usize {
        self.counts[call as usize]
    }

    /// Counts a call of each of `calls` and returns the fault it gets, if any.
    fn hit(&mut self, calls: &[Call]) -> Option<(Fault, String)> {
        for &c in calls {
            self.counts[c as usize] += 1;
        }
        self.rules.iter().find_map(|r| {
            let n = self.counts[r.call as usize];
            let fires =
                calls.contains(&r.call) && r.nth > 0 && (n == r.nth || (r.and_later && n > r.nth));
            fires.then(|| {
                (
                    r.fault,
                    format!("injected failure of {:?} call {n}", r.call),
                )
            })
        })
    }

    fn run<T>(
        &mut self,
        calls: &[Call],
        f: impl FnOnce(&mut M) -> Result<T, MachineError>,
    ) -> Result<T, MachineError> {
        match self.hit(calls) {
            None => f(self.inner),
            Some((Fault::Refused, why)) => Err(MachineError::Engine(why.into())),
            Some((Fault::ReplyLost, why)) => {
                f(self.inner)?;
                Err(MachineError::Engine(why.into()))
            }
        }
    }
}

impl<M: Machine + ?Sized> PhysMem for Failing<'_, M> {
    fn read_phys(&self, pa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MachineError> {
        let (start, end) = (pa.raw(), pa.raw().saturating_add(buf.len() as u64));
        let mut fired = None;
        for r in &self.reads {
            if start < r.range.end && r.range.start < end {
                let n = r.seen.get() + 1;
                r.seen.set(n);
                if r.nth > 0 && n == r.nth && fired.is_none() {
                    fired = Some(format!("injected failure of read {n} of {:#x?}", r.range));
                }
            }
        }
        match fired {
            Some(why) => Err(MachineError::Engine(why.into())),
            None => self.inner.read_phys(pa, buf),
        }
    }
}

impl<M: Machine + ?Sized> Machine for Failing<'_, M> {
    fn vcpu_count(&self) -> usize {
        self.inner.vcpu_count()
    }

    fn pause(&mut self) -> Result<(), MachineError> {
        self.run(&[Call::Pause], |m| m.pause())
    }

    fn resume(&mut self) -> Result<(), MachineError> {
        self.run(&[Call::Resume], |m| m.resume())
    }

    fn is_paused(&mut self) -> Result<bool, MachineError> {
        self.run(&[Call::IsPaused], |m| m.is_paused())
    }

    fn vcpu_regs(&mut self, idx: usize) -> Result<VcpuRegs, MachineError> {
        self.run(&[Call::Registers], |m| m.vcpu_regs(idx))
    }

    fn vcpu_rip(&mut self, idx: usize) -> Result<u64, MachineError> {
        self.run(&[Call::Registers], |m| m.vcpu_rip(idx))
    }

    fn idt_base(&mut self, idx: usize) -> Result<u64, MachineError> {
        self.inner.idt_base(idx)
    }

    fn write_phys(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        self.run(&[Call::CodeWrite, Call::Write], |m| m.write_phys(pa, data))
    }

    fn write_phys_data(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        self.run(&[Call::DataWrite, Call::Write], |m| {
            m.write_phys_data(pa, data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> FakeMachine {
        let mut mem = FakeMem::new();
        mem.write(0x1000, &[0; 16]);
        FakeMachine::new(mem, 1)
    }

    #[test]
    fn a_running_fake_refuses_register_reads_and_code_writes() {
        let mut m = machine();
        m.resume().unwrap();
        assert!(matches!(m.vcpu_regs(0), Err(MachineError::NotPaused)));
        assert!(matches!(m.vcpu_rip(0), Err(MachineError::NotPaused)));
        assert!(matches!(m.idt_base(0), Err(MachineError::NotPaused)));
        assert!(matches!(
            m.write_phys(GuestPhysAddr(0x1000), &[1]),
            Err(MachineError::NotPaused)
        ));
        m.write_phys_data(GuestPhysAddr(0x1000), &[2]).unwrap();
        m.pause().unwrap();
        m.write_phys(GuestPhysAddr(0x1001), &[3]).unwrap();
        assert_eq!(m.vcpu_rip(0).unwrap(), 0);
        let mut b = [0u8; 2];
        m.read_phys(GuestPhysAddr(0x1000), &mut b).unwrap();
        assert_eq!(b, [2, 3]);
    }

    #[test]
    fn failing_fires_on_the_chosen_calls_only() {
        let mut m = machine();
        {
            let mut f = Failing::new(&mut m)
                .fail(Call::CodeWrite, 2)
                .fail_from(Call::DataWrite, 2)
                .lose_reply(Call::Resume, 1)
                .fail(Call::Pause, 0);
            f.write_phys(GuestPhysAddr(0x1000), &[1]).unwrap();
            assert!(f.write_phys(GuestPhysAddr(0x1001), &[2]).is_err());
            f.write_phys(GuestPhysAddr(0x1002), &[3]).unwrap();
            f.write_phys_data(GuestPhysAddr(0x1003), &[4]).unwrap();
            assert!(f.write_phys_data(GuestPhysAddr(0x1004), &[5]).is_err());
            assert!(f.write_phys_data(GuestPhysAddr(0x1005), &[6]).is_err());
            assert!(f.resume().is_err(), "the reply was lost");
            assert!(!f.is_paused().unwrap(), "but the resume happened");
            f.pause().unwrap();
            assert_eq!(f.count(Call::Write), 6);
            assert_eq!(f.count(Call::CodeWrite), 3);
        }
        let mut b = [0u8; 6];
        m.read_phys(GuestPhysAddr(0x1000), &mut b).unwrap();
        assert_eq!(b, [1, 0, 3, 4, 0, 0]);
    }

    #[test]
    fn failing_reads_fire_on_the_nth_read_of_their_range_only() {
        let mut m = machine();
        m.write_phys(GuestPhysAddr(0x1000), &[7; 16]).unwrap();
        let f = Failing::new(&mut m)
            .fail_read(0x1008..0x1010, 2)
            .fail_read(0x1000..0x1001, 0);
        let mut b = [0u8; 4];
        // Outside both ranges: counted by neither rule.
        f.read_phys(GuestPhysAddr(0x1002), &mut b).unwrap();
        f.read_phys(GuestPhysAddr(0x1006), &mut b).unwrap();
        assert_eq!(f.reads_seen(0), 1, "0x1006..0x100a overlaps 0x1008..");
        b = [0; 4];
        assert!(f.read_phys(GuestPhysAddr(0x100c), &mut b).is_err());
        assert_eq!(b, [0; 4], "a failed read reads nothing");
        f.read_phys(GuestPhysAddr(0x100c), &mut b).unwrap();
        assert_eq!(b, [7; 4], "only the nth read fails");
        f.read_phys(GuestPhysAddr(0x1000), &mut b).unwrap();
        assert_eq!((f.reads_seen(0), f.reads_seen(1)), (3, 1));
    }
}
