//! An owned model of a compiled comparison object (`gcc -c -ffunction-sections
//! -fdata-sections`), with the lookups create-diff-object needs: which symbol a relocation
//! really points at, and instruction boundaries.
//!
//! The compiler and assembler often refer to static functions and data through a section
//! symbol plus an offset (`.text.helper - 4`, `.rodata.str1.1 + 12`). [`Obj::target`] turns
//! those into the named symbol that contains the address, so relocations can be compared
//! by name and linked against the running kernel. For PC-relative fields the addend also
//! holds the distance to the end of the instruction, so the instruction is decoded to find
//! the address really meant.

use iced_x86::{Decoder, DecoderOptions};
use object::elf;
use object::read::elf::{FileHeader, Rela, SectionHeader, Sym as _};
use object::Endianness;

use super::error::DiffError;

#[derive(Debug, Clone)]
pub(crate) struct Sec {
    pub name: String,
    pub sh_type: u32,
    pub flags: u64,
    pub align: u64,
    pub size: u64,
    pub entsize: u64,
    /// Empty for `SHT_NOBITS`.
    pub data: Vec<u8>,
    /// Relocations applying to this section, sorted by offset.
    pub relocs: Vec<Rel>,
    /// Start offsets of the instructions, for executable sections.
    pub insns: Vec<u32>,
    /// Defined named symbols in this section, sorted by (value, size).
    pub items: Vec<usize>,
    /// Anonymous data used by several functions (or by special tables): compared by the
    /// bytes around each reference, since its layout shifts with unrelated changes.
    pub shared: bool,
}

impl Sec {
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

    /// Relocations with offsets in `[start, end)`.
    pub fn relocs_in(&self, start: u64, end: u64) -> &[Rel] {
        let a = self.relocs.partition_point(|r| r.offset < start);
        let b = self.relocs.partition_point(|r| r.offset < end);
        &self.relocs[a..b]
    }

