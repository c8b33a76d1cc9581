//! Frame-local types: a struct whose layout change is safe when the switch is consistent.
//!
//! A changed layout is refused because the running kernel's objects keep the old one
//! ([`super::layout`]). Some types have no such objects between two calls: `struct lb_env`
//! of `kernel/sched/fair.c` is declared in that file only, and every instance is a local
//! variable of a load-balancing function, handed down to helpers by pointer. Such an
//! instance lives exactly as long as the frame that declared it. If no task is inside any
//! replaced function when the jmps go in (a consistent switch, which lucos checks from
//! outside), no old-layout instance exists that new code could see, and none made by new
//! code outlives a revert under the same check. A function whose code is byte-identical
//! under both layouts is not replaced and needs not be: it reads and writes the same bytes
//! either way.
//!
//! The proof is read from the object's DWARF, in both compiles, and is deliberately narrow.
//! The type must be defined in the compiled `.c` file itself (a header's type can be named
//! by other objects, which this build does not see), at least one function must hold it by
//! value, and nothing else may name it: no global or static variable, no member of another
//! type, no local *pointer* variable (where a heap instance would be kept) and no function
//! returning a pointer to it. Pointers are allowed only as parameters, which is how the
//! frame's owner lends the instance to its helpers. What DWARF cannot show is a pointer
//! laundered through an untyped value (`void *`); the kernel's stack-only types do not do
//! that, since such a pointer would dangle once the frame returns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::dwarf::{dwarf, dwarf_sections, parse, Slice};
use super::error::DwarfError;

type Unit<'a> = gimli::Unit<Slice<'a>>;
type Offset = gimli::UnitOffset<usize>;

/// How a type reaches one of the types being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The type is the struct (or an array of it, through typedefs and qualifiers).
    Value,
    /// The type points to it (at any depth of indirection).
    Pointer,
}

/// What the DWARF of one object says about one type: why it is not frame-local, or the
/// functions that hold it in their frames.
#[derive(Debug, Clone, Default)]
struct Evidence {
    owners: BTreeSet<String>,
    against: Option<String>,
    seen: bool,
}

impl Evidence {
    fn refuse(&mut self, why: String) {
        self.against.get_or_insert(why);
    }
}

/// For each of `types` (`struct name` or `union name`): `Ok(owners)` when every instance
/// the object can make lives in the frame of one of `owners` (see the module docs), or
/// `Err(why not)`. A type the object's DWARF does not define is not frame-local.
pub(crate) fn frame_local(
    data: &[u8],
    types: &BTreeSet<String>,
) -> Result<BTreeMap<String, Result<BTreeSet<String>, String>>, DwarfError> {
    let file = object::File::parse(data).map_err(|source| DwarfError::Object { source })?;
    let sections = dwarf_sections(&file)?;
    let dwarf = dwarf(&sections)?;
    let mut found: BTreeMap<String, Evidence> = BTreeMap::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(parse("a unit header"))? {
        let unit = dwarf.unit(header).map_err(parse("a unit"))?;
        Scan::new(&dwarf, &unit, types)
            .run(&mut found)
            .map_err(parse("a unit's variables"))?;
    }
    Ok(types
        .iter()
        .map(|t| {
            let e = found.remove(t).unwrap_or_default();
            let verdict = match (e.seen, e.against, e.owners.is_empty()) {
                (false, _, _) => Err("its definition is not in this object's debug info".into()),
                (true, Some(why), _) => Err(why),
                (true, None, true) => {
                    Err("no function holds it in its frame, so its instances live elsewhere".into())
                }
                (true, None, false) => Ok(e.owners),
            };
            (t.clone(), verdict)
        })
        .collect())
}

/// One unit's walk: which DIEs are the checked types, and every DIE that names them.
struct Scan<'d, 'u> {
    dwarf: &'d gimli::Dwarf<Slice<'d>>,
    unit: &'u Unit<'d>,
    types: &'u BTreeSet<String>,
    /// Definitions and declarations of the checked types in this unit, by offset.
    targets: BTreeMap<Offset, String>,
    reach: BTreeMap<Offset, Option<(Reach, String)>>,
}

/// A DIE's context in the tree: the innermost enclosing function and type, by name.
#[derive(Debug, Clone)]
struct Context {
    depth: isize,
    tag: gimli::DwTag,
    name: Option<String>,
}

