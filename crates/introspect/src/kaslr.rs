//! Where the running kernel really is: the KASLR slide and physical load
//! address, measured from hardware-visible state (IDTR, the IDT the CPU
//! dispatches through, the page tables at CR3), never from anything the
//! guest reports about itself.

use serde::Serialize;

use crate::addr::GuestVirtAddr;
use crate::machine::{Machine, MachineError, PhysMem};
use crate::paging::{self, PagingError};
use crate::symbols::{KernelSymbols, SymbolError, START_KERNEL_MAP};

/// x86-64 KASLR moves the kernel in units of CONFIG_PHYSICAL_ALIGN, which
/// must be a multiple of 2 MiB; any other slide means a wrong vmlinux.
pub const SLIDE_ALIGN: u64 = 0x20_0000;
/// The image must stay inside the 1 GiB kernel image mapping (KERNEL_IMAGE_SIZE).
pub const MAX_SLIDE: u64 = 1 << 30;
/// Bit of a PTI kernel's CR3 that selects the user half of the PGD pair.
pub const PTI_USER_PGD_BIT: u64 = 1 << 12;

/// Exception vectors used to measure the slide, with their handler names
/// (current, then pre-5.8 kernels).
const PROBES: [(u8, &[&str]); 3] = [
    (0, &["asm_exc_divide_error", "divide_error"]),
    (3, &["asm_exc_int3", "int3"]),
    (14, &["asm_exc_page_fault", "page_fault"]),
];

/// The running kernel's placement. Addresses named `live` are what the
/// guest uses now; link-time ones are what vmlinux says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelLayout {
    /// live = link-time + slide.
    pub slide: i64,
    /// A CR3 that maps the whole kernel image: the physical address of
    /// `init_top_pgt` when vmlinux has it (stable for the kernel's life),
    /// else the vCPU's (with PTI, its kernel half; PCID bits are ignored).
    pub cr3: u64,
    /// Live `_text`, `_etext` and `_end`.
    pub text_start: u64,
    pub text_end: u64,
    pub image_end: u64,
    /// Physical address of `_text`.
    pub phys_text: u64,
    /// The kernel's `phys_base`: pa = live_va - START_KERNEL_MAP + phys_base
    /// for image addresses.
    pub phys_base: u64,
}

impl KernelLayout {
    /// Live address of a link-time address.
    pub fn live(&self, link: u64) -> u64 {
        link.wrapping_add(self.slide as u64)
    }

    /// Link-time address of a live address.
    pub fn link(&self, live: u64) -> u64 {
        live.wrapping_sub(self.slide as u64)
    }

    /// Physical address of a link-time image address (`_text`..`_end`), from
    /// the kernel's linear image mapping; `None` outside the image.
    pub fn image_phys(&self, link: u64) -> Option<u64> {
        let live = self.live(link);
        (live >= self.text_start && live < self.image_end).then(|| {
            live.wrapping_sub(START_KERNEL_MAP)
                .wrapping_add(self.phys_base)
        })
    }

