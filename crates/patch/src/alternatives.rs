//! CPU-feature alternatives in new code, applied when the bundle is linked, for the CPU the
//! guest runs on, with the result the kernel's own `apply_alternatives()`
//! (arch/x86/kernel/alternative.c, Linux 6.1) gives on that CPU.
//!
//! The linker loads `.altinstructions` (as read-only data) and `.altinstr_replacement` (as
//! code) like any section and applies their relocations, so each `struct alt_instr` then
//! holds the same self-relative offsets the kernel reads. For each entry whose feature
//! test passes, the replacement is copied over the original instruction: a `call rel32`
//! at its start gets its displacement moved to the new place, a `jmp` is re-encoded for
//! its new place (short when the kernel would make it short), and the rest is padded with
//! NOPs. Entries are applied in order, as the kernel does (a later one may overwrite an
//! earlier one).

use crate::bundle::Bundle;
use crate::link::{LinkError, Plan};
use crate::Linked;
use crate::RegionKind;

/// `struct alt_instr`: s32 instr_offset, s32 repl_offset, u16 cpuid, u8 instrlen, u8
/// replacementlen.
const ENTRY: usize = 12;
/// `ALTINSTR_FLAG_INV` in `cpuid`: patch when the feature is *absent*.
const FLAG_INV: u16 = 1 << 15;

/// The live CPU's feature words (`boot_cpu_data.x86_capability`, bugs included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFeatures {
    pub words: Vec<u32>,
}

impl CpuFeatures {
    pub(crate) fn has(&self, bit: u16) -> Option<bool> {
        let w = self.words.get(usize::from(bit / 32))?;
        Some(w & (1 << (bit % 32)) != 0)
    }
}

fn bad(reason: String) -> LinkError {
    LinkError::Alternative { reason }
}

/// The replacement bytes as they must stand at `instr` (kernel: `apply_alternatives`).
fn relocate_replacement(repl: &[u8], repl_addr: u64, instr_addr: u64, instrlen: usize) -> Vec<u8> {
    let mut buf = repl.to_vec();
    let disp = |b: &[u8]| i32::from_le_bytes(b[1..5].try_into().expect("5 bytes"));
    if buf.len() == 5 && buf[0] == 0xe8 {
        let d = disp(&buf).wrapping_add(repl_addr.wrapping_sub(instr_addr) as i32);
        buf[1..5].copy_from_slice(&d.to_le_bytes());
    }
    // recompute_jump(): only a 5-byte jmp replacement is re-encoded.
    if buf.len() == 5 && (buf[0] == 0xe9 || buf[0] == 0xeb) {
        let target = repl_addr
            .wrapping_add(5)
            .wrapping_add(disp(&buf) as i64 as u64);
        let n = target.wrapping_sub(instr_addr) as i64;
        if n >= 0 && n - 2 <= 127 {
            buf = vec![0xeb, (n - 2) as u8, 0x90, 0x90, 0x90];
        } else {
            buf = vec![0xe9];
            buf.extend(((n - 5) as i32).to_le_bytes());
        }
    }
    buf.resize(instrlen.max(buf.len()), 0x90);
    buf
}

/// Applies every alternative of the linked bundle for `cpu`; returns how many replaced
/// their original instruction.
pub fn apply_alternatives(
    bundle: &Bundle,
    plan: &Plan,
    linked: &mut Linked,
    cpu: &CpuFeatures,
) -> Result<usize, LinkError> {
    let mut applied = 0;
    for (index, sec) in bundle.object.sections.iter().enumerate() {
        if sec.name != ".altinstructions" {
            continue;
        }
        let Some((RegionKind::Rodata, off)) = plan.placement_of(index) else {
            return Err(bad(".altinstructions was not loaded".into()));
        };
        let base = linked.regions.rodata + off;
        for i in 0..sec.data.len() / ENTRY {
            let at = off as usize + i * ENTRY;
            let e: [u8; ENTRY] = linked.rodata[at..at + ENTRY].try_into().expect("entry");
            let field = base + (i * ENTRY) as u64;
            let rel = |o: usize| i32::from_le_bytes(e[o..o + 4].try_into().expect("4")) as i64;
            let instr = field.wrapping_add(rel(0) as u64);
            let repl = (field + 4).wrapping_add(rel(4) as u64);
            let cpuid = u16::from_le_bytes([e[8], e[9]]);
            let (instrlen, repllen) = (usize::from(e[10]), usize::from(e[11]));
            let feature = cpuid & !FLAG_INV;
            let has = cpu.has(feature).ok_or_else(|| {
                bad(format!(
                    "feature bit {feature} is beyond the CPU's {} feature words",
                    cpu.words.len()
                ))
            })?;
            if has == (cpuid & FLAG_INV != 0) {
                continue;
            }
            if repllen > instrlen {
                return Err(bad(format!(
                    "a {repllen}-byte replacement does not fit its {instrlen}-byte original"
                )));
            }
            let text = |addr: u64, len: usize| {
                let o = addr.wrapping_sub(linked.regions.text) as usize;
                (o + len <= linked.text.len()).then_some(o)
            };
            let (Some(io), Some(ro)) = (text(instr, instrlen), text(repl, repllen)) else {
                return Err(bad(format!(
                    "entry {i} points outside the bundle's code ({instr:#x}, {repl:#x})"
                )));
            };
            let bytes = linked.text[ro..ro + repllen].to_vec();
            let new = relocate_replacement(&bytes, repl, instr, instrlen);
            linked.text[io..io + instrlen].copy_from_slice(&new[..instrlen]);
            applied += 1;
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_jumps_move_like_the_kernel_moves_them() {
        // call +0x100 at the replacement, copied 0x40 bytes lower: displacement grows.
        let call = relocate_replacement(&[0xe8, 0, 1, 0, 0], 0x1040, 0x1000, 6);
        assert_eq!(call, vec![0xe8, 0x40, 1, 0, 0, 0x90]);
        // jmp to 0x1050 from a replacement at 0x2000: short from 0x1000.
        let d = (0x1050i64 - 0x2005) as i32;
        let mut jmp = vec![0xe9];
        jmp.extend(d.to_le_bytes());
        assert_eq!(
            relocate_replacement(&jmp, 0x2000, 0x1000, 5),
            vec![0xeb, 0x4e, 0x90, 0x90, 0x90]
        );
        // A backward target stays a 5-byte jmp (as the kernel's recompute_jump does).
        let d = (0x0f00i64 - 0x2005) as i32;
        let mut back = vec![0xe9];
        back.extend(d.to_le_bytes());
        let out = relocate_replacement(&back, 0x2000, 0x1000, 5);
        assert_eq!(out[0], 0xe9);
        assert_eq!(
            i32::from_le_bytes(out[1..5].try_into().unwrap()),
            0x0f00 - 0x1005
        );
        // Other instructions are copied and padded.
        assert_eq!(
            relocate_replacement(&[0x0f, 0xae, 0xe8], 0, 0, 5),
            vec![0x0f, 0xae, 0xe8, 0x90, 0x90]
        );
        let cpu = CpuFeatures {
            words: vec![0b10, 0],
        };
        assert_eq!(cpu.has(1), Some(true));
        assert_eq!(cpu.has(33), Some(false));
        assert_eq!(cpu.has(64), None);
    }
}