impl<'d, 'u> Scan<'d, 'u> {
    fn new(
        dwarf: &'d gimli::Dwarf<Slice<'d>>,
        unit: &'u Unit<'d>,
        types: &'u BTreeSet<String>,
    ) -> Self {
        Scan {
            dwarf,
            unit,
            types,
            targets: BTreeMap::new(),
            reach: BTreeMap::new(),
        }
    }

    fn name(&self, e: &gimli::DebuggingInformationEntry<Slice<'d>>) -> Option<String> {
        let v = e.attr_value(gimli::DW_AT_name)?;
        let s = self.dwarf.attr_string(self.unit, v).ok()?;
        Some(s.to_string_lossy().into_owned())
    }

    /// The source file a DIE's `DW_AT_decl_file` names, as an absolute path.
    fn decl_file(&self, e: &gimli::DebuggingInformationEntry<Slice<'d>>) -> Option<PathBuf> {
        let idx = match e.attr_value(gimli::DW_AT_decl_file)? {
            gimli::AttributeValue::FileIndex(i) => i,
            v => v.udata_value()?,
        };
        let h = self.unit.line_program.as_ref()?.header();
        let f = h.file(idx)?;
        let text = |v| {
            let s = self.dwarf.attr_string(self.unit, v).ok()?;
            Some(PathBuf::from(s.to_string_lossy().into_owned()))
        };
        let mut path = text(f.path_name())?;
        if path.is_relative() {
            if let Some(dir) = f.directory(h).and_then(text) {
                path = dir.join(path);
            }
        }
        Some(self.absolute(path))
    }

    fn absolute(&self, p: PathBuf) -> PathBuf {
        let dir = self.unit.comp_dir.map(|s| s.to_string_lossy().into_owned());
        let p = match (p.is_relative(), dir) {
            (true, Some(d)) => Path::new(&d).join(p),
            _ => p,
        };
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    }

    /// Whether `file` is the unit's own `.c` source (not a header it includes).
    fn is_unit_source(&self, file: &Path) -> bool {
        let Some(name) = self.unit.name.map(|s| s.to_string_lossy().into_owned()) else {
            return false;
        };
        name.ends_with(".c") && self.absolute(PathBuf::from(name)) == file
    }

    fn run(mut self, found: &mut BTreeMap<String, Evidence>) -> Result<(), gimli::Error> {
        self.find_targets(found)?;
        if self.targets.is_empty() {
            return Ok(());
        }
        let mut entries = self.unit.entries();
        let mut stack: Vec<Context> = Vec::new();
        while let Some(e) = entries.next_dfs()? {
            let depth = e.depth();
            while stack.last().is_some_and(|c| c.depth >= depth) {
                stack.pop();
            }
            let name = self.name(e);
            stack.push(Context {
                depth,
                tag: e.tag(),
                name: name.clone(),
            });
            let Some(gimli::AttributeValue::UnitRef(t)) = e.attr_value(gimli::DW_AT_type) else {
                continue;
            };
            let Some((how, ty)) = self.reaches(t, 0)? else {
                continue;
            };
            let outer = &stack[..stack.len() - 1];
            let ev = found.entry(ty.clone()).or_default();
            judge(e, how, &ty, name.as_deref(), outer, ev);
        }
        Ok(())
    }

    /// Records each checked type this unit defines; one defined in a header is refused.
    fn find_targets(&mut self, found: &mut BTreeMap<String, Evidence>) -> Result<(), gimli::Error> {
        let mut entries = self.unit.entries();
        while let Some(e) = entries.next_dfs()? {
            let kind = match e.tag() {
                gimli::DW_TAG_structure_type => "struct",
                gimli::DW_TAG_union_type => "union",
                _ => continue,
            };
            let Some(name) = self.name(e) else { continue };
            let full = format!("{kind} {name}");
            if !self.types.contains(&full) {
                continue;
            }
            self.targets.insert(e.offset(), full.clone());
            if e.has_attr(gimli::DW_AT_declaration) {
                continue;
            }
            let ev = found.entry(full).or_default();
            ev.seen = true;
            match self.decl_file(e) {
                Some(f) if self.is_unit_source(&f) => {}
                Some(f) => ev.refuse(format!(
                    "it is defined in {}, which other objects may include",
                    f.display()
                )),
                None => ev.refuse("its debug info does not say where it is defined".into()),
            }
        }
        Ok(())
    }

