use std::sync::OnceLock;

use super::*;
use crate::fake::{FakeMachine, FakeMem};
use crate::paging::{PageSize, CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA, GLOBAL, NX, PRESENT, RW};
use crate::regs::VcpuRegs;
use crate::testelf;

/// Link address of the fake kernel's first byte (its ELF header).
const LINK_BASE: u64 = 0xffff_ffff_8100_0000;
/// Where the fake kernel is loaded physically (2 MiB aligned).
const PHYS_LOAD: u64 = 0x0800_0000;
const IDT_VA: u64 = 0xffff_fe00_0000_0000;

const KERNEL_S: &str = r#"
.text
.globl _text
_text:
.macro handler name
.globl \name
.type \name,@function
\name: nop
  ret
.size \name, .-\name
.endm
handler asm_exc_divide_error
handler asm_exc_int3
handler asm_exc_page_fault
.globl _etext
_etext:
"#;

fn kernel() -> &'static [u8] {
    static ELF: OnceLock<Vec<u8>> = OnceLock::new();
    ELF.get_or_init(|| testelf::build(&[("head.S", KERNEL_S)], Some(LINK_BASE)))
}

fn syms() -> KernelSymbols {
    KernelSymbols::from_bytes(kernel().to_vec()).unwrap()
}

fn gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    g[5] = 0x8e;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

struct Guest {
    m: FakeMachine,
    idt_pa: u64,
    pml4: u64,
}

impl Guest {
    /// A booted guest with the fake kernel at `slide` and a full IDT.
    /// `user_pgd` puts the vCPU on a PTI user PGD that maps only the IDT.
    fn new(s: &KernelSymbols, slide: u64, user_pgd: bool) -> Guest {
        let mut mem = FakeMem::new();
        let pml4 = mem.new_pml4();
        let user = mem.new_pml4();
        assert_eq!(user, pml4 | PTI_USER_PGD_BIT);
        // The image is linked so that file offset == address - LINK_BASE.
        mem.write(PHYS_LOAD, kernel());
        mem.map(
            pml4,
            LINK_BASE + slide,
            PHYS_LOAD,
            PageSize::Size2M,
            PRESENT | RW | GLOBAL,
        );
        let idt_pa = mem.alloc_page();
        for cr3 in [pml4, user] {
            mem.map(cr3, IDT_VA, idt_pa, PageSize::Size4K, PRESENT | NX | GLOBAL);
        }
        let mut g = Guest {
            m: FakeMachine::new(mem, 2),
            idt_pa,
            pml4,
        };
        for (vector, names) in PROBES {
            g.set_gate(vector, s.lookup(names[0]).unwrap().addr + slide);
        }
        let regs = VcpuRegs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8) | (1 << 11),
            cr3: if user_pgd { user } else { pml4 } | 0x5, // PCID 5
            ..Default::default()
        };
        g.m.regs = vec![regs.clone(), regs];
        g.m.idt_bases = vec![IDT_VA, IDT_VA];
        g
    }

    fn set_gate(&mut self, vector: u8, handler: u64) {
        self.m
            .mem
            .write(self.idt_pa + 16 * vector as u64, &gate(handler));
    }
}

#[test]
fn gate_decoding() {
    let h = 0xffff_ffff_9a60_08b0;
    assert_eq!(decode_idt_gate(&gate(h)), Some(h));
    let mut trap = gate(h);
    trap[5] = 0x8f;
    assert_eq!(decode_idt_gate(&trap), Some(h));
    let mut absent = gate(h);
    absent[5] = 0x0e;
    assert_eq!(decode_idt_gate(&absent), None);
    let mut call_gate = gate(h);
    call_gate[5] = 0x8c;
    assert_eq!(decode_idt_gate(&call_gate), None);
}

#[test]
fn measures_slide_and_physical_base() {
    let s = syms();
    let text = s.lookup("_text").unwrap().addr;
    for slide in [0u64, 0x2a00_0000, MAX_SLIDE - SLIDE_ALIGN] {
        let mut g = Guest::new(&s, slide, false);
        let l = detect_layout(&mut g.m, 1, &s).unwrap();
        assert_eq!(l.slide, slide as i64);
        assert_eq!(l.cr3 & !0xfff, g.pml4);
        assert_eq!(l.text_start, text + slide);
        assert_eq!(l.text_end, s.lookup("_etext").unwrap().addr + slide);
        assert_eq!(l.image_end, s.lookup("_end").unwrap().addr + slide);
        assert_eq!(l.phys_text, PHYS_LOAD + (text - LINK_BASE));
        // The kernel's own formula: pa = va - __START_KERNEL_map + phys_base.
        let pa = l
            .text_start
            .wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(l.phys_base);
        assert_eq!(pa, l.phys_text);
        assert_eq!(l.live(text), text + slide);
        assert_eq!(l.link(text + slide), text);
        assert_eq!(l.image_phys(text + 2), Some(l.phys_text + 2));
        assert_eq!(l.image_phys(text - 0x10_0000), None);
        assert!(l.in_text(l.text_start) && !l.in_text(l.text_end));
        verify_build_id(&g.m, l.cr3, &s, &l).unwrap();
    }
}

