//! Architectural state of one x86-64 vCPU, as read from outside.

use serde::Serialize;

/// Register snapshot of one vCPU, taken while the VM is paused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VcpuRegs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15 (gdb order).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cs: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl VcpuRegs {
    pub fn rsp(&self) -> u64 {
        self.gpr[7]
    }

    /// Current privilege level, from the low bits of CS.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }
}
