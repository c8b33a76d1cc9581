//! The 5-byte fentry site: what may be found there and the `jmp rel32` written over it.
//!
//! Decoding goes through iced-x86 rather than byte compares alone so that a site whose first
//! byte merely looks right (e.g. `e9` starting a longer garbage sequence) is never accepted.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};
use thiserror::Error;

use crate::link::LinkError;

/// The 5-byte NOP ftrace leaves at every fentry site (and the linker writes into new code).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`, which precedes the fentry site on IBT kernels.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// What a valid fentry site holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    /// The NOP5: not patched by anyone.
    Nop,
    /// `jmp rel32` to `target`: already redirected (by lucos, if `target` is in patch memory).
    Jmp { target: u64 },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SiteError {
    #[error("fentry site at {ip:#x}: only {len} bytes given; read at least 5")]
    TooShort { ip: u64, len: usize },
    #[error(
        "fentry site at {ip:#x} holds `{insn}`: ftrace owns this function (function tracer, \
         kprobe-on-ftrace or the guest's own livepatch); disable that tracing and retry"
    )]
    FtraceOwned { ip: u64, insn: String },
    #[error(
        "fentry site at {ip:#x} starts with int3: a kprobe is armed there or a text_poke is in \
         progress; remove the kprobe (or retry) before patching"
    )]
    Breakpoint { ip: u64 },
    #[error(
        "fentry site at {ip:#x} holds {bytes} (`{insn}`), not the NOP5 0f1f440000 or a jmp \
         rel32; the live text is not what this bundle expects (wrong function, wrong \
         site_offset, or a kernel without -mfentry)"
    )]
    Unexpected {
        ip: u64,
        bytes: String,
        insn: String,
    },
}

fn format_insn(insn: &Instruction) -> String {
    if insn.is_invalid() {
        return "(invalid)".into();
    }
    let mut out = String::new();
    iced_x86::FastFormatter::new().format(insn, &mut out);
    out
}

/// Decodes the instruction at the start of `bytes`, located at `ip`.
fn decode_one(bytes: &[u8], ip: u64) -> Instruction {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    d.decode()
}

/// Classifies the bytes at a live fentry site (`bytes` starts at the site, `ip` is its address).
///
/// Accepts exactly one 5-byte instruction: the NOP5, or `jmp rel32`.
pub fn check_fentry_site(bytes: &[u8], ip: u64) -> Result<SiteKind, SiteError> {
    if bytes.len() < 5 {
        return Err(SiteError::TooShort {
            ip,
            len: bytes.len(),
        });
    }
    let insn = decode_one(bytes, ip);
    if !insn.is_invalid() && insn.len() == 5 {
        if bytes[..5] == NOP5 {
            return Ok(SiteKind::Nop);
        }
        if insn.code() == Code::Jmp_rel32_64 {
            return Ok(SiteKind::Jmp {
                target: insn.near_branch_target(),
            });
        }
        if insn.code() == Code::Call_rel32_64 {
            return Err(SiteError::FtraceOwned {
                ip,
                insn: format_insn(&insn),
            });
        }
    }
    if bytes[0] == 0xcc {
        return Err(SiteError::Breakpoint { ip });
    }
    Err(SiteError::Unexpected {
        ip,
        bytes: hex::encode(&bytes[..5]),
        insn: format_insn(&insn),
    })
}

/// True when `bytes` decode as exactly one 5-byte instruction: no instruction boundary
/// lies inside them, so no vCPU or stack frame can be in their middle.
pub(crate) fn is_one_instruction(bytes: &[u8; 5]) -> bool {
    let insn = decode_one(bytes, 0);
    !insn.is_invalid() && insn.len() == 5
}

/// True when `bytes` (at least 5) decode as exactly one `call rel32`.
pub(crate) fn is_call_rel32(bytes: &[u8]) -> bool {
    if bytes.len() < 5 {
        return false;
    }
    let insn = decode_one(&bytes[..5], 0);
    !insn.is_invalid() && insn.len() == 5 && insn.code() == Code::Call_rel32_64
}

