//! Comparing the original and patched compiles of one source file, function by function.
//!
//! A function changed if its bytes, its relocations (compared symbolically, see
//! [`super::keys`]) or its entries in special tables differ. A difference that is only the
//! immediate of a `mov $N, %reg` feeding a `__LINE__`-taking call (printk, might_sleep,
//! WARN) is a moved line, not a change. Data may not change size, and writable data may not
//! change its initial value; a changed read-only object of the same size is rewritten in
//! place in the running kernel (see `lucos_patch::Rewrite`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use iced_x86::{Code, Register};
use object::elf;

use super::correlate::{correlate, patched_name, Correlation};
use super::error::Refusal;
use super::keys::{Key, Keyer, Keys};
use super::names::{cold_parent, is_special_static};
use super::obj::{insn_at, is_item, Obj, Target};
use super::promote;
use super::special;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Same,
    /// Only `__LINE__` immediates moved, or a dynamic-debug call site (see
    /// `special::dyndbg_same_site`).
    LineOnly,
    Changed,
    New,
}

/// Calls whose arguments include `__LINE__`.
const LINE_FUNCS: &[&str] = &[
    "__warn_printk",
    "warn_slowpath_fmt",
    "warn_slowpath_null",
    "__might_sleep",
    "___might_sleep",
    "__might_resched",
    "__might_fault",
    "__cant_sleep",
    "__cant_migrate",
    "printk",
    "_printk",
    "lockdep_rcu_suspicious",
    "__validate_creds",
    "__validate_process_creds",
    "__jbd2_debug",
    "__btrfs_abort_transaction",
    "__btrfs_handle_fs_error",
    "__btrfs_panic",
];

/// The comparison of one object pair.
pub(crate) struct Diff<'a> {
    pub orig: &'a Obj<'a>,
    pub patched: &'a Obj<'a>,
    /// Source path of the object, for messages and static resolution.
    pub file: String,
    /// Patched symbol -> original symbol.
    pub twin: Vec<Option<usize>>,
    /// Patched function-scope statics that match one of several original ones, unknown
    /// which: new code must not use them.
    pub ambiguous: HashSet<usize>,
    /// Per patched symbol; meaningful for functions and data items.
    pub status: Vec<Status>,
    /// Patched function -> special tables with entries pointing into it.
    pub tables: HashMap<usize, BTreeSet<&'static str>>,
    /// Changed functions without an fentry site that are replaced through their callers.
    pub via_callers: HashSet<usize>,
    /// Why a changed function without an fentry site could not be replaced through its
    /// callers, or which such function made a caller change.
    pub no_fentry: HashMap<usize, String>,
    /// Changed `__init` code and data (kernel names): it ran at boot and was freed, so
    /// there is nothing live to patch; reported, not refused.
    pub not_applicable: Vec<String>,
    /// Changed data rewritten in place in the running kernel (same size): read-only data
    /// whole (no fields), writable data only in the byte ranges `(offset, len)` whose
    /// initial value changed, since the rest holds live state.
    pub rewrite: HashMap<usize, Vec<(u32, u32)>>,
    pub refusals: Vec<Refusal>,
}

impl Diff<'_> {
    pub fn is_func(&self, p: usize) -> bool {
        let s = &self.patched.symbols[p];
        s.is_func() && self.patched.sec_of(p).is_some_and(|x| x.is_exec())
    }

    /// The name a patched symbol has in the running kernel (its original's), or its own.
    pub fn kernel_name(&self, p: usize) -> &str {
        match self.twin[p] {
            Some(o) => &self.orig.symbols[o].name,
            None => &self.patched.symbols[p].name,
        }
    }

    /// Compiler-made statics copied fresh for each user (never "new" in a report).
    pub fn is_special(&self, p: usize) -> bool {
        let s = &self.patched.symbols[p];
        let sec = self.patched.sec_of(p).map_or("", |x| x.name.as_str());
        s.is_local() && is_special_static(&s.name, sec)
    }

    /// New dynamic-debug descriptors: call sites that stay off (not registered).
    pub fn new_debug_sites(&self) -> Vec<String> {
        (0..self.status.len())
            .filter(|&p| self.status[p] == Status::New && is_item(&self.patched.symbols[p]))
            .filter(|&p| {
                self.patched
                    .sec_of(p)
                    .is_some_and(|s| special::is_dyndbg(&s.name))
            })
            .map(|p| self.patched.symbols[p].name.clone())
            .collect()
    }

    /// Patched symbols with `status`, in symbol order, as kernel names.
    pub fn names_with(&self, status: Status, funcs: bool) -> Vec<String> {
        (0..self.status.len())
            .filter(|&p| self.status[p] == status && is_item(&self.patched.symbols[p]))
            .filter(|&p| !self.is_special(p))
            .filter(|&p| self.is_func(p) == funcs)
            .map(|p| self.kernel_name(p).to_string())
            .collect()
    }
}

