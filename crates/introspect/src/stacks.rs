//! One full stack scan of a paused guest: every task's kernel backtrace, from outside.

use serde::Serialize;

use crate::btf::Btf;
use crate::kaslr::KernelLayout;
use crate::machine::{Machine, MachineError};
use crate::modules::{self, LoadedModule, ModuleError};
use crate::orc::Orc;
use crate::symbols::KernelSymbols;
use crate::tasks::{self, CpuTasks, Task, TaskError};
use crate::unwind::{self, RegsLayout, StackRange, Start, Trace, IRQ_STACK_SIZE, THREAD_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("reading vCPU registers: {0}")]
    Machine(#[from] MachineError),
    #[error("the kernel's pt_regs layout: {0}")]
    Layout(#[from] crate::btf::BtfError),
}

/// What stays the same between scans of one boot: layouts and vmlinux's ORC table.
pub struct Scanner {
    btf: std::sync::Arc<Btf>,
    regs: RegsLayout,
    vmlinux_orc: Orc,
    ret_from_fork: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskStack {
    #[serde(flatten)]
    pub task: Task,
    /// The vCPU it runs on now, whose registers started the unwind.
    pub vcpu: Option<usize>,
    pub trace: Trace,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scan {
    pub tasks: Vec<TaskStack>,
    pub cpus: Vec<CpuTasks>,
    #[serde(skip)]
    pub modules: Vec<LoadedModule>,
    /// Each vCPU's rip at the scan (read for the live tasks' unwinds anyway).
    #[serde(skip)]
    pub rips: Vec<u64>,
}

impl Scanner {
    pub fn new(
        mem: &(impl crate::machine::PhysMem + ?Sized),
        syms: &KernelSymbols,
        layout: &KernelLayout,
    ) -> Result<Self, ScanError> {
        let btf = modules::live_btf(mem, syms, layout)?;
        let regs = RegsLayout::from_btf(&btf)?;
        let ret_from_fork = layout.live(
            syms.lookup("ret_from_fork")
                .map_err(|_| TaskError::NoSymbol("ret_from_fork"))?
                .addr,
        );
        Ok(Scanner {
            btf,
            regs,
            vmlinux_orc: Orc::vmlinux(syms, layout)?,
            ret_from_fork,
        })
    }

    /// Scans every task; the VM must be paused.
    pub fn scan(
        &self,
        m: &mut (impl Machine + ?Sized),
        syms: &KernelSymbols,
        layout: &KernelLayout,
    ) -> Result<Scan, ScanError> {
        self.scan_with(m, syms, layout, &[])
    }

    /// Scans every task, unwinding also through the modules whose `struct module` is at
    /// `unlinked` (off the module list, still in memory: reverted lucos bundles).
    pub fn scan_with(
        &self,
        m: &mut (impl Machine + ?Sized),
        syms: &KernelSymbols,
        layout: &KernelLayout,
        unlinked: &[u64],
    ) -> Result<Scan, ScanError> {
        if !m.is_paused()? {
            return Err(MachineError::NotPaused.into());
        }
        let n = m.vcpu_count();
        let regs = (0..n)
            .map(|i| m.vcpu_regs(i))
            .collect::<Result<Vec<_>, _>>()?;
        let cpus = tasks::cpus(m, syms, layout, n)?;
        let mut mods = modules::loaded(m, syms, layout)?;
        for &va in unlinked {
            if !mods.iter().any(|l| l.module == va) {
                mods.push(modules::module_at(m, layout.cr3, &self.btf, va)?);
            }
        }
        let mut orc = self.vmlinux_orc.clone();
        orc.add_modules(m, layout.cr3, &self.btf, &mods)?;
        let all = tasks::all(m, syms, layout, &self.btf, &cpus)?;
        let out = all
            .into_iter()
            .map(|task| {
                let vcpu = cpus.iter().position(|c| c.current == task.addr);
                let mut stacks = vec![StackRange {
                    kind: "task",
                    begin: task.stack,
                    end: task.stack + THREAD_SIZE,
                }];
                let start = match vcpu {
                    Some(i) => {
                        let top = cpus[i].irq_stack_top;
                        stacks.push(StackRange {
                            kind: "irq",
                            begin: top - IRQ_STACK_SIZE,
                            end: top,
                        });
                        Start::Live(regs[i].clone())
                    }
                    None => Start::Saved { sp: task.saved_sp },
                };
                let trace = unwind::unwind(
                    m,
                    layout.cr3,
                    &self.regs,
                    &orc,
                    self.ret_from_fork,
                    &stacks,
                    &start,
                );
                TaskStack { task, vcpu, trace }
            })
            .collect();
        Ok(Scan {
            tasks: out,
            cpus,
            modules: mods,
            rips: regs.iter().map(|r| r.rip).collect(),
        })
    }
}
