//! The x86-64 relocation types the Linux 6.1 module loader applies
//! (`arch/x86/kernel/module.c`, `__apply_relocate_add`), with the same checks.

use object::elf;

/// Human-readable name of an x86-64 relocation type.
pub fn reloc_name(r_type: u32) -> String {
    let name = match r_type {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => return format!("relocation type {r_type}"),
    };
    name.to_string()
}

/// Bytes written by a supported type, or `None` for types the kernel does not support.
pub(crate) fn width(r_type: u32) -> Option<usize> {
    match r_type {
        elf::R_X86_64_NONE => Some(0),
        elf::R_X86_64_32 | elf::R_X86_64_32S | elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => Some(4),
        elf::R_X86_64_64 | elf::R_X86_64_PC64 => Some(8),
        _ => None,
    }
}

/// Why one relocation could not be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// The computed value does not fit the field.
    Overflow(u64),
    /// The field is not zero before relocation (the kernel refuses this too).
    NotZero,
    Unsupported,
}

/// Applies relocation `r_type` at `buf[at..]`, located at address `p`, for symbol value `s`
/// and addend `a`. `buf[at..at + width]` must be in bounds (checked by the planner).
pub(crate) fn apply(
    buf: &mut [u8],
    at: usize,
    r_type: u32,
    s: u64,
    a: i64,
    p: u64,
) -> Result<(), Fail> {
    let n = width(r_type).ok_or(Fail::Unsupported)?;
    let field = &mut buf[at..at + n];
    if field.iter().any(|&b| b != 0) {
        return Err(Fail::NotZero);
    }
    let val = s.wrapping_add(a as u64);
    match r_type {
        elf::R_X86_64_NONE => {}
        elf::R_X86_64_64 => field.copy_from_slice(&val.to_le_bytes()),
        elf::R_X86_64_32 => {
            let v = u32::try_from(val).map_err(|_| Fail::Overflow(val))?;
            field.copy_from_slice(&v.to_le_bytes());
        }
        elf::R_X86_64_32S => {
            let v = i32::try_from(val as i64).map_err(|_| Fail::Overflow(val))?;
            field.copy_from_slice(&v.to_le_bytes());
        }
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
            // The kernel has this check `#if 0`-ed out; a truncated displacement is a wild
            // jump, so lucos keeps it.
            let rel = val.wrapping_sub(p);
            let v = i32::try_from(rel as i64).map_err(|_| Fail::Overflow(rel))?;
            field.copy_from_slice(&v.to_le_bytes());
        }
        elf::R_X86_64_PC64 => field.copy_from_slice(&val.wrapping_sub(p).to_le_bytes()),
        _ => return Err(Fail::Unsupported),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_checks() {
        let mut b = [0u8; 8];
        apply(&mut b, 0, elf::R_X86_64_32S, 0xffff_ffff_8100_0000, 0x10, 0).unwrap();
        assert_eq!(b[..4], 0x8100_0010u32.to_le_bytes());
        let mut b = [0u8; 8];
        assert_eq!(
            apply(&mut b, 0, elf::R_X86_64_32, 0xffff_ffff_8100_0000, 0, 0),
            Err(Fail::Overflow(0xffff_ffff_8100_0000))
        );
        assert_eq!(
            apply(&mut b, 0, elf::R_X86_64_32S, 0x8000_0000, 0, 0),
            Err(Fail::Overflow(0x8000_0000))
        );
        apply(&mut b, 0, elf::R_X86_64_PC32, 0x1000, -4, 0x2000).unwrap();
        assert_eq!(b[..4], (-0x1004i32).to_le_bytes());
        let mut b = [1u8; 8];
        assert_eq!(
            apply(&mut b, 0, elf::R_X86_64_64, 1, 0, 0),
            Err(Fail::NotZero)
        );
        assert_eq!(
            apply(&mut b, 0, elf::R_X86_64_GOTPCREL, 1, 0, 0),
            Err(Fail::Unsupported)
        );
    }
}
