//! Which sections of a bundle are loaded, which are refused and which are safely dropped
//! (the linker's side of [`crate::policy`]).
//!
//! The kernel's module loader gives many special sections meaning at load time (exception
//! tables, alternatives, static keys ...). lucos does not yet register any of them with the
//! running kernel, so loading them as plain data would silently produce wrong code: those are
//! refused. Hint sections whose absence only costs optimisation or diagnostics are dropped.

use object::elf;

use crate::policy::{section_rule, Link};

const LATER: &str = "a later lucos version will register it with the running kernel";

/// How the linker treats one section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Executable code: the text region.
    Text,
    /// Allocated, read-only: the rodata region.
    Rodata,
    /// Allocated and writable, including `.bss`: the data region.
    Data,
    /// Not loaded (symbol tables, string tables, debug info, the manifest ...).
    Ignore,
    /// Not loaded, and listed in the plan with this reason.
    Drop(&'static str),
    /// The bundle cannot be loaded; the reason says what the section is.
    Refuse(&'static str),
}

/// Why the linker refuses a section of this name, if it does: read from the one section
/// policy that `lucos build` also follows, so the two never disagree.
pub fn refused_by_name(name: &str) -> Option<&'static str> {
    section_rule(name)
        .filter(|r| r.link == Link::Refuse)
        .map(|r| r.reason)
}

/// Reason text for refusing `name`, ending in the note that support is planned.
pub(crate) fn refusal(what: &str) -> String {
    format!("{what}; {LATER}")
}

/// Classifies a non-relocation section by name, type and flags.
pub(crate) fn classify(name: &str, sh_type: u32, flags: u64) -> Class {
    match section_rule(name) {
        Some(r) if r.link == Link::Refuse => return Class::Refuse(r.reason),
        Some(r) if r.link == Link::Drop => return Class::Drop(r.reason),
        _ => {}
    }
    if flags & u64::from(elf::SHF_ALLOC) == 0 {
        return Class::Ignore;
    }
    if flags & u64::from(elf::SHF_TLS) != 0 {
        return Class::Refuse("thread-local storage, which the kernel does not have");
    }
    if matches!(
        sh_type,
        elf::SHT_INIT_ARRAY | elf::SHT_FINI_ARRAY | elf::SHT_PREINIT_ARRAY
    ) {
        return Class::Refuse(
            "constructors/destructors (e.g. from KASAN or GCOV), which nothing would run",
        );
    }
    if flags & u64::from(elf::SHF_EXECINSTR) != 0 {
        Class::Text
    } else if flags & u64::from(elf::SHF_WRITE) != 0 {
        Class::Data
    } else {
        Class::Rodata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = elf::SHF_ALLOC as u64;
    const X: u64 = elf::SHF_EXECINSTR as u64;
    const W: u64 = elf::SHF_WRITE as u64;

    #[test]
    fn plain_sections() {
        assert_eq!(classify(".text.foo", elf::SHT_PROGBITS, A | X), Class::Text);
        assert_eq!(
            classify(".rodata.str1.1", elf::SHT_PROGBITS, A),
            Class::Rodata
        );
        assert_eq!(
            classify(".data.rel.ro", elf::SHT_PROGBITS, A | W),
            Class::Data
        );
        assert_eq!(
            classify(".bss.counter", elf::SHT_NOBITS, A | W),
            Class::Data
        );
        assert_eq!(classify(".debug_info", elf::SHT_PROGBITS, 0), Class::Ignore);
        assert_eq!(
            classify(".lucos.manifest", elf::SHT_PROGBITS, 0),
            Class::Ignore
        );
    }

    #[test]
    fn special_sections() {
        for n in [
            ".init.text",
            ".exit.data",
            "__ksymtab_gpl",
            ".data..percpu",
            ".modinfo",
        ] {
            assert!(
                matches!(classify(n, elf::SHT_PROGBITS, A), Class::Refuse(_)),
                "{n}"
            );
        }
        for n in [
            "__mcount_loc",
            ".discard.retpoline_safe",
            ".note.GNU-stack",
            ".eh_frame",
        ] {
            assert!(
                matches!(classify(n, elf::SHT_PROGBITS, A), Class::Drop(_)),
                "{n}"
            );
        }
        // Not a prefix match on look-alikes.
        assert_eq!(classify(".inits", elf::SHT_PROGBITS, A), Class::Rodata);
        assert_eq!(
            classify(".text.init.x", elf::SHT_PROGBITS, A | X),
            Class::Text
        );
    }
}