/// Whether the diff moved original line `.0` to patched line `.1` (in some changed file).
pub(crate) type LineMoved<'a> = &'a dyn Fn(u64, u64) -> bool;

type Fingerprint = (&'static str, Vec<u8>, Vec<(u64, u32, Key)>);

/// Table entries per owning function, as comparable fingerprints.
fn table_entries(o: &Obj, name_of: &dyn Fn(usize) -> String) -> HashMap<usize, Vec<Fingerprint>> {
    let mut out: HashMap<usize, Vec<Fingerprint>> = HashMap::new();
    for (si, sec) in o.sections.iter().enumerate() {
        let Some(t) = special::table(&sec.name) else {
            continue;
        };
        for e in special::entries(o, si, &t) {
            let (start, end) = (e.start, e.end);
            let rels = sec.relocs_in(start, end);
            if let Some(owner) = e.owner {
                let k = Keyer {
                    obj: o,
                    name_of,
                    owner: Some(owner),
                };
                let mut bytes = sec.bytes(start, end).to_vec();
                if let Some(line) = t.line {
                    for b in bytes.iter_mut().skip(line as usize).take(2) {
                        *b = 0;
                    }
                }
                let keys = rels
                    .iter()
                    .map(|r| {
                        let at = r.offset - start;
                        let key = match (t.data_len, o.target(si, r)) {
                            // Compare exactly the bytes the entry covers (say, an
                            // alternative's replacement), not its neighbours'.
                            (Some((field, len_at)), Target::Anon { sec, addend, .. })
                                if field == at =>
                            {
                                let len = sec_byte(o, si, start + len_at);
                                k.window(sec, addend, len)
                            }
                            _ => k.key(si, r),
                        };
                        (at, r.r_type, key)
                    })
                    .collect();
                out.entry(owner).or_default().push((t.name, bytes, keys));
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

fn sec_byte(o: &Obj, sec: usize, at: u64) -> u64 {
    o.sections[sec]
        .bytes(at, at + 1)
        .first()
        .map_or(0, |&b| u64::from(b))
}

fn is_line_load(i: &iced_x86::Instruction) -> bool {
    matches!(i.code(), Code::Mov_r32_imm32 | Code::Mov_rm32_imm32)
        && i.op0_kind() == iced_x86::OpKind::Register
        && matches!(
            i.op0_register(),
            Register::ESI | Register::EDX | Register::ECX | Register::R8D | Register::R9D
        )
}

/// Whether `a` and `b` (same length, same relocations) differ only in `__LINE__` loads:
/// `mov $N, %reg` feeding a call that takes a line number, where the diff moved line N of
/// a changed file to the patched value (`moved`).
fn line_only(a: &[u8], b: &[u8], keys: &[(u64, u32, Key)], moved: LineMoved<'_>) -> bool {
    let mut off = 0usize;
    let mut found = false;
    while off < a.len() {
        let (Some(i1), Some(i2)) = (insn_at(a, off), insn_at(b, off)) else {
            return false;
        };
        let len = i1.len();
        if len != i2.len() || len == 0 {
            return false;
        }
        if a[off..off + len] != b[off..off + len] {
            if !is_line_load(&i1) || !is_line_load(&i2) {
                return false;
            }
            if !moved(u64::from(i1.immediate32()), u64::from(i2.immediate32())) {
                return false;
            }
            let next = keys.iter().find(|(at, _, k)| {
                *at >= (off + len) as u64
                    && !matches!(
                        k,
                        Key::Str(..)
                            | Key::Const(..)
                            | Key::Special(..)
                            | Key::Null(_)
                            | Key::Anon(..)
                    )
            });
            match next {
                Some((_, _, Key::Name(n, _))) if LINE_FUNCS.contains(&n.as_str()) => found = true,
                _ => return false,
            }
        }
        off += len;
    }
    found
}

/// A function's status from its relocation keys and special-table entries, then its bytes.
fn function_status(
    name: &str,
    (bo, bp): (&[u8], &[u8]),
    (keys_o, keys_p): (&Keys, &Keys),
    tables_same: bool,
    moved: LineMoved<'_>,
) -> Status {
    if keys_o != keys_p || !tables_same {
        if tracing::enabled!(tracing::Level::DEBUG) {
            explain(name, keys_o, keys_p, tables_same);
        }
        Status::Changed
    } else if bo == bp {
        Status::Same
    } else if bo.len() == bp.len() && line_only(bo, bp, keys_p, moved) {
        Status::LineOnly
    } else {
        Status::Changed
    }
}

/// Compares two compiles of `file`.
pub(crate) fn compare<'a>(
    orig: &'a Obj<'a>,
    patched: &'a Obj<'a>,
    file: &str,
    moved: LineMoved<'_>,
) -> Diff<'a> {
    let Correlation { twin, ambiguous } = correlate(orig, patched);
    let name_o = |i: usize| orig.symbols[i].name.clone();
    let name_p = |i: usize| patched_name(orig, patched, &twin, i);
    let ko = Keyer::new(orig, &name_o);
    let kp = Keyer::new(patched, &name_p);
    let to = table_entries(orig, &name_o);
    let tp = table_entries(patched, &name_p);
    let mut status = vec![Status::Same; patched.symbols.len()];
    let mut refusals = Vec::new();
    let mut rewrite = HashMap::new();
    let mut not_applicable = Vec::new();

    for p in 0..patched.symbols.len() {
        let s = &patched.symbols[p];
        if !is_item(s) {
            continue;
        }
        let sec = patched.sec_of(p).expect("items are defined");
        if !sec.is_alloc() || special::is_ignored(&sec.name) || special::table(&sec.name).is_some()
        {
            continue;
        }
        let init = special::is_init(&sec.name);
        if s.is_local() && is_special_static(&s.name, &sec.name) {
            status[p] = Status::New;
            continue;
        }
        let Some(o) = twin[p] else {
            status[p] = Status::New;
            continue;
        };
        let (bo, bp) = (orig.sym_bytes(o), patched.sym_bytes(p));
        let (keys_o, keys_p) = (ko.sym_keys(o), kp.sym_keys(p));
        if sec.is_exec() {
            if !s.is_func() {
                continue;
            }
            let tables_same = to.get(&o) == tp.get(&p);
            status[p] = function_status(&s.name, (bo, bp), (&keys_o, &keys_p), tables_same, moved);
            continue;
        }
        let so = &orig.symbols[o];
        let label = || (s.name.clone(), file.to_string());
        let differs = so.size != s.size || bo != bp || keys_o != keys_p;
        if init && differs {
            // Boot-time data: it was used and freed (or is never used again).
            not_applicable.push(s.name.clone());
        } else if so.size != s.size {
            status[p] = Status::Changed;
            let (symbol, file) = label();
            refusals.push(Refusal::DataLayout {
                symbol,
                file,
                old: so.size,
                new: s.size,
            });
        } else if special::dyndbg_same_site(&sec.name, (bo, bp), (&keys_o, &keys_p), moved) {
            status[p] = Status::LineOnly;
        } else if bo != bp || keys_o != keys_p {
            if tracing::enabled!(tracing::Level::DEBUG) {
                explain(&s.name, &keys_o, &keys_p, bo == bp);
            }
            status[p] = Status::Changed;
            // Rewritten in place, not copied: a copy would not reach other files' users
            // or a pointer to it stored at boot (`proc_create(..., &ops)` in __init
            // code), and its readers need not be replaced.
            if !sec.is_write() {
                rewrite.insert(p, Vec::new());
            } else {
                match changed_fields((bo, bp), (&keys_o, &keys_p)) {
                    Some(fields) => {
                        rewrite.insert(p, fields);
                    }
                    None => {
                        let (symbol, file) = label();
                        refusals.push(Refusal::DataInit { symbol, file });
                    }
                }
            }
        }
    }

    propagate_cold(patched, &mut status);

    let mut tables: HashMap<usize, BTreeSet<&'static str>> = HashMap::new();
    for (&owner, entries) in &tp {
        tables
            .entry(owner)
            .or_default()
            .extend(entries.iter().map(|e| e.0));
    }

    let diff = Diff {
        orig,
        patched,
        file: file.to_string(),
        twin,
        ambiguous: ambiguous.into_iter().collect(),
        status,
        tables,
        via_callers: HashSet::new(),
        no_fentry: HashMap::new(),
        not_applicable,
        rewrite,
        refusals,
    };
    let mut diff = check_init(diff);
    promote::promote_callers(&mut diff);
    diff
}

/// Logs the first relocation difference of a changed function.
fn explain(name: &str, a: &[(u64, u32, Key)], b: &[(u64, u32, Key)], tables_same: bool) {
    if !tables_same {
        tracing::debug!(function = name, "special-table entries differ");
    }
    match a.iter().zip(b).find(|(x, y)| x != y) {
        Some((x, y)) => {
            tracing::debug!(function = name, original = ?x, patched = ?y, "relocations differ")
        }
        None if a.len() != b.len() => tracing::debug!(
            function = name,
            original = a.len(),
            patched = b.len(),
            "relocation counts differ"
        ),
        None => {}
    }
}

/// The byte ranges of writable data whose initial value changes: bytes that differ and
/// relocated fields whose target differs, merged where they touch. `None` when a field
/// is relocated in one compile only or at another width (then the bytes mean different
/// things).
fn changed_fields((bo, bp): (&[u8], &[u8]), (ko, kp): (&Keys, &Keys)) -> Option<Vec<(u32, u32)>> {
    let width = |t: u32| match t {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 => 8usize,
        _ => 4,
    };
    let at = |k: &Keys| -> BTreeMap<u64, (usize, Key)> {
        k.iter()
            .map(|(o, t, key)| (*o, (width(*t), key.clone())))
            .collect()
    };
    let (ro, rp) = (at(ko), at(kp));
    let same_fields = ro.len() == rp.len()
        && ro
            .iter()
            .zip(&rp)
            .all(|(a, b)| a.0 == b.0 && a.1 .0 == b.1 .0);
    if !same_fields || bo.len() != bp.len() {
        return None;
    }
    let mut changed: Vec<bool> = bo.iter().zip(bp).map(|(a, b)| a != b).collect();
    for (off, (w, key)) in &ro {
        let differs = rp.get(off).is_some_and(|(_, k)| k != key);
        let start = *off as usize;
        // A relocated field's bytes are an addend or zero: its target says what it holds.
        for c in changed.iter_mut().skip(start).take(*w) {
            *c = differs;
        }
    }
    let mut fields: Vec<(u32, u32)> = Vec::new();
    for (i, _) in changed.iter().enumerate().filter(|(_, c)| **c) {
        let i = u32::try_from(i).ok()?;
        match fields.last_mut() {
            Some((o, l)) if *o + *l == i => *l += 1,
            _ => fields.push((i, 1)),
        }
    }
    (!fields.is_empty()).then_some(fields)
}

/// A changed cold part changes its parent, which is what gets redirected.
pub(crate) fn propagate_cold(patched: &Obj, status: &mut [Status]) {
    let by_name: HashMap<&str, usize> = (0..patched.symbols.len())
        .filter(|&p| patched.symbols[p].is_func() && patched.symbols[p].section().is_some())
        .map(|p| (patched.symbols[p].name.as_str(), p))
        .collect();
    for p in 0..patched.symbols.len() {
        if !matches!(status[p], Status::Changed | Status::New) {
            continue;
        }
        let mut name = patched.symbols[p].name.as_str();
        while let Some(&parent) = cold_parent(name).and_then(|n| by_name.get(n)) {
            if matches!(status[parent], Status::Same | Status::LineOnly) {
                status[parent] = Status::Changed;
            }
            name = &patched.symbols[parent].name;
        }
    }
}

/// Changed `__init` functions ran at boot and were freed: nothing live runs them, so they
/// are reported as not applicable and the rest of the change is built. Changed `__exit`
/// code never runs in built-in code and is only logged.
fn check_init(mut d: Diff<'_>) -> Diff<'_> {
    for p in 0..d.status.len() {
        if !d.is_func(p) || !matches!(d.status[p], Status::Changed | Status::New) {
            continue;
        }
        let sec = d.patched.sec_of(p).map_or("", |s| s.name.as_str());
        if !special::is_init(sec) {
            continue;
        }
        if sec.starts_with(".exit.") {
            tracing::info!(function = %d.patched.symbols[p].name, "ignoring a change to __exit code, which built-in code never runs");
            d.status[p] = Status::Same;
            continue;
        }
        tracing::info!(function = %d.patched.symbols[p].name, "a changed __init function ran at boot and is not applied");
        d.not_applicable.push(d.kernel_name(p).to_string());
        d.status[p] = Status::Same;
    }
    d
}

/// `call __fentry__` at the entry of `sym` (after an optional endbr64), as the running
/// kernel's ftrace NOP site requires.
pub(crate) fn has_fentry(o: &Obj, sym: usize) -> bool {
    let s = &o.symbols[sym];
    let Some(sec) = s.section() else { return false };
    o.sym_relocs(sym).iter().any(|r| {
        let at = r.offset - s.value;
        (at == 1 || at == 5)
            && matches!(r.r_type, elf::R_X86_64_PLT32 | elf::R_X86_64_PC32)
            && matches!(o.target(sec, r), Target::Sym { sym: t, .. } if o.symbols[t].name == "__fentry__")
    })
}
