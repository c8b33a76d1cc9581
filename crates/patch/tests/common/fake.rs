//! A fake guest (introspect's FakeMachine) with patch memory holding a given registry.

use std::process::Command;

use lucos_introspect::fake::{FakeMachine, FakeMem};
use lucos_introspect::{KernelLayout, KernelSymbols};
use lucos_patch::memory::PatchMemLayout;
use lucos_patch::registry::{Header, Registry};

pub const SIZE: u64 = 8 << 20;
pub const GPA: u64 = 0xfe00_0000;
pub const PD_ENTRY: u64 = 0x20_0000;

/// A symbol table with just the image bounds (no build id: bundles are refused as built
/// for another kernel once they get that far).
pub fn symbols() -> KernelSymbols {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("k.c");
    std::fs::write(&src, "int _text; int _etext; int _end;\n").unwrap();
    let obj = dir.path().join("k.o");
    let st = Command::new("gcc")
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap();
    assert!(st.success());
    KernelSymbols::load(&obj).unwrap()
}

pub fn layout() -> KernelLayout {
    KernelLayout {
        slide: 0,
        cr3: 0x10_0000,
        text_start: 0xffff_ffff_8100_0000,
        text_end: 0xffff_ffff_8180_0000,
        image_end: 0xffff_ffff_8200_0000,
        phys_text: 0x100_0000,
        phys_base: 0,
    }
}

/// A guest whose patch memory at `gpa` holds `reg`.
pub fn guest_with(reg: &Registry, gpa: u64) -> FakeMachine {
    let (h, json) = reg.encode(&Header::default()).unwrap();
    guest_with_bytes(gpa, &h.encode(), &json, h.active)
}

/// A guest whose patch memory at `gpa` holds raw header and slot bytes (which need not
/// be consistent).
pub fn guest_with_bytes(gpa: u64, header: &[u8], slot: &[u8], active: u32) -> FakeMachine {
    let mut mem = FakeMem::new();
    assert_eq!(
        mem.new_pml4(),
        layout().cr3,
        "the kernel's (empty) page tables"
    );
    let pm = PatchMemLayout::new(SIZE).unwrap();
    // Back the whole registry area, as a real patch-memory file does.
    mem.write(gpa, &vec![0u8; pm.alloc_start as usize]);
    mem.write(gpa + pm.slot_offset(active & 1), slot);
    mem.write(gpa + pm.header_offset(), header);
    mem.write_u64(PD_ENTRY, 0);
    FakeMachine::new(mem, 1)
}

pub fn mapped_registry() -> Registry {
    let mut reg = Registry::empty(&PatchMemLayout::new(SIZE).unwrap());
    reg.va_base = Some(0xffff_ffff_a000_0000);
    reg.patch_gpa = Some(GPA);
    reg.pd_entries = vec![(PD_ENTRY, (GPA + 0x40_0000) | 0x23)];
    reg.next_free += 0x3000;
    reg
}
