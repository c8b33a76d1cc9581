//! Matching the patched object's functions and data with the original's.
//!
//! 1. Plain names (globals, file-scope statics, `foo.cold`) match exactly.
//! 2. Compiler-numbered clones (`foo.isra.0`, `foo.constprop.1`, `foo.part.2`) match by
//!    name without the numbers; when several share that name, identical contents match
//!    first, then equal names, so a renumbering never swaps two clones' calling conventions.
//! 3. Function-scope statics (`calls.3`) match through the functions that use them: the
//!    n-th static named `calls` used by `f` in the original is the n-th one used by `f`'s
//!    twin. Statics used only by data fall back to a unique name.
//!
//! Special statics (`__func__`, WARN_ONCE flags, ...) are never matched: each replaced
//! function gets its own copy.

use std::collections::{BTreeMap, HashSet};

use object::elf;

use super::keys::{Key, Keyer};
use super::names::{canonical, is_numbered, is_special_static, is_static_local};
use super::obj::{is_item, Obj, Target};
use super::special::{self, is_dyndbg, DYNDBG_FUNCTION};

/// One relocation of a dynamic-debug descriptor: what it describes.
type Site = (u64, u32, Key);

/// Symbols that take part in correlation: named, defined, allocated, in a section the
/// policy correlates ([`special::is_correlated`]: BTF-ID lists too, so that references to
/// `btf_sock_ids` name the running kernel's list on both sides).
fn candidates(o: &Obj) -> Vec<usize> {
    (0..o.symbols.len())
        .filter(|&i| {
            let s = &o.symbols[i];
            if !is_item(s) {
                return false;
            }
            let sec = o.sec_of(i).expect("items are defined");
            sec.is_alloc()
                && special::is_correlated(&sec.name)
                && !is_special_static(&s.name, &sec.name)
        })
        .collect()
}

/// `__BTF_ID__<kind>__<name>` of a BTF ID entry `__BTF_ID__<kind>__<name>__<n>`.
fn btf_id_stem(name: &str) -> Option<&str> {
    let (stem, n) = name.rsplit_once("__")?;
    (stem.starts_with("__BTF_ID__") && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then_some(stem)
}

/// Patched symbol -> original symbol, and the patched function-scope statics that match
/// one of several original ones without telling which (see [`correlate`]).
pub(crate) struct Correlation {
    pub twin: Vec<Option<usize>>,
    pub ambiguous: Vec<usize>,
}

fn is_static_local_obj(o: &Obj<'_>, i: usize) -> bool {
    let s = &o.symbols[i];
    s.kind == elf::STT_OBJECT && s.is_local() && is_static_local(&s.name)
}

/// The two objects [`correlate`] matches, and the candidates on each side.
struct Sides<'a> {
    orig: &'a Obj<'a>,
    patched: &'a Obj<'a>,
    oc: Vec<usize>,
    pc: Vec<usize>,
}

/// What [`correlate`]'s stages have matched so far.
struct Matches {
    twin: Vec<Option<usize>>,
    /// Original symbols already matched.
    taken: HashSet<usize>,
}

/// Patched symbol -> original symbol.
pub(crate) fn correlate<'a>(orig: &'a Obj<'a>, patched: &'a Obj<'a>) -> Correlation {
    let mut sides = Sides {
        orig,
        patched,
        oc: candidates(orig),
        pc: candidates(patched),
    };
    let mut m = Matches {
        twin: vec![None; patched.symbols.len()],
        taken: HashSet::new(),
    };
    // Descriptors match only by what they describe; one left unmatched is a new call site,
    // never another's by number.
    let is_site = |o: &Obj<'_>, i: usize| o.sec_of(i).is_some_and(|s| is_dyndbg(&s.name));
    let (od, oc): (Vec<usize>, Vec<usize>) = sides.oc.iter().partition(|&&i| is_site(orig, i));
    let (pd, pc): (Vec<usize>, Vec<usize>) = sides.pc.iter().partition(|&&i| is_site(patched, i));
    (sides.oc, sides.pc) = (oc, pc);
    sides.plain_names(&mut m);
    sides.btf_ids(&mut m);
    debug_sites((orig, &od), (patched, &pd), &mut m);
    sides.numbered(&mut m);
    sides.statics_through_users(&mut m);
    let ambiguous = sides.leftover_statics(&mut m);
    Correlation {
        twin: m.twin,
        ambiguous,
    }
}

