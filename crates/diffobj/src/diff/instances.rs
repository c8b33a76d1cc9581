//! Where the running kernel keeps objects of one struct type, from the dbg vmlinux's
//! DWARF: every variable of the type (or an array of it) with its link-time address, and
//! whether any compile unit has a pointer through which code could fill an object of it.
//!
//! A member added in a padding hole ([`super::layout::padding_only`]) is read by new code
//! from objects the old code made. Those hold zero there only if they are static: the
//! compiler emits zeros for the padding of every static initializer, which is the value
//! of the new member in an instance that does not set it. An object the kernel allocates
//! and fills at run time needs a pointer to the type that is not to `const`; when no unit
//! has one, every instance is one of the variables listed here (or a module's static,
//! also zero-filled by the compiler), and the live ones are checked at the switch.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use object::Object;
use serde::{Deserialize, Serialize};

use super::dwarf::{parse, Slice};
use super::error::{DiffError, DwarfError};

/// One variable of the type: `count` objects of `stride` bytes from `addr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub addr: u64,
    pub count: u64,
    /// `const`: placed in read-only data, so the live bytes are vmlinux's.
    pub constant: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instances {
    pub vars: Vec<Instance>,
    /// The compile units (sources) with a pointer to the non-`const` type.
    pub writable_pointers: Vec<String>,
}

/// Bump when the cached format or its derivation changes.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Cached {
    format: u32,
    build_id: String,
    type_name: String,
    found: Instances,
}

/// [`scan`] of `vmlinux`, cached at `cache` for `build_id` (a failed store only costs
/// the next build time).
pub fn load_or_scan(
    vmlinux: &Path,
    build_id: &str,
    type_name: &str,
    cache: &Path,
) -> Result<Instances, DiffError> {
    if let Ok(text) = std::fs::read(cache) {
        if let Ok(c) = serde_json::from_slice::<Cached>(&text) {
            if c.format == FORMAT && c.build_id == build_id && c.type_name == type_name {
                return Ok(c.found);
            }
        }
    }
    let started = std::time::Instant::now();
    let data = std::fs::read(vmlinux).map_err(DiffError::io("read", vmlinux))?;
    let found = scan(&data, type_name).map_err(|source| DiffError::VmlinuxDwarf {
        path: vmlinux.to_owned(),
        source,
    })?;
    tracing::info!(
        type_name,
        vars = found.vars.len(),
        seconds = started.elapsed().as_secs_f64(),
        "found the type's variables in vmlinux"
    );
    let cached = Cached {
        format: FORMAT,
        build_id: build_id.to_owned(),
        type_name: type_name.to_owned(),
        found,
    };
    super::dwarfdeps::store(cache, &cached);
    Ok(cached.found)
}

/// The variables of `type_name` (`struct x`) in the object `data` and the units with a
/// writable pointer to it.
pub fn scan(data: &[u8], type_name: &str) -> Result<Instances, DwarfError> {
    let file = object::File::parse(data).map_err(|source| DwarfError::Object { source })?;
    if file.section_by_name(".debug_info").is_none() {
        return Err(DwarfError::NoDebugInfo);
    }
    let (tag, name) = match type_name.split_once(' ') {
        Some(("struct", n)) => (gimli::DW_TAG_structure_type, n),
        Some(("union", n)) => (gimli::DW_TAG_union_type, n),
        _ => return Ok(Instances::default()),
    };
    let sections = super::dwarf::dwarf_sections(&file)?;
    let dwarf = super::dwarf::dwarf(&sections)?;
    let mut out = Instances::default();
    let mut headers = dwarf.units();
    while let Some(header) = headers.next().map_err(parse("a unit header"))? {
        let unit = dwarf.unit(header).map_err(parse("a unit"))?;
        unit_instances(&dwarf, &unit, tag, name, &mut out).map_err(parse("a unit's variables"))?;
    }
    // A variable a header declares is defined once, but an object's addresses are only
    // section offsets: one name at one address is one variable.
    out.vars
        .sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
    out.vars
        .dedup_by(|a, b| (a.addr, &a.name) == (b.addr, &b.name));
    Ok(out)
}

