//! The guest's tasks, read from outside: every thread reachable from `init_task`, the idle
//! task of each CPU, and which task each CPU runs now. Layouts come from the running
//! kernel's BTF; the walk is bounded and every pointer goes through the page tables, so a
//! list changing under a running guest gives an error, never a hang (pause around it).

use serde::Serialize;

use crate::addr::GuestVirtAddr;
use crate::btf::{Btf, BtfError};
use crate::kaslr::KernelLayout;
use crate::machine::PhysMem;
use crate::paging::{read_virt, PagingError};
use crate::symbols::KernelSymbols;

/// More threads than the walk accepts: a longer list is corrupt or changing.
const MAX_TASKS: usize = 1 << 16;
const COMM_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("the kernel's task layout: {0}")]
    Layout(#[from] BtfError),
    #[error("reading task memory at {va:#x}: {source}")]
    Read {
        va: u64,
        #[source]
        source: PagingError,
    },
    #[error("the task list does not end after {MAX_TASKS} entries (pause the VM: it is changing or corrupt)")]
    TooMany,
    #[error("vmlinux has no `{0}`; lucos needs it to find the guest's tasks")]
    NoSymbol(&'static str),
}

/// Member offsets of `task_struct` and its neighbours (Linux 6.1 names).
#[derive(Debug, Clone, Copy)]
pub struct TaskOffsets {
    tasks: u64,
    pid: u64,
    tgid: u64,
    comm: u64,
    state: u64,
    stack: u64,
    thread_sp: u64,
    on_cpu: u64,
    cpu: u64,
    signal: u64,
    thread_node: u64,
    thread_head: u64,
    rq_idle: u64,
}

impl TaskOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let t = |p: &str| btf.offset_of("task_struct", p);
        Ok(TaskOffsets {
            tasks: t("tasks")?,
            pid: t("pid")?,
            tgid: t("tgid")?,
            comm: t("comm")?,
            state: t("__state")?,
            stack: t("stack")?,
            thread_sp: t("thread.sp")?,
            on_cpu: t("on_cpu")?,
            cpu: t("thread_info.cpu")?,
            signal: t("signal")?,
            thread_node: t("thread_node")?,
            thread_head: btf.offset_of("signal_struct", "thread_head")?,
            rq_idle: btf.offset_of("rq", "idle")?,
        })
    }
}

/// One guest thread as its `task_struct` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    /// Address of its `task_struct`.
    pub addr: u64,
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    /// `__state` (0 running, 1 interruptible, 2 uninterruptible, ...).
    pub state: u32,
    /// Base of its kernel stack.
    pub stack: u64,
    /// Stack pointer saved at its last switch out (stale while it runs).
    pub saved_sp: u64,
    pub on_cpu: bool,
    pub cpu: u32,
}

impl Task {
    /// The letter `ps` shows for its state.
    pub fn state_letter(&self) -> char {
        match self.state {
            0 => 'R',
            s if s & 0x402 == 0x402 => 'I',
            s if s & 1 != 0 => 'S',
            s if s & 2 != 0 => 'D',
            s if s & 4 != 0 => 'T',
            s if s & 8 != 0 => 't',
            _ => '?',
        }
    }
}

/// Per-CPU facts the unwinder needs: the running task and the IRQ stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuTasks {
    pub cpu: usize,
    /// `current_task`.
    pub current: u64,
    /// `__per_cpu_offset[cpu]`: equals GS base while the CPU is in the kernel.
    pub percpu_offset: u64,
    /// Top of the hardirq stack (`hardirq_stack_ptr` + 8).
    pub irq_stack_top: u64,
}

pub(crate) struct Reader<'a, P: PhysMem + ?Sized> {
    pub mem: &'a P,
    pub cr3: u64,
}

