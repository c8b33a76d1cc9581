//! A compiled comparison object (`gcc -c -ffunction-sections -fdata-sections`): lucos's
//! one ELF model ([`lucos_patch::elf::Object`]) plus the lookups create-diff-object needs:
//! which symbol a relocation really points at, and instruction boundaries.
//!
//! The compiler and assembler often refer to static functions and data through a section
//! symbol plus an offset (`.text.helper - 4`, `.rodata.str1.1 + 12`). [`Obj::target`] turns
//! those into the named symbol that contains the address, so relocations can be compared
//! by name and linked against the running kernel. For PC-relative fields the addend also
//! holds the distance to the end of the instruction, so the instruction is decoded to find
//! the address really meant.

use std::ops::Deref;

use iced_x86::{Decoder, DecoderOptions};
use lucos_patch::elf::{Object, Reloc, SymPlace, Symbol};
use object::elf;

use super::error::DiffError;

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
pub(crate) struct Obj<'data> {
    /// The object path in the tree, for messages.
    pub label: String,
    pub elf: Object<'data>,
    /// Per section: start offsets of the instructions, for executable sections.
    insns: Vec<Vec<u32>>,
    /// Per section: defined named symbols in it, sorted by (value, size).
    items: Vec<Vec<usize>>,
    /// Per section: anonymous data used by several functions (or by special tables):
    /// compared by the bytes around each reference, since its layout shifts with
    /// unrelated changes.
    shared: Vec<bool>,
}

/// Sections and symbols are the ELF model's; only the lookups are added here.
impl<'data> Deref for Obj<'data> {
    type Target = Object<'data>;
    fn deref(&self) -> &Object<'data> {
        &self.elf
    }
}

impl<'data> Obj<'data> {
    pub fn parse(label: &str, data: &'data [u8]) -> Result<Obj<'data>, DiffError> {
        let elf = Object::parse(data).map_err(|source| DiffError::Elf {
            object: label.to_string(),
            source,
        })?;
        let mut items = vec![Vec::new(); elf.sections.len()];
        for (i, s) in elf.symbols.iter().enumerate() {
            if let SymPlace::Section(sec) = s.place {
                if is_item(s) {
                    items[sec].push(i);
                }
            }
        }
        for list in &mut items {
            list.sort_by_key(|&i| (elf.symbols[i].value, std::cmp::Reverse(elf.symbols[i].size)));
        }
        let insns = elf
            .sections
            .iter()
            .map(|sec| {
                let code = sec.is_exec() && sec.is_alloc() && !sec.is_nobits();
                if code {
                    decode(&sec.data)
                } else {
                    Vec::new()
                }
            })
            .collect();
        let mut obj = Obj {
            label: label.to_string(),
            shared: vec![false; elf.sections.len()],
            elf,
            insns,
            items,
        };
        obj.shared = obj.find_shared();
        Ok(obj)
    }

    /// Instruction start offsets of section `sec` (empty unless it is code).
    pub fn insns(&self, sec: usize) -> &[u32] {
        &self.insns[sec]
    }

    /// Whether section `sec` is anonymous data shared by several users.
    pub fn is_shared(&self, sec: usize) -> bool {
        self.shared[sec]
    }

    /// The end of the instruction containing `offset` in code section `sec`.
    pub fn insn_end(&self, sec: usize, offset: u64) -> Option<u64> {
        let insns = &self.insns[sec];
        let i = insns.partition_point(|&s| u64::from(s) <= offset);
        if i == 0 {
            return None;
        }
        Some(
            insns
                .get(i)
                .map_or(self.sections[sec].size, |&e| u64::from(e)),
        )
    }

    /// Which anonymous sections are shared, from who refers to each.
    fn find_shared(&self) -> Vec<bool> {
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
        shared
    }

    /// The named symbol containing `off` in `sec`: a sized symbol around it, else one ending
    /// exactly there (`&array[n]`), else a zero-sized one starting there.
    pub fn item_at(&self, sec: usize, off: i64) -> Option<usize> {
        let items = &self.items[sec];
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
    pub fn target(&self, sec: usize, rel: &Reloc) -> Target {
        if rel.sym == 0 {
            return Target::Null;
        }
        let s = &self.symbols[rel.sym];
        let SymPlace::Section(tsec) = s.place else {
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
    pub fn pc_bias(&self, sec: usize, rel: &Reloc) -> i64 {
        let s = &self.sections[sec];
        let pc_rel = matches!(
            rel.r_type,
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 | elf::R_X86_64_PC64
        );
        if !pc_rel || !s.is_exec() {
            return 0;
        }
        self.insn_end(sec, rel.offset)
            .map_or(4, |end| end as i64 - rel.offset as i64)
    }
}

/// Named function, object or label: what a relocation can be said to point at.
pub(crate) fn is_item(s: &Symbol) -> bool {
    let named = !s.name.is_empty() && !s.name.starts_with(".L");
    named
        && matches!(s.place, SymPlace::Section(_))
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
pub(crate) fn same_allocated_contents(a: &Obj<'_>, b: &Obj<'_>) -> bool {
    type Relocs = Vec<(u64, u32, String, i64)>;
    let alloc = |o: &Obj<'_>| -> Vec<(String, Vec<u8>, u64, Relocs)> {
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
                (s.name.clone(), s.data.to_vec(), s.size, rels)
            })
            .collect();
        v.sort();
        v
    };
    alloc(a) == alloc(b)
}