    /// Bytes `[start, end)`, or empty for `.bss`-like sections.
    pub fn bytes(&self, start: u64, end: u64) -> &[u8] {
        self.data
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// The end of the instruction containing `offset` (executable sections only).
    pub fn insn_end(&self, offset: u64) -> Option<u64> {
        let i = self.insns.partition_point(|&s| u64::from(s) <= offset);
        if i == 0 {
            return None;
        }
        Some(self.insns.get(i).map_or(self.size, |&e| u64::from(e)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Undef,
    Abs,
    Common,
    Sec(usize),
}

#[derive(Debug, Clone)]
pub(crate) struct Sym {
    pub name: String,
    pub kind: u8,
    pub bind: u8,
    pub place: Place,
    pub value: u64,
    pub size: u64,
}

impl Sym {
    pub fn is_func(&self) -> bool {
        self.kind == elf::STT_FUNC
    }
    pub fn is_local(&self) -> bool {
        self.bind == elf::STB_LOCAL
    }
    pub fn section(&self) -> Option<usize> {
        match self.place {
            Place::Sec(s) => Some(s),
            _ => None,
        }
    }
    pub fn end(&self) -> u64 {
        self.value + self.size
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rel {
    pub offset: u64,
    pub r_type: u32,
    pub sym: usize,
    pub addend: i64,
}

/// What a relocation refers to, after replacing section symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Symbol index 0: an absolute value.
    Null,
    /// A named symbol (defined or undefined); `addend` is relative to its start.
    Sym { sym: usize, addend: i64 },
    /// Bytes of a section no symbol covers (string literals, constants, jump tables).
    /// `addend` is relative to the section; the address meant is `addend + bias`.
    Anon { sec: usize, addend: i64, bias: i64 },
}

#[derive(Debug)]
pub(crate) struct Obj {
    /// The object path in the tree, for messages.
    pub label: String,
    pub sections: Vec<Sec>,
    pub symbols: Vec<Sym>,
}

fn bad(label: &str, what: impl std::fmt::Display) -> DiffError {
    DiffError::BadObject {
        object: label.to_string(),
        reason: what.to_string(),
    }
}

impl Obj {
    pub fn parse(label: &str, data: &[u8]) -> Result<Obj, DiffError> {
        let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| bad(label, e))?;
        let endian = header.endian().map_err(|e| bad(label, e))?;
        if header.e_machine(endian) != elf::EM_X86_64 || header.e_type(endian) != elf::ET_REL {
            return Err(bad(label, "not an x86-64 relocatable object"));
        }
        let table = header.sections(endian, data).map_err(|e| bad(label, e))?;
        let mut sections = Vec::with_capacity(table.len());
        for sh in table.iter() {
            let name = table.section_name(endian, sh).map_err(|e| bad(label, e))?;
            let sh_type = sh.sh_type(endian);
            let contents = if sh_type == elf::SHT_NOBITS {
                Vec::new()
            } else {
                sh.data(endian, data).map_err(|e| bad(label, e))?.to_vec()
            };
            sections.push(Sec {
                name: String::from_utf8_lossy(name).into_owned(),
                sh_type,
                flags: sh.sh_flags(endian),
                align: sh.sh_addralign(endian).max(1),
                size: sh.sh_size(endian),
                entsize: sh.sh_entsize(endian),
                data: contents,
                relocs: Vec::new(),
                insns: Vec::new(),
                items: Vec::new(),
                shared: false,
            });
        }
        let symtab = table
            .symbols(endian, data, elf::SHT_SYMTAB)
            .map_err(|e| bad(label, e))?;
        let mut symbols = Vec::with_capacity(symtab.len());
        for (index, s) in symtab.enumerate() {
            let mut name =
                String::from_utf8_lossy(symtab.symbol_name(endian, s).map_err(|e| bad(label, e))?)
                    .into_owned();
            let place = match s.st_shndx(endian) {
                elf::SHN_UNDEF => Place::Undef,
                elf::SHN_ABS => Place::Abs,
                elf::SHN_COMMON => Place::Common,
                _ => match symtab.symbol_section(endian, s, index) {
                    Ok(Some(i)) if i.0 < sections.len() => Place::Sec(i.0),
                    _ => return Err(bad(label, format!("symbol `{name}` has a bad section"))),
                },
            };
            if s.st_type() == elf::STT_SECTION {
                if let Place::Sec(i) = place {
                    name = sections[i].name.clone();
                }
            }
            symbols.push(Sym {
                name,
                kind: s.st_type(),
                bind: s.st_bind(),
                place,
                value: s.st_value(endian),
                size: s.st_size(endian),
            });
        }
        for sh in table.iter() {
            if sh.sh_type(endian) != elf::SHT_RELA {
                continue;
            }
            let target = sh.sh_info(endian) as usize;
            let Some((entries, _)) = sh.rela(endian, data).map_err(|e| bad(label, e))? else {
                continue;
            };
            let mut list = Vec::with_capacity(entries.len());
            for r in entries {
                let sym = r.r_sym(endian, false) as usize;
                if sym >= symbols.len() || target >= sections.len() {
                    return Err(bad(
                        label,
                        "relocation refers to a missing symbol or section",
                    ));
                }
                list.push(Rel {
                    offset: r.r_offset(endian),
                    r_type: r.r_type(endian, false),
                    sym,
                    addend: r.r_addend(endian),
                });
            }
            list.sort_by_key(|r| r.offset);
            sections[target].relocs = list;
        }
        for (i, s) in symbols.iter().enumerate() {
            if let Place::Sec(sec) = s.place {
                if is_item(s) {
                    sections[sec].items.push(i);
                }
            }
        }
        for sec in &mut sections {
            sec.items
                .sort_by_key(|&i| (symbols[i].value, std::cmp::Reverse(symbols[i].size)));
            if sec.is_exec() && sec.is_alloc() && !sec.is_nobits() {
                sec.insns = decode(&sec.data);
            }
        }
        let mut obj = Obj {
            label: label.to_string(),
            sections,
            symbols,
        };
        obj.mark_shared();
        Ok(obj)
    }

    /// Sets [`Sec::shared`] from who refers to each anonymous section.
    fn mark_shared(&mut self) {
        let mut users: Vec<Option<usize>> = vec![None; self.sections.len()];
        let mut shared = vec![false; self.sections.len()];
        for (si, sec) in self.sections.iter().enumerate() {
            if !sec.is_alloc() {
                continue;
            }
            let table = super::special::table(&sec.name).is_some();
            for r in &sec.relocs {
                let Target::Anon { sec: t, .. } = self.target(si, r) else {
                    continue;
                };
                let user = if sec.is_exec() {
                    self.item_at(si, r.offset as i64)
                } else {
                    None
                };
                match (users[t], user) {
                    _ if table || user.is_none() => shared[t] = true,
                    (None, Some(u)) => users[t] = Some(u),
                    (Some(a), Some(b)) if a != b => shared[t] = true,
                    _ => {}
                }
            }
        }
        for (sec, s) in self.sections.iter_mut().zip(shared) {
            sec.shared = s;
        }
    }

    /// The named symbol containing `off` in `sec`: a sized symbol around it, else one ending
    /// exactly there (`&array[n]`), else a zero-sized one starting there.
    pub fn item_at(&self, sec: usize, off: i64) -> Option<usize> {
        let items = &self.sections[sec].items;
        let within = |i: &usize| {
            let s = &self.symbols[*i];
            off >= s.value as i64 && off < s.end() as i64
        };
        items
            .iter()
            .find(|i| within(i))
            .or_else(|| {
                items
                    .iter()
                    .find(|&&i| self.symbols[i].size > 0 && self.symbols[i].end() as i64 == off)
            })
            .or_else(|| {
                items
                    .iter()
                    .find(|&&i| self.symbols[i].size == 0 && self.symbols[i].value as i64 == off)
            })
            .copied()
    }

    /// What `rel` (in section `sec`) refers to.
    pub fn target(&self, sec: usize, rel: &Rel) -> Target {
        if rel.sym == 0 {
            return Target::Null;
        }
        let s = &self.symbols[rel.sym];
        let Place::Sec(tsec) = s.place else {
            return Target::Sym {
                sym: rel.sym,
                addend: rel.addend,
            };
        };
        if is_item(s) {
            return Target::Sym {
                sym: rel.sym,
                addend: rel.addend,
            };
        }
        let bias = self.pc_bias(sec, rel);
        let raw = rel.addend + s.value as i64;
        match self.item_at(tsec, raw + bias) {
            Some(t) => Target::Sym {
                sym: t,
                addend: raw - self.symbols[t].value as i64,
            },
            None => Target::Anon {
                sec: tsec,
                addend: raw,
                bias,
            },
        }
    }

    /// For a PC-relative field in code: the distance from the field to the end of its
    /// instruction, which the compiler folded into the addend.
    pub fn pc_bias(&self, sec: usize, rel: &Rel) -> i64 {
        let s = &self.sections[sec];
        let pc_rel = matches!(
            rel.r_type,
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 | elf::R_X86_64_PC64
        );
        if !pc_rel || !s.is_exec() {
            return 0;
        }
        s.insn_end(rel.offset)
            .map_or(4, |end| end as i64 - rel.offset as i64)
    }

    /// Section index and name of a symbol's section, if defined.
    pub fn sec_of(&self, sym: usize) -> Option<&Sec> {
        self.symbols[sym].section().map(|s| &self.sections[s])
    }

    /// Bytes of a defined symbol (empty for `.bss`).
    pub fn sym_bytes(&self, sym: usize) -> &[u8] {
        let s = &self.symbols[sym];
        self.sec_of(sym)
            .map_or(&[][..], |sec| sec.bytes(s.value, s.end()))
    }

    /// Relocations inside a defined symbol.
    pub fn sym_relocs(&self, sym: usize) -> &[Rel] {
        let s = &self.symbols[sym];
        self.sec_of(sym).map_or(&[][..], |sec| {
            sec.relocs_in(s.value, s.end().max(s.value + 1))
        })
    }
}

/// Named function, object or label: what a relocation can be said to point at.
pub(crate) fn is_item(s: &Sym) -> bool {
    let named = !s.name.is_empty() && !s.name.starts_with(".L");
    named
        && matches!(s.place, Place::Sec(_))
        && matches!(s.kind, elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE)
}

/// Instruction start offsets; undecodable bytes count as one-byte instructions.
fn decode(data: &[u8]) -> Vec<u32> {
    let mut d = Decoder::with_ip(64, data, 0, DecoderOptions::NONE);
    let mut starts = Vec::new();
    let mut insn = iced_x86::Instruction::default();
    while d.can_decode() {
        let pos = d.position();
        starts.push(pos as u32);
        d.decode_out(&mut insn);
        if insn.is_invalid() {
            let _ = d.set_position(pos + 1);
        }
    }
    starts
}

/// Length and bytes of the instruction at `off` in `data`, if it decodes.
pub(crate) fn insn_at(data: &[u8], off: usize) -> Option<iced_x86::Instruction> {
    let mut d = Decoder::with_ip(64, data.get(off..)?, off as u64, DecoderOptions::NONE);
    let insn = d.decode();
    (!insn.is_invalid()).then_some(insn)
}

/// Whether two objects have the same allocated sections (by name), bytes and relocations
/// (by symbol name): used for assembly objects, which are not compared by function.
pub(crate) fn same_allocated_contents(a: &Obj, b: &Obj) -> bool {
    type Relocs = Vec<(u64, u32, String, i64)>;
    let alloc = |o: &Obj| -> Vec<(String, Vec<u8>, u64, Relocs)> {
        let mut v: Vec<_> = o
            .sections
            .iter()
            .filter(|s| s.is_alloc())
            .map(|s| {
                let rels = s
                    .relocs
                    .iter()
                    .map(|r| (r.offset, r.r_type, o.symbols[r.sym].name.clone(), r.addend))
                    .collect();
                (s.name.clone(), s.data.clone(), s.size, rels)
            })
            .collect();
        v.sort();
        v
    };
    alloc(a) == alloc(b)
}