/// Encodes `jmp rel32` placed at `site_addr` that lands on `target`.
pub fn jmp_rel32(site_addr: u64, target: u64) -> Result<[u8; 5], LinkError> {
    let next = site_addr.wrapping_add(5);
    let rel = target.wrapping_sub(next) as i64;
    let rel32 = i32::try_from(rel).map_err(|_| LinkError::JumpOutOfRange {
        site: site_addr,
        target,
    })?;
    let mut out = [0xe9, 0, 0, 0, 0];
    out[1..].copy_from_slice(&rel32.to_le_bytes());
    Ok(out)
}

/// Where the `jmp rel32` in `bytes`, placed at `site_addr`, lands; `None` if it is not one.
pub fn jmp_target(site_addr: u64, bytes: &[u8; 5]) -> Option<u64> {
    let [0xe9, rel @ ..] = *bytes else {
        return None;
    };
    Some((site_addr + 5).wrapping_add(i32::from_le_bytes(rel) as i64 as u64))
}

/// `ret; int3 x4`: what the kernel's `apply_returns()` writes over a `jmp
/// __x86_return_thunk` when the CPU needs no return mitigation.
pub(crate) const PATCHED_RETURN: [u8; 5] = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];

/// Makes each `jmp __x86_return_thunk` of `expected` read as the kernel patched it,
/// where `live` holds that patched form: the build knows the compiled bytes, the kernel
/// rewrote its return sites at boot for the live CPU. `compiled(at)` gives the 5 compiled
/// bytes at offset `at` and the address they are at (a jmp may run past the end of the
/// `expect` window); `thunk` is the return thunk at the same addresses.
pub fn as_patched_returns(
    expected: &mut [u8],
    live: &[u8],
    compiled: impl Fn(usize) -> Option<([u8; 5], u64)>,
    thunk: u64,
) {
    let n = expected.len().min(live.len());
    let mut at = 0;
    while at < n {
        let end = (at + 5).min(n);
        if expected[at] == 0xe9 && live[at..end] == PATCHED_RETURN[..end - at] {
            if let Some((insn, addr)) = compiled(at) {
                if jmp_target(addr, &insn) == Some(thunk) {
                    expected[at..end].copy_from_slice(&PATCHED_RETURN[..end - at]);
                    at = end;
                    continue;
                }
            }
        }
        at += 1;
    }
}

#[cfg(test)]
mod return_tests {
    use super::*;

    #[test]
    fn a_return_thunk_jump_reads_as_the_kernel_patched_it() {
        let addr = 0xffff_ffff_8100_0000u64;
        let thunk = addr + 0x1000;
        // xor eax,eax; jmp thunk (rel32 from addr+7)
        let rel = (thunk - (addr + 7)) as i32;
        let mut code = vec![0x31, 0xc0, 0xe9];
        code.extend(rel.to_le_bytes());
        let compiled = |c: &[u8], at: usize| {
            let b: [u8; 5] = c.get(at..at + 5)?.try_into().ok()?;
            Some((b, addr + at as u64))
        };
        let live = [0x31, 0xc0, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc];
        let mut expected = code.clone();
        as_patched_returns(&mut expected, &live, |at| compiled(&code, at), thunk);
        assert_eq!(expected, live);
        // The jmp runs past the end of a 4-byte window: still recognised from the code.
        let mut window = code[..4].to_vec();
        as_patched_returns(&mut window, &live[..4], |at| compiled(&code, at), thunk);
        assert_eq!(window, live[..4]);
        // A jmp elsewhere is compared as compiled.
        let mut other = vec![0x31, 0xc0, 0xe9];
        other.extend((rel + 16).to_le_bytes());
        let before = other.clone();
        as_patched_returns(&mut other, &live, |at| compiled(&before, at), thunk);
        assert_eq!(other, before);
    }
}
