//! What goes into the bundle: starting from the changed functions, follow relocations and
//! include what the new code needs that the running kernel does not have (new and changed
//! functions, new data, string literals and other anonymous constants, fresh copies of
//! special statics); everything else becomes an undefined symbol that the lucos linker
//! resolves against the running kernel (statics by source file).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use object::elf;

use super::compare::{Diff, Status};
use super::emit::global_defs;
use super::error::Refusal;
use super::names::{cold_parent, is_special_static};
use super::obj::Target;
use super::special;
use lucos_patch::elf::Reloc;

/// A piece of one object copied into the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum UnitKind {
    /// A function or data object (its byte range).
    Item(usize),
    /// A whole section nothing names (string literals, constants, jump tables).
    Section(usize),
}

#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub obj: usize,
    pub kind: UnitKind,
    /// Symbol name in the bundle (unique among defined symbols for functions).
    pub name: String,
}

/// Where a relocation of included code points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolved {
    Null(i64),
    /// A field of code that nothing in the bundle can reach: a `static_cpu_has()` test of
    /// `.altinstr_aux` jumping back into an `__init` function, whose own site is the only
    /// way in. It is pointed at a `ud2` trap ([`TRAP`]) rather than at freed memory.
    Dead,
    /// Into an included unit; the addend is relative to the unit's start.
    Unit {
        obj: usize,
        kind: UnitKind,
        addend: i64,
    },
    /// A symbol of the running kernel.
    External {
        name: String,
        addend: i64,
        weak: bool,
    },
}

/// A kernel symbol the bundle links against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct External {
    /// Its name in the running kernel (the bundle's name for it may be an alias).
    pub symbol: String,
    /// Source file of the static it names (None for globals).
    pub file: Option<String>,
    /// The first unit referring to it, for messages.
    pub from: String,
    pub weak: bool,
}

/// A function of the running kernel to redirect.
#[derive(Debug, Clone)]
pub(crate) struct Redirect {
    pub obj: usize,
    pub sym: usize,
    /// Name in the running kernel.
    pub old: String,
    /// Source file, for statics.
    pub old_file: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub units: Vec<Unit>,
    pub index: HashMap<(usize, UnitKind), usize>,
    /// Kernel symbols the new code uses, by the name the bundle's object gives them.
    pub externals: BTreeMap<String, External>,
    /// (kernel name, file of a static) → the bundle's name for it: the kernel name, or an
    /// alias when statics of one name from two files are both used.
    pub bundle_names: HashMap<(String, Option<String>), String>,
    pub redirects: Vec<Redirect>,
    /// Read-only objects rewritten in place: (unit holding the new content, the object).
    pub rewrites: Vec<(usize, Redirect)>,
    pub refusals: Vec<Refusal>,
    /// Some field is [`Resolved::Dead`]: the object gets the [`TRAP`] section.
    pub trap: bool,
    /// New exports, with the unit of the new function or object each names (`None`: the
    /// running kernel has the symbol, and its own address is exported).
    pub exports: Vec<(super::verify::NewExport, Option<usize>)>,
}

impl Plan {
    /// Whether the bundle would do nothing: no redirect, no rewrite, no export.
    pub fn is_empty(&self) -> bool {
        self.redirects.is_empty() && self.rewrites.is_empty() && self.exports.is_empty()
    }

    /// Records a kernel symbol the new code uses, once per (name, file).
    fn add_external(&mut self, name: String, file: Option<String>, from: &str, weak: bool) {
        let key = (name.clone(), file.clone());
        if self.bundle_names.contains_key(&key) {
            return;
        }
        // A second static of the same name gets an alias, which the manifest maps back to
        // the kernel symbol and its file.
        let mut alias = name.clone();
        let mut n = 1;
        while self.externals.contains_key(&alias) {
            alias = format!("{name}.lucos_alias{n}");
            n += 1;
        }
        self.bundle_names.insert(key, alias.clone());
        self.externals.insert(
            alias,
            External {
                symbol: name,
                file,
                from: from.to_string(),
                weak,
            },
        );
    }
}

