//! Every supported relocation type against hand-written assembly, with the expected bytes
//! computed by hand from the known layout.

mod common;

use common::{assemble, binutils, bundle};
use lucos_introspect::symbols::SymbolError;
use lucos_patch::{link, plan, LinkError, Regions, ResolveError, NOP5};

const ASM: &str = r#"
	.section .text.f,"ax",@progbits
	.globl f
	.type f,@function
f:
	call __fentry__             # 0:  e8 + PLT32 @1 (NOP-ed)
	movq $ext_a, %rax           # 5:  48 c7 c0 + 32S @8
	call printk                 # 12: e8 + PLT32 @13, addend -4
	leaq obj(%rip), %rdi        # 17: 48 8d 3d + PC32 @20 against .data.obj - 4
	ret                         # 24
	.size f, .-f

	.section .data.obj,"aw",@progbits
	.type obj,@object
obj:
	.quad f                     # 0:  R_X86_64_64 f
	.quad ext_a + 16            # 8:  R_X86_64_64 ext_a + 16
	.long ext_low               # 16: R_X86_64_32 ext_low
	.long ext_a - .             # 20: R_X86_64_PC32 ext_a
	.quad ext_a - .             # 24: R_X86_64_PC64 ext_a
	.reloc ., R_X86_64_NONE, f  # 32: R_X86_64_NONE
	.quad 0
	.quad maybe                 # 40: R_X86_64_64 against a weak undefined symbol
	.size obj, .-obj
	.weak maybe

	.section .rodata.ro,"a",@progbits
ro:
	.reloc ., R_X86_64_32S, f + 8   # 0: R_X86_64_32S f + 8
	.long 0
"#;

const TEXT: u64 = 0xffff_ffff_c000_0000;
const RODATA: u64 = 0xffff_ffff_c001_0000;
const DATA: u64 = 0xffff_ffff_c002_0000;
const BASES: Regions = Regions {
    text: TEXT,
    rodata: RODATA,
    data: DATA,
};
const PRINTK: u64 = 0xffff_ffff_8100_0000;
const EXT_A: u64 = 0xffff_ffff_8200_0000;
const EXT_LOW: u64 = 0x1234;

fn resolver(printk: u64, ext_a: u64, ext_low: u64) -> impl Fn(&str) -> Result<u64, ResolveError> {
    move |name: &str| match name {
        "printk" => Ok(printk),
        "ext_a" => Ok(ext_a),
        "ext_low" => Ok(ext_low),
        _ => Err(ResolveError::Symbol(SymbolError::NotFound {
            name: name.to_string(),
            variants: Vec::new(),
        })),
    }
}

fn le32(v: i64) -> [u8; 4] {
    (v as i32).to_le_bytes()
}

#[test]
fn assembler_emits_the_expected_relocations() {
    // Guards the hand-computed offsets below against assembler changes.
    let (_, out, _) = binutils("readelf", &["-rW"], &assemble(ASM));
    for want in [
        "0000000000000001  0000000",
        "R_X86_64_PLT32         0000000000000000 __fentry__ - 4",
        "R_X86_64_32S           0000000000000000 ext_a + 0",
        "R_X86_64_PLT32         0000000000000000 printk - 4",
        "R_X86_64_PC32          0000000000000000 .data.obj - 4",
        "R_X86_64_32            0000000000000000 ext_low + 0",
        "R_X86_64_PC32          0000000000000000 ext_a + 0",
        "R_X86_64_PC64          0000000000000000 ext_a + 0",
        "R_X86_64_NONE",
        "R_X86_64_32S           0000000000000000 f + 8",
        "maybe + 0",
    ] {
        assert!(out.contains(want), "missing `{want}` in\n{out}");
    }
}