    /// Whether the type at `off` is, or points to, a checked type (and which).
    fn reaches(
        &mut self,
        off: Offset,
        depth: u32,
    ) -> Result<Option<(Reach, String)>, gimli::Error> {
        if let Some(r) = self.reach.get(&off) {
            return Ok(r.clone());
        }
        if let Some(t) = self.targets.get(&off) {
            return Ok(Some((Reach::Value, t.clone())));
        }
        if depth > 32 {
            return Ok(None);
        }
        let e = self.unit.entry(off)?;
        let inner = match e.attr_value(gimli::DW_AT_type) {
            Some(gimli::AttributeValue::UnitRef(t)) => Some(t),
            _ => None,
        };
        let r = match (e.tag(), inner) {
            (
                gimli::DW_TAG_typedef
                | gimli::DW_TAG_const_type
                | gimli::DW_TAG_volatile_type
                | gimli::DW_TAG_restrict_type
                | gimli::DW_TAG_atomic_type
                | gimli::DW_TAG_array_type,
                Some(t),
            ) => self.reaches(t, depth + 1)?,
            (gimli::DW_TAG_pointer_type | gimli::DW_TAG_reference_type, Some(t)) => self
                .reaches(t, depth + 1)?
                .map(|(_, ty)| (Reach::Pointer, ty)),
            _ => None,
        };
        self.reach.insert(off, r.clone());
        Ok(r)
    }
}

/// Whether a DIE naming a checked type keeps the type frame-local, given the DIEs that
/// enclose it (innermost last).
fn judge(
    e: &gimli::DebuggingInformationEntry<Slice<'_>>,
    how: Reach,
    ty: &str,
    name: Option<&str>,
    outer: &[Context],
    ev: &mut Evidence,
) {
    let function = outer
        .iter()
        .rev()
        .find(|c| c.tag == gimli::DW_TAG_subprogram)
        .and_then(|c| c.name.clone());
    let name = name.unwrap_or("(anonymous)");
    match e.tag() {
        // Types built on it (pointers, typedefs, arrays) are followed where they are used.
        gimli::DW_TAG_typedef
        | gimli::DW_TAG_pointer_type
        | gimli::DW_TAG_reference_type
        | gimli::DW_TAG_const_type
        | gimli::DW_TAG_volatile_type
        | gimli::DW_TAG_restrict_type
        | gimli::DW_TAG_atomic_type
        | gimli::DW_TAG_array_type
        | gimli::DW_TAG_subroutine_type => {}
        // How an owner lends its instance to helpers (or a function-pointer type's
        // parameter, which holds nothing).
        gimli::DW_TAG_formal_parameter => {}
        gimli::DW_TAG_member => {
            let within = outer.last().and_then(|c| c.name.clone());
            let own = within.is_some_and(|w| ty.ends_with(&format!(" {w}")));
            if !(own && how == Reach::Pointer) {
                ev.refuse(format!("member `{name}` of another type holds it"));
            }
        }
        gimli::DW_TAG_variable => match (&function, is_static(e), how) {
            (Some(f), false, Reach::Value) => {
                ev.owners.insert(f.clone());
            }
            (Some(f), false, Reach::Pointer) => ev.refuse(format!(
                "local variable `{name}` of `{f}` points to one, which may be on the heap"
            )),
            _ => ev.refuse(format!("variable `{name}` holds it outside any frame")),
        },
        gimli::DW_TAG_subprogram if how == Reach::Pointer => {
            ev.refuse(format!("`{name}` returns a pointer to one"))
        }
        gimli::DW_TAG_subprogram => {}
        other => ev.refuse(format!("a {other} entry of its debug info names it")),
    }
}

/// Whether a variable has static storage: external, or located at a fixed address.
fn is_static(e: &gimli::DebuggingInformationEntry<Slice<'_>>) -> bool {
    if e.has_attr(gimli::DW_AT_external) {
        return true;
    }
    match e.attr_value(gimli::DW_AT_location) {
        Some(gimli::AttributeValue::Exprloc(x)) => x.0.slice().first() == Some(&0x03),
        _ => false,
    }
}