/// Stage 1c: dynamic-debug descriptors (`__UNIQUE_ID_ddebug<counter>.<n>`), by what they
/// describe: the counter renumbers every later one when a call site is added, so names
/// would pair different messages. Same module, function, file and format match (several
/// alike in section order, when both sides have as many); then a message that moved to
/// another function matches when it is the only one of its kind on each side (see
/// `special::dyndbg_same_site`).
fn debug_sites(
    (orig, od): (&Obj<'_>, &[usize]),
    (patched, pd): (&Obj<'_>, &[usize]),
    m: &mut Matches,
) {
    let Matches { twin, taken } = m;
    let sites = |o: &Obj<'_>, syms: &[usize], loose: bool| {
        let name_of = |i: usize| o.symbols[i].name.clone();
        let keyer = Keyer::new(o, &name_of);
        let mut by_what: BTreeMap<Vec<Site>, Vec<(u64, usize)>> = BTreeMap::new();
        for &i in syms {
            let mut what = keyer.sym_keys(i);
            if loose {
                what.retain(|k| k.0 != DYNDBG_FUNCTION);
            }
            by_what
                .entry(what)
                .or_default()
                .push((o.symbols[i].value, i));
        }
        for v in by_what.values_mut() {
            v.sort();
        }
        by_what
    };
    for loose in [false, true] {
        let oc: Vec<usize> = od.iter().copied().filter(|o| !taken.contains(o)).collect();
        let pc: Vec<usize> = pd.iter().copied().filter(|&p| twin[p].is_none()).collect();
        let ours = sites(orig, &oc, loose);
        for (what, ps) in sites(patched, &pc, loose) {
            let Some(os) = ours.get(&what) else { continue };
            if os.len() != ps.len() || (loose && os.len() != 1) {
                continue;
            }
            for (&(_, o), &(_, p)) in os.iter().zip(&ps) {
                twin[p] = Some(o);
                taken.insert(o);
            }
        }
    }
}

impl Sides<'_> {
    /// Stage 1: exact plain names.
    fn plain_names(&self, m: &mut Matches) {
        let (orig, patched) = (self.orig, self.patched);
        let (oc, pc) = (&self.oc, &self.pc);
        let Matches { twin, taken } = m;
        let mut by_name: BTreeMap<(&str, u8), Vec<usize>> = BTreeMap::new();
        for &i in oc.iter() {
            if !is_numbered(&orig.symbols[i].name) {
                by_name
                    .entry((&orig.symbols[i].name, orig.symbols[i].kind))
                    .or_default()
                    .push(i);
            }
        }
        for &p in pc.iter() {
            let s = &patched.symbols[p];
            if is_numbered(&s.name) {
                continue;
            }
            if let Some(list) = by_name.get(&(s.name.as_str(), s.kind)) {
                if let Some(&o) = list.iter().find(|o| !taken.contains(o)) {
                    twin[p] = Some(o);
                    taken.insert(o);
                }
            }
        }
    }

    /// Stage 1b: BTF ID entries.
    fn btf_ids(&self, m: &mut Matches) {
        let (orig, patched) = (self.orig, self.patched);
        let (oc, pc) = (&self.oc, &self.pc);
        let Matches { twin, taken } = m;
        // 1b. BTF ID entries (`__BTF_ID__struct__bpf_htab__<n>`): `n` pastes `__COUNTER__` and
        // `__LINE__`, so moved lines rename entries that are the same. Entries of one stem
        // match in the order they have in their section, when both sides have as many.
        let btf_entries = |o: &Obj<'_>, syms: &[usize]| {
            let mut by_stem: BTreeMap<String, Vec<(usize, u64, usize)>> = BTreeMap::new();
            for &i in syms {
                if let Some(stem) = btf_id_stem(&o.symbols[i].name) {
                    let s = &o.symbols[i];
                    by_stem.entry(stem.to_owned()).or_default().push((
                        s.section().unwrap_or(0),
                        s.value,
                        i,
                    ));
                }
            }
            for v in by_stem.values_mut() {
                v.sort();
            }
            by_stem
        };
        let ob = btf_entries(orig, oc);
        for (stem, ps) in btf_entries(patched, pc) {
            match ob.get(&stem) {
                Some(os) if os.len() == ps.len() => {
                    for (&(_, _, o), &(_, _, p)) in os.iter().zip(&ps) {
                        if twin[p].is_none() && taken.insert(o) {
                            twin[p] = Some(o);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Stage 2: numbered functions and data other than function-scope statics.
    fn numbered(&self, m: &mut Matches) {
        let (orig, patched) = (self.orig, self.patched);
        let (oc, pc) = (&self.oc, &self.pc);
        let Matches { twin, taken } = m;
        let canon_key = |name: &str| canonical(name);
        let mut groups: BTreeMap<(String, u8), (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for &i in oc.iter() {
            if is_numbered(&orig.symbols[i].name)
                && !is_static_local_obj(orig, i)
                && !taken.contains(&i)
            {
                groups
                    .entry((canon_key(&orig.symbols[i].name), orig.symbols[i].kind))
                    .or_default()
                    .0
                    .push(i);
            }
        }
        for &p in pc.iter() {
            if is_numbered(&patched.symbols[p].name)
                && !is_static_local_obj(patched, p)
                && twin[p].is_none()
            {
                groups
                    .entry((canon_key(&patched.symbols[p].name), patched.symbols[p].kind))
                    .or_default()
                    .1
                    .push(p);
            }
        }
        let canon_name_o = |i: usize| canonical(&orig.symbols[i].name);
        let canon_name_p = |i: usize| canonical(&patched.symbols[i].name);
        let ko = Keyer::new(orig, &canon_name_o);
        let kp = Keyer::new(patched, &canon_name_p);
        for (os, ps) in groups.values() {
            if os.len() == 1 && ps.len() == 1 {
                twin[ps[0]] = Some(os[0]);
                taken.insert(os[0]);
                continue;
            }
            let fp =
                |k: &Keyer<'_>, o: &Obj<'_>, i: usize| (o.sym_bytes(i).to_vec(), k.sym_keys(i));
            let ofp: Vec<_> = os.iter().map(|&i| fp(&ko, orig, i)).collect();
            for &p in ps {
                let pf = fp(&kp, patched, p);
                if let Some(j) = (0..os.len()).find(|&j| !taken.contains(&os[j]) && ofp[j] == pf) {
                    twin[p] = Some(os[j]);
                    taken.insert(os[j]);
                }
            }
            let unmatched: Vec<usize> = ps.iter().copied().filter(|&p| twin[p].is_none()).collect();
            for p in unmatched {
                let name = &patched.symbols[p].name;
                if let Some(&o) = os
                    .iter()
                    .find(|&&o| !taken.contains(&o) && &orig.symbols[o].name == name)
                {
                    twin[p] = Some(o);
                    taken.insert(o);
                }
            }
        }
    }

    /// Stage 3: function-scope statics, through the users already matched.
    fn statics_through_users(&self, m: &mut Matches) {
        let (orig, patched) = (self.orig, self.patched);
        let pc = &self.pc;
        let Matches { twin, taken } = m;
        let statics_used = |o: &Obj<'_>, user: usize| -> Vec<usize> {
            let Some(sec) = o.symbols[user].section() else {
                return Vec::new();
            };
            o.sym_relocs(user)
                .iter()
                .filter_map(|r| match o.target(sec, r) {
                    Target::Sym { sym, .. } if is_static_local_obj(o, sym) => Some(sym),
                    _ => None,
                })
                .filter(|&s| {
                    let sec_name = o.sec_of(s).map_or("", |x| x.name.as_str());
                    !is_special_static(&o.symbols[s].name, sec_name)
                })
                .collect()
        };
        let users: Vec<(usize, usize)> =
            pc.iter().filter_map(|&p| twin[p].map(|o| (p, o))).collect();
        for (p, o) in users {
            let mut pused = statics_used(patched, p);
            pused.dedup();
            for os in statics_used(orig, o) {
                if taken.contains(&os) {
                    continue;
                }
                let cname = canonical(&orig.symbols[os].name);
                if let Some(&ps) = pused.iter().find(|&&ps| {
                    twin[ps].is_none() && canonical(&patched.symbols[ps].name) == cname
                }) {
                    twin[ps] = Some(os);
                    taken.insert(os);
                }
            }
        }
    }

    /// Stage 4: statics no user matched; returns the patched ones left ambiguous.
    fn leftover_statics(&self, m: &mut Matches) -> Vec<usize> {
        let (orig, patched) = (self.orig, self.patched);
        let (oc, pc) = (&self.oc, &self.pc);
        let Matches { twin, taken } = m;
        let mut left: BTreeMap<String, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for &i in oc
            .iter()
            .filter(|&&i| is_static_local_obj(orig, i) && !taken.contains(&i))
        {
            left.entry(canonical(&orig.symbols[i].name))
                .or_default()
                .0
                .push(i);
        }
        for &p in pc
            .iter()
            .filter(|&&p| is_static_local_obj(patched, p) && twin[p].is_none())
        {
            left.entry(canonical(&patched.symbols[p].name))
                .or_default()
                .1
                .push(p);
        }
        // Left over: statics that no user function matched. One on each side is the same
        // static; several on both sides cannot be told apart, and guessing would either lose
        // the live state (taken as new) or give a function another's state.
        let mut ambiguous = Vec::new();
        for (name, (os, ps)) in left {
            match (os.as_slice(), ps.as_slice()) {
                ([o], [p]) => {
                    twin[*p] = Some(*o);
                }
                (_, []) | ([], _) => {}
                _ => {
                    tracing::debug!(object = %patched.label, %name, "ambiguous function-scope statics");
                    ambiguous.extend(ps.iter().copied());
                }
            }
        }
        ambiguous
    }
}

/// The name a patched symbol is compared by: its original's, or a marked new name (so
/// keys of unchanged code agree on both sides and never match a new symbol by accident).
pub(crate) fn patched_name(
    orig: &Obj,
    patched: &Obj,
    twin: &[Option<usize>],
    sym: usize,
) -> String {
    match twin[sym] {
        Some(o) => orig.symbols[o].name.clone(),
        None => format!("<new>{}", patched.symbols[sym].name),
    }
}

/// The matched (original, patched) pairs by name, for reports.
pub(crate) fn pairs(orig: &Obj, patched: &Obj, twin: &[Option<usize>]) -> Vec<(String, String)> {
    twin.iter()
        .enumerate()
        .filter_map(|(p, o)| {
            o.map(|o| {
                (
                    orig.symbols[o].name.clone(),
                    patched.symbols[p].name.clone(),
                )
            })
        })
        .collect()
}
