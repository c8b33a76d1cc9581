//! The contract between introspection/patching logic and a VM engine.

use crate::addr::GuestPhysAddr;
use crate::regs::VcpuRegs;

/// Failures of the engine beneath a [`Machine`].
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("guest physical range {addr:#x}+{len:#x} is not backed by guest RAM or patch memory")]
    Unbacked { addr: u64, len: u64 },
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
    #[error("the VM must be paused for this operation")]
    NotPaused,
    /// The engine's own failure (a QMP or gdbstub error, a file of the VM ...), kept whole
    /// for callers that look at it; introspect knows no engine's error type.
    #[error("VM engine: {0}")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Read access to guest physical memory.
pub trait PhysMem {
    fn read_phys(&self, pa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MachineError>;

    fn read_u64(&self, pa: GuestPhysAddr) -> Result<u64, MachineError> {
        let mut b = [0u8; 8];
        self.read_phys(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// A whole VM as lucos drives it: pause/resume, vCPU state, and writes
/// that running vCPUs are guaranteed to observe (including code: the
/// engine must invalidate any cached translation of the bytes written).
pub trait Machine: PhysMem {
    fn vcpu_count(&self) -> usize;
    fn pause(&mut self) -> Result<(), MachineError>;
    fn resume(&mut self) -> Result<(), MachineError>;
    fn is_paused(&mut self) -> Result<bool, MachineError>;
    /// Registers of vCPU `idx`; only meaningful while paused.
    fn vcpu_regs(&mut self, idx: usize) -> Result<VcpuRegs, MachineError>;
    /// Instruction pointer of vCPU `idx`: the only register the site switch
    /// needs while the VM is paused, so engines may provide a cheaper path.
    fn vcpu_rip(&mut self, idx: usize) -> Result<u64, MachineError> {
        Ok(self.vcpu_regs(idx)?.rip)
    }
    /// Base of the IDT of vCPU `idx` (IDTR is not in every register dump).
    fn idt_base(&mut self, idx: usize) -> Result<u64, MachineError>;
    /// Coherent write: the guest sees it on its next access, code included.
    /// Engines may pause the VM briefly to do it.
    fn write_phys(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError>;
    /// Write of bytes no vCPU has executed (page tables, data, lucos's own
    /// records, code in never-used patch memory): engines may take a faster
    /// path without translation invalidation.
    fn write_phys_data(&mut self, pa: GuestPhysAddr, data: &[u8]) -> Result<(), MachineError> {
        self.write_phys(pa, data)
    }
    /// Several [`Machine::write_phys_data`] writes in order. Engines that journal each
    /// write made while paused (so that a killed lucos can be undone) may journal them all
    /// at once before the first write: a journal entry for a write not yet made restores
    /// bytes that are still there, which is harmless.
    fn write_phys_data_all(
        &mut self,
        writes: &[(GuestPhysAddr, &[u8])],
    ) -> Result<(), MachineError> {
        for &(pa, data) in writes {
            self.write_phys_data(pa, data)?;
        }
        Ok(())
    }
}
