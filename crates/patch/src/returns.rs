//! Return-thunk sites in new code, rewritten when the bundle is linked exactly as the
//! kernel's own `apply_returns()` (arch/x86/kernel/alternative.c, Linux 6.1.187) rewrote
//! every return of the running kernel and its modules.
//!
//! The kernel is built with `-mfunction-return=thunk-extern`: every `ret` is compiled as
//! `jmp __x86_return_thunk`. At boot the kernel rewrites each such site to a plain `ret`
//! when the CPU needs no return mitigation, or to `jmp x86_return_thunk` (the mitigation's
//! thunk: retbleed's, SRSO's or ITS's) when it does. `__x86_return_thunk` itself stays a
//! bare `ret`, so leaving new code's jumps to it would be fast but *unmitigated* on a CPU
//! that needs the mitigation, and one jump slower than the kernel's code on one that does
//! not. Doing what `patch_return()` does gives new code the same returns as the code it
//! replaces.

use crate::elf::SymPlace;
use crate::link::{LinkError, Plan};
use crate::site::{jmp_rel32, jmp_target, PATCHED_RETURN};
use crate::{Bundle, CpuFeatures, RegionKind};

/// The symbol compiled returns jump to.
pub const RETURN_THUNK: &str = "__x86_return_thunk";

const JMP32: u8 = 0xe9;

/// What a return site becomes on the live CPU (`cpu_wants_rethunk_at()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnMode {
    /// `X86_FEATURE_RETHUNK` is off: `ret; int3; int3; int3; int3`.
    Ret,
    /// `jmp x86_return_thunk` (its live value) at every site.
    Thunk(u64),
    /// The ITS return thunk: `jmp its_return_thunk` where bit 5 of the site's address is
    /// clear, `ret` where it is set (the kernel's ITS rule).
    Its(u64),
}

/// `X86_FEATURE_RETHUNK` (11*32+14) in `boot_cpu_data.x86_capability`.
pub const FEATURE_RETHUNK: u16 = 11 * 32 + 14;

impl ReturnMode {
    /// The kernel's choice from the live CPU feature bit and the live `x86_return_thunk`
    /// pointer; `its_thunk` is `its_return_thunk`'s address, if the kernel has it.
    pub fn live(rethunk: bool, x86_return_thunk: u64, its_thunk: Option<u64>) -> Self {
        match (rethunk, its_thunk) {
            (false, _) => ReturnMode::Ret,
            (true, Some(its)) if its == x86_return_thunk => ReturnMode::Its(its),
            (true, _) => ReturnMode::Thunk(x86_return_thunk),
        }
    }

    fn bytes(self, site: u64) -> Result<[u8; 5], LinkError> {
        match self {
            ReturnMode::Thunk(t) => jmp_rel32(site, t),
            ReturnMode::Its(t) if site & 0x20 == 0 => jmp_rel32(site, t),
            ReturnMode::Ret | ReturnMode::Its(_) => Ok(PATCHED_RETURN),
        }
    }
}

/// Rewrites each return site (`sites`: offsets into `text`, which is linked at
/// `text_base`) for `mode`. Each must be `jmp __x86_return_thunk` (at `thunk`): anything
/// else means the site list and the code disagree, which the kernel would warn about
/// ("missing return thunk") and lucos refuses.
pub fn apply_returns(
    text: &mut [u8],
    text_base: u64,
    sites: &[u64],
    thunk: u64,
    mode: ReturnMode,
) -> Result<usize, LinkError> {
    // Check and encode every site before writing any, so a refusal leaves the code as linked.
    let mut new = Vec::with_capacity(sites.len());
    for &off in sites {
        let at = off as usize;
        let site = text_base + off;
        let Some(b) = text.get(at..at + 5) else {
            return Err(not_a_site(off, "past the end of the bundle's code"));
        };
        if jmp_target(site, b.try_into().expect("5 bytes")) != Some(thunk) {
            return Err(not_a_site(off, "not a `jmp __x86_return_thunk`"));
        }
        new.push((at, mode.bytes(site)?));
    }
    for (at, bytes) in new {
        text[at..at + 5].copy_from_slice(&bytes);
    }
    Ok(sites.len())
}

/// Offsets in the text region of new code's `jmp __x86_return_thunk`: the relocations to
/// the thunk at a `jmp rel32`, which are exactly the sites objtool lists in `.return_sites`
/// (which the builder does not carry). A reference to the thunk that is not a `jmp` is
/// left alone, as the kernel leaves it (with a warning).
pub fn return_sites(bundle: &Bundle, plan: &Plan) -> Vec<u64> {
    let obj = &bundle.object;
    let mut sites = Vec::new();
    for (index, sec) in obj.sections.iter().enumerate() {
        let Some((RegionKind::Text, base)) = plan.placement_of(index) else {
            continue;
        };
        for r in &sec.relocs {
            let sym = &obj.symbols[r.sym];
            let is_jmp = r.offset >= 1 && sec.data.get(r.offset as usize - 1) == Some(&JMP32);
            if sym.name == RETURN_THUNK && matches!(sym.place, SymPlace::Undefined) && is_jmp {
                sites.push(base + r.offset - 1);
            }
        }
    }
    sites
}

