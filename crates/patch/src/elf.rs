//! The one model of an ELF64 x86-64 relocatable object in lucos: a bundle's object (the
//! linker, kmod tables, the bundle checks) and the comparison objects `lucos build`
//! compiles (lucos-diffobj) are both read through it.
//!
//! Parsing goes through `object`'s bounds-checked low-level reader once; afterwards users
//! only index into this model, so garbage input fails here with a message instead of
//! panicking later. Section contents borrow from the file (comparison objects carry
//! megabytes of DWARF nobody reads); [`Object::into_owned`] detaches a model that must
//! outlive its bytes, as a [`crate::Bundle`] does.

use std::borrow::Cow;

use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, SectionTable, Sym, SymbolTable};
use object::{Endianness, SectionIndex, SymbolIndex};
use thiserror::Error;

/// Why bytes are not a usable x86-64 relocatable object.
#[derive(Debug, Error)]
pub enum ElfError {
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    #[error("wrong kind of ELF file: {what}")]
    WrongFormat { what: String },
    #[error("malformed or truncated ELF object: {what}{}", detail(.source))]
    Malformed {
        what: String,
        #[source]
        source: Option<object::read::Error>,
    },
}

/// `": reason"` of `object`'s reader, for messages that name what was being read.
pub(crate) fn detail(source: &Option<object::read::Error>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

fn malformed(what: impl Into<String>, e: object::read::Error) -> ElfError {
    ElfError::Malformed {
        what: what.into(),
        source: Some(e),
    }
}

fn invalid(what: impl Into<String>) -> ElfError {
    ElfError::Malformed {
        what: what.into(),
        source: None,
    }
}

/// One section header plus its bytes (`data` is empty for `SHT_NOBITS`).
#[derive(Debug, Clone)]
pub struct Section<'data> {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    /// Alignment in bytes, at least 1.
    pub align: u64,
    pub size: u64,
    pub entsize: u64,
    pub data: Cow<'data, [u8]>,
    /// Relocations applying to this section (from every `SHT_RELA` section naming it),
    /// sorted by offset; entries at one offset keep their file order.
    pub relocs: Vec<Reloc>,
    /// An `SHT_REL` section (implicit addends, which the kernel does not support on
    /// x86-64) that applies to this one; its entries are not read.
    pub rel_section: Option<usize>,
}

impl Section<'_> {
    pub fn is_alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }
    pub fn is_exec(&self) -> bool {
        self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }
    pub fn is_write(&self) -> bool {
        self.flags & u64::from(elf::SHF_WRITE) != 0
    }
    pub fn is_nobits(&self) -> bool {
        self.sh_type == elf::SHT_NOBITS
    }
    pub fn is_strings(&self) -> bool {
        self.flags & u64::from(elf::SHF_STRINGS) != 0
    }
    /// Mergeable constants (`.rodata.cst16` ...): entries are identified by their value.
    pub fn is_merged_consts(&self) -> bool {
        self.flags & u64::from(elf::SHF_MERGE) != 0 && !self.is_strings() && self.entsize > 0
    }
    pub fn is_reloc_section(&self) -> bool {
        self.sh_type == elf::SHT_RELA || self.sh_type == elf::SHT_REL
    }

    /// Relocations with offsets in `[start, end)`.
    pub fn relocs_in(&self, start: u64, end: u64) -> &[Reloc] {
        let a = self.relocs.partition_point(|r| r.offset < start);
        let b = self.relocs.partition_point(|r| r.offset < end);
        &self.relocs[a..b.max(a)]
    }

    /// Bytes `[start, end)`, or empty for `.bss`-like sections.
    pub fn bytes(&self, start: u64, end: u64) -> &[u8] {
        self.data
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    fn into_owned(self) -> Section<'static> {
        Section {
            data: Cow::Owned(self.data.into_owned()),
            name: self.name,
            sh_type: self.sh_type,
            flags: self.flags,
            align: self.align,
            size: self.size,
            entsize: self.entsize,
            relocs: self.relocs,
            rel_section: self.rel_section,
        }
    }
}

/// Where a symbol's value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymPlace {
    Undefined,
    Absolute,
    Common,
    Section(usize),
}