    /// Whether a live address is in kernel text (`_text`..`_etext`).
    pub fn in_text(&self, live: u64) -> bool {
        live >= self.text_start && live < self.text_end
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KaslrError {
    #[error("reading vCPU state: {0}")]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Paging(#[from] PagingError),
    #[error(transparent)]
    Symbol(#[from] SymbolError),
    #[error("cannot read IDT vector {vector} at {addr:#x} through CR3 {cr3:#x}: {source}")]
    IdtUnreadable {
        vector: u8,
        addr: u64,
        cr3: u64,
        #[source]
        source: PagingError,
    },
    #[error("IDT vector {vector} is not a present 64-bit interrupt/trap gate (bytes {raw}); the kernel is probably still booting (or uses FRED): retry once it is up")]
    BadGate { vector: u8, raw: String },
    #[error("the IDT handlers imply different KASLR slides ({detail}); this vmlinux does not match the running kernel, or the kernel is still on its early boot IDT")]
    InconsistentSlides { detail: String },
    #[error("KASLR slide {slide:#x} is not a multiple of 2 MiB (CONFIG_PHYSICAL_ALIGN); this vmlinux does not match the running kernel")]
    MisalignedSlide { slide: i64 },
    #[error("KASLR slide {slide:#x} is outside 0..1 GiB, which x86-64 KASLR never produces; this vmlinux does not match the running kernel")]
    ImplausibleSlide { slide: i64 },
    #[error("the kernel text at {live_text:#x} is not mapped through CR3 {cr3:#x}: {source}")]
    TextNotMapped {
        live_text: u64,
        cr3: u64,
        #[source]
        source: PagingError,
    },
    #[error("cannot read the running kernel's build id at {addr:#x}: {source}")]
    BuildIdUnreadable {
        addr: u64,
        #[source]
        source: PagingError,
    },
    #[error("the running kernel's build id is {live} but vmlinux's is {vmlinux}; point lucos at the vmlinux of the kernel that was booted")]
    BuildIdMismatch { vmlinux: String, live: String },
}

/// The handler address of a 16-byte 64-bit IDT gate, if it is a present
/// interrupt (0xE) or trap (0xF) gate.
pub fn decode_idt_gate(raw: &[u8; 16]) -> Option<u64> {
    let attr = raw[5];
    if attr & 0x80 == 0 || !matches!(attr & 0x1f, 0x0e | 0x0f) {
        return None;
    }
    let lo = u16::from_le_bytes([raw[0], raw[1]]) as u64;
    let mid = u16::from_le_bytes([raw[6], raw[7]]) as u64;
    let hi = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) as u64;
    Some(lo | mid << 16 | hi << 32)
}

fn lookup_any(syms: &KernelSymbols, names: &[&str]) -> Result<u64, SymbolError> {
    let mut first_err = None;
    for n in names {
        match syms.lookup(n) {
            Ok(s) => return Ok(s.addr),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("at least one name"))
}

/// Measures the slide from the IDT of vCPU `vcpu` (which must be paused)
/// and locates the kernel image physically.
pub fn detect_layout(
    machine: &mut (impl Machine + ?Sized),
    vcpu: usize,
    syms: &KernelSymbols,
) -> Result<KernelLayout, KaslrError> {
    let regs = machine.vcpu_regs(vcpu)?;
    paging::check_paging_mode(&regs)?;
    let idt = machine.idt_base(vcpu)?;
    let mem = &*machine;

    let mut seen: Vec<(u8, &str, u64, i64)> = Vec::new();
    for (vector, names) in PROBES {
        let link = lookup_any(syms, names)?;
        let addr = idt.wrapping_add(16 * vector as u64);
        let mut raw = [0u8; 16];
        paging::read_virt(mem, regs.cr3, GuestVirtAddr(addr), &mut raw).map_err(|source| {
            KaslrError::IdtUnreadable {
                vector,
                addr,
                cr3: regs.cr3,
                source,
            }
        })?;
        let live = decode_idt_gate(&raw).ok_or_else(|| KaslrError::BadGate {
            vector,
            raw: hex::encode(raw),
        })?;
        seen.push((vector, names[0], live, live.wrapping_sub(link) as i64));
    }
    let slide = seen[0].3;
    if seen.iter().any(|s| s.3 != slide) {
        let detail = seen
            .iter()
            .map(|(v, n, live, s)| format!("vector {v} -> {live:#x} ({n}): {s:#x}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(KaslrError::InconsistentSlides { detail });
    }
    if slide < 0 || slide as u64 >= MAX_SLIDE {
        return Err(KaslrError::ImplausibleSlide { slide });
    }
    if slide as u64 & (SLIDE_ALIGN - 1) != 0 {
        return Err(KaslrError::MisalignedSlide { slide });
    }

    let live = |name: &str| -> Result<u64, SymbolError> {
        Ok(syms.lookup(name)?.addr.wrapping_add(slide as u64))
    };
    let text_start = live("_text")?;
    // With PTI the vCPU may be on a user PGD, which maps the IDT but not
    // all of the kernel; its kernel twin is the page below.
    let mut cr3 = regs.cr3;
    let phys_text = match paging::translate(mem, cr3, GuestVirtAddr(text_start)) {
        Ok(t) => t.pa.raw(),
        Err(first) if cr3 & PTI_USER_PGD_BIT != 0 => {
            let kernel = cr3 & !PTI_USER_PGD_BIT;
            match paging::translate(mem, kernel, GuestVirtAddr(text_start)) {
                Ok(t) => {
                    cr3 = kernel;
                    t.pa.raw()
                }
                Err(_) => return Err(text_not_mapped(text_start, cr3, first)),
            }
        }
        Err(e) => return Err(text_not_mapped(text_start, cr3, e)),
    };
    let mut layout = KernelLayout {
        slide,
        cr3,
        text_start,
        text_end: live("_etext")?,
        image_end: live("_end")?,
        phys_text,
        phys_base: phys_text.wrapping_sub(text_start.wrapping_sub(START_KERNEL_MAP)),
    };
    // A vCPU's CR3 may belong to a short-lived process whose page tables
    // get freed; the kernel's own top-level table (`init_top_pgt`) maps the
    // same kernel half and lives as long as the kernel. Use it when it
    // really maps the kernel.
    if let Some(pgd) = syms
        .lookup("init_top_pgt")
        .ok()
        .and_then(|s| layout.image_phys(s.addr))
    {
        if paging::translate(mem, pgd, GuestVirtAddr(text_start))
            .is_ok_and(|t| t.pa.raw() == phys_text)
        {
            layout.cr3 = pgd;
        }
    }
    Ok(layout)
}

fn text_not_mapped(live_text: u64, cr3: u64, source: PagingError) -> KaslrError {
    KaslrError::TextNotMapped {
        live_text,
        cr3,
        source,
    }
}

/// Checks that the build id in guest memory equals vmlinux's, so symbol
/// addresses and expected bytes really describe the running kernel.
pub fn verify_build_id(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    syms: &KernelSymbols,
    layout: &KernelLayout,
) -> Result<(), KaslrError> {
    let want = syms.build_id()?;
    let addr = layout.live(syms.notes_addr()?);
    let mut got = vec![0u8; want.len()];
    paging::read_virt(mem, cr3, GuestVirtAddr(addr), &mut got)
        .map_err(|source| KaslrError::BuildIdUnreadable { addr, source })?;
    if got != want {
        return Err(KaslrError::BuildIdMismatch {
            vmlinux: hex::encode(want),
            live: hex::encode(&got),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
