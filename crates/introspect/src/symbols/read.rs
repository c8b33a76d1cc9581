//! ELF parsing for [`KernelSymbols`](super::KernelSymbols): symbols with
//! their source files, slide-adjusted relocation fields, the build-id note.

use object::elf;
use object::read::elf::{FileHeader, Rela as _, SectionHeader as _, Sym as _, SymbolTable};
use object::read::StringTable;
use object::{Endianness, ReadRef};

use super::{Binding, Parsed, RelocKind, Section, Symbol, SymbolError, SymbolKind};

/// Per-CPU section symbols that are nevertheless image addresses (relocs.c).
fn percpu_exception(name: &str) -> bool {
    name == "__init_begin" || name == "__per_cpu_load" || name.starts_with("init_per_cpu_")
}

pub(super) fn parse<'data, R: ReadRef<'data>>(
    data: R,
    origin: &str,
) -> Result<Parsed, SymbolError> {
    let bad = |msg: String| SymbolError::BadElf {
        origin: origin.to_string(),
        msg,
        source: None,
    };
    let oe = |e: object::read::Error| SymbolError::BadElf {
        origin: origin.to_string(),
        msg: e.to_string(),
        source: Some(e),
    };
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(oe)?;
    let endian = header.endian().map_err(oe)?;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(bad("machine is not x86-64".into()));
    }
    let is_rel = header.e_type(endian) == elf::ET_REL;
    let table = header.sections(endian, data).map_err(oe)?;
    let mut sections = Vec::with_capacity(table.len());
    for sh in table.iter() {
        let name = table.section_name(endian, sh).map_err(oe)?;
        sections.push(Section {
            name: String::from_utf8_lossy(name).into_owned(),
            addr: sh.sh_addr(endian),
            size: sh.sh_size(endian),
            offset: sh.sh_offset(endian),
            alloc: sh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0,
            loaded: sh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0
                && sh.sh_type(endian) != elf::SHT_NOBITS,
            note: sh.sh_type(endian) == elf::SHT_NOTE,
        });
    }
    // x86-64 SMP kernels before 6.15 link per-CPU data at address 0.
    let percpu_shndx = sections
        .iter()
        .position(|s| s.name == ".data..percpu" && s.addr == 0);
    let symtab = table.symbols(endian, data, elf::SHT_SYMTAB).map_err(oe)?;
    if symtab.is_empty() {
        return Err(SymbolError::NoSymtab {
            origin: origin.to_string(),
        });
    }
    // One read of the whole string table: resolving each of a vmlinux's ~200k names through
    // a file-backed `ReadRef` costs a read(2) per name (seconds per lucos command).
    let strtab = table
        .section(symtab.string_section())
        .and_then(|sh| sh.data(endian, data))
        .map_err(oe)?;
    let strings = StringTable::new(strtab, 0, strtab.len() as u64);
    let (symbols, per_cpu_load) = read_symbols(&symtab, strings, endian, percpu_shndx);
    let name_of = |sym: &elf::Sym64<Endianness>| symbol_name(strings, endian, sym);

    // Linker-script symbols may be SHN_ABS yet name image addresses (relocs.c
    // lists them by name); anything inside the image's span is one of those.
    let spans = sections.iter().filter(|s| s.alloc && s.addr != 0);
    let lo = spans.clone().map(|s| s.addr).min().unwrap_or(0);
    let hi = spans.map(|s| s.addr + s.size).max().unwrap_or(0);
    let in_image = |v: u64| v >= lo && v <= hi;
    let mut relocs = Vec::new();
    let mut has_relocs = false;
    for sh in table.iter() {
        let Some((relas, link)) = sh.rela(endian, data).map_err(oe)? else {
            continue;
        };
        let target = sh.sh_info(endian) as usize;
        // Like relocs.c: only allocated sections, and not notes (those are
        // for pre-boot consumers and are never adjusted).
        let applies = sections.get(target).is_some_and(|s| s.loaded && !s.note);
        if link != symtab.section() || !applies {
            continue;
        }
        has_relocs = true;
        // Fields in the per-CPU section live in its init copy at __per_cpu_load.
        let mut base = if is_rel { sections[target].addr } else { 0 };
        if Some(target) == percpu_shndx {
            base += per_cpu_load;
        }
        for r in relas {
            let sym = symtab
                .symbols()
                .get(r.r_sym(endian, false) as usize)
                .ok_or_else(|| bad("relocation names a symbol past the end of .symtab".into()))?;
            let shndx = sym.st_shndx(endian);
            if shndx == elf::SHN_UNDEF {
                continue;
            }
            let percpu = Some(shndx as usize) == percpu_shndx && !percpu_exception(&name_of(sym));
            let kind = match r.r_type(endian, false) {
                elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 if percpu => RelocKind::InversePc32,
                elf::R_X86_64_64 => RelocKind::Abs64,
                elf::R_X86_64_32 => RelocKind::Abs32,
                elf::R_X86_64_32S => RelocKind::Abs32S,
                _ => continue,
            };
            let absolute_const = shndx == elf::SHN_ABS && !in_image(sym.st_value(endian));
            if kind != RelocKind::InversePc32 && (percpu || absolute_const) {
                continue;
            }
            relocs.push((base.wrapping_add(r.r_offset(endian)), kind));
        }
    }
    relocs.sort_unstable_by_key(|r| r.0);

    let build_id = note_build_id(&table, endian, data)
        .map_err(oe)?
        .map(|(desc, index, off)| (desc, sections[index].addr + off as u64));

    Ok(Parsed {
        sections,
        symbols,
        relocs,
        has_relocs,
        build_id,
    })
}

