//! Function prototypes from both compiles' DWARF, to catch a replaced function whose
//! parameters change.
//!
//! The running kernel's callers keep passing the old arguments: a caller the bundle does
//! not replace (another file, or a pointer to the function in an ops table that any code
//! may call through) enters the new code with the old ones. 6.1.190 gives
//! `tcp_v4_syn_recv_sock` a seventh parameter, a function pointer; replaced alone, it read
//! that pointer from the old caller's stack and called it, and the guest died. The
//! parameter and return sizes are compared (what the calling convention passes); a
//! change is refused, naming the function and both lists, unless the function is static,
//! its address is never taken and every function that calls it is replaced too: then
//! only an old caller still running could pass the old arguments, and the bundle asks
//! for consistent switches (`Manifest::prototypes`).

use std::collections::{BTreeMap, BTreeSet};

use super::compare::Diff;
use super::dwarf::{type_bytes, Slice};
use super::error::Refusal;
use super::include::Plan;
use super::names::cold_parent;
use super::obj::{Obj, Target};

/// Byte sizes of the parameters (`None`: unknown; `Some(0)`: `...`) and of the return
/// value (0 for void).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prototype {
    params: Vec<Option<u64>>,
    ret: Option<u64>,
}

impl std::fmt::Display for Prototype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = |s: &Option<u64>| match s {
            Some(0) => "...".to_string(),
            Some(n) => n.to_string(),
            None => "?".to_string(),
        };
        let params: Vec<String> = self.params.iter().map(size).collect();
        write!(
            f,
            "({}) -> {}",
            params.join(", "),
            size(&self.ret).replace("...", "void")
        )
    }
}

/// Every function an object defines, by name (`None`: defined twice, as two statics of
/// one name), as [`collect`] finds them.
pub(crate) type Prototypes = BTreeMap<String, Option<Prototype>>;

/// The functions both objects define, with one prototype each, whose prototypes differ:
/// name → "old became new" (byte sizes).
pub(crate) fn changed(old: &Prototypes, new: &Prototypes) -> BTreeMap<String, String> {
    old.iter()
        .filter_map(|(name, o)| {
            let (Some(o), Some(Some(n))) = (o, new.get(name)) else {
                return None;
            };
            (o != n).then(|| (name.clone(), format!("{o} became {n}")))
        })
        .collect()
}

/// Adds the functions `unit` defines to `out`.
pub(crate) fn collect(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    unit: &gimli::Unit<Slice<'_>>,
    out: &mut Prototypes,
) -> Result<(), gimli::Error> {
    let mut tree = unit.entries_tree(None)?;
    let root = tree.root()?;
    let mut children = root.children();
    while let Some(node) = children.next()? {
        let e = node.entry();
        if e.tag() != gimli::DW_TAG_subprogram || e.has_attr(gimli::DW_AT_declaration) {
            continue;
        }
        let Some(name) = e
            .attr_value(gimli::DW_AT_name)
            .and_then(|v| dwarf.attr_string(unit, v).ok())
            .map(|s| s.to_string_lossy().into_owned())
        else {
            continue;
        };
        let ret = match e.attr_value(gimli::DW_AT_type) {
            None => Some(0),
            Some(_) => type_bytes(unit, e, 0),
        };
        let mut params = Vec::new();
        let mut kids = node.children();
        while let Some(k) = kids.next()? {
            match k.entry().tag() {
                gimli::DW_TAG_formal_parameter => params.push(type_bytes(unit, k.entry(), 0)),
                gimli::DW_TAG_unspecified_parameters => params.push(Some(0)),
                _ => {}
            }
        }
        let p = Prototype { params, ret };
        match out.get(&name) {
            None => {
                out.insert(name, Some(p));
            }
            Some(Some(q)) if *q == p => {}
            Some(_) => {
                out.insert(name, None);
            }
        }
    }
    Ok(())
}

