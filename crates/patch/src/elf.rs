//! An owned, validated model of the ELF64 x86-64 relocatable object inside a bundle.
//!
//! Parsing goes through `object`'s bounds-checked low-level reader once; afterwards the
//! linker only indexes into this model, so garbage input fails here with a message instead
//! of panicking later.

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym};
use object::{Endianness, SectionIndex, SymbolIndex};

use crate::bundle::BundleError;

/// One section header plus its bytes (`data` is empty for `SHT_NOBITS`).
#[derive(Debug, Clone)]
pub(crate) struct Section {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    /// Alignment in bytes, at least 1.
    pub align: u64,
    pub size: u64,
    pub data: Vec<u8>,
}

impl Section {
    pub fn is_alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }
    pub fn is_exec(&self) -> bool {
        self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }
    pub fn is_nobits(&self) -> bool {
        self.sh_type == elf::SHT_NOBITS
    }
}

/// Where a symbol's value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SymPlace {
    Undefined,
    Absolute,
    Common,
    Section(usize),
}

#[derive(Debug, Clone)]
pub(crate) struct Symbol {
    pub name: String,
    pub kind: u8,
    pub bind: u8,
    pub place: SymPlace,
    pub value: u64,
    pub size: u64,
}

impl Symbol {
    pub fn is_weak(&self) -> bool {
        self.bind == elf::STB_WEAK
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    pub sym: usize,
    pub addend: i64,
}

/// A `SHT_RELA` or `SHT_REL` section and the section it applies to.
#[derive(Debug, Clone)]
pub(crate) struct RelocSection {
    pub name: String,
    pub target: usize,
    /// True for `SHT_REL` (implicit addends), which the kernel does not support on x86-64.
    pub is_rel: bool,
    pub relocs: Vec<Reloc>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Object {
    /// Indexed by ELF section index; entry 0 is the null section.
    pub sections: Vec<Section>,
    /// Indexed by symbol table index; entry 0 is the null symbol.
    pub symbols: Vec<Symbol>,
    pub relocs: Vec<RelocSection>,
}

fn malformed(what: &str, e: object::read::Error) -> BundleError {
    BundleError::Malformed {
        what: format!("{what}: {e}"),
    }
}

/// Checks the ELF identification and header fields a bundle must have.
pub(crate) fn check_header(data: &[u8]) -> Result<&elf::FileHeader64<Endianness>, BundleError> {
    if data.len() < 4 || data[..4] != elf::ELFMAG {
        return Err(BundleError::NotElf);
    }
    if data.len() < 64 {
        return Err(BundleError::Malformed {
            what: format!("file is {} bytes, shorter than an ELF64 header", data.len()),
        });
    }
    if data[4] != elf::ELFCLASS64 {
        return Err(BundleError::WrongFormat {
            what: "the file is not ELF64 (32-bit objects cannot target x86-64 kernels)".into(),
        });
    }
    if data[5] != elf::ELFDATA2LSB {
        return Err(BundleError::WrongFormat {
            what: "the file is not little-endian".into(),
        });
    }
    let header =
        elf::FileHeader64::<Endianness>::parse(data).map_err(|e| malformed("ELF header", e))?;
    let endian = header.endian().map_err(|e| malformed("ELF header", e))?;
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(BundleError::WrongFormat {
            what: format!("e_machine is {machine}, not EM_X86_64 (62)"),
        });
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_REL {
        return Err(BundleError::WrongFormat {
            what: format!(
                "e_type is {e_type}, not ET_REL (1); a bundle is an unlinked object (`gcc -c`, \
                 or `ld -r` of several), not an executable or shared object"
            ),
        });
    }
    Ok(header)
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, BundleError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| BundleError::Malformed {
        what: format!("{what} is not valid UTF-8"),
    })
}

/// Parses every section, the symbol table and all relocation sections.
pub(crate) fn parse_object(data: &[u8]) -> Result<Object, BundleError> {
    let header = check_header(data)?;
    let endian = header.endian().map_err(|e| malformed("ELF header", e))?;
    let table = header
        .sections(endian, data)
        .map_err(|e| malformed("section header table", e))?;

    let mut sections = Vec::with_capacity(table.len());
    // Sections of a real object never overlap, so their contents fit in the file; this
    // bounds what corrupt headers can make us copy.
    let mut copied = 0usize;
    for (i, sh) in table.iter().enumerate() {
        let name = table
            .section_name(endian, sh)
            .map_err(|e| malformed(&format!("name of section {i}"), e))?;
        let name = utf8(name, &format!("name of section {i}"))?;
        let sh_type = sh.sh_type(endian);
        let size = sh.sh_size(endian);
        let contents = if sh_type == elf::SHT_NOBITS {
            Vec::new()
        } else {
            sh.data(endian, data)
                .map_err(|e| malformed(&format!("contents of section {name}"), e))?
                .to_vec()
        };
        copied = copied.saturating_add(contents.len());
        if copied > data.len() {
            return Err(BundleError::Malformed {
                what: format!("section {name} overlaps other sections"),
            });
        }
        sections.push(Section {
            name,
            sh_type,
            flags: sh.sh_flags(endian),
            align: sh.sh_addralign(endian).max(1),
            size,
            data: contents,
        });
    }

    let symtab = table
        .symbols(endian, data, elf::SHT_SYMTAB)
        .map_err(|e| malformed("symbol table", e))?;
    let mut symbols = Vec::with_capacity(symtab.len());
    for (index, sym) in symtab.enumerate() {
        let name = symtab
            .symbol_name(endian, sym)
            .map_err(|e| malformed(&format!("name of symbol {}", index.0), e))?;
        let name = utf8(name, &format!("name of symbol {}", index.0))?;
        let place = place_of(&symtab, endian, sym, index, sections.len(), &name)?;
        let mut name = name;
        if sym.st_type() == elf::STT_SECTION && name.is_empty() {
            if let SymPlace::Section(s) = place {
                name = sections[s].name.clone();
            }
        }
        symbols.push(Symbol {
            name,
            kind: sym.st_type(),
            bind: sym.st_bind(),
            place,
            value: sym.st_value(endian),
            size: sym.st_size(endian),
        });
    }

    let mut relocs = Vec::new();
    for (i, sh) in table.iter().enumerate() {
        let sh_type = sh.sh_type(endian);
        if sh_type != elf::SHT_RELA && sh_type != elf::SHT_REL {
            continue;
        }
        let name = sections[i].name.clone();
        let target = sh.sh_info(endian) as usize;
        if target == 0 || target >= sections.len() {
            return Err(BundleError::Malformed {
                what: format!("relocation section {name} applies to missing section {target}"),
            });
        }
        if sh_type == elf::SHT_REL {
            relocs.push(RelocSection {
                name,
                target,
                is_rel: true,
                relocs: Vec::new(),
            });
            continue;
        }
        let (entries, link) = sh
            .rela(endian, data)
            .map_err(|e| malformed(&format!("relocation section {name}"), e))?
            .unwrap_or((&[], SectionIndex(0)));
        if !entries.is_empty() && link != symtab.section() {
            return Err(BundleError::Malformed {
                what: format!("relocation section {name} does not use the object's symbol table"),
            });
        }
        let mut list = Vec::with_capacity(entries.len());
        for r in entries {
            let sym = r.r_sym(endian, false) as usize;
            if sym >= symbols.len() {
                return Err(BundleError::Malformed {
                    what: format!("relocation in {name} refers to missing symbol {sym}"),
                });
            }
            list.push(Reloc {
                offset: r.r_offset(endian),
                r_type: r.r_type(endian, false),
                sym,
                addend: r.r_addend(endian),
            });
        }
        relocs.push(RelocSection {
            name,
            target,
            is_rel: false,
            relocs: list,
        });
    }

    Ok(Object {
        sections,
        symbols,
        relocs,
    })
}

fn place_of(
    symtab: &object::read::elf::SymbolTable<'_, elf::FileHeader64<Endianness>>,
    endian: Endianness,
    sym: &elf::Sym64<Endianness>,
    index: SymbolIndex,
    nsections: usize,
    name: &str,
) -> Result<SymPlace, BundleError> {
    match sym.st_shndx(endian) {
        elf::SHN_UNDEF => return Ok(SymPlace::Undefined),
        elf::SHN_ABS => return Ok(SymPlace::Absolute),
        elf::SHN_COMMON => return Ok(SymPlace::Common),
        _ => {}
    }
    let bad = || BundleError::Malformed {
        what: format!("symbol `{name}` has an invalid section index"),
    };
    match symtab.symbol_section(endian, sym, index) {
        Ok(Some(s)) if s.0 < nsections => Ok(SymPlace::Section(s.0)),
        _ => Err(bad()),
    }
}
