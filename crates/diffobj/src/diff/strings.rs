//! String literals of new code, pointed at the running kernel's own copies.
//!
//! A literal the bundle carried would live in patch memory, and kernel code tells a literal
//! from a heap string by its address: `kfree_const()` frees whatever `is_kernel_rodata()`
//! does not claim. 6.1's trace_events_hist.c sets `hist_field->type = "u64"` and later
//! `kfree_const()`s it; with the bundle's copy of `"u64"` that was a `kfree()` of patch
//! memory (`WARNING … free_large_kmalloc`). So every literal the kernel's `.rodata`
//! already holds (alone, or as the tail of a longer string) is used from there, as the replaced code did;
//! only strings new to the kernel travel in the bundle.
//!
//! A copy counts only outside `__ro_after_init` data (written at boot) and outside every
//! field the KASLR decompressor rewrites: its bytes are then the same in the guest as in
//! vmlinux.

use lucos_introspect::symbols::KernelSymbols;

/// The symbol new code names to reach a kernel literal, plus an offset.
pub(crate) const BASE: &str = "__start_rodata";

/// The running kernel's `.rodata`, for finding literals.
pub(crate) struct KernelStrings<'k> {
    syms: &'k KernelSymbols,
    bytes: Vec<u8>,
    /// Link-time address of `bytes[0]`, and of [`BASE`].
    start: u64,
    base: u64,
    /// `__ro_after_init` data: written at boot, so not what vmlinux says.
    written: std::ops::Range<u64>,
}

impl<'k> KernelStrings<'k> {
    /// `None` when vmlinux lacks `.rodata` or the symbols that bound it (then every
    /// literal travels in the bundle, as before).
    pub fn load(syms: &'k KernelSymbols) -> Option<KernelStrings<'k>> {
        let addr = |n: &str| syms.lookup(n).ok().map(|s| s.addr);
        let (start, size) = syms.section_range(".rodata")?;
        let bytes = syms
            .section_bytes(start, usize::try_from(size).ok()?)
            .ok()?;
        let written = addr("__start_ro_after_init")?..addr("__end_ro_after_init")?;
        Some(KernelStrings {
            syms,
            bytes,
            start,
            base: addr(BASE)?,
            written,
        })
    }

    /// Where the kernel holds the NUL-terminated `s` (without its NUL), as an offset from
    /// [`BASE`]: a copy whose bytes the guest has as vmlinux does, one that starts a
    /// string if there is one.
    pub fn find(&self, s: &[u8]) -> Option<i64> {
        let mut needle = s.to_vec();
        needle.push(0);
        let finder = memchr::memmem::Finder::new(&needle);
        let copies = || finder.find_iter(&self.bytes);
        let starts = |&i: &usize| i == 0 || self.bytes[i - 1] == 0;
        // The linker merges a string into the tail of a longer one ("u64" into "__u64"),
        // so a copy inside another string serves when none starts one.
        copies()
            .filter(starts)
            .chain(copies().filter(|i| !starts(i)))
            .map(|i| self.start + i as u64)
            .find(|&a| self.unchanged(a, needle.len()))
            .map(|a| (a - self.base) as i64)
    }

    fn unchanged(&self, addr: u64, len: usize) -> bool {
        let end = addr + len as u64;
        let written = addr < self.written.end && self.written.start < end;
        // A field straddling either end counts too: look one field-width around.
        let around = addr.saturating_sub(8);
        let relocated = self
            .syms
            .abs_reloc_offsets(around, len + 16)
            .map(|f| {
                f.iter().any(|r| {
                    let at = around + r.offset as u64;
                    at < end && addr < at + r.width() as u64
                })
            })
            .unwrap_or(true);
        !written && !relocated
    }
}

/// The NUL-terminated string at `off` of `bytes`, without its NUL.
pub(crate) fn c_string(bytes: &[u8], off: usize) -> Option<&[u8]> {
    let rest = bytes.get(off..)?;
    let len = memchr::memchr(0, rest)?;
    Some(&rest[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_ends_at_its_nul() {
        let b = b"u64\0unsigned int\0x";
        assert_eq!(c_string(b, 0), Some(&b"u64"[..]));
        assert_eq!(c_string(b, 4), Some(&b"unsigned int"[..]));
        assert_eq!(c_string(b, 13), Some(&b"int"[..]));
        assert_eq!(c_string(b, 17), None, "no NUL: not a C string");
    }
}
