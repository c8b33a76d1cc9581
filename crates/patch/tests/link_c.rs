//! Linking gcc-compiled kernel-style C; results are checked by decoding the output with
//! iced-x86 (independently of the relocation code).

mod common;

use std::collections::HashMap;

use common::{bundle, compile_c};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind};
use lucos_introspect::symbols::SymbolError;
use lucos_patch::{link, plan, LinkError, Linked, Regions, ResolveError, ENDBR64, NOP5, PAGE_SIZE};

const SRC: &str = r#"
extern int printk(const char *fmt, ...);
static int counter;
static int limit = 5;
__attribute__((noinline)) int helper(int x) { return x * 3 + limit; }
static int (*const ops[])(int) = { helper };
int (*table[2])(int) = { helper, 0 };
void *get_fn(void) { return (void *)helper; }
int lucos_new(int x)
{
	counter++;
	printk("hello %d\n", x);
	return ops[x & 0](x) + counter;
}
"#;

const PRINTK: u64 = 0xffff_ffff_8110_0000;
const BASES: Regions = Regions {
    text: 0xffff_ffff_c000_0000,
    rodata: 0xffff_ffff_c000_4000,
    data: 0xffff_ffff_c000_8000,
};

fn kernel() -> HashMap<&'static str, u64> {
    HashMap::from([("printk", PRINTK)])
}

/// What the engine's resolver says of a name vmlinux does not have.
fn not_found(name: &str) -> ResolveError {
    ResolveError::Symbol(SymbolError::NotFound {
        name: name.to_string(),
        variants: Vec::new(),
    })
}

fn resolve(name: &str) -> Result<u64, ResolveError> {
    kernel().get(name).copied().ok_or_else(|| not_found(name))
}

fn decode_fn(linked: &Linked, name: &str, len: usize) -> Vec<Instruction> {
    let addr = linked.new_fn_addr(name).unwrap();
    let off = (addr - linked.regions.text) as usize;
    let mut d = Decoder::with_ip(64, &linked.text[off..off + len], addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        out.push(d.decode());
    }
    out
}

#[test]
fn plan_classifies_sections_and_needs() {
    let b = bundle(&compile_c(SRC, &[]), &["lucos_new"]);
    let p = plan(&b).unwrap();
    let names = |r: &lucos_patch::RegionPlan| {
        r.sections
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    };
    let text = names(&p.text);
    for s in [".text.helper", ".text.get_fn", ".text.lucos_new"] {
        assert!(text.contains(&s.to_string()), "{s} not in {text:?}");
    }
    assert!(
        names(&p.rodata).iter().any(|n| n.starts_with(".rodata")),
        "{:?}",
        p.rodata
    );
    let data = names(&p.data);
    assert!(
        data.contains(&".data.table".to_string()) && data.contains(&".bss.counter".to_string()),
        "{data:?}"
    );
    for s in ["__mcount_loc", ".comment", ".note.GNU-stack", ".eh_frame"] {
        let d = p
            .dropped
            .iter()
            .find(|d| d.name == s)
            .unwrap_or_else(|| panic!("{s} not dropped"));
        assert!(!d.reason.is_empty());
    }
    assert_eq!(
        p.undefined,
        vec!["printk".to_string()],
        "__fentry__ must not be resolved"
    );
    assert_eq!(p.fentry_sites.len(), 3);
    assert!(p.fentry_sites.iter().all(|s| s.offset == 0));
    // Sections are aligned inside their region.
    for s in &p.text.sections {
        assert_eq!(s.offset % 16, 0, "{s:?}");
    }
    assert_eq!(p.text.page_size() % PAGE_SIZE, 0);
    assert!(p.text.page_size() >= p.text.size);
}

