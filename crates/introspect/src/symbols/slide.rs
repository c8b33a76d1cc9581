//! Fields that the KASLR decompressor relocated at boot, and how to apply the slide to
//! vmlinux bytes so they compare equal to live memory.

use serde::Serialize;

/// How the KASLR decompressor adjusts a relocated field by the slide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RelocKind {
    /// R_X86_64_64: 8-byte field, += slide.
    Abs64,
    /// R_X86_64_32: 4-byte field, += slide.
    Abs32,
    /// R_X86_64_32S: 4-byte field, += slide.
    Abs32S,
    /// PC32 from the image to a zero-based per-CPU symbol: 4 bytes, -= slide.
    InversePc32,
}

impl RelocKind {
    pub fn width(self) -> usize {
        match self {
            RelocKind::Abs64 => 8,
            _ => 4,
        }
    }
}

/// A field inside a queried range whose live bytes differ by the slide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RelocField {
    /// Offset from the start of the queried range.
    pub offset: usize,
    pub kind: RelocKind,
}

impl RelocField {
    pub fn width(&self) -> usize {
        self.kind.width()
    }
}

/// Adjusts vmlinux bytes as the KASLR decompressor did at boot, so they can
/// be compared with live memory. `bytes` starts where the fields' offsets
/// are counted from; fields that do not fit are skipped.
pub fn apply_slide(bytes: &mut [u8], fields: &[RelocField], slide: i64) {
    for f in fields {
        let Some(b) = bytes.get_mut(f.offset..f.offset + f.width()) else {
            continue;
        };
        match f.kind {
            RelocKind::Abs64 => {
                let v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                b.copy_from_slice(&v.wrapping_add(slide as u64).to_le_bytes());
            }
            RelocKind::Abs32 | RelocKind::Abs32S | RelocKind::InversePc32 => {
                let v = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                let v = if f.kind == RelocKind::InversePc32 {
                    v.wrapping_sub(slide as u32)
                } else {
                    v.wrapping_add(slide as u32)
                };
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}