#[test]
fn pti_user_pgd_falls_back_to_kernel_half() {
    let s = syms();
    let mut g = Guest::new(&s, 0x400_0000, true);
    let l = detect_layout(&mut g.m, 0, &s).unwrap();
    assert_eq!(l.slide, 0x400_0000);
    assert_eq!(l.cr3 & !0xfff, g.pml4);
}

#[test]
fn build_id_mismatch_shows_both() {
    let s = syms();
    let mut g = Guest::new(&s, 0x200_0000, false);
    let l = detect_layout(&mut g.m, 0, &s).unwrap();
    let off = s.notes_addr().unwrap() - LINK_BASE;
    g.m.mem.write(PHYS_LOAD + off, &[0xde, 0xad]);
    let e = verify_build_id(&g.m, l.cr3, &s, &l).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, KaslrError::BuildIdMismatch { .. }));
    assert!(
        msg.contains(&s.build_id_hex().unwrap()) && msg.contains("dead"),
        "{msg}"
    );
}

#[test]
fn disagreeing_handlers_are_refused() {
    let s = syms();
    let mut g = Guest::new(&s, 0x200_0000, false);
    let pf = s.lookup("asm_exc_page_fault").unwrap().addr;
    g.set_gate(14, pf + 0x400_0000);
    let e = detect_layout(&mut g.m, 0, &s).unwrap_err();
    assert!(matches!(e, KaslrError::InconsistentSlides { .. }), "{e}");
    assert!(e.to_string().contains("vector 14"), "{e}");
}

#[test]
fn misaligned_or_implausible_slides_are_refused() {
    let s = syms();
    let mut g = Guest::new(&s, 0, false);
    let mut set_slide = |slide: i64| {
        for (vector, names) in PROBES {
            let link = s.lookup(names[0]).unwrap().addr;
            g.set_gate(vector, link.wrapping_add(slide as u64));
        }
        detect_layout(&mut g.m, 0, &s).unwrap_err()
    };
    let e = set_slide(0x1000);
    assert!(
        matches!(e, KaslrError::MisalignedSlide { slide: 0x1000 }),
        "{e}"
    );
    let e = set_slide(-0x20_0000);
    assert!(matches!(e, KaslrError::ImplausibleSlide { .. }), "{e}");
    let e = set_slide(MAX_SLIDE as i64);
    assert!(matches!(e, KaslrError::ImplausibleSlide { .. }), "{e}");
}

#[test]
fn early_boot_states_are_refused() {
    let s = syms();
    let mut g = Guest::new(&s, 0x200_0000, false);
    g.m.mem.write(g.idt_pa + 16 * 3, &[0; 16]);
    let e = detect_layout(&mut g.m, 0, &s).unwrap_err();
    assert!(matches!(e, KaslrError::BadGate { vector: 3, .. }), "{e}");

    let mut g = Guest::new(&s, 0x200_0000, false);
    g.m.regs[0].cr4 |= CR4_LA57;
    let e = detect_layout(&mut g.m, 0, &s).unwrap_err();
    assert!(
        matches!(e, KaslrError::Paging(PagingError::FiveLevelPaging)),
        "{e}"
    );

    g.m.idt_bases[0] = 0xffff_fe00_0010_0000;
    g.m.regs[0].cr4 &= !CR4_LA57;
    let e = detect_layout(&mut g.m, 0, &s).unwrap_err();
    assert!(matches!(e, KaslrError::IdtUnreadable { .. }), "{e}");
    assert!(matches!(
        detect_layout(&mut g.m, 7, &s),
        Err(KaslrError::Machine(_))
    ));
}

#[test]
fn unmapped_text_is_reported() {
    let s = syms();
    let mut g = Guest::new(&s, 0x200_0000, false);
    // Clear the PD entry mapping the image.
    let text = s.lookup("_text").unwrap().addr + 0x200_0000;
    let w = crate::paging::walk(&g.m, g.pml4, crate::GuestVirtAddr(text)).unwrap();
    let pd = w.entry(crate::paging::Level::Pd).unwrap().entry_pa;
    g.m.mem.write_u64(pd.raw(), 0);
    let e = detect_layout(&mut g.m, 0, &s).unwrap_err();
    assert!(matches!(e, KaslrError::TextNotMapped { .. }), "{e}");
}
