//! Sections that are not plain code or data: tables the kernel reads at boot or module load
//! (one entry per site in some function), hints the bundle drops, and init/exit code.
//!
//! A table entry belongs to the function its first code reference points into; comparing a
//! function includes its entries (a changed WARN flag or fixup changes behaviour without
//! changing the function's bytes), and a function whose new code has entries in a table the
//! bundle cannot carry is refused — the lucos linker would refuse the section anyway, and
//! leaving the entries out would make the new code silently misbehave.

use lucos_patch::policy::{section_rule, Link, Role};

use super::keys::Keys;
use super::obj::{Obj, Target};

/// A table of fixed-size entries pointing into code ([`Role::Table`] of the section policy).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table {
    pub name: &'static str,
    /// Entry size in bytes (x86-64, Linux 6.1); the last entry may be shorter (padding).
    pub entry: u64,
    /// Offset of a `u16` line number inside an entry, ignored when comparing.
    pub line: Option<u64>,
    /// What the table is, for refusal messages.
    pub what: &'static str,
    /// (offset of a relocation to anonymous data, offset of a `u8` with its length).
    pub data_len: Option<(u64, u64)>,
    /// A parallel table (name, entry size) whose entry `i` goes with entry `i` here.
    pub pair: Option<(&'static str, u64)>,
    link: Link,
}

impl Table {
    /// New code with entries here cannot be emitted: the lucos linker refuses the
    /// section (the entries are needed for the code to behave). Otherwise the entries
    /// are an optimisation the new code can do without, and the linker drops them.
    pub fn required(&self) -> bool {
        self.link != Link::Drop
    }

    /// Whether the builder copies the entries of the functions it includes into the
    /// bundle (the linker applies them, or hands them to the kernel). An entry that covers
    /// a window of another section (an alternative's replacement code) takes just that
    /// window along, not the whole section, which holds every function's replacements.
    pub fn carried(&self) -> bool {
        matches!(self.link, Link::Register | Link::Apply)
    }
}

/// One entry of a table section: its byte range and the function it belongs to (the
/// first code its relocations point into).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub start: u64,
    pub end: u64,
    pub owner: Option<usize>,
    /// Index of the entry in its section (for a paired table).
    pub index: u64,
}

/// The bytes of another section that an entry of a [`Table::data_len`] table covers (an
/// alternative's replacement code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Offset in the entry of the relocation that points there.
    pub field: u64,
    pub sec: usize,
    pub start: u64,
    pub len: u64,
    /// The relocation means `start`; its addend, relative to the window, is `-bias`.
    pub bias: i64,
}

/// The window entry `e` covers, if its table has windows.
pub(crate) fn window(o: &Obj, si: usize, t: &Table, e: &Entry) -> Option<Window> {
    let (field, len_at) = t.data_len?;
    let sec = &o.sections[si];
    let r = sec
        .relocs_in(e.start, e.end)
        .iter()
        .find(|r| r.offset == e.start + field)?;
    let Target::Anon {
        sec: ws,
        addend,
        bias,
    } = o.target(si, r)
    else {
        return None;
    };
    let len = sec
        .bytes(e.start + len_at, e.start + len_at + 1)
        .first()
        .copied()?;
    Some(Window {
        field,
        sec: ws,
        start: u64::try_from(addend + bias).ok()?,
        len: u64::from(len),
        bias,
    })
}

/// The relocations an included entry needs resolved, as (section, relocation): its own,
/// except the one pointing at its window, and those inside its window.
pub(crate) fn entry_needs(
    o: &Obj,
    si: usize,
    t: &Table,
    e: &Entry,
) -> Vec<(usize, lucos_patch::elf::Reloc)> {
    let w = window(o, si, t, e);
    let mut out: Vec<(usize, lucos_patch::elf::Reloc)> = o.sections[si]
        .relocs_in(e.start, e.end)
        .iter()
        .filter(|r| w.is_none_or(|w| r.offset != e.start + w.field))
        .map(|r| (si, *r))
        .collect();
    if let Some(w) = w {
        out.extend(
            o.sections[w.sec]
                .relocs_in(w.start, w.start + w.len)
                .iter()
                .map(|r| (w.sec, *r)),
        );
    }
    out
}

