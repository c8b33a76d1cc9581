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
use super::obj::Target;
use super::strings::{self, KernelStrings};

fn emit_err(reason: impl std::fmt::Display) -> DiffError {
    DiffError::Emit {
        reason: reason.to_string(),
    }
}

/// Writes the object for `plan`, with string literals the kernel already holds taken from
/// `strings` ([`super::strings`]). Returns its bytes.
pub(crate) fn write_object(
    diffs: &[Diff<'_>],
    plan: &Plan,
    strings: Option<&KernelStrings<'_>>,
) -> Result<Vec<u8>, DiffError> {
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
    let mut out = Out {
        w,
        plan,
        sections,
        externals: HashMap::new(),
        trap: None,
        strings,
        literals: HashMap::new(),
    };
    if plan.trap {
        let (name, code) = super::include::TRAP;
        let id = out
            .w
            .add_section(Vec::new(), name.into(), SectionKind::Text);
        out.w.set_section_data(id, code.to_vec(), 16);
        out.trap = Some(out.w.section_symbol(id));
    }
    for (ui, unit) in plan.units.iter().enumerate() {
        let o = diffs[unit.obj].patched;
        let (sec, start, end) = match unit.kind {
            UnitKind::Item(p) => {
                let s = &o.symbols[p];
                (s.section().expect("items are defined"), s.value, s.end())
            }
            UnitKind::Section(s) => (s, 0, o.sections[s].size),
        };
        let id = out.sections[ui].0;
        for r in o.sections[sec].relocs_in(start, end) {
            out.relocate(diffs, &globals, (unit.obj, sec), id, r, r.offset - start)?;
        }
    }
    write_tables(&mut out, diffs, &globals)?;
    let w = out.w;
    w.write().map_err(emit_err)
}

/// The object being written, with the symbols relocations can name.
struct Out<'p> {
    w: write::Object<'static>,
    plan: &'p Plan,
    /// Per unit: its section, its symbol, and its start in the source section.
    sections: Vec<(SectionId, SymbolId, u64)>,
    externals: HashMap<String, SymbolId>,
    /// The symbol of the [`super::include::TRAP`] section, when the plan needs one.
    trap: Option<SymbolId>,
    strings: Option<&'p KernelStrings<'p>>,
    /// Each literal looked up in `strings`: its offset from [`strings::BASE`], if found.
    literals: HashMap<Vec<u8>, Option<i64>>,
}