#[derive(Debug, Clone)]
pub struct Symbol {
    /// For an unnamed section symbol, its section's name.
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
    pub fn is_func(&self) -> bool {
        self.kind == elf::STT_FUNC
    }
    pub fn is_local(&self) -> bool {
        self.bind == elf::STB_LOCAL
    }
    pub fn section(&self) -> Option<usize> {
        match self.place {
            SymPlace::Section(s) => Some(s),
            _ => None,
        }
    }
    pub fn end(&self) -> u64 {
        self.value.wrapping_add(self.size)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    /// Index into [`Object::symbols`]; 0 is the null symbol.
    pub sym: usize,
    pub addend: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Object<'data> {
    /// Indexed by ELF section index; entry 0 is the null section.
    pub sections: Vec<Section<'data>>,
    /// Indexed by symbol table index; entry 0 is the null symbol.
    pub symbols: Vec<Symbol>,
}

impl<'data> Object<'data> {
    /// Parses every section, the symbol table and all relocation sections.
    pub fn parse(data: &'data [u8]) -> Result<Object<'data>, ElfError> {
        let header = check_header(data)?;
        let endian = header.endian().map_err(|e| malformed("ELF header", e))?;
        let table = header
            .sections(endian, data)
            .map_err(|e| malformed("section header table", e))?;
        let mut sections = parse_sections(&table, endian, data)?;
        let symtab = table
            .symbols(endian, data, elf::SHT_SYMTAB)
            .map_err(|e| malformed("symbol table", e))?;
        let symbols = parse_symbols(&symtab, endian, &sections)?;
        attach_relocs(&table, &symtab, endian, data, &mut sections, symbols.len())?;
        Ok(Object { sections, symbols })
    }

    /// The same model with its section contents copied out of the file.
    pub fn into_owned(self) -> Object<'static> {
        Object {
            sections: self.sections.into_iter().map(Section::into_owned).collect(),
            symbols: self.symbols,
        }
    }

    /// A defined symbol's section.
    pub fn sec_of(&self, sym: usize) -> Option<&Section<'data>> {
        self.symbols[sym].section().map(|s| &self.sections[s])
    }

    /// Bytes of a defined symbol (empty for `.bss`).
    pub fn sym_bytes(&self, sym: usize) -> &[u8] {
        let s = &self.symbols[sym];
        self.sec_of(sym)
            .map_or(&[][..], |sec| sec.bytes(s.value, s.end()))
    }

    /// Relocations inside a defined symbol (at its address, for a zero-sized one).
    pub fn sym_relocs(&self, sym: usize) -> &[Reloc] {
        let s = &self.symbols[sym];
        self.sec_of(sym).map_or(&[][..], |sec| {
            sec.relocs_in(s.value, s.end().max(s.value + 1))
        })
    }
}

/// Checks the ELF identification and header fields a relocatable x86-64 object must have.
pub fn check_header(data: &[u8]) -> Result<&elf::FileHeader64<Endianness>, ElfError> {
    if data.len() < 4 || data[..4] != elf::ELFMAG {
        return Err(ElfError::NotElf);
    }
    if data.len() < size_of::<elf::FileHeader64<Endianness>>() {
        return Err(invalid(format!(
            "file is {} bytes, shorter than an ELF64 header",
            data.len()
        )));
    }
    // Not parsed yet: `parse` would refuse these without saying which one is wrong.
    let (raw, _) = object::from_bytes::<elf::FileHeader64<Endianness>>(data)
        .map_err(|()| invalid("ELF header is truncated"))?;
    let ident = &raw.e_ident;
    if ident.class != elf::ELFCLASS64 {
        return Err(ElfError::WrongFormat {
            what: "the file is not ELF64 (32-bit objects cannot target x86-64 kernels)".into(),
        });
    }
    if ident.data != elf::ELFDATA2LSB {
        return Err(ElfError::WrongFormat {
            what: "the file is not little-endian".into(),
        });
    }
    let header =
        elf::FileHeader64::<Endianness>::parse(data).map_err(|e| malformed("ELF header", e))?;
    let endian = header.endian().map_err(|e| malformed("ELF header", e))?;
    let machine = header.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(ElfError::WrongFormat {
            what: format!("e_machine is {machine}, not EM_X86_64 (62)"),
        });
    }
    let e_type = header.e_type(endian);
    if e_type != elf::ET_REL {
        return Err(ElfError::WrongFormat {
            what: format!(
                "e_type is {e_type}, not ET_REL (1); a bundle is an unlinked object (`gcc -c`, \
                 or `ld -r` of several), not an executable or shared object"
            ),
        });
    }
    Ok(header)
}

type Table<'data> = SectionTable<'data, elf::FileHeader64<Endianness>>;
type Symtab<'data> = SymbolTable<'data, elf::FileHeader64<Endianness>>;

fn utf8(bytes: &[u8], what: impl FnOnce() -> String) -> Result<String, ElfError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(format!("{} is not valid UTF-8", what())))
}

