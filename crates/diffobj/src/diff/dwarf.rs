//! Reading an object's DWARF: its debug sections (relocated when the object is a `.o`),
//! gimli's view of them, each compile unit in turn, and the byte size of a DIE's type.
//! Layouts, prototypes, frames, dependencies and instances are all read through here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

use super::error::DwarfError;

/// The gimli error of reading `what`, kept as the source.
pub(crate) fn parse(what: &'static str) -> impl FnOnce(gimli::Error) -> DwarfError {
    move |source| DwarfError::Parse { what, source }
}

pub(crate) type Slice<'a> = gimli::EndianSlice<'a, gimli::RunTimeEndian>;

/// A debug section's bytes, with the object's absolute relocations applied when it has any
/// (in a `.o`, string and line offsets are relocations against the string sections; a
/// linked vmlinux has none, and its sections are borrowed as they are).
fn relocated<'d>(file: &object::File<'d>, name: &'static str) -> Result<Cow<'d, [u8]>, DwarfError> {
    let Some(sec) = file.section_by_name(name) else {
        return Ok(Cow::Borrowed(&[]));
    };
    let mut data = sec
        .uncompressed_data()
        .map_err(|source| DwarfError::Section {
            section: name,
            source,
        })?;
    for (offset, rel) in sec.relocations() {
        let base = match rel.target() {
            RelocationTarget::Symbol(i) => {
                file.symbol_by_index(i).map(|s| s.address()).unwrap_or(0)
            }
            _ => 0,
        };
        let value = base.wrapping_add(rel.addend() as u64);
        let at = offset as usize;
        let bytes = data.to_mut();
        match rel.size() {
            32 => {
                if let Some(w) = bytes.get_mut(at..at + 4) {
                    w.copy_from_slice(&(value as u32).to_le_bytes());
                }
            }
            64 => {
                if let Some(w) = bytes.get_mut(at..at + 8) {
                    w.copy_from_slice(&value.to_le_bytes());
                }
            }
            _ => {}
        }
    }
    Ok(data)
}

/// The DWARF sections of `file` that unit headers, DIEs and line tables need.
pub(crate) fn dwarf_sections<'d>(
    file: &object::File<'d>,
) -> Result<BTreeMap<gimli::SectionId, Cow<'d, [u8]>>, DwarfError> {
    let mut sections = BTreeMap::new();
    for id in [
        gimli::SectionId::DebugAbbrev,
        gimli::SectionId::DebugInfo,
        gimli::SectionId::DebugLine,
        gimli::SectionId::DebugRngLists,
        gimli::SectionId::DebugAddr,
        gimli::SectionId::DebugStr,
        gimli::SectionId::DebugLineStr,
        gimli::SectionId::DebugStrOffsets,
    ] {
        sections.insert(id, relocated(file, id.name())?);
    }
    Ok(sections)
}

/// gimli's view of sections from [`dwarf_sections`].
pub(crate) fn dwarf<'a>(
    sections: &'a BTreeMap<gimli::SectionId, Cow<'_, [u8]>>,
) -> Result<gimli::Dwarf<Slice<'a>>, DwarfError> {
    gimli::Dwarf::load(|id| -> Result<Slice<'a>, gimli::Error> {
        let bytes = sections.get(&id).map(|c| &c[..]).unwrap_or(&[]);
        Ok(gimli::EndianSlice::new(bytes, gimli::RunTimeEndian::Little))
    })
    .map_err(parse("the DWARF sections"))
}

