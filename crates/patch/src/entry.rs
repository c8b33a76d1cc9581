//! Entry sites: redirecting a function that has no fentry NOP (Kbuild builds `kernel/trace`,
//! `kernel/bpf` and others without `-pg`; `notrace` and `noinstr` functions have none).
//!
//! LUCOS wrote its `jmp` over any function's first bytes while the VM was stopped. That is
//! safe only if nothing can ever execute, or return into, an instruction boundary strictly
//! inside those 5 bytes again, because it would then run the middle of the `jmp`. The
//! static half of that proof is here and reads only vmlinux:
//! - the instructions the `jmp` overwrites decode, and none is a call that would leave a
//!   return address inside them, or a trap (`ud2`, `int3`, …) that resumes inside them;
//! - no direct branch of the function or of its `.cold` part lands inside them, and the
//!   function has no native indirect jump (a jump table could);
//! - no exception-table fixup, jump label, static call or `lock` prefix the kernel may
//!   rewrite or jump to later sits in them.
//!
//! The dynamic half runs with the guest stopped: no vCPU's rip and no frame of any task's
//! stack (interrupted contexts included) may be inside the window. The engine refuses to
//! switch a window site without a stack check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};
use thiserror::Error;

use lucos_introspect::{KernelSymbols, SymbolError, SymbolKind};

use crate::site::ENDBR64;