fn not_a_site(offset: u64, what: &'static str) -> LinkError {
    LinkError::ReturnSite { offset, what }
}

/// `X86_FEATURE_INDIRECT_THUNK_ITS` (21*32+5).
pub const FEATURE_INDIRECT_THUNK_ITS: u16 = 21 * 32 + 5;

/// New code's indirect calls through the shared spectre-v2 thunks are mitigated as the
/// kernel's own (the thunk bodies were patched at boot), except under ITS, where the
/// kernel rewrites every call site instead and the shared thunk is not safe.
pub(crate) fn check_indirect_thunks(cpu: &CpuFeatures, refs: usize) -> Result<(), LinkError> {
    if refs > 0 && cpu.has(FEATURE_INDIRECT_THUNK_ITS).unwrap_or(false) {
        return Err(LinkError::IndirectThunksNeedIts { count: refs });
    }
    Ok(())
}

/// How many of new code's relocations reference a `__x86_indirect_thunk_*` (objtool's
/// `.retpoline_sites`).
pub(crate) fn indirect_thunk_refs(bundle: &Bundle) -> usize {
    let obj = &bundle.object;
    obj.sections
        .iter()
        .flat_map(|s| &s.relocs)
        .filter(|r| obj.symbols[r.sym].name.starts_with("__x86_indirect_thunk_"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xffff_ffff_c000_0000;
    const THUNK: u64 = 0xffff_ffff_8100_0000;

    /// Code with `jmp __x86_return_thunk` at offsets 0x10 and 0x20, linked at BASE.
    fn code() -> Vec<u8> {
        let mut t = vec![0x90u8; 0x40];
        for off in [0x10u64, 0x20] {
            let d = THUNK.wrapping_sub(BASE + off + 5) as i64 as i32;
            t[off as usize] = JMP32;
            t[off as usize + 1..off as usize + 5].copy_from_slice(&d.to_le_bytes());
        }
        t
    }

    fn target(t: &[u8], off: u64) -> u64 {
        jmp_target(
            BASE + off,
            t[off as usize..off as usize + 5].try_into().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn indirect_thunk_calls_are_refused_only_under_its() {
        let mut words = vec![0u32; 22];
        assert!(check_indirect_thunks(
            &CpuFeatures {
                words: words.clone()
            },
            3
        )
        .is_ok());
        words[21] |= 1 << 5;
        let its = CpuFeatures { words };
        assert!(matches!(
            check_indirect_thunks(&its, 3),
            Err(LinkError::IndirectThunksNeedIts { count: 3 })
        ));
        assert!(check_indirect_thunks(&its, 0).is_ok());
    }

    #[test]
    fn the_mode_is_the_kernels_choice() {
        assert_eq!(ReturnMode::live(false, THUNK, Some(7)), ReturnMode::Ret);
        assert_eq!(ReturnMode::live(true, 5, Some(7)), ReturnMode::Thunk(5));
        assert_eq!(ReturnMode::live(true, 5, None), ReturnMode::Thunk(5));
        assert_eq!(ReturnMode::live(true, 7, Some(7)), ReturnMode::Its(7));
    }

    #[test]
    fn returns_become_ret_without_the_mitigation() {
        let mut t = code();
        assert_eq!(
            apply_returns(&mut t, BASE, &[0x10, 0x20], THUNK, ReturnMode::Ret).unwrap(),
            2
        );
        for off in [0x10, 0x20] {
            assert_eq!(t[off..off + 5], PATCHED_RETURN);
        }
    }

    #[test]
    fn returns_jump_to_the_live_thunk_with_it() {
        let srso = 0xffff_ffff_8200_0040;
        let mut t = code();
        apply_returns(&mut t, BASE, &[0x10, 0x20], THUNK, ReturnMode::Thunk(srso)).unwrap();
        assert_eq!((t[0x10], target(&t, 0x10)), (JMP32, srso));
        assert_eq!((t[0x20], target(&t, 0x20)), (JMP32, srso));
    }

    #[test]
    fn the_its_thunk_is_used_where_bit_5_is_clear() {
        let its = 0xffff_ffff_8300_0000;
        let mut t = code();
        apply_returns(&mut t, BASE, &[0x10, 0x20], THUNK, ReturnMode::Its(its)).unwrap();
        assert_eq!((t[0x10], target(&t, 0x10)), (JMP32, its));
        assert_eq!(t[0x20..0x25], PATCHED_RETURN);
    }

    #[test]
    fn a_site_that_is_not_a_thunk_jump_is_refused_and_nothing_changes() {
        let mut t = code();
        let before = t.clone();
        // 0x08 is NOPs: the good site before it must not have been rewritten either.
        assert!(apply_returns(&mut t, BASE, &[0x10, 0x08], THUNK, ReturnMode::Ret).is_err());
        assert_eq!(t, before);
        assert!(apply_returns(&mut t, BASE, &[0x3e], THUNK, ReturnMode::Ret).is_err());
        assert_eq!(t, before);
    }
}