#[test]
fn every_relocation_type() {
    let b = bundle(&assemble(ASM), &["f"]);
    let p = plan(&b).unwrap();
    assert_eq!(p.undefined, vec!["ext_a", "ext_low", "maybe", "printk"]);
    let l = link(&b, &p, BASES, &resolver(PRINTK, EXT_A, EXT_LOW)).unwrap();

    let f = TEXT;
    let obj = DATA;
    assert_eq!(l.new_fn_addr("f"), Some(f));
    assert_eq!(l.symbols["obj"], obj);
    assert_eq!(l.resolved["maybe"], 0, "unresolved weak symbols are 0");

    let t = &l.text;
    assert_eq!(t[0..5], NOP5);
    assert_eq!(t[5..8], [0x48, 0xc7, 0xc0]);
    assert_eq!(
        t[8..12],
        0x8200_0000u32.to_le_bytes(),
        "32S: low half of sign-extended ext_a"
    );
    assert_eq!(t[12], 0xe8);
    assert_eq!(
        t[13..17],
        le32(PRINTK as i64 - 4 - (f as i64 + 13)),
        "PLT32: S + A - P"
    );
    assert_eq!(t[17..20], [0x48, 0x8d, 0x3d]);
    assert_eq!(
        t[20..24],
        le32(obj as i64 - 4 - (f as i64 + 20)),
        "PC32 via section symbol"
    );
    assert_eq!(t[20..24], 0x0001_ffe8u32.to_le_bytes());
    assert_eq!(t[24], 0xc3);

    let d = &l.data;
    assert_eq!(d[0..8], f.to_le_bytes(), "64");
    assert_eq!(d[8..16], (EXT_A + 16).to_le_bytes(), "64 + addend");
    assert_eq!(d[16..20], 0x1234u32.to_le_bytes(), "32");
    assert_eq!(
        d[20..24],
        le32(EXT_A as i64 - (obj as i64 + 20)),
        "PC32 in data"
    );
    assert_eq!(
        d[24..32],
        EXT_A.wrapping_sub(obj + 24).to_le_bytes(),
        "PC64"
    );
    assert_eq!(d[32..40], [0; 8], "NONE writes nothing");
    assert_eq!(d[40..48], [0; 8], "weak");

    assert_eq!(l.rodata[0..4], 0xc000_0008u32.to_le_bytes(), "32S f + 8");
}

#[test]
fn overflow_checks() {
    let b = bundle(&assemble(ASM), &["f"]);
    let p = plan(&b).unwrap();
    let overflow = |r: &dyn Fn(&str) -> Result<u64, ResolveError>, bases: Regions| match link(
        &b, &p, bases, r,
    ) {
        Err(LinkError::RelocationOverflow {
            r_type,
            symbol,
            value,
            offset,
            section,
            ..
        }) => (r_type, symbol, value, offset, section),
        other => panic!("expected overflow, got {other:?}"),
    };

    // 32S must sign-extend: an address in the low half does not.
    let (ty, sym, value, off, sec) = overflow(&resolver(PRINTK, 0x1_0000_0000, EXT_LOW), BASES);
    assert_eq!(
        (ty.as_str(), sym.as_str(), value, off, sec.as_str()),
        ("R_X86_64_32S", "ext_a", 0x1_0000_0000, 8, ".text.f")
    );

    // 32 must zero-extend: a kernel address does not.
    let (ty, sym, value, off, sec) =
        overflow(&resolver(PRINTK, EXT_A, 0xffff_ffff_8000_0000), BASES);
    assert_eq!(
        (ty.as_str(), sym.as_str(), value, off, sec.as_str()),
        (
            "R_X86_64_32",
            "ext_low",
            0xffff_ffff_8000_0000,
            16,
            ".data.obj"
        )
    );

    // PLT32 must fit i32: printk more than 2 GiB below the text region.
    let (ty, sym, _, off, _) = overflow(&resolver(0xffff_ffff_0000_0000, EXT_A, EXT_LOW), BASES);
    assert_eq!(
        (ty.as_str(), sym.as_str(), off),
        ("R_X86_64_PLT32", "printk", 13)
    );

    // PC32 from text to data: data region too far away.
    let far = Regions {
        data: 0xffff_ffff_4000_0000,
        ..BASES
    };
    let (ty, sym, _, off, _) = overflow(&resolver(PRINTK, EXT_A, EXT_LOW), far);
    assert_eq!(
        (ty.as_str(), sym.as_str(), off),
        ("R_X86_64_PC32", ".data.obj", 20)
    );

    // PLT32 at the edge: printk - 4 - (f + 13) == i32::MIN fits, one byte lower does not.
    let edge = (TEXT + 17).wrapping_sub(1 << 31);
    let l = link(&b, &p, BASES, &resolver(edge, EXT_A, EXT_LOW)).unwrap();
    assert_eq!(l.text[13..17], i32::MIN.to_le_bytes());
    let (ty, _, value, _, _) = overflow(&resolver(edge - 1, EXT_A, EXT_LOW), BASES);
    assert_eq!(
        (ty.as_str(), value),
        ("R_X86_64_PLT32", (edge - 5).wrapping_sub(TEXT + 13))
    );
}