/// Why a function's first bytes cannot take a `jmp`.
#[derive(Debug, Error)]
pub enum EntryError {
    #[error("cannot decode the instruction at {at:#x}")]
    Decode { at: u64 },
    #[error("its first {size} bytes are fewer than the 5 a jmp needs")]
    TooSmall { size: u64 },
    #[error(
        "the instructions the jmp would overwrite end {len} bytes into it, more than the \
         {max} bytes a manifest can expect"
    )]
    WindowTooLong { len: usize, max: usize },
    #[error("`{insn}` at {at:#x} is a call inside the first 5 bytes, so a return address would point into the jmp")]
    CallInWindow { at: u64, insn: String },
    #[error(
        "`{insn}` at {at:#x} traps inside the first 5 bytes, and the trap returns into the jmp"
    )]
    TrapInWindow { at: u64, insn: String },
    #[error("the branch at {from:#x} lands at {to:#x}, inside the 5 bytes the jmp overwrites")]
    BranchIntoWindow { from: u64, to: u64 },
    #[error("`{insn}` at {at:#x} is a native indirect jump, which may land inside the jmp")]
    IndirectJump { at: u64, insn: String },
    #[error("a {table} entry points at {at:#x}, inside the 5 bytes the jmp overwrites")]
    TableEntry { table: &'static str, at: u64 },
    #[error(
        "it is in {what}, which runs on page tables (PTI's user ones, or boot's) that do not \
         map patch memory"
    )]
    Placement { what: &'static str },
    #[error("it is {what}, whose first bytes the kernel itself rewrites at run time")]
    KernelPoked { what: &'static str },
    #[error("reading vmlinux")]
    Symbols(#[from] SymbolError),
}

/// The bytes an entry `jmp` replaces: `[site, site + 5)`, inside whole instructions that
/// end at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryWindow {
    /// Offset of the site from the function's start: 0, or 4 after `endbr64` (kept, so
    /// indirect calls still land on an `endbr64` under IBT).
    pub site_offset: u32,
    /// Offset just past the last instruction the `jmp` overlaps.
    pub end: u32,
    /// True when those bytes are exactly one 5-byte instruction: then no boundary lies
    /// inside the `jmp`, and nothing has to be checked while the guest is stopped.
    pub single: bool,
}

/// Addresses from vmlinux's tables that the kernel may jump to or rewrite after boot.
#[derive(Debug, Default, Clone)]
pub struct KernelTables {
    /// (table, address) sorted by address.
    entries: Vec<(u64, &'static str)>,
}

impl KernelTables {
    /// From explicit (table, address) pairs, e.g. a test's.
    pub fn new(mut entries: Vec<(u64, &'static str)>) -> Self {
        entries.sort_unstable();
        KernelTables { entries }
    }

    fn first_in(&self, start: u64, end: u64) -> Option<(u64, &'static str)> {
        let i = self.entries.partition_point(|&(a, _)| a < start);
        self.entries.get(i).copied().filter(|&(a, _)| a < end)
    }

    /// Reads the tables of `syms` (once per vmlinux build id: they are megabytes). A
    /// table vmlinux lacks (a kernel without jump labels, say) contributes nothing.
    pub fn of(syms: &KernelSymbols) -> Result<Arc<KernelTables>, EntryError> {
        static CACHE: OnceLock<Mutex<HashMap<String, Arc<KernelTables>>>> = OnceLock::new();
        let key = syms.build_id_hex()?;
        let cache = CACHE.get_or_init(Default::default);
        if let Some(t) = cache.lock().expect("not poisoned").get(&key) {
            return Ok(t.clone());
        }
        let mut entries = Vec::new();
        // (start, stop, entry size, offsets of the relative s32 fields, name)
        let tables: [(&str, &str, usize, &[usize], &'static str); 4] = [
            (
                "__start___ex_table",
                "__stop___ex_table",
                12,
                &[0, 4],
                "exception table",
            ),
            (
                "__start___jump_table",
                "__stop___jump_table",
                16,
                &[0, 4],
                "jump label",
            ),
            (
                "__start_static_call_sites",
                "__stop_static_call_sites",
                8,
                &[0],
                "static call",
            ),
            (
                "__smp_locks",
                "__smp_locks_end",
                4,
                &[0],
                "lock prefix (.smp_locks)",
            ),
        ];
        for (start, stop, size, fields, name) in tables {
            let (Ok(a), Ok(b)) = (syms.lookup(start), syms.lookup(stop)) else {
                tracing::debug!(table = name, "vmlinux has no such table");
                continue;
            };
            let len = b.addr.saturating_sub(a.addr) as usize;
            let bytes = syms.section_bytes(a.addr, len)?;
            for (i, e) in bytes.chunks_exact(size).enumerate() {
                for &f in fields {
                    let rel = i32::from_le_bytes(e[f..f + 4].try_into().expect("4 bytes"));
                    let field_addr = a.addr + (i * size + f) as u64;
                    entries.push((field_addr.wrapping_add(rel as i64 as u64), name));
                }
            }
        }
        let t = Arc::new(KernelTables::new(entries));
        cache.lock().expect("not poisoned").insert(key, t.clone());
        Ok(t)
    }
}

fn text(insn: &Instruction) -> String {
    let mut out = String::new();
    iced_x86::FastFormatter::new().format(insn, &mut out);
    out
}

/// Decodes all of `code` (at `ip`) linearly; kernel text has no data between instructions.
fn decode_all(code: &[u8], ip: u64) -> Result<Vec<Instruction>, EntryError> {
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while d.can_decode() {
        let insn = d.decode();
        if insn.is_invalid() {
            return Err(EntryError::Decode { at: insn.ip() });
        }
        out.push(insn);
    }
    Ok(out)
}

fn is_trap(insn: &Instruction) -> bool {
    matches!(
        insn.mnemonic(),
        Mnemonic::Ud0
            | Mnemonic::Ud1
            | Mnemonic::Ud2
            | Mnemonic::Int3
            | Mnemonic::Int
            | Mnemonic::Int1
            | Mnemonic::Into
            | Mnemonic::Syscall
            | Mnemonic::Hlt
    )
}

/// Checks the function `code` at link address `addr` (and its `.cold` parts) for an entry
/// `jmp` at offset 0, or 4 after `endbr64`. Pure: the tables are given.
pub fn check_window(
    code: &[u8],
    addr: u64,
    cold: &[(u64, Vec<u8>)],
    tables: &KernelTables,
) -> Result<EntryWindow, EntryError> {
    let off = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    if code.len() < off + 5 {
        return Err(EntryError::TooSmall {
            size: code.len() as u64,
        });
    }
    if code[off..off + 5] == crate::NOP5 {
        // A function without fentry that starts with the NOP5 has a patchable entry
        // (`patchable_function_entry`), which its owner pokes with text_poke.
        return Err(EntryError::KernelPoked {
            what: "a patchable entry (a NOP5 without fentry)",
        });
    }
    let insns = decode_all(code, addr)?;
    let site = addr + off as u64;
    let inner = (site + 1, site + 5);
    let mut end = site;
    let mut count = 0;
    for insn in insns.iter().filter(|i| i.ip() >= site && i.ip() < site + 5) {
        end = insn.next_ip();
        count += 1;
        if is_trap(insn) {
            return Err(EntryError::TrapInWindow {
                at: insn.ip(),
                insn: text(insn),
            });
        }
        let call = matches!(
            insn.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        );
        if call && insn.next_ip() < site + 5 {
            return Err(EntryError::CallInWindow {
                at: insn.ip(),
                insn: text(insn),
            });
        }
    }
    let len = (end - addr) as usize;
    if len > crate::MAX_EXPECT {
        return Err(EntryError::WindowTooLong {
            len,
            max: crate::MAX_EXPECT,
        });
    }
    let single = count == 1 && end == site + 5;
    let mut all = vec![insns];
    for (a, c) in cold {
        all.push(decode_all(c, *a)?);
    }
    for insn in all.iter().flatten() {
        if insn.flow_control() == FlowControl::IndirectBranch {
            return Err(EntryError::IndirectJump {
                at: insn.ip(),
                insn: text(insn),
            });
        }
        // `near_branch_target` is 0 for anything but a direct near jmp, jcc, call or loop.
        let to = insn.near_branch_target();
        if to >= inner.0 && to < inner.1 {
            return Err(EntryError::BranchIntoWindow {
                from: insn.ip(),
                to,
            });
        }
    }
    if let Some((at, table)) = tables.first_in(site, end.max(site + 5)) {
        return Err(EntryError::TableEntry { table, at });
    }
    Ok(EntryWindow {
        site_offset: off as u32,
        end: len as u32,
        single,
    })
}

/// [`check_window`] for vmlinux's function at link address `addr` of `size` bytes.
pub fn window_in_vmlinux(
    syms: &KernelSymbols,
    name: &str,
    addr: u64,
    size: u64,
) -> Result<EntryWindow, EntryError> {
    if size < 5 {
        return Err(EntryError::TooSmall { size });
    }
    let at = |name: &str| syms.lookup(name).ok().map(|s| s.addr);
    // Entry code switches CR3 itself; head code also runs on CPU bring-up, before paging
    // is the kernel's. Both are without fentry (mostly assembly).
    if let (Some(a), Some(b)) = (at("__entry_text_start"), at("__entry_text_end")) {
        if (a..b).contains(&addr) {
            return Err(EntryError::Placement {
                what: ".entry.text",
            });
        }
    }
    // Static-call trampolines (`__SCT__*`) are rewritten by static_call_update().
    let calls = (at("__static_call_text_start"), at("__static_call_text_end"));
    if let (Some(a), Some(b)) = calls {
        if (a..b).contains(&addr) {
            return Err(EntryError::KernelPoked {
                what: "a static-call trampoline (.static_call.text)",
            });
        }
    }
    // vmlinux keeps no bounds of .head.text (it starts `.text`); its code comes from these
    // files, and verify_cpu there runs again when a CPU is brought up.
    let head = syms.all_named(name).any(|s| {
        s.addr == addr
            && s.file
                .as_deref()
                .is_some_and(|f| f.starts_with("head_64") || f.starts_with("head64"))
    });
    if head {
        return Err(EntryError::Placement {
            what: ".head.text (early boot and CPU bring-up code)",
        });
    }
    let code = syms.section_bytes(addr, size as usize)?;
    let prefix = format!("{name}.cold");
    let cold = syms
        .symbols()
        .iter()
        .filter(|s| s.kind == SymbolKind::Func && s.size > 0 && s.name.starts_with(&prefix))
        .map(|s| Ok((s.addr, syms.section_bytes(s.addr, s.size as usize)?)))
        .collect::<Result<Vec<_>, SymbolError>>()?;
    let tables = KernelTables::of(syms)?;
    check_window(&code, addr, &cold, &tables)
}

#[cfg(test)]
#[path = "entry_tests.rs"]
mod tests;