/// Redirects for the changed functions (refusing those without an fentry site), queued as
/// the first units.
fn seed_redirects(diffs: &[Diff<'_>], plan: &mut Plan, queue: &mut VecDeque<(usize, UnitKind)>) {
    for (oi, d) in diffs.iter().enumerate() {
        for p in 0..d.status.len() {
            if d.status[p] != Status::Changed || !d.is_func(p) {
                continue;
            }
            let name = &d.patched.symbols[p].name;
            let sec = d.patched.sec_of(p).map_or("", |s| s.name.as_str());
            if cold_parent(name).is_some() || special::is_init(sec) {
                continue;
            }
            // Included through its redirected callers instead.
            if d.via_callers.contains(&p) {
                continue;
            }
            let Some(o) = d.twin[p] else { continue };
            let os = &d.orig.symbols[o];
            let file = d.file.clone();
            // Without an fentry site the redirect goes over the entry instructions, if
            // vmlinux shows that safe (checked at emit, refused there as NoFentry if not).
            plan.redirects.push(Redirect {
                obj: oi,
                sym: p,
                old: os.name.clone(),
                old_file: os.is_local().then_some(file),
            });
            queue.push_back((oi, UnitKind::Item(p)));
        }
    }
}

/// Plans the bundle for all compared objects.
pub(crate) fn plan(diffs: &[Diff<'_>]) -> Plan {
    let mut plan = Plan::default();
    for d in diffs {
        plan.refusals.extend(d.refusals.iter().cloned());
    }
    // Global definitions one object adds or changes that another's new code may call.
    let globals = global_defs(diffs);
    let mut queue: VecDeque<(usize, UnitKind)> = VecDeque::new();
    seed_redirects(diffs, &mut plan, &mut queue);
    // The new content of objects rewritten in place is linked like new read-only data.
    let mut rewrites = Vec::new();
    for (oi, d) in diffs.iter().enumerate() {
        for &p in d.rewrite.keys() {
            let s = &d.patched.symbols[p];
            rewrites.push(Redirect {
                obj: oi,
                sym: p,
                old: d.kernel_name(p).to_string(),
                old_file: s.is_local().then(|| d.file.clone()),
            });
            queue.push_back((oi, UnitKind::Item(p)));
        }
    }
    let exports = queue_exports(diffs, &mut queue);
    let mut seen_refusals: BTreeSet<String> = plan.refusals.iter().map(|r| r.to_string()).collect();
    let mut names: BTreeSet<String> = BTreeSet::new();
    while let Some((oi, kind)) = queue.pop_front() {
        if plan.index.contains_key(&(oi, kind)) {
            continue;
        }
        let d = &diffs[oi];
        let name = unit_name(d, kind, &mut names);
        plan.index.insert((oi, kind), plan.units.len());
        plan.units.push(Unit {
            obj: oi,
            kind,
            name,
        });
        let mut refuse = |r: Refusal, plan: &mut Plan| {
            if seen_refusals.insert(r.to_string()) {
                plan.refusals.push(r);
            }
        };
        let mut extra: Vec<(usize, Reloc)> = Vec::new();
        let (sec, relocs): (usize, &[Reloc]) = match kind {
            UnitKind::Item(p) => {
                let sec = d.patched.symbols[p].section().expect("items are defined");
                if let Some(tables) = d.tables.get(&p) {
                    for t in tables {
                        let Some(table) = special::table(t).filter(|x| x.required()) else {
                            continue;
                        };
                        if table.carried() {
                            // The entries go with the function: so does what they point at.
                            extra.extend(entry_relocs(d, p, &table));
                            continue;
                        }
                        let what = table.what;
                        refuse(
                            Refusal::SpecialSection {
                                function: d.kernel_name(p).to_string(),
                                file: d.file.clone(),
                                section: t.to_string(),
                                what: what.to_string(),
                            },
                            &mut plan,
                        );
                    }
                }
                // Cold parts jump back into their parent's body: they go with it.
                let me = &d.patched.symbols[p].name;
                for c in 0..d.patched.symbols.len() {
                    let cs = &d.patched.symbols[c];
                    if cs.is_func() && cs.section().is_some() && cold_parent(&cs.name) == Some(me) {
                        queue.push_back((oi, UnitKind::Item(c)));
                    }
                }
                (sec, d.patched.sym_relocs(p))
            }
            UnitKind::Section(s) => (s, &d.patched.sections[s].relocs[..]),
        };
        let from = plan
            .units
            .last()
            .map(|u| u.name.clone())
            .unwrap_or_default();
        let all = relocs.iter().map(|r| (sec, *r)).chain(extra);
        for (sec, r) in all.filter(|(_, r)| r.r_type != elf::R_X86_64_NONE) {
            let r = &r;
            match resolve(diffs, &globals, oi, sec, r) {
                Ok(Resolved::Unit { obj, kind, .. }) => queue.push_back((obj, kind)),
                Ok(Resolved::External { name, weak, .. }) => {
                    let file = external_file(d, sec, r);
                    plan.add_external(name, file, &from, weak);
                }
                Ok(Resolved::Null(_)) => {}
                Ok(Resolved::Dead) => plan.trap = true,
                Err(r) => refuse(r, &mut plan),
            }
        }
    }
    for r in rewrites {
        let unit = plan.index[&(r.obj, UnitKind::Item(r.sym))];
        plan.rewrites.push((unit, r));
    }
    plan.exports = exports
        .into_iter()
        .map(|(e, item)| (e, item.and_then(|k| plan.index.get(&k).copied())))
        .collect();
    plan
}

/// The new exports of every object; a symbol the running kernel lacks (a new function)
/// is queued, so the bundle carries what its module exports.
fn queue_exports(
    diffs: &[Diff<'_>],
    queue: &mut VecDeque<(usize, UnitKind)>,
) -> Vec<(super::verify::NewExport, Option<(usize, UnitKind)>)> {
    let mut out = Vec::new();
    for (oi, d) in diffs.iter().enumerate() {
        for e in super::verify::new_exports(d.orig, d.patched) {
            let new = (0..d.patched.symbols.len()).find(|&p| {
                let s = &d.patched.symbols[p];
                s.name == e.name
                    && !s.is_local()
                    && s.section().is_some()
                    && d.status[p] == Status::New
            });
            let item = new.map(|p| (oi, UnitKind::Item(p)));
            if let Some(k) = item {
                queue.push_back(k);
            }
            out.push((e, item));
        }
    }
    out
}

/// The relocations (section, relocation) of the entries of `table` that belong to item `p`.
pub(crate) fn entry_relocs(d: &Diff<'_>, p: usize, table: &special::Table) -> Vec<(usize, Reloc)> {
    let o = d.patched;
    let mut out = Vec::new();
    for (si, sec) in o.sections.iter().enumerate() {
        if sec.name != table.name {
            continue;
        }
        for e in special::entries(o, si, table) {
            if e.owner == Some(p) {
                out.extend(special::entry_needs(o, si, table, &e));
            }
        }
    }
    out
}

/// The source file that qualifies an external static, if it is one.
pub(crate) fn external_file(d: &Diff<'_>, sec: usize, r: &Reloc) -> Option<String> {
    match d.patched.target(sec, r) {
        Target::Sym { sym, .. } => {
            let s = &d.patched.symbols[sym];
            (s.section().is_some() && s.is_local()).then(|| d.file.clone())
        }
        _ => None,
    }
}

fn unit_name(d: &Diff<'_>, kind: UnitKind, taken: &mut BTreeSet<String>) -> String {
    let base = match kind {
        // Not the kernel's name, which the new code uses for the live object.
        UnitKind::Item(p) if d.rewrite.contains_key(&p) => {
            format!("{}.lucos_rewrite", d.kernel_name(p))
        }
        UnitKind::Item(p) => d.kernel_name(p).to_string(),
        UnitKind::Section(s) => return d.patched.sections[s].name.clone(),
    };
    let mut name = base.clone();
    let mut n = 1;
    while !taken.insert(name.clone()) {
        name = format!("{base}.lucos{n}");
        n += 1;
    }
    name
}

/// The trap section that [`Resolved::Dead`] fields point at: `ud2`.
pub(crate) const TRAP: (&str, &[u8]) = (".text.lucos_unreachable", &[0x0f, 0x0b]);

/// `static_cpu_has()`'s run-time tests: each jumps back into the function whose site
/// jumped to it, so one that jumps into `__init` code belongs to `__init` code.
fn is_aux(section: &str) -> bool {
    section == ".altinstr_aux"
}

/// Where relocation `r` in section `sec` of object `oi` must point in the bundle.
pub(crate) fn resolve(
    diffs: &[Diff<'_>],
    globals: &HashMap<&str, (usize, usize)>,
    oi: usize,
    sec: usize,
    r: &Reloc,
) -> Result<Resolved, Refusal> {
    let d = &diffs[oi];
    let o = d.patched;
    let refuse = |symbol: &str, reason: &str| Refusal::Reference {
        from: o.sections[sec]
            .name
            .trim_start_matches(".text.")
            .to_string(),
        file: d.file.clone(),
        symbol: symbol.to_string(),
        reason: reason.to_string(),
    };
    match o.target(sec, r) {
        Target::Null => Ok(Resolved::Null(r.addend)),
        Target::Sym { sym, addend } => {
            let s = &o.symbols[sym];
            let Some(tsec) = s.section() else {
                if let Some(&(obj, p)) = globals.get(s.name.as_str()) {
                    return Ok(Resolved::Unit {
                        obj,
                        kind: UnitKind::Item(p),
                        addend,
                    });
                }
                return Ok(Resolved::External {
                    name: s.name.clone(),
                    addend,
                    weak: s.bind == elf::STB_WEAK,
                });
            };
            let tname = &o.sections[tsec].name;
            if special::is_init(tname) {
                if is_aux(&o.sections[sec].name) {
                    return Ok(Resolved::Dead);
                }
                return Err(refuse(
                    &s.name,
                    "is __init/__exit code or data, freed after boot",
                ));
            }
            let include = Ok(Resolved::Unit {
                obj: oi,
                kind: UnitKind::Item(sym),
                addend,
            });
            let external = Ok(Resolved::External {
                name: d.kernel_name(sym).to_string(),
                addend,
                weak: false,
            });
            if o.sections[tsec].is_exec() {
                let cold = cold_parent(&s.name).is_some();
                return match d.status[sym] {
                    // vmlinux decides which definition of a weak function wins; a changed
                    // weak one that did win is redirected in place.
                    Status::Changed if s.bind == elf::STB_WEAK => external,
                    Status::Changed | Status::New => include,
                    _ if cold => include,
                    _ => external,
                };
            }
            if s.is_local() && is_special_static(&s.name, tname) {
                return include;
            }
            if d.ambiguous.contains(&sym) {
                return Err(refuse(
                    &s.name,
                    "is one of several function-scope statics of that name in this file that \
                     lucos cannot tell apart, so it cannot know which live copy the new code \
                     must use (a fresh copy would lose its state); give the static a unique \
                     name or move it to file scope",
                ));
            }
            match d.status[sym] {
                Status::New => match special::needs_registration(tname) {
                    Some(_) if tname.starts_with(".data..percpu") => Err(Refusal::NewPercpu {
                        symbol: s.name.clone(),
                        file: d.file.clone(),
                    }),
                    Some(what) => Err(refuse(
                        &s.name,
                        &format!("is new and is {what}, which lucos cannot register yet"),
                    )),
                    None => include,
                },
                // Changed read-only data is rewritten in place (other changes were refused):
                // the new code uses the live object, like everyone.
                _ => external,
            }
        }
        Target::Anon { sec: t, addend, .. } => {
            let ts = &o.sections[t];
            if special::is_init(&ts.name) {
                if is_aux(&o.sections[sec].name) {
                    return Ok(Resolved::Dead);
                }
                return Err(refuse(&ts.name, "is __init data, freed after boot"));
            }
            if ts.is_write() {
                return Err(refuse(
                    &ts.name,
                    "is writable data without a symbol; give it a name (a static variable)",
                ));
            }
            Ok(Resolved::Unit {
                obj: oi,
                kind: UnitKind::Section(t),
                addend,
            })
        }
    }
}