#[test]
fn links_and_resolves() {
    let b = bundle(&compile_c(SRC, &[]), &["lucos_new"]);
    let p = plan(&b).unwrap();
    let asked = std::cell::RefCell::new(Vec::new());
    let resolver = |n: &str| {
        asked.borrow_mut().push(n.to_string());
        resolve(n)
    };
    let l = link(&b, &p, BASES, &resolver).unwrap();
    assert_eq!(
        asked.into_inner(),
        vec!["printk"],
        "asked once, never for __fentry__"
    );
    assert_eq!(l.resolved.get("printk"), Some(&PRINTK));
    assert_eq!(l.text.len() as u64, p.text.size);

    let helper = l.symbols["helper"];
    let counter = l.symbols["counter"];
    assert!(helper >= BASES.text && helper < BASES.text + p.text.size);
    assert!(counter >= BASES.data && counter < BASES.data + p.data.size);

    // Every function starts with the NOP5 instead of `call __fentry__`.
    for f in ["helper", "get_fn", "lucos_new"] {
        let off = (l.symbols[f] - BASES.text) as usize;
        assert_eq!(l.text[off..off + 5], NOP5, "{f}");
    }

    let insns = decode_fn(&l, "lucos_new", 0x2e);
    let calls: Vec<u64> = insns
        .iter()
        .filter(|i| i.code() == Code::Call_rel32_64)
        .map(|i| i.near_branch_target())
        .collect();
    assert_eq!(calls, vec![PRINTK, helper], "PLT32 to printk and to helper");
    let rip_targets: Vec<u64> = insns
        .iter()
        .filter(|i| i.is_ip_rel_memory_operand())
        .map(|i| i.ip_rel_memory_address())
        .collect();
    assert_eq!(
        rip_targets,
        vec![counter, counter],
        "PC32 with addends -5 and -4"
    );
    // movq $"hello %d\n", %rdi: a 32S reference to the string in rodata.
    let imm = insns
        .iter()
        .find(|i| i.code() == Code::Mov_rm64_imm32)
        .map(|i| i.immediate32to64() as u64)
        .unwrap();
    assert!(
        imm >= BASES.rodata && imm < BASES.rodata + p.rodata.size,
        "{imm:#x}"
    );
    let off = (imm - BASES.rodata) as usize;
    assert_eq!(&l.rodata[off..off + 10], b"hello %d\n\0");

    // get_fn: movq $helper, %rax (32S).
    let insns = decode_fn(&l, "get_fn", 13);
    assert_eq!(insns[1].code(), Code::Mov_rm64_imm32);
    assert_eq!(insns[1].op1_kind(), OpKind::Immediate32to64);
    assert_eq!(insns[1].immediate32to64() as u64, helper);

    // table[0] = helper (R_X86_64_64 in .data).
    let off = (l.symbols["table"] - BASES.data) as usize;
    assert_eq!(l.data[off..off + 8], helper.to_le_bytes());
    assert_eq!(l.data[off + 8..off + 16], [0; 8]);
    // .bss is zero.
    let off = (counter - BASES.data) as usize;
    assert_eq!(l.data[off..off + 4], [0; 4]);
}

#[test]
fn endbr64_functions() {
    let b = bundle(&compile_c(SRC, &["-fcf-protection=branch"]), &["lucos_new"]);
    let p = plan(&b).unwrap();
    assert!(
        p.fentry_sites.iter().all(|s| s.offset == 4),
        "{:?}",
        p.fentry_sites
    );
    let l = link(&b, &p, BASES, &resolve).unwrap();
    let off = (l.new_fn_addr("lucos_new").unwrap() - BASES.text) as usize;
    assert_eq!(l.text[off..off + 4], ENDBR64);
    assert_eq!(l.text[off + 4..off + 9], NOP5);
}

#[test]
fn overflow_and_unresolved() {
    let b = bundle(&compile_c(SRC, &[]), &["lucos_new"]);
    let p = plan(&b).unwrap();

    // printk more than 2 GiB away from the text region: the call's PLT32 overflows.
    let far_printk = |n: &str| {
        if n == "printk" {
            Ok(0xffff_ffff_0000_0000)
        } else {
            resolve(n)
        }
    };
    match link(&b, &p, BASES, &far_printk).unwrap_err() {
        LinkError::RelocationOverflow {
            symbol,
            r_type,
            section,
            offset,
            value,
            ..
        } => {
            assert_eq!(
                (symbol.as_str(), r_type.as_str(), section.as_str()),
                ("printk", "R_X86_64_PLT32", ".text.lucos_new")
            );
            assert_eq!(offset, 0x1b);
            let lucos_new = BASES.text
                + p.text
                    .sections
                    .iter()
                    .find(|s| s.name == ".text.lucos_new")
                    .unwrap()
                    .offset;
            assert_eq!(
                value,
                0xffff_ffff_0000_0000u64
                    .wrapping_sub(4)
                    .wrapping_sub(lucos_new + 0x1b)
            );
        }
        e => panic!("expected overflow, got {e}"),
    }
    // Text in vmalloc space: `movq $helper, %rax` (32S) cannot hold helper's address.
    let far = Regions {
        text: 0xffff_c900_0000_0000,
        ..BASES
    };
    match link(&b, &p, far, &resolve).unwrap_err() {
        LinkError::RelocationOverflow { symbol, r_type, .. } => {
            assert_eq!(
                (symbol.as_str(), r_type.as_str()),
                ("helper", "R_X86_64_32S")
            );
        }
        e => panic!("expected overflow, got {e}"),
    }
    // rodata below the top 2 GiB: `movq $str, %rdi` (32S) cannot hold it.
    let low = Regions {
        rodata: 0xffff_c900_0000_0000,
        ..BASES
    };
    match link(&b, &p, low, &resolve).unwrap_err() {
        LinkError::RelocationOverflow { r_type, value, .. } => {
            assert_eq!(r_type, "R_X86_64_32S");
            assert_eq!(value, 0xffff_c900_0000_0000);
        }
        e => panic!("expected overflow, got {e}"),
    }

    let e = link(&b, &p, BASES, &|n: &str| Err(not_found(n))).unwrap_err();
    assert!(
        matches!(
            &e,
            LinkError::UnresolvedSymbol {
                name,
                source: ResolveError::Symbol(SymbolError::NotFound { name: missing, .. }),
            } if name == "printk" && missing == "printk"
        ),
        "{e:?}"
    );
    // The message still says why, and the typed cause stays reachable as the source.
    assert!(
        e.to_string().contains("no symbol `printk` in vmlinux"),
        "{e}"
    );
    let source = std::error::Error::source(&e).expect("a source");
    assert_eq!(source.to_string(), not_found("printk").to_string());
}

