//! Writing the planned units as one ELF relocatable object (the bundle's code and data).
//!
//! Each unit gets its own section, named after the section it came from so the lucos
//! linker classifies it the same way. Relocations are rewritten to name either a unit of
//! the bundle or an undefined symbol of the running kernel; `__fentry__` stays undefined
//! (the linker turns those calls into NOPs).

use std::collections::HashMap;

use object::write::{self, Mangling, SectionId, SymbolId, SymbolSection};
use object::{
    elf, Architecture, BinaryFormat, Endianness, RelocationFlags, SectionFlags, SectionKind,
    SymbolFlags, SymbolKind, SymbolScope,
};

use super::compare::Diff;
use super::error::DiffError;
use super::include::{resolve, Plan, Resolved, UnitKind};

fn emit_err(reason: impl std::fmt::Display) -> DiffError {
    DiffError::Emit {
        reason: reason.to_string(),
    }
}

/// Writes the object for `plan`. Returns its bytes and each unit's symbol name.
pub(crate) fn write_object(diffs: &[Diff<'_>], plan: &Plan) -> Result<Vec<u8>, DiffError> {
    let mut w = write::Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    w.set_mangling(Mangling::None);
    let mut sections: Vec<(SectionId, SymbolId, u64)> = Vec::with_capacity(plan.units.len());

    for unit in &plan.units {
        let o = diffs[unit.obj].patched;
        let (sec, start, size) = match unit.kind {
            UnitKind::Item(p) => {
                let s = &o.symbols[p];
                (s.section().expect("items are defined"), s.value, s.size)
            }
            UnitKind::Section(s) => (s, 0, o.sections[s].size),
        };
        let src = &o.sections[sec];
        let whole = start == 0 && size == src.size;
        let name = match unit.kind {
            UnitKind::Item(_) if !whole => format!("{}.{}", src.name, unit.name),
            _ => src.name.clone(),
        };
        let kind = if src.is_exec() {
            SectionKind::Text
        } else if src.is_nobits() {
            SectionKind::UninitializedData
        } else if src.is_write() {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        let id = w.add_section(Vec::new(), name.into_bytes(), kind);
        let keep = u64::from(elf::SHF_ALLOC | elf::SHF_WRITE | elf::SHF_EXECINSTR);
        w.section_mut(id).flags = SectionFlags::Elf {
            sh_flags: src.flags & keep,
        };
        if src.is_nobits() {
            w.append_section_bss(id, size, src.align);
        } else {
            w.set_section_data(id, src.bytes(start, start + size).to_vec(), src.align);
        }
        let sym = match unit.kind {
            UnitKind::Item(p) => {
                let s = &o.symbols[p];
                w.add_symbol(write::Symbol {
                    name: unit.name.clone().into_bytes(),
                    value: 0,
                    size,
                    kind: if s.is_func() {
                        SymbolKind::Text
                    } else {
                        SymbolKind::Data
                    },
                    scope: if s.is_local() {
                        SymbolScope::Compilation
                    } else {
                        SymbolScope::Dynamic
                    },
                    weak: s.bind == elf::STB_WEAK,
                    section: SymbolSection::Section(id),
                    flags: SymbolFlags::None,
                })
            }
            UnitKind::Section(_) => w.section_symbol(id),
        };
        sections.push((id, sym, start));
    }

    let globals = global_defs(diffs);
    let mut externals: HashMap<String, SymbolId> = HashMap::new();
    for (ui, unit) in plan.units.iter().enumerate() {
        let o = diffs[unit.obj].patched;
        let (sec, start, end) = match unit.kind {
            UnitKind::Item(p) => {
                let s = &o.symbols[p];
                (s.section().expect("items are defined"), s.value, s.end())
            }
            UnitKind::Section(s) => (s, 0, o.sections[s].size),
        };
        let (id, _, _) = sections[ui];
        for r in o.sections[sec].relocs_in(start, end) {
            if r.r_type == elf::R_X86_64_NONE {
                continue;
            }
            let resolved = resolve(diffs, &globals, unit.obj, sec, r)
                .map_err(|e| emit_err(format!("unplanned refusal: {e}")))?;
            let (symbol, addend) = match resolved {
                Resolved::Unit { obj, kind, addend } => {
                    let ti = *plan.index.get(&(obj, kind)).ok_or_else(|| {
                        emit_err("a relocation points at a unit that was not planned")
                    })?;
                    (sections[ti].1, addend)
                }
                Resolved::External { name, addend, weak } => {
                    let file = super::include::external_file(&diffs[unit.obj], sec, r);
                    let name = plan
                        .bundle_names
                        .get(&(name, file))
                        .cloned()
                        .ok_or_else(|| emit_err("an external reference that was not planned"))?;
                    let id = *externals.entry(name.clone()).or_insert_with(|| {
                        w.add_symbol(write::Symbol {
                            name: name.into_bytes(),
                            value: 0,
                            size: 0,
                            kind: SymbolKind::Unknown,
                            scope: SymbolScope::Dynamic,
                            weak,
                            section: SymbolSection::Undefined,
                            flags: SymbolFlags::None,
                        })
                    });
                    (id, addend)
                }
                Resolved::Null(_) => {
                    return Err(emit_err(format!(
                        "{}+{:#x}: an absolute relocation without a symbol is not supported",
                        o.sections[sec].name, r.offset
                    )))
                }
            };
            w.add_relocation(
                id,
                write::Relocation {
                    offset: r.offset - start,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf { r_type: r.r_type },
                },
            )
            .map_err(emit_err)?;
        }
    }
    w.write().map_err(emit_err)
}

/// Same map as the planner's: global definitions added or changed by the diff.
pub(crate) fn global_defs<'a>(diffs: &'a [Diff<'_>]) -> HashMap<&'a str, (usize, usize)> {
    use super::compare::Status;
    use super::elf::is_item;
    let mut globals = HashMap::new();
    for (oi, d) in diffs.iter().enumerate() {
        for p in 0..d.status.len() {
            let s = &d.patched.symbols[p];
            let weak = s.bind == elf::STB_WEAK;
            let wanted = match d.status[p] {
                Status::New => true,
                // The running kernel's winner of a weak definition is the one to call.
                Status::Changed => !weak,
                _ => false,
            };
            if is_item(s) && !s.is_local() && wanted {
                globals.insert(s.name.as_str(), (oi, p));
            }
        }
    }
    globals
}
