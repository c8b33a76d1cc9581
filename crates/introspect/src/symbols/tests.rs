use std::process::Command;
use std::sync::OnceLock;

use super::*;
use crate::testelf;

const A_C: &str = r#"
static int __attribute__((noinline)) helper(void) { return 1; }
static int __attribute__((noinline)) only_in_a(void) { return 7; }
int a_global(void) { return helper() + only_in_a(); }
int __attribute__((weak)) weak_fn(void) { return 3; }
int a_var = 5;
int a_bss;
asm(".text\n.type myfn.isra.0,@function\nmyfn.isra.0: ret\n.size myfn.isra.0, 1\n");
"#;

const B_C: &str = r#"
static int __attribute__((noinline)) helper(void) { return 2; }
int b_global(void) { return helper(); }
void *b_ptr = (void *)&b_global;
asm(".text\n.globl b_abs\n.type b_abs,@function\nb_abs:\n"
    "movq $b_global, %rax\nmovl $b_global, %eax\ncall a_global\nret\n"
    ".size b_abs, .-b_abs\nb_label: nop\n");
"#;

fn elf() -> &'static [u8] {
    static ELF: OnceLock<Vec<u8>> = OnceLock::new();
    ELF.get_or_init(|| testelf::build(&[("a.c", A_C), ("sub/b.c", B_C)], None))
}

fn syms() -> KernelSymbols {
    KernelSymbols::from_bytes(elf().to_vec()).unwrap()
}

#[test]
fn locals_are_attributed_to_their_files() {
    let s = syms();
    let mut files: Vec<_> = s
        .all_named("helper")
        .map(|h| (h.file.clone().unwrap(), h.binding, h.kind))
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            ("a.c".into(), Binding::Local, SymbolKind::Func),
            ("b.c".into(), Binding::Local, SymbolKind::Func)
        ]
    );
    let g = s.lookup("a_global").unwrap();
    assert_eq!((g.binding, g.file.as_deref()), (Binding::Global, None));
    assert_eq!(s.lookup("weak_fn").unwrap().binding, Binding::Weak);
    assert_eq!(s.lookup("a_var").unwrap().kind, SymbolKind::Object);
    let only = s.lookup("only_in_a").unwrap();
    assert_eq!(only.qualified_name(), "a.c:only_in_a");
    assert_eq!(g.qualified_name(), "a_global");
}

