//! lucos's view of a guest: memory, page tables, vCPU state, kernel symbols.
//!
//! Everything here works on the [`Machine`] trait, so the same code runs
//! against a live QEMU (the `lucos-backend` crate) and against synthetic
//! memory in unit tests.

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