/// The functions of `obj` that call `f`, when every reference to `f` is a direct `call`
/// or `jmp` from inside one: `None` when its address is taken (data, a pointer load), so
/// that callers could be anywhere.
pub(crate) fn direct_callers(obj: &Obj<'_>, f: usize) -> Option<BTreeSet<usize>> {
    let mut callers = BTreeSet::new();
    for (sec, s) in obj.sections.iter().enumerate() {
        // Debug info and the kernel's tables (ORC, __mcount_loc, exception and jump
        // tables) name code places, not pointers anyone calls through.
        let metadata = !s.is_alloc()
            || super::special::table(&s.name).is_some()
            || super::special::is_ignored(&s.name);
        if metadata || s.sh_type == object::elf::SHT_RELA || s.sh_type == object::elf::SHT_REL {
            continue;
        }
        for rel in &s.relocs {
            if !matches!(obj.target(sec, rel), Target::Sym { sym, .. } if sym == f) {
                continue;
            }
            let at = rel.offset as usize;
            let opcode = at.checked_sub(1).and_then(|i| s.data.get(i));
            let direct = s.is_exec()
                && matches!(
                    rel.r_type,
                    object::elf::R_X86_64_PLT32 | object::elf::R_X86_64_PC32
                )
                && matches!(opcode, Some(0xe8 | 0xe9));
            if !direct {
                return None;
            }
            callers.insert(obj.item_at(sec, rel.offset as i64)?);
        }
    }
    Some(callers)
}

/// Redirected functions whose prototype changes: refused, or, for a static function only
/// called directly by functions the bundle replaces too, returned for consistent switches.
pub(crate) fn check(
    plan: &Plan,
    diffs: &[Diff<'_>],
    prototypes: &[BTreeMap<String, String>],
) -> (Vec<Refusal>, Vec<String>) {
    let mut refusals = Vec::new();
    let mut consistent = Vec::new();
    for r in &plan.redirects {
        // A compiler clone (`f.isra.0`) is named after its source function.
        let name = r.old.split('.').next().unwrap_or(&r.old);
        let Some(what) = prototypes.get(r.obj).and_then(|p| p.get(name)) else {
            continue;
        };
        let d = &diffs[r.obj];
        let orig = d.twin[r.sym];
        let local = orig.is_some_and(|o| d.orig.symbols[o].bind == object::elf::STB_LOCAL);
        let callers_replaced = orig.is_some_and(|o| only_replaced_reach(plan, d, r.obj, o))
            && direct_callers(d.patched, r.sym).is_some();
        tracing::info!(function = %r.old, %what, local, callers_replaced, "prototype changes");
        if local && callers_replaced {
            consistent.push(r.old.clone());
            continue;
        }
        refusals.push(Refusal::Prototype {
            function: r.old.clone(),
            file: r.old_file.clone().unwrap_or_else(|| d.file.clone()),
            what: what.clone(),
        });
    }
    (refusals, consistent)
}

/// Whether every way into original function `f` of object `obj` goes through a function
/// the bundle replaces: each direct caller is replaced, or is itself a static function
/// the patched compile no longer has (inlined away) whose own callers are, and so on.
/// Then no code left running the old way calls `f`, except a frame already inside.
fn only_replaced_reach(plan: &Plan, d: &Diff<'_>, obj: usize, f: usize) -> bool {
    let replaced = |name: &str| plan.redirects.iter().any(|x| x.obj == obj && x.old == name);
    let vanished = |c: usize| {
        let s = &d.orig.symbols[c];
        s.bind == object::elf::STB_LOCAL && !d.twin.contains(&Some(c))
    };
    let mut seen = BTreeSet::from([f]);
    let mut todo = vec![f];
    while let Some(g) = todo.pop() {
        let Some(callers) = direct_callers(d.orig, g) else {
            return false;
        };
        for c in callers {
            let name = &d.orig.symbols[c].name;
            // A caller's cold part (`f.cold`) is replaced with `f`.
            let caller = cold_parent(name).unwrap_or(name);
            if replaced(caller) || !seen.insert(c) {
                continue;
            }
            if !vanished(c) {
                tracing::info!(function = %d.orig.symbols[f].name, %caller, "a caller is not replaced");
                return false;
            }
            todo.push(c);
        }
    }
    true
}