/// A DIE of interest in one unit: its tag, the DIE its `DW_AT_type` names, and for
/// arrays their element count.
struct Die {
    tag: gimli::DwTag,
    of: Option<gimli::UnitOffset>,
    count: Option<u64>,
}

fn unit_instances(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    unit: &gimli::Unit<Slice<'_>>,
    tag: gimli::DwTag,
    name: &str,
    out: &mut Instances,
) -> Result<(), gimli::Error> {
    let mut dies: HashMap<gimli::UnitOffset, Die> = HashMap::new();
    let mut target: HashSet<gimli::UnitOffset> = HashSet::new();
    type Var = (
        Option<String>,
        u64,
        Option<gimli::UnitOffset>,
        Option<gimli::UnitOffset>,
    );
    let mut vars: Vec<Var> = Vec::new();
    let mut declared: HashMap<gimli::UnitOffset, (Option<String>, Option<gimli::UnitOffset>)> =
        HashMap::new();
    let mut last_array: Option<gimli::UnitOffset> = None;
    let mut entries = unit.entries();
    while let Some(e) = entries.next_dfs()? {
        let of = match e.attr_value(gimli::DW_AT_type) {
            Some(gimli::AttributeValue::UnitRef(o)) => Some(o),
            _ => None,
        };
        match e.tag() {
            t if t == tag => {
                let named = e
                    .attr_value(gimli::DW_AT_name)
                    .and_then(|v| dwarf.attr_string(unit, v).ok())
                    .is_some_and(|s| s.slice() == name.as_bytes());
                if named {
                    target.insert(e.offset());
                }
            }
            gimli::DW_TAG_typedef
            | gimli::DW_TAG_const_type
            | gimli::DW_TAG_volatile_type
            | gimli::DW_TAG_pointer_type => {
                dies.insert(
                    e.offset(),
                    Die {
                        tag: e.tag(),
                        of,
                        count: None,
                    },
                );
            }
            gimli::DW_TAG_array_type => {
                dies.insert(
                    e.offset(),
                    Die {
                        tag: e.tag(),
                        of,
                        count: Some(1),
                    },
                );
                last_array = Some(e.offset());
            }
            gimli::DW_TAG_subrange_type => {
                let n = e
                    .attr_value(gimli::DW_AT_count)
                    .and_then(|v| v.udata_value())
                    .or_else(|| {
                        e.attr_value(gimli::DW_AT_upper_bound)
                            .and_then(|v| v.udata_value())
                            .map(|u| u + 1)
                    });
                if let Some(d) = last_array.and_then(|a| dies.get_mut(&a)) {
                    d.count = match (d.count, n) {
                        (Some(c), Some(n)) => c.checked_mul(n),
                        _ => None,
                    };
                }
            }
            gimli::DW_TAG_variable => {
                let name = e
                    .attr_value(gimli::DW_AT_name)
                    .and_then(|v| dwarf.attr_string(unit, v).ok())
                    .map(|s| s.to_string_lossy().into_owned());
                // A global's definition names its declaration (in a header) for the
                // name and type.
                let spec = match e.attr_value(gimli::DW_AT_specification) {
                    Some(gimli::AttributeValue::UnitRef(o)) => Some(o),
                    _ => None,
                };
                declared.insert(e.offset(), (name.clone(), of));
                if let Some(addr) = static_address(e, unit) {
                    vars.push((name, addr, of, spec));
                }
            }
            _ => {}
        }
    }
    if target.is_empty() {
        return Ok(());
    }
    let source = unit
        .name
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if dies.values().any(|d| {
        d.tag == gimli::DW_TAG_pointer_type && reaches(&dies, &target, d.of, false).is_some()
    }) {
        out.writable_pointers.push(source);
    }
    for (name, addr, of, spec) in vars {
        let decl = spec.and_then(|s| declared.get(&s));
        let name = name.or_else(|| decl.and_then(|d| d.0.clone()));
        let Some(of) = of.or_else(|| decl.and_then(|d| d.1)) else {
            continue;
        };
        if let Some((constant, count)) = instance_of(&dies, &target, of) {
            let name = name.unwrap_or_default();
            out.vars.push(Instance {
                name,
                addr,
                count,
                constant,
            });
        }
    }
    Ok(())
}