fn parse_sections<'data>(
    table: &Table<'data>,
    endian: Endianness,
    data: &'data [u8],
) -> Result<Vec<Section<'data>>, ElfError> {
    let mut sections = Vec::with_capacity(table.len());
    // Sections of a real object never overlap, so their contents fit in the file; this
    // bounds what corrupt headers can make `into_owned` copy.
    let mut total = 0usize;
    for (i, sh) in table.iter().enumerate() {
        let what = || format!("name of section {i}");
        let name = table
            .section_name(endian, sh)
            .map_err(|e| malformed(what(), e))?;
        let name = utf8(name, what)?;
        let sh_type = sh.sh_type(endian);
        let contents = if sh_type == elf::SHT_NOBITS {
            &[][..]
        } else {
            sh.data(endian, data)
                .map_err(|e| malformed(format!("contents of section {name}"), e))?
        };
        total = total.saturating_add(contents.len());
        if total > data.len() {
            return Err(invalid(format!("section {name} overlaps other sections")));
        }
        sections.push(Section {
            name,
            sh_type,
            flags: sh.sh_flags(endian),
            align: sh.sh_addralign(endian).max(1),
            size: sh.sh_size(endian),
            entsize: sh.sh_entsize(endian),
            data: Cow::Borrowed(contents),
            relocs: Vec::new(),
            rel_section: None,
        });
    }
    Ok(sections)
}

fn parse_symbols(
    symtab: &Symtab<'_>,
    endian: Endianness,
    sections: &[Section<'_>],
) -> Result<Vec<Symbol>, ElfError> {
    let mut symbols = Vec::with_capacity(symtab.len());
    for (index, sym) in symtab.enumerate() {
        let what = || format!("name of symbol {}", index.0);
        let name = symtab
            .symbol_name(endian, sym)
            .map_err(|e| malformed(what(), e))?;
        let mut name = utf8(name, what)?;
        let place = place_of(symtab, endian, sym, index, sections.len(), &name)?;
        if sym.st_type() == elf::STT_SECTION && name.is_empty() {
            if let SymPlace::Section(s) = place {
                name.clone_from(&sections[s].name);
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
    Ok(symbols)
}

/// Reads every relocation section into the section it applies to.
fn attach_relocs(
    table: &Table<'_>,
    symtab: &Symtab<'_>,
    endian: Endianness,
    data: &[u8],
    sections: &mut [Section<'_>],
    nsymbols: usize,
) -> Result<(), ElfError> {
    for (i, sh) in table.iter().enumerate() {
        let sh_type = sh.sh_type(endian);
        if sh_type != elf::SHT_RELA && sh_type != elf::SHT_REL {
            continue;
        }
        let name = &sections[i].name;
        let target = sh.sh_info(endian) as usize;
        if target == 0 || target >= sections.len() {
            return Err(invalid(format!(
                "relocation section {name} applies to missing section {target}"
            )));
        }
        if sh_type == elf::SHT_REL {
            sections[target].rel_section.get_or_insert(i);
            continue;
        }
        let (entries, link) = sh
            .rela(endian, data)
            .map_err(|e| malformed(format!("relocation section {name}"), e))?
            .unwrap_or((&[], SectionIndex(0)));
        if !entries.is_empty() && link != symtab.section() {
            return Err(invalid(format!(
                "relocation section {name} does not use the object's symbol table"
            )));
        }
        let mut list = Vec::with_capacity(entries.len());
        for r in entries {
            let sym = r.r_sym(endian, false) as usize;
            if sym >= nsymbols {
                return Err(invalid(format!(
                    "relocation in {name} refers to missing symbol {sym}"
                )));
            }
            list.push(Reloc {
                offset: r.r_offset(endian),
                r_type: r.r_type(endian, false),
                sym,
                addend: r.r_addend(endian),
            });
        }
        let relocs = &mut sections[target].relocs;
        relocs.append(&mut list);
        relocs.sort_by_key(|r| r.offset);
    }
    Ok(())
}

fn place_of(
    symtab: &Symtab<'_>,
    endian: Endianness,
    sym: &elf::Sym64<Endianness>,
    index: SymbolIndex,
    nsections: usize,
    name: &str,
) -> Result<SymPlace, ElfError> {
    match sym.st_shndx(endian) {
        elf::SHN_UNDEF => return Ok(SymPlace::Undefined),
        elf::SHN_ABS => return Ok(SymPlace::Absolute),
        elf::SHN_COMMON => return Ok(SymPlace::Common),
        _ => {}
    }
    match symtab.symbol_section(endian, sym, index) {
        Ok(Some(s)) if s.0 < nsections => Ok(SymPlace::Section(s.0)),
        _ => Err(invalid(format!(
            "symbol `{name}` has an invalid section index"
        ))),
    }
}