impl<P: PhysMem + ?Sized> Reader<'_, P> {
    pub fn bytes(&self, va: u64, buf: &mut [u8]) -> Result<(), TaskError> {
        read_virt(self.mem, self.cr3, GuestVirtAddr(va), buf)
            .map_err(|source| TaskError::Read { va, source })
    }
    pub fn u64(&self, va: u64) -> Result<u64, TaskError> {
        let mut b = [0u8; 8];
        self.bytes(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    pub fn u32(&self, va: u64) -> Result<u32, TaskError> {
        let mut b = [0u8; 4];
        self.bytes(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

fn sym(syms: &KernelSymbols, name: &'static str) -> Result<u64, TaskError> {
    syms.lookup(name)
        .map(|s| s.addr)
        .map_err(|_| TaskError::NoSymbol(name))
}

/// Each CPU's running task and IRQ stack, for `ncpus` CPUs.
pub fn cpus(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    layout: &KernelLayout,
    ncpus: usize,
) -> Result<Vec<CpuTasks>, TaskError> {
    let r = Reader {
        mem,
        cr3: layout.cr3,
    };
    let offsets = layout.live(sym(syms, "__per_cpu_offset")?);
    let (current, irq) = (sym(syms, "current_task")?, sym(syms, "hardirq_stack_ptr")?);
    (0..ncpus)
        .map(|cpu| {
            let off = r.u64(offsets + 8 * cpu as u64)?;
            Ok(CpuTasks {
                cpu,
                current: r.u64(current.wrapping_add(off))?,
                percpu_offset: off,
                irq_stack_top: r.u64(irq.wrapping_add(off))?.wrapping_add(8),
            })
        })
        .collect()
}

fn read_task<P: PhysMem + ?Sized>(
    r: &Reader<'_, P>,
    addr: u64,
    o: &TaskOffsets,
) -> Result<Task, TaskError> {
    let mut comm = [0u8; COMM_LEN];
    r.bytes(addr + o.comm, &mut comm)?;
    let end = comm.iter().position(|&c| c == 0).unwrap_or(COMM_LEN);
    Ok(Task {
        addr,
        pid: r.u32(addr + o.pid)? as i32,
        tgid: r.u32(addr + o.tgid)? as i32,
        comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        state: r.u32(addr + o.state)?,
        stack: r.u64(addr + o.stack)?,
        saved_sp: r.u64(addr + o.thread_sp)?,
        on_cpu: r.u32(addr + o.on_cpu)? != 0,
        cpu: r.u32(addr + o.cpu)?,
    })
}

/// Addresses on the circular list headed at `head`, whose nodes sit `link` bytes into
/// their structs, without the head itself.
fn list<P: PhysMem + ?Sized>(
    r: &Reader<'_, P>,
    head: u64,
    link: u64,
    seen: &mut usize,
) -> Result<Vec<u64>, TaskError> {
    let mut out = Vec::new();
    let mut node = r.u64(head)?;
    while node != head {
        *seen += 1;
        if *seen > MAX_TASKS {
            return Err(TaskError::TooMany);
        }
        out.push(node.wrapping_sub(link));
        node = r.u64(node)?;
    }
    Ok(out)
}

/// Every thread of the guest (the kernel's `for_each_process_thread`) and then each CPU's
/// idle task, in that order, without duplicates. Pause the VM around it.
pub fn all(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    layout: &KernelLayout,
    btf: &Btf,
    cpus: &[CpuTasks],
) -> Result<Vec<Task>, TaskError> {
    let o = TaskOffsets::from_btf(btf)?;
    let r = Reader {
        mem,
        cr3: layout.cr3,
    };
    let init = layout.live(sym(syms, "init_task")?);
    let rq = sym(syms, "runqueues")?;
    let mut seen = 0;
    let mut addrs = Vec::new();
    for p in list(&r, init + o.tasks, o.tasks, &mut seen)? {
        let signal = r.u64(p + o.signal)?;
        addrs.extend(list(&r, signal + o.thread_head, o.thread_node, &mut seen)?);
    }
    for c in cpus {
        let idle = r.u64(rq.wrapping_add(c.percpu_offset) + o.rq_idle)?;
        if !addrs.contains(&idle) {
            addrs.push(idle);
        }
    }
    addrs.iter().map(|&a| read_task(&r, a, &o)).collect()
}
