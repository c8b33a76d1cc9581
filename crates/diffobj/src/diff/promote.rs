//! Changed functions that cannot be redirected themselves, replaced through their callers.
//!
//! The kernel makes every `inline` function notrace, so the out-of-line copy GCC sometimes
//! emits for a `static inline` (every `SYSCALL_DEFINE` body is one: `__do_sys_*`) has no
//! fentry site. When such a function is static and only ever *called* — never has its
//! address taken, which could have been stored somewhere by the old code — redirecting
//! all its callers is equivalent: their new copies call the new version in the bundle.
//! Callers that cannot be redirected either are promoted in turn; `__init` callers are
//! ignored (they never run again).

use std::collections::HashMap;

use object::elf;

use super::compare::{has_fentry, propagate_cold, Diff, Status};
use super::names::cold_parent;
use super::obj::{is_item, Obj, Target};
use super::special;

/// How a function is referred to.
#[derive(Debug, Default)]
struct Uses {
    /// Functions calling it (direct `call`/`jmp`/`jcc rel32`).
    callers: Vec<usize>,
    /// Some reference takes its address, or comes from data.
    escapes: bool,
}

/// Whether the relocation at `offset` of executable section `sec` is the rel32 of a
/// direct call or jump.
fn is_branch(o: &Obj, sec: usize, offset: u64, r_type: u32) -> bool {
    if !matches!(r_type, elf::R_X86_64_PLT32 | elf::R_X86_64_PC32) {
        return false;
    }
    let s = &o.sections[sec];
    let insns = o.insns(sec);
    let i = insns.partition_point(|&st| u64::from(st) <= offset);
    let Some(&start) = i.checked_sub(1).and_then(|i| insns.get(i)) else {
        return false;
    };
    let at = u64::from(start);
    let b = s.bytes(at, (at + 2).min(s.size));
    match b {
        [0xe8 | 0xe9, ..] => offset == at + 1,
        [0x0f, 0x80..=0x8f] => offset == at + 2,
        _ => false,
    }
}

fn uses(d: &Diff<'_>) -> HashMap<usize, Uses> {
    let o = d.patched;
    let mut out: HashMap<usize, Uses> = HashMap::new();
    for (u, us) in o.symbols.iter().enumerate() {
        let Some(sec) = us.section() else { continue };
        let name = &o.sections[sec].name;
        if !is_item(us) || special::is_ignored(name) || special::table(name).is_some() {
            continue;
        }
        let code = o.sections[sec].is_exec();
        for r in o.sym_relocs(u) {
            let Target::Sym { sym, .. } = o.target(sec, r) else {
                continue;
            };
            if sym == u {
                continue;
            }
            let entry = out.entry(sym).or_default();
            if code && us.is_func() && is_branch(o, sec, r.offset, r.r_type) {
                entry.callers.push(u);
            } else {
                entry.escapes = true;
            }
        }
    }
    out
}

/// Marks the callers of changed, fentry-less, only-called static functions as changed.
pub(crate) fn promote_callers(d: &mut Diff<'_>) {
    let uses = uses(d);
    loop {
        let mut more = false;
        for p in 0..d.status.len() {
            if d.status[p] != Status::Changed || !d.is_func(p) || d.via_callers.contains(&p) {
                continue;
            }
            let s = &d.patched.symbols[p];
            let sec = d.patched.sec_of(p).map_or("", |x| x.name.as_str());
            if cold_parent(&s.name).is_some() || special::is_init(sec) {
                continue;
            }
            let Some(o) = d.twin[p] else { continue };
            if has_fentry(d.orig, o) {
                continue;
            }
            let why = if !s.is_local() {
                Some("it is global, so its callers in other files cannot be replaced instead")
            } else {
                match uses.get(&p) {
                    Some(u) if u.escapes => Some(
                        "its address is taken (or data refers to it), so replacing its callers \
                         would not catch every use",
                    ),
                    Some(_) => None,
                    None => Some("nothing in its file calls it"),
                }
            };
            if let Some(why) = why {
                d.no_fentry.entry(p).or_insert_with(|| why.to_string());
                continue;
            }
            let u = &uses[&p];
            tracing::debug!(function = %s.name, callers = u.callers.len(), "no fentry site: replacing its callers");
            d.via_callers.insert(p);
            for &c in &u.callers {
                let csec = d.patched.sec_of(c).map_or("", |x| x.name.as_str());
                if special::is_init(csec) {
                    continue;
                }
                if matches!(d.status[c], Status::Same | Status::LineOnly) {
                    d.status[c] = Status::Changed;
                    let callee = d.kernel_name(p).to_string();
                    d.no_fentry.insert(
                        c,
                        format!(
                            "it calls `{callee}`, which changed and has no fentry site either, \
                             so its callers must be replaced"
                        ),
                    );
                    more = true;
                }
            }
        }
        propagate_cold(d.patched, &mut d.status);
        if !more {
            break;
        }
    }
}
