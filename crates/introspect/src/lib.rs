//! lucos's view of a guest: memory, page tables, vCPU state, kernel symbols.
//!
//! Everything here works on the [`Machine`] trait, so the same code runs
//! against a live QEMU (the `lucos-backend` crate) and against synthetic
//! memory in unit tests.
//!
//! Addresses that index memory are typed ([`GuestPhysAddr`], [`GuestVirtAddr`]):
//! the [`PhysMem`]/[`Machine`] accessors, the page walker's inputs and outputs,
//! and the fields that hold an address later read or written. Kernel symbol
//! values, layout bases and offsets used only for arithmetic, page-table entry
//! bits, error fields, serialized records and the [`fake::FakeMem`] test builder
//! stay `u64`; they become typed where they are handed to an accessor.

pub mod addr;
pub mod btf;
pub mod fake;
pub mod kaslr;
pub mod machine;
pub mod modules;
pub mod orc;
pub mod paging;
pub mod regs;
pub mod stacks;
pub mod symbols;
pub mod tasks;
pub mod unwind;

pub use addr::{GuestPhysAddr, GuestVirtAddr};
pub use btf::{Btf, BtfError};
pub use kaslr::{decode_idt_gate, detect_layout, verify_build_id, KaslrError, KernelLayout};
pub use machine::{Machine, MachineError, PhysMem};
pub use modules::{
    list_modules, LoadedModule, ModuleError, ModuleOffsets, ModuleState, ModuleSymbol,
};
pub use paging::{
    check_paging_mode, read_virt, read_virt_u64, translate, virt_to_phys_ranges, walk, write_virt,
    Level, PageSize, PagingError, PhysChunk, Translation, Walk, WalkEntry,
};
pub use regs::VcpuRegs;
pub use symbols::{
    apply_slide, Binding, KernelSymbols, RelocField, RelocKind, Symbol, SymbolError, SymbolKind,
};

#[cfg(test)]
mod testelf;