impl Out<'_> {
    /// Adds to section `id`, at `offset`, relocation `r` of source section `src`
    /// (object, section), pointed at the bundle's unit or kernel symbol it means.
    fn relocate(
        &mut self,
        diffs: &[Diff<'_>],
        globals: &HashMap<&str, (usize, usize)>,
        src: (usize, usize),
        id: SectionId,
        r: &lucos_patch::elf::Reloc,
        offset: u64,
    ) -> Result<(), DiffError> {
        if r.r_type == elf::R_X86_64_NONE {
            return Ok(());
        }
        let (oi, sec) = src;
        let o = diffs[oi].patched;
        let resolved = resolve(diffs, globals, oi, sec, r)
            .map_err(|source| DiffError::UnplannedRefusal { source })?;
        let literal = match resolved {
            Resolved::Unit {
                kind: UnitKind::Section(t),
                ..
            } if o.sections[t].is_strings() => self.kernel_literal(o, sec, r),
            _ => None,
        };
        let (symbol, addend) = match resolved {
            _ if literal.is_some() => {
                let addend = literal.expect("checked");
                (self.external(strings::BASE, false), addend)
            }
            Resolved::Unit { obj, kind, addend } => {
                let ti = *self.plan.index.get(&(obj, kind)).ok_or_else(|| {
                    emit_err("a relocation points at a unit that was not planned")
                })?;
                (self.sections[ti].1, addend)
            }
            Resolved::External { name, addend, weak } => {
                let file = super::include::external_file(&diffs[oi], sec, r);
                let name = self
                    .plan
                    .bundle_names
                    .get(&(name, file))
                    .cloned()
                    .ok_or_else(|| emit_err("an external reference that was not planned"))?;
                (self.external(&name, weak), addend)
            }
            Resolved::Dead => {
                let trap = self
                    .trap
                    .ok_or_else(|| emit_err("a dead field without a trap"))?;
                // The field is the end of a jmp or jcc: -4 lands on the trap itself.
                let pc_relative = matches!(r.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32);
                (trap, if pc_relative { -4 } else { 0 })
            }
            Resolved::Null(_) => {
                return Err(emit_err(format!(
                    "{}+{:#x}: an absolute relocation without a symbol is not supported",
                    o.sections[sec].name, r.offset
                )))
            }
        };
        self.w
            .add_relocation(
                id,
                write::Relocation {
                    offset,
                    symbol,
                    addend,
                    flags: RelocationFlags::Elf { r_type: r.r_type },
                },
            )
            .map_err(emit_err)
    }

    /// The undefined symbol `name` of the running kernel.
    fn external(&mut self, name: &str, weak: bool) -> SymbolId {
        let w = &mut self.w;
        *self.externals.entry(name.to_string()).or_insert_with(|| {
            w.add_symbol(write::Symbol {
                name: name.as_bytes().to_vec(),
                value: 0,
                size: 0,
                kind: SymbolKind::Unknown,
                scope: SymbolScope::Dynamic,
                weak,
                section: SymbolSection::Undefined,
                flags: SymbolFlags::None,
            })
        })
    }

    /// For relocation `r` of section `sec` into a string section: the addend from
    /// [`strings::BASE`] that points it at the kernel's copy of the literal, if any.
    fn kernel_literal(
        &mut self,
        o: &super::obj::Obj<'_>,
        sec: usize,
        r: &lucos_patch::elf::Reloc,
    ) -> Option<i64> {
        let Target::Anon {
            sec: t,
            addend,
            bias,
        } = o.target(sec, r)
        else {
            return None;
        };
        let off = usize::try_from(addend + bias).ok()?;
        let data = o.sections[t].bytes(0, o.sections[t].size);
        let s = strings::c_string(data, off)?;
        let kernel = self.strings?;
        // One literal is often named many times; each lookup scans the kernel's .rodata.
        let at = *self
            .literals
            .entry(s.to_vec())
            .or_insert_with(|| kernel.find(s));
        Some(at? - bias)
    }

    fn add_like(&mut self, src: &lucos_patch::elf::Section<'_>, name: &str) -> SectionId {
        let kind = if src.is_exec() {
            SectionKind::Text
        } else if src.is_write() {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        let id = self
            .w
            .add_section(Vec::new(), name.as_bytes().to_vec(), kind);
        let keep = u64::from(elf::SHF_ALLOC | elf::SHF_WRITE | elf::SHF_EXECINSTR);
        self.w.section_mut(id).flags = SectionFlags::Elf {
            sh_flags: src.flags & keep,
        };
        id
    }
}

/// The entries of carried tables (exception fixups, bug records, ORC) that belong to
/// included functions: one section per table and object, with the entries in their
/// original order (the lucos linker merges and sorts them for the kernel).
fn write_tables(
    out: &mut Out<'_>,
    diffs: &[Diff<'_>],
    globals: &HashMap<&str, (usize, usize)>,
) -> Result<(), DiffError> {
    let objs: std::collections::BTreeSet<usize> = out.plan.units.iter().map(|u| u.obj).collect();
    for oi in objs {
        let o = diffs[oi].patched;
        for (si, sec) in o.sections.iter().enumerate() {
            let Some(t) = super::special::table(&sec.name).filter(|t| t.carried()) else {
                continue;
            };
            let mine: Vec<_> = super::special::entries(o, si, &t)
                .into_iter()
                .filter(|e| {
                    e.owner
                        .is_some_and(|p| out.plan.index.contains_key(&(oi, UnitKind::Item(p))))
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let id = out.add_like(sec, &sec.name);
            let mut bytes = Vec::new();
            // Windows (replacement code) go to one section per object, next to the table.
            let mut windows: Option<(SectionId, Vec<u8>, u64)> = None;
            for e in &mine {
                let at = bytes.len() as u64;
                bytes.extend_from_slice(sec.bytes(e.start, e.end));
                let win = super::special::window(o, si, &t, e);
                for r in sec.relocs_in(e.start, e.end) {
                    let offset = at + r.offset - e.start;
                    match win.filter(|w| r.offset == e.start + w.field) {
                        Some(w) => {
                            let ws = &o.sections[w.sec];
                            let (wid, wbytes, _) = windows.get_or_insert_with(|| {
                                (out.add_like(ws, &ws.name), Vec::new(), ws.align.max(1))
                            });
                            let (wid, off) = (*wid, wbytes.len() as u64);
                            wbytes.extend_from_slice(ws.bytes(w.start, w.start + w.len));
                            for rr in ws.relocs_in(w.start, w.start + w.len) {
                                out.relocate(
                                    diffs,
                                    globals,
                                    (oi, w.sec),
                                    wid,
                                    rr,
                                    off + rr.offset - w.start,
                                )?;
                            }
                            let symbol = out.w.section_symbol(wid);
                            out.w
                                .add_relocation(
                                    id,
                                    write::Relocation {
                                        offset,
                                        symbol,
                                        addend: off as i64 - w.bias,
                                        flags: RelocationFlags::Elf { r_type: r.r_type },
                                    },
                                )
                                .map_err(emit_err)?;
                        }
                        None => out.relocate(diffs, globals, (oi, si), id, r, offset)?,
                    }
                }
            }
            out.w.set_section_data(id, bytes, sec.align.max(1));
            if let Some((wid, wbytes, align)) = windows {
                out.w.set_section_data(wid, wbytes, align);
            }
            if let Some((pair, size)) = t.pair {
                let Some(ps) = o.sections.iter().find(|s| s.name == pair) else {
                    return Err(emit_err(format!("{} without {pair}", sec.name)));
                };
                let pid = out.add_like(ps, pair);
                let mut pbytes = Vec::new();
                for e in &mine {
                    let from = e.index * size;
                    if from + size > ps.size {
                        return Err(emit_err(format!("{pair} is shorter than {}", sec.name)));
                    }
                    pbytes.extend_from_slice(ps.bytes(from, from + size));
                }
                out.w.set_section_data(pid, pbytes, ps.align.max(1));
            }
        }
    }
    Ok(())
}

/// Same map as the planner's: global definitions added or changed by the diff.
pub(crate) fn global_defs<'a>(diffs: &'a [Diff<'_>]) -> HashMap<&'a str, (usize, usize)> {
    use super::compare::Status;
    use super::obj::is_item;
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

/// The manifest entries of the plan's new exports, naming the bundle's unit of each new
/// function (or none: the running kernel's symbol).
pub(crate) fn exports(plan: &Plan) -> Vec<lucos_patch::Export> {
    plan.exports
        .iter()
        .map(|(e, unit)| lucos_patch::Export {
            name: e.name.clone(),
            symbol: unit.map(|u| plan.units[u].name.clone()),
            gpl: e.gpl,
            namespace: e.namespace.clone(),
        })
        .collect()
}

/// The manifest entries of the objects the plan rewrites in place: the original compile's
/// bytes as the run-pre check, with its relocated fields (addresses) left unchecked.
pub(crate) fn rewrites(diffs: &[Diff<'_>], plan: &Plan) -> Vec<lucos_patch::Rewrite> {
    plan.rewrites
        .iter()
        .filter_map(|(unit, r)| {
            let d = &diffs[r.obj];
            let o = d.twin[r.sym]?;
            let s = &d.orig.symbols[o];
            let mut expect = d.orig.sym_bytes(o).to_vec();
            let mut skip = Vec::new();
            for rel in d.orig.sym_relocs(o) {
                let width: u8 = match rel.r_type {
                    object::elf::R_X86_64_64 | object::elf::R_X86_64_PC64 => 8,
                    object::elf::R_X86_64_NONE => continue,
                    _ => 4,
                };
                let at = (rel.offset - s.value) as usize;
                if let Some(field) = expect.get_mut(at..at + usize::from(width)) {
                    field.fill(0);
                    skip.push(lucos_patch::AbsField {
                        offset: at as u32,
                        width,
                    });
                }
            }
            let fields = d.rewrite.get(&r.sym).into_iter().flatten();
            Some(lucos_patch::Rewrite {
                old: r.old.clone(),
                old_file: r.old_file.clone(),
                new: plan.units[*unit].name.clone(),
                expect,
                skip,
                fields: fields
                    .map(|&(offset, len)| lucos_patch::Field { offset, len })
                    .collect(),
            })
        })
        .collect()
}