/// The entries of table section `si` of `o`.
pub(crate) fn entries(o: &Obj, si: usize, t: &Table) -> Vec<Entry> {
    let sec = &o.sections[si];
    let mut out = Vec::new();
    let mut start = 0;
    while start < sec.size {
        let end = (start + t.entry).min(sec.size);
        let owner = sec
            .relocs_in(start, end)
            .iter()
            .find_map(|r| match o.target(si, r) {
                Target::Sym { sym, .. } if o.sec_of(sym).is_some_and(|s| s.is_exec()) => Some(sym),
                _ => None,
            });
        out.push(Entry {
            start,
            end,
            owner,
            index: start / t.entry,
        });
        start = end;
    }
    out
}

/// Offset of `lineno:18` (the low bits of a `u32`) in `struct _ddebug` (Linux 6.1: four
/// pointers first).
const DYNDBG_LINENO: usize = 32;
/// Offset of `function` (the `__func__` of the call site) in `struct _ddebug`.
pub(crate) const DYNDBG_FUNCTION: u64 = 8;

/// Dynamic-debug descriptors' section.
pub(crate) fn is_dyndbg(section: &str) -> bool {
    section.starts_with("__dyndbg")
}

/// Whether a changed dynamic-debug descriptor (`__dyndbg`) is the same call site, moved:
/// only its line number changed (and the diff really moved that line), or the same
/// message (same module, file and format) now sits in another function (a helper split
/// out of its caller, drivers/base/core.c's `__dev_probe_failed`). The rest of the
/// descriptor, its flags and static key, is what the kernel and the user set at run
/// time, so new code keeps using the live descriptor; only what
/// `/proc/dynamic_debug/control` lists for it (line, function) stays the old.
pub(crate) fn dyndbg_same_site(
    section: &str,
    (a, b): (&[u8], &[u8]),
    (keys_a, keys_b): (&Keys, &Keys),
    moved: &dyn Fn(u64, u64) -> bool,
) -> bool {
    let lineno = |x: &[u8]| {
        x.get(DYNDBG_LINENO..DYNDBG_LINENO + 4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
    };
    let (Some(la), Some(lb)) = (lineno(a), lineno(b)) else {
        return false;
    };
    if !is_dyndbg(section) || keys_a.len() != keys_b.len() {
        return false;
    }
    let mut function_moved = false;
    for (ka, kb) in keys_a.iter().zip(keys_b) {
        if ka == kb {
            continue;
        }
        let both_function = ka.0 == DYNDBG_FUNCTION && kb.0 == DYNDBG_FUNCTION && ka.1 == kb.1;
        if !both_function {
            return false;
        }
        function_moved = true;
    }
    const MASK: u32 = (1 << 18) - 1;
    let rest_same = a.len() == b.len()
        && a[..DYNDBG_LINENO] == b[..DYNDBG_LINENO]
        && a[DYNDBG_LINENO + 4..] == b[DYNDBG_LINENO + 4..]
        && la & !MASK == lb & !MASK;
    let line_moved = la != lb && moved(u64::from(la & MASK), u64::from(lb & MASK));
    rest_same && (function_moved || line_moved)
}

pub(crate) fn table(name: &str) -> Option<Table> {
    let r = section_rule(name)?;
    match r.role {
        Role::Table(t) => Some(Table {
            name: r.pattern,
            entry: t.entry,
            line: t.line,
            what: r.what,
            data_len: t.data_len,
            pair: t.pair,
            link: r.link,
        }),
        _ => None,
    }
}

/// Sections left out of comparison and bundles entirely.
pub(crate) fn is_ignored(name: &str) -> bool {
    section_rule(name).is_some_and(|r| matches!(r.role, Role::Ignored | Role::LinkTime))
}

/// Whether symbols in this section take part in correlation: those of compared sections,
/// and of link-time tables that code refers to (see [`Role::LinkTime`]).
pub(crate) fn is_correlated(name: &str) -> bool {
    section_rule(name).is_none_or(|r| r.role != Role::Ignored)
}

/// `__init`/`__exit` code and data (and their variants such as `.init.rodata`, `.meminit.text`
/// in kernels that still have them).
pub(crate) fn is_init(name: &str) -> bool {
    section_rule(name).is_some_and(|r| r.role == Role::Init)
}

/// Why a new item in this section cannot be added by a patch, if it cannot.
pub(crate) fn needs_registration(name: &str) -> Option<&'static str> {
    section_rule(name)
        .filter(|r| r.role == Role::Registered)
        .map(|r| r.what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(table("__bug_table").is_some_and(|t| t.line == Some(8)));
        assert!(is_ignored("__mcount_loc"));
        assert!(is_ignored(".discard.addressable"));
        assert!(is_ignored(".initcall5.init"));
        assert!(!is_ignored(".text.foo"));
        assert!(is_init(".init.text"));
        assert!(is_init(".exit.data"));
        assert!(!is_init(".text.init_foo"));
        assert_eq!(needs_registration(".data..percpu"), Some("per-CPU data"));
        assert_eq!(needs_registration(".data..read_mostly"), None);
    }

    #[test]
    fn required_tables_are_exactly_those_the_linker_refuses() {
        assert!(table("__ex_table").unwrap().required());
        assert!(table("__bug_table").unwrap().required());
        // The builder carries what the kernel is told about, and not alternatives yet.
        assert!(table("__bug_table").unwrap().carried());
        assert!(table("__ex_table").unwrap().carried());
        assert!(table(".orc_unwind_ip").unwrap().carried());
        assert!(table(".altinstructions").unwrap().carried());
        assert!(!table(".smp_locks").unwrap().carried());
        // The linker drops LOCK-prefix records, so new code may have them.
        assert!(!table(".smp_locks").unwrap().required());
    }

    #[test]
    fn a_dynamic_debug_descriptor_whose_line_or_function_moved_is_the_same_site() {
        let desc = |line: u32, flags: u32| {
            let mut d = vec![0u8; 56];
            d[..8].copy_from_slice(&[1; 8]);
            d[32..36].copy_from_slice(&(line | flags << 24).to_le_bytes());
            d
        };
        use super::super::keys::Key;
        let keys = |function: &str, format: &str| {
            vec![
                (
                    8,
                    1,
                    Key::Special("__func__".into(), function.len() as u64, 0),
                ),
                (24, 1, Key::Str(format.as_bytes().to_vec(), 0)),
            ]
        };
        let moved = |a: u64, b: u64| (a, b) == (100, 103);
        let same = |a: &[u8], b: &[u8], ka: &[_], kb: &[_]| {
            dyndbg_same_site("__dyndbg", (a, b), (ka, kb), &moved)
        };
        let (a, b) = (desc(100, 0), desc(103, 0));
        let (k, k_fn, k_fmt) = (keys("f", "x"), keys("g_helper", "x"), keys("f", "y"));
        assert!(same(&a, &b, &k, &k));
        // The same message, now in another function: any line.
        assert!(same(&a, &desc(250, 0), &k, &k_fn));
        // Not a descriptor, a line the diff did not move, another message, or the flags.
        assert!(!dyndbg_same_site(".data", (&a, &b), (&k, &k), &moved));
        assert!(!same(&a, &desc(104, 0), &k, &k));
        assert!(!same(&a, &b, &k, &k_fmt));
        assert!(!same(&a, &desc(103, 1), &k, &k));
        assert!(!same(&a, &desc(103, 1), &k, &k_fn));
        assert!(!same(&a, &a, &k, &k));
    }
}
