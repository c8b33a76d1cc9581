//! Symbolic form of a relocation, for comparing two compiles of the same source.
//!
//! Offsets into sections and symbol-table indices differ between the original and the
//! patched object even when the code is the same, so a relocation is compared by what it
//! means: the (correlated) name of the symbol and the offset into it, the text of a string
//! literal, or the contents of an anonymous constant.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use object::elf;

use super::names::{canonical, is_special_static};
use super::obj::{Obj, Target};
use lucos_patch::elf::Reloc;

/// Bytes of shared anonymous data compared around a reference.
const WINDOW: u64 = 16;

/// A symbol's relocations as (offset, type, target key), in offset order.
pub(crate) type Keys = [(u64, u32, Key)];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Key {
    Null(i64),
    /// A symbol by (correlated) name, and the addend relative to it.
    Name(String, i64),
    /// The function a table entry belongs to.
    Owner(i64),
    /// A special static, compared by contents (it is always copied, never shared).
    Special(String, u64, i64),
    /// A string literal by its text; the number is the PC bias folded into the addend.
    Str(Vec<u8>, i64),
    /// A merged constant (`.rodata.cst8` ...) by its value.
    Const(Vec<u8>, i64),
    /// Anonymous data by its section's canonical name, offset and contents.
    Anon(String, i64, u64),
}

/// Builds keys for one object; `name_of` gives the name a defined symbol is known by on
/// this side (the original's name for correlated patched symbols).
pub(crate) struct Keyer<'a> {
    pub obj: &'a Obj<'a>,
    pub name_of: &'a dyn Fn(usize) -> String,
    /// Table entries: references to this symbol become [`Key::Owner`].
    pub owner: Option<usize>,
}

impl<'a> Keyer<'a> {
    /// Keys of a whole object (no table entry's owner).
    pub fn new(obj: &'a Obj<'a>, name_of: &'a dyn Fn(usize) -> String) -> Keyer<'a> {
        Keyer {
            obj,
            name_of,
            owner: None,
        }
    }

    /// Key of relocation `rel` in section `sec`.
    pub fn key(&self, sec: usize, rel: &Reloc) -> Key {
        self.key_depth(sec, rel, 0)
    }

    fn key_depth(&self, sec: usize, rel: &Reloc, depth: u32) -> Key {
        let o = self.obj;
        match o.target(sec, rel) {
            Target::Null => Key::Null(rel.addend),
            Target::Sym { sym, addend } => {
                if self.owner == Some(sym) {
                    return Key::Owner(addend);
                }
                let s = &o.symbols[sym];
                let sec_name = o.sec_of(sym).map_or("", |x| x.name.as_str());
                if s.section().is_some() && s.is_local() && is_special_static(&s.name, sec_name) {
                    let content = if depth == 0 {
                        self.content_hash(sym)
                    } else {
                        0
                    };
                    return Key::Special(canonical(&s.name), content, addend);
                }
                let name = if s.section().is_some() {
                    (self.name_of)(sym)
                } else {
                    s.name.clone()
                };
                Key::Name(name, addend)
            }
            Target::Anon {
                sec: t,
                addend,
                bias,
            } => {
                let ts = &o.sections[t];
                let at = addend + bias;
                if ts.is_strings() {
                    let start = at.max(0) as usize;
                    let tail = ts.data.get(start..).unwrap_or_default();
                    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                    return Key::Str(tail[..end].to_vec(), -bias);
                }
                if ts.is_merged_consts() {
                    let start = at.max(0) as u64;
                    let bytes = ts.bytes(start, (start + ts.entsize).min(ts.size));
                    return Key::Const(bytes.to_vec(), -bias);
                }
                // Boot-time helper code of static_cpu_has(), inert afterwards (as kpatch).
                if ts.name == ".altinstr_aux" {
                    return Key::Anon(ts.name.clone(), 0, 0);
                }
                if self.obj.is_shared(t) {
                    return self.window_depth(t, at, WINDOW, -bias, depth);
                }
                let content = if depth == 0 {
                    let mut h = DefaultHasher::new();
                    ts.data.hash(&mut h);
                    ts.size.hash(&mut h);
                    for r in &ts.relocs {
                        (r.offset, r.r_type).hash(&mut h);
                        self.key_depth(t, r, depth + 1).hash(&mut h);
                    }
                    h.finish()
                } else {
                    0
                };
                Key::Anon(canonical(&ts.name), addend, content)
            }
        }
    }

    /// Key of `len` bytes of anonymous section `sec` from `at`, with their relocations.
    pub fn window(&self, sec: usize, at: i64, len: u64) -> Key {
        self.window_depth(sec, at, len, 0, 0)
    }

    fn window_depth(&self, sec: usize, at: i64, len: u64, tag: i64, depth: u32) -> Key {
        let ts = &self.obj.sections[sec];
        let start = at.max(0) as u64;
        let end = (start + len).min(ts.size);
        let mut h = DefaultHasher::new();
        ts.bytes(start, end).hash(&mut h);
        if depth == 0 {
            for r in ts.relocs_in(start, end) {
                (r.offset - start, r.r_type).hash(&mut h);
                self.key_depth(sec, r, depth + 1).hash(&mut h);
            }
        }
        Key::Anon(canonical(&ts.name), tag, h.finish())
    }

    /// Hash of a defined symbol's bytes and relocations (shallow).
    pub fn content_hash(&self, sym: usize) -> u64 {
        let o = self.obj;
        let s = &o.symbols[sym];
        let mut h = DefaultHasher::new();
        o.sym_bytes(sym).hash(&mut h);
        s.size.hash(&mut h);
        if let Some(sec) = s.section() {
            for r in o.sym_relocs(sym) {
                (r.offset - s.value, r.r_type).hash(&mut h);
                self.key_depth(sec, r, 1).hash(&mut h);
            }
        }
        h.finish()
    }

    /// The relocations of a defined symbol as (offset in symbol, type, key).
    pub fn sym_keys(&self, sym: usize) -> Vec<(u64, u32, Key)> {
        let o = self.obj;
        let s = &o.symbols[sym];
        let Some(sec) = s.section() else {
            return Vec::new();
        };
        o.sym_relocs(sym)
            .iter()
            .filter(|r| r.r_type != elf::R_X86_64_NONE)
            .map(|r| (r.offset - s.value, r.r_type, self.key(sec, r)))
            .collect()
    }
}
