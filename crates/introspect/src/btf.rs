//! Struct layouts from the kernel's BTF (`.BTF` of vmlinux, `CONFIG_DEBUG_INFO_BTF`).
//!
//! lucos reads kernel data structures (the module list, later tasks) from outside, and the
//! offsets of their members depend on the config. BTF is the kernel's own compact type
//! information, a few MB against the hundreds of DWARF, so a layout lookup costs
//! milliseconds. Only what layout lookups need is decoded: names, struct/union members and
//! the modifiers between a member and its struct type.

use std::collections::HashMap;
use std::path::Path;

use object::{Object, ObjectSection};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Malformed(String),
    #[error("{}: {source}", path.display())]
    Elf {
        path: std::path::PathBuf,
        #[source]
        source: object::read::Error,
    },
    #[error(
        "the kernel has no BTF (.BTF section); it needs CONFIG_DEBUG_INFO_BTF for lucos to \
         read {what} from outside"
    )]
    Missing { what: &'static str },
    #[error("BTF has no struct or union `{name}`")]
    NoType { name: String },
    #[error("`{ty}` has no member `{member}` in this kernel's BTF")]
    NoMember { ty: String, member: String },
}

const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    ty: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: String,
    /// Size for structs and unions, the referenced type for modifiers.
    size_or_type: u32,
    members: Vec<Member>,
    /// Element count, for arrays.
    nelems: u32,
}

/// Decoded BTF: types by id (id 0 is `void`).
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<Type>,
    by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        .ok_or_else(|| BtfError::Malformed(format!("BTF truncated at byte {at}")))
}

