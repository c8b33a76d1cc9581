//! An attached VM: the [`Machine`] implementation over QMP + gdbstub +
//! shared memory files.

use std::time::Duration;

use lucos_introspect::{GuestPhysAddr, Machine, MachineError, PhysMem, VcpuRegs};

use crate::descriptor::VmDescriptor;
use crate::error::BackendError;
use crate::gdb::Gdb;
use crate::guard::Guard;
use crate::launch::PATCH_BAR;
use crate::qmp::{self, Qmp};
use crate::sys::SharedMem;

/// Where patch memory appears in guest-physical space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchWindow {
    pub gpa: u64,
    pub size: u64,
}

pub struct Vm {
    pub desc: VmDescriptor,
    qmp: Qmp,
    gdb: Gdb,
    ram: SharedMem,
    patch: SharedMem,
    window: Option<PatchWindow>,
    vcpus: usize,
    /// Set by our own pause(); avoids a QMP round trip per coherent write.
    paused_by_us: bool,
    /// Resumes the guest if this process dies while it is paused (see guard.rs).
    guard: Option<Guard>,
}

impl Vm {
    pub fn attach(name: &str) -> Result<Self, BackendError> {
        Self::attach_desc(VmDescriptor::load(name)?)
    }

    /// Attaches without changing the VM's run state. (QEMU pauses the VM
    /// while a gdb client connects; lucos resumes it if it was running.)
    pub fn attach_desc(desc: VmDescriptor) -> Result<Self, BackendError> {
        let mut guard = Guard::spawn(&desc.name)?;
        let mut qmp = Qmp::connect_timeout(&desc.qmp, Duration::from_secs(10))?;
        let was_running = qmp.running()?;
        if let (true, Some(g)) = (was_running, &mut guard) {
            g.paused()?;
        }
        let gdb = Gdb::connect(&desc.gdb);
        if was_running {
            qmp.cont()?;
            if let Some(g) = &mut guard {
                g.resumed()?;
            }
        }
        let gdb = gdb?;
        let vcpus = qmp
            .execute("query-cpus-fast", None)?
            .as_array()
            .map_or(0, Vec::len);
        let ram = SharedMem::open(&desc.ram.path)?;
        let patch = SharedMem::open(&desc.patch.path)?;
        if (ram.len() as u64) < desc.ram.size || (patch.len() as u64) < desc.patch.size {
            return Err(BackendError::BadDescriptor {
                path: desc.dir.clone(),
                reason: "memory files are smaller than the descriptor says".into(),
            });
        }
        let mut vm = Vm {
            desc,
            qmp,
            gdb,
            ram,
            patch,
            window: None,
            vcpus,
            paused_by_us: false,
            guard,
        };
        vm.refresh_patch_window()?;
        Ok(vm)
    }

    /// Finds the patch-memory BAR; the guest firmware assigns it at boot.
    pub fn refresh_patch_window(&mut self) -> Result<Option<PatchWindow>, BackendError> {
        self.window = self
            .qmp
            .pci_bar(&self.desc.patch_device, PATCH_BAR)?
            .filter(|&(gpa, size)| gpa != 0 && gpa != u64::MAX && size == self.desc.patch.size)
            .map(|(gpa, size)| PatchWindow { gpa, size });
        if let Some(w) = self.window {
            if let Some(r) = self
                .desc
                .ram_regions
                .iter()
                .find(|r| w.gpa < r.gpa + r.len && r.gpa < w.gpa + w.size)
            {
                self.window = None;
                return Err(BackendError::PatchMemory(format!(
                    "the patch memory BAR at {:#x} overlaps guest RAM region {:#x}+{:#x} of the descriptor: the RAM layout in {} is wrong for this machine",
                    w.gpa,
                    r.gpa,
                    r.len,
                    self.desc.dir.display()
                )));
            }
        }
        Ok(self.window)
    }

    pub fn patch_window(&mut self) -> Result<PatchWindow, BackendError> {
        if let Some(w) = self.window {
            return Ok(w);
        }
        self.refresh_patch_window()?.ok_or_else(|| {
            BackendError::PatchMemory(format!(
                "the guest firmware has not assigned an address to the patch memory device '{}' yet; wait for the guest to boot",
                self.desc.patch_device
            ))
        })
    }

    /// Marks the current pause as the operator's (`lucos pause`): the guard leaves it.
    pub fn keep_paused(&mut self) -> Result<(), BackendError> {
        self.paused_by_us = false;
        match &mut self.guard {
            Some(g) => g.keep(),
            None => Ok(()),
        }
    }

    /// Tells the guard what a write while paused replaces.
    fn journal(
        &mut self,
        coherent: bool,
        pa: GuestPhysAddr,
        len: usize,
    ) -> Result<(), MachineError> {
        if self.guard.is_none() {
            return Ok(());
        }
        let mut old = vec![0u8; len];
        self.read_phys(pa, &mut old)?;
        if let Some(g) = &mut self.guard {
            g.journal(coherent, pa.raw(), &old)?;
        }
        Ok(())
    }