type Symtab<'data, R> = SymbolTable<'data, elf::FileHeader64<Endianness>, R>;

fn symbol_name(
    strings: StringTable<'_>,
    endian: Endianness,
    sym: &elf::Sym64<Endianness>,
) -> String {
    String::from_utf8_lossy(strings.get(sym.st_name(endian)).unwrap_or(b"")).into_owned()
}

/// The function, object and untyped symbols with their source files (for locals), and
/// the value of `__per_cpu_load`.
fn read_symbols<'data, R: ReadRef<'data>>(
    symtab: &Symtab<'data, R>,
    strings: StringTable<'_>,
    endian: Endianness,
    percpu_shndx: Option<usize>,
) -> (Vec<Symbol>, u64) {
    let is_percpu =
        |shndx: u16, name: &str| Some(shndx as usize) == percpu_shndx && !percpu_exception(name);
    let mut symbols = Vec::new();
    let mut file: Option<String> = None;
    let mut per_cpu_load = 0;
    for sym in symtab.iter() {
        let name = symbol_name(strings, endian, sym);
        let shndx = sym.st_shndx(endian);
        if sym.st_type() == elf::STT_FILE {
            file = Some(name).filter(|n| !n.is_empty());
            continue;
        }
        let kind = match sym.st_type() {
            elf::STT_FUNC => SymbolKind::Func,
            elf::STT_OBJECT => SymbolKind::Object,
            elf::STT_NOTYPE => SymbolKind::NoType,
            _ => continue,
        };
        let binding = match sym.st_bind() {
            elf::STB_LOCAL => Binding::Local,
            elf::STB_WEAK => Binding::Weak,
            elf::STB_GLOBAL | elf::STB_GNU_UNIQUE => Binding::Global,
            _ => continue,
        };
        // Absolute symbols are constants, not addresses KASLR moves.
        if name.is_empty() || shndx == elf::SHN_UNDEF || shndx >= elf::SHN_LORESERVE {
            continue;
        }
        if name == "__per_cpu_load" {
            per_cpu_load = sym.st_value(endian);
        }
        symbols.push(Symbol {
            percpu: is_percpu(shndx, &name),
            file: file.clone().filter(|_| binding == Binding::Local),
            name,
            addr: sym.st_value(endian),
            size: sym.st_size(endian),
            kind,
            binding,
        });
    }
    (symbols, per_cpu_load)
}

/// The GNU build id of an ELF file, reading only its note sections (cheap
/// next to loading all symbols).
pub(super) fn parse_build_id<'data, R: ReadRef<'data>>(
    data: R,
    origin: &str,
) -> Result<Option<Vec<u8>>, SymbolError> {
    let oe = |e: object::read::Error| SymbolError::BadElf {
        origin: origin.to_string(),
        msg: e.to_string(),
        source: Some(e),
    };
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(oe)?;
    let endian = header.endian().map_err(oe)?;
    let table = header.sections(endian, data).map_err(oe)?;
    Ok(note_build_id(&table, endian, data)
        .map_err(oe)?
        .map(|(desc, _, _)| desc))
}

/// NT_GNU_BUILD_ID from the first note section holding one:
/// (descriptor, section index, offset of the descriptor in the section).
fn note_build_id<'data, R: ReadRef<'data>>(
    table: &object::read::elf::SectionTable<'data, elf::FileHeader64<Endianness>, R>,
    endian: Endianness,
    data: R,
) -> Result<Option<(Vec<u8>, usize, usize)>, object::read::Error> {
    for (index, sh) in table.iter().enumerate() {
        if sh.sh_type(endian) != elf::SHT_NOTE {
            continue;
        }
        let bytes = sh.data(endian, data)?;
        let align = if sh.sh_addralign(endian) == 8 { 8 } else { 4 };
        if let Some((desc, off)) = find_build_id(bytes, align) {
            return Ok(Some((desc, index, off)));
        }
    }
    Ok(None)
}

/// Finds NT_GNU_BUILD_ID in a note section: (descriptor, its offset).
fn find_build_id(bytes: &[u8], align: usize) -> Option<(Vec<u8>, usize)> {
    let up = |v: usize| v.div_ceil(align) * align;
    let word = |o: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?) as usize)
    };
    let mut off = 0;
    while off + 12 <= bytes.len() {
        let (namesz, descsz, ty) = (word(off)?, word(off + 4)?, word(off + 8)?);
        let name = bytes.get(off + 12..off + 12 + namesz)?;
        let desc_off = off + up(12 + namesz);
        let desc = bytes.get(desc_off..desc_off + descsz)?;
        if ty == elf::NT_GNU_BUILD_ID as usize && name == b"GNU\0" {
            return Some((desc.to_vec(), desc_off));
        }
        off = desc_off + up(descsz);
    }
    None
}