impl Btf {
    /// The BTF of a vmlinux file.
    pub fn from_vmlinux(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_owned(),
            source,
        })?;
        let file = object::File::parse(&*data).map_err(|source| BtfError::Elf {
            path: path.to_owned(),
            source,
        })?;
        let sec = file.section_by_name(".BTF").ok_or(BtfError::Missing {
            what: "kernel data",
        })?;
        let bytes = sec.data().map_err(|source| BtfError::Elf {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(bytes)
    }

    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::Malformed("not BTF (bad magic)".into()));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| BtfError::Malformed("string section out of range".into()))?;
        let name = |off: u32| -> String {
            let tail = strings.get(off as usize..).unwrap_or_default();
            let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
            String::from_utf8_lossy(&tail[..end]).into_owned()
        };
        let start = hdr_len + type_off;
        let end = start + type_len;
        if end > b.len() {
            return Err(BtfError::Malformed("type section out of range".into()));
        }
        let mut types = vec![Type {
            kind: 0,
            name: String::new(),
            size_or_type: 0,
            members: Vec::new(),
            nelems: 0,
        }];
        let mut at = start;
        while at < end {
            let info = u32_at(b, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let mut t = Type {
                kind,
                name: name(u32_at(b, at)?),
                size_or_type: u32_at(b, at + 8)?,
                members: Vec::new(),
                nelems: 0,
            };
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                KIND_ARRAY => {
                    t.nelems = u32_at(b, at + 8)?;
                    12
                }
                KIND_STRUCT | KIND_UNION => {
                    let bitfields = info >> 31 == 1;
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let off = u32_at(b, m + 8)?;
                        t.members.push(Member {
                            name: name(u32_at(b, m)?),
                            ty: u32_at(b, m + 4)?,
                            bit_offset: if bitfields { off & 0xff_ffff } else { off },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,
                15 | 19 => vlen * 12,
                2 | 7..=12 | 16 | 18 => 0,
                k => return Err(BtfError::Malformed(format!("unknown BTF kind {k}"))),
            };
            at += extra;
            types.push(t);
        }
        let mut by_name = HashMap::new();
        for (id, t) in types.iter().enumerate() {
            if matches!(t.kind, KIND_STRUCT | KIND_UNION) && !t.name.is_empty() {
                by_name.entry(t.name.clone()).or_insert(id as u32);
            }
        }
        Ok(Btf { types, by_name })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.types[id as usize].size_or_type;
                }
                _ => break,
            }
        }
        id
    }

    /// Size in bytes of struct or union `name`.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let id = self.struct_id(name)?;
        Ok(u64::from(self.types[id as usize].size_or_type))
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| BtfError::NoType {
                name: name.to_string(),
            })
    }

    /// Bit offset and type of `member` in type `id`, looking into anonymous members.
    fn find(&self, id: u32, member: &str) -> Option<(u64, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in &t.members {
            if m.name == member {
                return Some((u64::from(m.bit_offset), m.ty));
            }
            if m.name.is_empty() {
                if let Some((off, ty)) = self.find(m.ty, member) {
                    return Some((u64::from(m.bit_offset) + off, ty));
                }
            }
        }
        None
    }

    /// Element count of the array member `path` of `ty`.
    pub fn array_len(&self, ty: &str, path: &str) -> Result<u64, BtfError> {
        let no = || BtfError::NoMember {
            ty: ty.to_string(),
            member: path.to_string(),
        };
        let mut id = self.struct_id(ty)?;
        for part in path.split('.') {
            id = self.find(id, part).ok_or_else(no)?.1;
        }
        let t = &self.types[self.resolve(id) as usize];
        if t.kind != KIND_ARRAY {
            return Err(no());
        }
        Ok(u64::from(t.nelems))
    }

    /// Byte offset of `path` (members separated by `.`, e.g. `core_layout.base`) in struct
    /// or union `ty`.
    pub fn offset_of(&self, ty: &str, path: &str) -> Result<u64, BtfError> {
        let mut id = self.struct_id(ty)?;
        let mut bits = 0u64;
        for part in path.split('.') {
            let (off, next) = self.find(id, part).ok_or_else(|| BtfError::NoMember {
                ty: ty.to_string(),
                member: path.to_string(),
            })?;
            bits += off;
            id = next;
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: int, struct inner { int a; int b; }, struct outer { int x; union { struct
    /// inner in; }; } — the anonymous union exercises the search.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0in\0caps\0".to_vec();
        let s = |n: &str| {
            let pos = strings
                .windows(n.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=n.len()] == n.as_bytes() && w[n.len() + 1] == 0)
                .unwrap();
            (pos + 1) as u32
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int (size 4, encoding word)
        t.extend([s("int"), 1 << 24, 4, 32]);
        // 2: struct inner, 2 members
        t.extend([s("inner"), (KIND_STRUCT << 24) | 2, 8]);
        t.extend([s("a"), 1, 0, s("b"), 1, 32]);
        // 3: anonymous union { struct inner in; }
        t.extend([0, (KIND_UNION << 24) | 1, 8]);
        t.extend([s("in"), 2, 0]);
        // 4: struct outer { int x; union; int caps[3]; }
        t.extend([s("outer"), (KIND_STRUCT << 24) | 3, 28]);
        t.extend([s("x"), 1, 0, 0, 3, 64, s("caps"), 5, 128]);
        // 5: int[3]
        t.extend([0, KIND_ARRAY << 24, 0, 1, 1, 3]);
        let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut b = vec![0x9f, 0xeb, 1, 0];
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend(w.to_le_bytes());
        }
        b.extend(types);
        b.extend(strings);
        b
    }

    #[test]
    fn offsets_follow_paths_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.struct_size("outer").unwrap(), 28);
        assert_eq!(btf.offset_of("outer", "caps").unwrap(), 16);
        assert_eq!(btf.array_len("outer", "caps").unwrap(), 3);
        assert!(btf.array_len("outer", "x").is_err());
        assert_eq!(btf.offset_of("outer", "x").unwrap(), 0);
        assert_eq!(btf.offset_of("outer", "in").unwrap(), 8);
        assert_eq!(btf.offset_of("outer", "in.b").unwrap(), 12);
        assert!(matches!(
            btf.offset_of("outer", "y"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.offset_of("nope", "x"),
            Err(BtfError::NoType { .. })
        ));
        assert!(Btf::parse(b"\0\0\0\0").is_err());
    }
}
