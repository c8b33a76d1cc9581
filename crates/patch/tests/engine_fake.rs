//! Engine checks that need a guest in states a live VM cannot be put in
//! safely: patch memory that moved, records from an earlier boot.

use std::process::Command;

use lucos_introspect::fake::{FakeMachine, FakeMem};
use lucos_introspect::{KernelLayout, KernelSymbols};
use lucos_patch::memory::PatchMemLayout;
use lucos_patch::registry::{Header, Registry};
use lucos_patch::{reset_registry, EngineError, ResetReport, Session};

const SIZE: u64 = 8 << 20;
const GPA: u64 = 0xfe00_0000;
const PD_ENTRY: u64 = 0x20_0000;
const POB: u64 = 0xffff_8880_0000_0000;

fn symbols() -> KernelSymbols {
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

fn layout() -> KernelLayout {
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
fn guest_with(reg: &Registry, gpa: u64) -> FakeMachine {
    let mut mem = FakeMem::new();
    assert_eq!(
        mem.new_pml4(),
        layout().cr3,
        "the kernel's (empty) page tables"
    );
    let pm = PatchMemLayout::new(SIZE).unwrap();
    // Back the whole registry area, as a real patch-memory file does.
    mem.write(gpa, &vec![0u8; pm.alloc_start as usize]);
    let (h, json) = reg.encode(&Header::default()).unwrap();
    mem.write(gpa + pm.slot_offset(h.active), &json);
    mem.write(gpa + pm.header_offset(), &h.encode());
    mem.write_u64(PD_ENTRY, 0);
    FakeMachine::new(mem, 1)
}

fn mapped_registry() -> Registry {
    let mut reg = Registry::empty(&PatchMemLayout::new(SIZE).unwrap());
    reg.va_base = Some(0xffff_ffff_a000_0000);
    reg.patch_gpa = Some(GPA);
    reg.pd_entries = vec![(PD_ENTRY, (GPA + 0x40_0000) | 0x23)];
    reg.next_free += 0x3000;
    reg
}

#[test]
fn patch_memory_that_moved_is_refused() {
    let syms = symbols();
    let mut reg = mapped_registry();
    reg.pd_entries.clear();
    let moved = GPA + (64 << 20);
    let mut m = guest_with(&reg, moved);
    let err = Session::new(&mut m, &syms, layout(), moved, SIZE)
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::PatchMemoryMoved { mapped: GPA, .. }),
        "{err}"
    );
}

#[test]
fn records_of_an_earlier_boot_are_stale_until_reset() {
    let syms = symbols();
    let reg = mapped_registry();
    let mut m = guest_with(&reg, GPA);
    // The page-directory entry lucos recorded is not in this kernel.
    let err = Session::new(&mut m, &syms, layout(), GPA, SIZE)
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::StaleRegistry { pa: PD_ENTRY, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("lucos reset"), "{err}");
    assert_eq!(
        reset_registry(&mut m, (layout().cr3, POB), GPA, SIZE).unwrap(),
        ResetReport {
            records: 0,
            entries: 0
        }
    );
    let s = Session::new(&mut m, &syms, layout(), GPA, SIZE).unwrap();
    let fresh = s.registry().unwrap();
    assert_eq!(fresh.va_base, None);
    assert_eq!(
        fresh.next_free, reg.next_free,
        "allocated pages are never reused"
    );
}

#[test]
fn reset_refuses_records_that_match_the_kernel() {
    let reg = mapped_registry();
    let mut m = guest_with(&reg, GPA);
    m.mem.write_u64(PD_ENTRY, reg.pd_entries[0].1);
    assert!(matches!(
        reset_registry(&mut m, (layout().cr3, POB), GPA, SIZE),
        Err(EngineError::NotStale)
    ));
}

#[test]
fn a_malformed_record_is_not_reverted_by_guessing() {
    use lucos_patch::registry::{BundleRecord, BundleState, SiteRecord};
    let syms = symbols();
    let mut reg = mapped_registry();
    reg.bundles.push(BundleRecord {
        id: "broken".into(),
        description: String::new(),
        sha256: String::new(),
        state: BundleState::Applied,
        applied_unix_ms: 0,
        reverted_unix_ms: None,
        sites: vec![SiteRecord {
            function: "f".into(),
            func_addr: 0xffff_ffff_8100_1000,
            site_addr: 0xffff_ffff_8100_1000,
            site_pa: 0x100_1000,
            original: vec![0x0f, 0x1f, 0x44],
            written: vec![0xe9, 0, 0, 0, 0],
            new_addr: 0xffff_ffff_a000_0000,
            new_symbol: "g".into(),
            module: None,
        }],
        ranges: Vec::new(),
        apply_pause_us: 0,
        revert_pause_us: None,
        module: None,
        rewrites: Vec::new(),
    });
    let mut m = guest_with(&reg, GPA);
    m.mem.write_u64(PD_ENTRY, reg.pd_entries[0].1);
    let before = m.mem.clone();
    let mut s = Session::new(&mut m, &syms, layout(), GPA, SIZE).unwrap();
    let err = s.revert("broken").unwrap_err();
    assert!(
        matches!(&err, EngineError::MalformedRecord { id, function } if id == "broken" && function == "f"),
        "{err}"
    );
    assert!(m.mem == before, "a refused revert changed guest memory");
}