    fn guard_mark(&mut self, paused: bool) -> Result<(), BackendError> {
        match (&mut self.guard, paused) {
            (Some(g), true) => g.paused(),
            (Some(g), false) => g.resumed(),
            (None, _) => Ok(()),
        }
    }

    /// A data write through the shared RAM or patch-memory mapping (not journalled).
    fn write_shared(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        let len = data.len() as u64;
        let done = match (
            self.desc.ram_offset(pa.raw(), len),
            self.patch_offset(pa, len),
        ) {
            (Some(off), _) => self.ram.write(off as usize, data),
            (None, Some(off)) => self.patch.write(off as usize, data),
            (None, None) => false,
        };
        if done {
            Ok(())
        } else {
            Err(MachineError::Unbacked {
                addr: pa.raw(),
                len,
            })
        }
    }

    fn patch_offset(&self, pa: GuestPhysAddr, len: u64) -> Option<u64> {
        let w = self.window?;
        let pa = pa.raw();
        (pa >= w.gpa && pa.checked_add(len)? <= w.gpa + w.size).then(|| pa - w.gpa)
    }
}

impl PhysMem for Vm {
    fn read_phys(&self, pa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MachineError> {
        let len = buf.len() as u64;
        if let Some(off) = self.desc.ram_offset(pa.raw(), len) {
            if self.ram.read(off as usize, buf) {
                return Ok(());
            }
        }
        if let Some(off) = self.patch_offset(pa, len) {
            if self.patch.read(off as usize, buf) {
                return Ok(());
            }
        }
        Err(MachineError::Unbacked {
            addr: pa.raw(),
            len,
        })
    }
}

impl Machine for Vm {
    fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    fn pause(&mut self) -> Result<(), MachineError> {
        self.guard_mark(true)?;
        self.qmp.stop()?;
        self.paused_by_us = true;
        // QEMU has just written a stop notification to the gdb socket
        // (before answering `stop`); read it now so they cannot pile up.
        self.gdb.drain_notifications()?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MachineError> {
        self.paused_by_us = false;
        self.qmp.cont()?;
        Ok(self.guard_mark(false)?)
    }

    fn is_paused(&mut self) -> Result<bool, MachineError> {
        Ok(!self.qmp.running()?)
    }

    fn vcpu_regs(&mut self, idx: usize) -> Result<VcpuRegs, MachineError> {
        if idx >= self.vcpu_count() {
            return Err(MachineError::NoSuchVcpu(idx));
        }
        let text = self.qmp.hmp("info registers", Some(idx))?;
        qmp::parse_info_registers(&text).ok_or_else(|| {
            MachineError::Engine(
                format!("unparsable 'info registers' for vCPU {idx}:\n{text}").into(),
            )
        })
    }

    fn vcpu_rip(&mut self, idx: usize) -> Result<u64, MachineError> {
        if !self.paused_by_us {
            // The gdbstub only answers a stopped VM.
            return Ok(self.vcpu_regs(idx)?.rip);
        }
        Ok(self.gdb.rip(idx)?)
    }

    fn idt_base(&mut self, idx: usize) -> Result<u64, MachineError> {
        let text = self.qmp.hmp("info registers", Some(idx))?;
        qmp::parse_idt_base(&text).ok_or_else(|| {
            MachineError::Engine(format!("no IDT base in 'info registers' for vCPU {idx}").into())
        })
    }

    fn write_phys(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        let len = data.len() as u64;
        if self.desc.ram_offset(pa.raw(), len).is_none() && self.patch_offset(pa, len).is_none() {
            return Err(MachineError::Unbacked {
                addr: pa.raw(),
                len,
            });
        }
        // QEMU's gdbstub treats any byte arriving while the VM runs as an
        // interrupt request and drops it: write only while paused.
        let pause = !self.paused_by_us && self.qmp.running()?;
        if pause {
            self.guard_mark(true)?;
            self.qmp.stop()?;
        }
        let r = self
            .journal(true, pa, data.len())
            .and_then(|()| Ok(self.gdb.write_phys(pa.raw(), data)?));
        if pause {
            self.qmp.cont()?;
            self.guard_mark(false)?;
        }
        r
    }

    fn write_phys_data(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        if self.paused_by_us {
            self.journal(false, pa, data.len())?;
        }
        self.write_shared(pa, data)
    }

    fn write_phys_data_all(
        &mut self,
        writes: &[(GuestPhysAddr, &[u8])],
    ) -> Result<(), MachineError> {
        if self.paused_by_us && self.guard.is_some() {
            let mut old = Vec::with_capacity(writes.len());
            for &(pa, data) in writes {
                let mut buf = vec![0u8; data.len()];
                self.read_phys(pa, &mut buf)?;
                old.push((pa.raw(), buf));
            }
            if let Some(g) = &mut self.guard {
                g.journal_all(&old)?;
            }
        }
        for &(pa, data) in writes {
            self.write_shared(pa, data)?;
        }
        Ok(())
    }
}