#[test]
fn unsupported_relocation_and_nonzero_target() {
    let src = ".text\n.globl f\n.type f,@function\nf: ret\n.size f,.-f\n.data\n.reloc ., R_X86_64_GOTPCREL, f\n.long 0\n";
    let b = bundle(&assemble(src), &["f"]);
    match plan(&b).unwrap_err() {
        LinkError::UnsupportedRelocation {
            section,
            offset,
            r_type,
        } => {
            assert_eq!(
                (section.as_str(), offset, r_type.as_str()),
                (".data", 0, "R_X86_64_GOTPCREL")
            );
        }
        e => panic!("{e}"),
    }

    let src = ".text\n.globl f\n.type f,@function\nf: ret\n.size f,.-f\n.data\n.quad 0\n.reloc ., R_X86_64_64, f\n.quad 7\n";
    let b = bundle(&assemble(src), &["f"]);
    let p = plan(&b).unwrap();
    let e = link(&b, &p, BASES, &resolver(PRINTK, EXT_A, EXT_LOW)).unwrap_err();
    assert!(
        matches!(e, LinkError::RelocationTargetNotZero { offset: 8, .. }),
        "{e}"
    );
}

#[test]
fn relocations_into_unloaded_sections() {
    // A dropped hint section and a non-allocated section cannot be referenced from code.
    for (section, flags) in [(".discard.x", "a"), (".mynotes", "")] {
        let src = format!(
            ".text\n.globl f\n.type f,@function\nf: leaq thing(%rip), %rax\nret\n.size f,.-f\n\
             .section {section},\"{flags}\",@progbits\nthing: .long 1\n"
        );
        let b = bundle(&assemble(&src), &["f"]);
        match plan(&b).unwrap_err() {
            LinkError::RelocationToUnloaded {
                section: from,
                target,
                ..
            } => {
                assert_eq!((from.as_str(), target.as_str()), (".text", section));
            }
            e => panic!("{section}: {e}"),
        }
    }
    // Relocations *in* dropped sections are ignored.
    let src = ".text\n.globl f\n.type f,@function\nf: ret\n.size f,.-f\n\
               .section .discard.x,\"a\",@progbits\n.quad f\n.reloc ., R_X86_64_GOTPCREL, f\n.long 0\n";
    let b = bundle(&assemble(src), &["f"]);
    let p = plan(&b).unwrap();
    assert!(p.dropped.iter().any(|d| d.name == ".discard.x"));
}

#[test]
fn bad_fentry_references() {
    let cases = [
        // Not at the function entry.
        ".text\n.globl f\n.type f,@function\nf: nop\ncall __fentry__\nret\n.size f,.-f\n",
        // Not a call at all.
        ".text\n.globl f\n.type f,@function\nf: ret\n.size f,.-f\n.data\n.quad __fentry__\n",
        // jmp rather than call.
        ".text\n.globl f\n.type f,@function\nf: jmp __fentry__\n.size f,.-f\n",
    ];
    for src in cases {
        let b = bundle(&assemble(src), &["f"]);
        let e = plan(&b).unwrap_err();
        assert!(matches!(e, LinkError::BadFentryCall { .. }), "{src}: {e}");
    }
    // With endbr64 first it is accepted.
    let src = ".text\n.globl f\n.type f,@function\nf: endbr64\ncall __fentry__\nret\n.size f,.-f\n";
    let b = bundle(&assemble(src), &["f"]);
    let p = plan(&b).unwrap();
    assert_eq!(p.fentry_sites[0].offset, 4);
    assert_eq!(p.fentry_sites[0].function, "f");
}