#[test]
fn ambiguous_local_asks_for_qualification() {
    let s = syms();
    let e = s.lookup("helper").unwrap_err();
    match &e {
        SymbolError::Ambiguous { name, files } => {
            assert_eq!(name, "helper");
            assert_eq!(files.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("file.c:helper"), "{e}");
}

#[test]
fn qualified_lookup_matches_base_names_and_paths() {
    let s = syms();
    let a = s.lookup_in_file("a.c", "helper").unwrap();
    let b = s.resolve_spec("sub/b.c:helper").unwrap();
    assert_ne!(a.addr, b.addr);
    assert_eq!(b.file.as_deref(), Some("b.c"));
    assert_eq!(s.resolve_spec(" lib/x/a.c:helper ").unwrap().addr, a.addr);
    // "xa.c" must not match "a.c" by plain suffix.
    assert!(matches!(
        s.resolve_spec("xa.c:helper"),
        Err(SymbolError::NotInFile { .. })
    ));
    // Globals carry no file, so a qualified global is taken as is.
    assert_eq!(s.resolve_spec("a.c:b_global").unwrap().name, "b_global");
    assert_eq!(s.resolve_spec("b_global").unwrap().name, "b_global");
    for bad in [":helper", "a.c:", "", "two words"] {
        assert!(
            matches!(s.resolve_spec(bad), Err(SymbolError::BadSpec { .. })),
            "{bad}"
        );
    }
}

#[test]
fn not_found_mentions_inlining_and_renamed_copies() {
    let s = syms();
    let e = s.lookup("myfn").unwrap_err();
    match &e {
        SymbolError::NotFound { variants, .. } => assert_eq!(variants, &["myfn.isra.0"]),
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("inlined") && msg.contains("myfn.isra.0"),
        "{msg}"
    );
    assert!(matches!(
        s.lookup("nope"),
        Err(SymbolError::NotFound { .. })
    ));
}

#[test]
fn symbol_at_finds_containing_symbol() {
    let s = syms();
    let g = s.lookup("a_global").unwrap().clone();
    let (hit, off) = s.symbol_at(g.addr + 1).unwrap();
    assert_eq!((hit.name.as_str(), off), ("a_global", 1));
    let abs = s.lookup("b_abs").unwrap().clone();
    let (hit, off) = s.symbol_at(abs.addr + abs.size - 1).unwrap();
    assert_eq!((hit.name.as_str(), off), ("b_abs", abs.size - 1));
    // A size-0 asm label right after b_abs.
    let (hit, off) = s.symbol_at(abs.addr + abs.size).unwrap();
    assert_eq!((hit.name.as_str(), off), ("b_label", 0));
    assert!(s.symbol_at(0x1000).is_none());
    assert_eq!(s.section_name_at(g.addr), Some(".text"));
}

#[test]
fn build_id_and_its_address() {
    let s = syms();
    let id = s.build_id().unwrap().to_vec();
    assert_eq!(id.len(), 20);
    assert_eq!(s.build_id_hex().unwrap(), hex::encode(&id));
    let at = s.notes_addr().unwrap();
    assert_eq!(s.section_bytes(at, 20).unwrap(), id);
    assert_eq!(s.section_bytes(at - 4, 4).unwrap(), b"GNU\0");
}

#[test]
fn absolute_relocations_in_code_and_data() {
    let s = syms();
    let abs = s.lookup("b_abs").unwrap().clone();
    let fields = s.abs_reloc_offsets(abs.addr, abs.size as usize).unwrap();
    // movq $sym,%rax = 48 c7 c0 imm32 (32S); movl $sym,%eax = b8 imm32 (32);
    // the PC-relative call is not listed.
    assert_eq!(
        fields,
        vec![
            RelocField {
                offset: 3,
                kind: RelocKind::Abs32S
            },
            RelocField {
                offset: 8,
                kind: RelocKind::Abs32
            },
        ]
    );
    // Fields straddling the range's ends are left out.
    assert!(s.abs_reloc_offsets(abs.addr + 4, 6).unwrap().is_empty());
    let ptr = s.lookup("b_ptr").unwrap().clone();
    let fields = s.abs_reloc_offsets(ptr.addr, 8).unwrap();
    assert_eq!(
        fields,
        vec![RelocField {
            offset: 0,
            kind: RelocKind::Abs64
        }]
    );

    let target = s.lookup("b_global").unwrap().addr;
    let slide = 0x3e00_0000;
    let live = s
        .expected_bytes(abs.addr, abs.size as usize, slide)
        .unwrap();
    let raw = s.section_bytes(abs.addr, abs.size as usize).unwrap();
    let imm = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert_eq!(imm(&raw, 3) as u64, target);
    assert_eq!(imm(&live, 3) as u64, target + slide as u64);
    assert_eq!(imm(&live, 8) as u64, target + slide as u64);
    assert_eq!(live[12..], raw[12..]);
    // Bytes inside a field, at the range's edge, are adjusted too.
    let part = s.expected_bytes(abs.addr + 5, 2, slide).unwrap();
    assert_eq!(part, live[5..7]);
    let live_ptr = s.expected_bytes(ptr.addr, 8, slide).unwrap();
    assert_eq!(
        u64::from_le_bytes(live_ptr.try_into().unwrap()),
        target + slide as u64
    );
}

#[test]
fn apply_slide_kinds() {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
    b[8..].copy_from_slice(&0x100u32.to_le_bytes());
    let fields = [
        RelocField {
            offset: 0,
            kind: RelocKind::Abs64,
        },
        RelocField {
            offset: 8,
            kind: RelocKind::InversePc32,
        },
        RelocField {
            offset: 10,
            kind: RelocKind::Abs32,
        }, // does not fit: skipped
    ];
    apply_slide(&mut b, &fields, 0x20_0000);
    assert_eq!(
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        0xffff_ffff_8120_0000
    );
    assert_eq!(
        u32::from_le_bytes(b[8..].try_into().unwrap()),
        0x100u32.wrapping_sub(0x20_0000)
    );
}

#[test]
fn section_bytes_refuses_bss_and_unmapped() {
    let s = syms();
    let bss = s.lookup("a_bss").unwrap().addr;
    assert!(matches!(
        s.section_bytes(bss, 4),
        Err(SymbolError::NoSection { .. })
    ));
    assert!(s.section_bytes(0x10, 4).is_err());
    let g = s.lookup("a_global").unwrap();
    assert!(s.section_bytes(g.addr, 1 << 30).is_err());
}

#[test]
fn load_from_file_reads_sections_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let path = testelf::write_to(dir.path(), "vmlinux", elf());
    let f = KernelSymbols::load(&path).unwrap();
    let m = syms();
    assert_eq!(f.symbols(), m.symbols());
    let g = m.lookup("b_abs").unwrap();
    assert_eq!(
        f.section_bytes(g.addr, g.size as usize).unwrap(),
        m.section_bytes(g.addr, g.size as usize).unwrap()
    );
    assert_eq!(f.build_id().unwrap(), m.build_id().unwrap());
    // The notes-only reader agrees with the full load.
    assert_eq!(
        KernelSymbols::read_build_id_hex(&path).unwrap(),
        m.build_id_hex().unwrap()
    );
    assert!(f.origin().ends_with("vmlinux"));
    let e = KernelSymbols::load(dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, SymbolError::Io { .. }) && e.to_string().contains("missing"));
}

fn objcopy(args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = testelf::write_to(dir.path(), "in", elf());
    let out = Command::new("objcopy")
        .args(args)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&path).unwrap()
}

#[test]
fn stripped_inputs_get_clear_errors() {
    let norel = KernelSymbols::from_bytes(objcopy(&["--remove-section=.rela*"])).unwrap();
    let g = norel.lookup("b_abs").unwrap();
    let e = norel.abs_reloc_offsets(g.addr, 4).unwrap_err();
    assert!(matches!(e, SymbolError::NoRelocs) && e.to_string().contains("unstripped"));
    let stripped = objcopy(&["--strip-all"]);
    assert!(matches!(
        KernelSymbols::from_bytes(stripped),
        Err(SymbolError::NoSymtab { .. })
    ));
    assert!(matches!(
        KernelSymbols::from_bytes(b"not an elf".to_vec()),
        Err(SymbolError::BadElf { .. })
    ));
}