#[test]
fn bad_regions_and_plan_mismatch() {
    let b = bundle(&compile_c(SRC, &[]), &["lucos_new"]);
    let p = plan(&b).unwrap();
    let e = link(
        &b,
        &p,
        Regions {
            text: BASES.text + 8,
            ..BASES
        },
        &resolve,
    )
    .unwrap_err();
    assert!(matches!(e, LinkError::BadRegions { .. }), "{e}");
    let e = link(
        &b,
        &p,
        Regions {
            data: BASES.text,
            ..BASES
        },
        &resolve,
    )
    .unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");

    let other = bundle(&compile_c(SRC, &["-fcf-protection=branch"]), &["lucos_new"]);
    let e = link(&other, &p, BASES, &resolve).unwrap_err();
    assert!(matches!(e, LinkError::PlanMismatch), "{e}");
}

#[test]
fn refused_sections() {
    let cases = [(
        ".init.text",
        r#"__attribute__((section(".init.text"))) int setup_x(void) { return 1; }
            int lucos_new(int x) { return x + setup_x(); }"#,
    )];
    for (section, src) in cases {
        let b = bundle(&compile_c(src, &[]), &["lucos_new"]);
        match plan(&b).unwrap_err() {
            LinkError::UnsupportedSection { section: s, reason } => {
                assert_eq!(s, section);
                assert!(reason.contains("later lucos version"), "{reason}");
            }
            e => panic!("{section}: expected UnsupportedSection, got {e}"),
        }
    }
}

/// Tables the kernel is told about through the bundle's module are loaded like data.
#[test]
fn registered_tables_are_loaded() {
    let src = r#"int lucos_new(int x) {
        asm volatile("1: nop\n.pushsection __ex_table,\"a\"\n.long 1b - .\n.long 1b - .\n.long 0\n.popsection");
        asm volatile("2: ud2\n.pushsection __bug_table,\"aw\"\n.long 2b - .\n.long 0\n.short 0\n.short 0\n.popsection");
        asm goto("3: jmp %l[l]\n.pushsection __jump_table,\"aw\"\n.long 3b - .\n.long %l[l] - .\n.quad 0\n.popsection" : : : : l);
        return x; l: return 0; }"#;
    let b = bundle(&compile_c(src, &[]), &["lucos_new"]);
    let p = plan(&b).unwrap();
    assert!(p.rodata.sections.iter().any(|s| s.name == "__ex_table"));
    assert!(p.data.sections.iter().any(|s| s.name == "__bug_table"));
    assert!(p.data.sections.iter().any(|s| s.name == "__jump_table"));
}

#[test]
fn common_symbols_are_refused() {
    let src = "int shared_thing; int lucos_new(int x) { return shared_thing + x; }";
    let b = bundle(&compile_c(src, &["-fcommon"]), &["lucos_new"]);
    let e = plan(&b).unwrap_err();
    assert!(
        matches!(&e, LinkError::CommonSymbol { name } if name == "shared_thing"),
        "{e}"
    );
    assert!(e.to_string().contains("-fno-common"));
}