/// Calls `f` on every compile unit of the object `data`, from one read of its debug
/// sections; `what` names what `f` reads, for its errors. An object without debug info
/// has no unit.
pub(crate) fn each_unit(
    data: &[u8],
    what: &'static str,
    mut f: impl FnMut(&gimli::Dwarf<Slice<'_>>, &gimli::Unit<Slice<'_>>) -> Result<(), gimli::Error>,
) -> Result<(), DwarfError> {
    let file = object::File::parse(data).map_err(|source| DwarfError::Object { source })?;
    let sections = dwarf_sections(&file)?;
    let dwarf = dwarf(&sections)?;
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(parse("a unit header"))? {
        let unit = dwarf.unit(header).map_err(parse("a unit"))?;
        f(&dwarf, &unit).map_err(parse(what))?;
    }
    Ok(())
}

type Entry<'a> = gimli::DebuggingInformationEntry<Slice<'a>>;

/// The byte size of `e`'s type, through typedefs and qualifiers, and arrays of known
/// bounds. Bounded depth: DWARF from a compiler has no cycles here, a damaged one might.
pub(crate) fn type_bytes(unit: &gimli::Unit<Slice<'_>>, e: &Entry<'_>, depth: u32) -> Option<u64> {
    let Some(gimli::AttributeValue::UnitRef(off)) = e.attr_value(gimli::DW_AT_type) else {
        return None;
    };
    let t = unit.entry(off).ok()?;
    if let Some(v) = t.attr_value(gimli::DW_AT_byte_size) {
        return v.udata_value();
    }
    if depth > 16 {
        return None;
    }
    match t.tag() {
        gimli::DW_TAG_typedef
        | gimli::DW_TAG_const_type
        | gimli::DW_TAG_volatile_type
        | gimli::DW_TAG_restrict_type
        | gimli::DW_TAG_atomic_type => type_bytes(unit, &t, depth + 1),
        gimli::DW_TAG_array_type => {
            let elem = type_bytes(unit, &t, depth + 1)?;
            let mut tree = unit.entries_tree(Some(off)).ok()?;
            let root = tree.root().ok()?;
            let mut children = root.children();
            let mut count = 1u64;
            while let Some(c) = children.next().ok()? {
                let c = c.entry();
                if c.tag() != gimli::DW_TAG_subrange_type {
                    continue;
                }
                let n = match (
                    c.attr_value(gimli::DW_AT_count)
                        .and_then(|v| v.udata_value()),
                    c.attr_value(gimli::DW_AT_upper_bound)
                        .and_then(|v| v.udata_value()),
                ) {
                    (Some(n), _) => n,
                    (None, Some(u)) => u + 1,
                    _ => return None,
                };
                count = count.checked_mul(n)?;
            }
            elem.checked_mul(count)
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An x86-64 ELF object whose `.debug_info` (when given) holds `debug_info`.
    pub(crate) fn object_with(debug_info: Option<&[u8]>) -> Vec<u8> {
        use object::write;
        let mut w = write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        if let Some(bytes) = debug_info {
            let id = w.add_section(
                Vec::new(),
                b".debug_info".to_vec(),
                object::SectionKind::Debug,
            );
            w.append_section_data(id, bytes, 1);
        }
        w.write().unwrap()
    }

    /// A unit header claiming 16 bytes of which 2 follow.
    pub(crate) const TRUNCATED_UNIT: &[u8] = &[16, 0, 0, 0, 5, 0];

    #[test]
    fn unreadable_dwarf_keeps_the_readers_error() {
        let units = |data: &[u8]| {
            let mut n = 0;
            each_unit(data, "a unit's types", |_, _| {
                n += 1;
                Ok(())
            })
            .map(|()| n)
        };
        let e = units(b"not an object").unwrap_err();
        assert!(matches!(e, DwarfError::Object { .. }), "{e}");
        let e = units(&object_with(Some(TRUNCATED_UNIT))).unwrap_err();
        let DwarfError::Parse { what, source } = &e else {
            panic!("expected a parse error, got {e:?}");
        };
        assert_eq!(*what, "a unit header");
        assert!(e.to_string().contains(&source.to_string()), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        // No debug info at all is no error: there is nothing to compare.
        assert_eq!(units(&object_with(None)).unwrap(), 0);
    }
}