/// Whether `of` names the target through typedefs (and `const` when `through_const`):
/// `Some(saw const)`.
fn reaches(
    dies: &HashMap<gimli::UnitOffset, Die>,
    target: &HashSet<gimli::UnitOffset>,
    mut of: Option<gimli::UnitOffset>,
    through_const: bool,
) -> Option<bool> {
    let mut constant = false;
    for _ in 0..16 {
        let o = of?;
        if target.contains(&o) {
            return Some(constant);
        }
        let d = dies.get(&o)?;
        match d.tag {
            gimli::DW_TAG_typedef | gimli::DW_TAG_volatile_type => {}
            gimli::DW_TAG_const_type if through_const => constant = true,
            _ => return None,
        }
        of = d.of;
    }
    None
}

/// (const, element count) when a variable of type `of` holds objects of the target.
fn instance_of(
    dies: &HashMap<gimli::UnitOffset, Die>,
    target: &HashSet<gimli::UnitOffset>,
    of: gimli::UnitOffset,
) -> Option<(bool, u64)> {
    let mut of = Some(of);
    let mut count = 1u64;
    let mut constant = false;
    for _ in 0..16 {
        if let Some(c) = reaches(dies, target, of, true) {
            return Some((constant || c, count));
        }
        let d = dies.get(&of?)?;
        match d.tag {
            gimli::DW_TAG_array_type => count = count.checked_mul(d.count?)?,
            gimli::DW_TAG_const_type => constant = true,
            gimli::DW_TAG_typedef | gimli::DW_TAG_volatile_type => {}
            _ => return None,
        }
        of = d.of;
    }
    None
}

/// The address of a variable placed at a fixed address (`DW_OP_addr`), not a local or a
/// declaration.
fn static_address(
    e: &gimli::DebuggingInformationEntry<Slice<'_>>,
    unit: &gimli::Unit<Slice<'_>>,
) -> Option<u64> {
    let gimli::AttributeValue::Exprloc(expr) = e.attr_value(gimli::DW_AT_location)? else {
        return None;
    };
    let mut ops = expr.operations(unit.encoding());
    match ops.next().ok()? {
        Some(gimli::Operation::Address { address }) => {
            ops.next().ok()?.is_none().then_some(address)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(src: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("t.c");
        std::fs::write(&c, src).unwrap();
        let o = dir.path().join("t.o");
        let st = std::process::Command::new("gcc")
            .args(["-g", "-O2", "-c", "-o"])
            .arg(&o)
            .arg(&c)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(o).unwrap()
    }

    const TYPES: &str = "struct p { void *f; char a, b; int r; };\n\
        typedef const struct p cp;\n";

    #[test]
    fn every_variable_of_the_type_is_found_with_its_constness() {
        let src = format!(
            "{TYPES}const struct p one = {{ 0, 1 }};\n\
             static cp many[3] = {{ {{ 0 }} }};\n\
             struct p writable;\n\
             const struct p *get(int i) {{ return i ? &many[i] : &one; }}\n\
             struct p *w(void) {{ return &writable; }}\n"
        );
        let found = scan(&compile(&src), "struct p").unwrap();
        let mut vars: Vec<_> = found
            .vars
            .iter()
            .map(|v| (v.name.as_str(), v.count, v.constant))
            .collect();
        vars.sort();
        assert_eq!(
            vars,
            [("many", 3, true), ("one", 1, true), ("writable", 1, false)]
        );
        // `w` returns a pointer to the type without const: code could fill one.
        assert_eq!(found.writable_pointers.len(), 1, "{found:?}");
        let src = src.replace("struct p *w(void) { return &writable; }", "");
        let found = scan(&compile(&src), "struct p").unwrap();
        assert!(found.writable_pointers.is_empty(), "{found:?}");
        assert!(scan(&compile(&src), "struct other")
            .unwrap()
            .vars
            .is_empty());
    }
}
