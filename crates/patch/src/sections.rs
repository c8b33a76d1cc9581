//! Which sections of a bundle are loaded, which are refused and which are safely dropped.
//!
//! The kernel's module loader gives many special sections meaning at load time (exception
//! tables, alternatives, static keys ...). lucos does not yet register any of them with the
//! running kernel, so loading them as plain data would silently produce wrong code: those are
//! refused. Hint sections whose absence only costs optimisation or diagnostics are dropped.

use object::elf;

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

/// (pattern, what it is). A trailing `*` matches any suffix.
const REFUSED: &[(&str, &str)] = &[
    ("__ex_table", "the exception table: fixups for instructions allowed to fault (user copies, rdmsr_safe ...); the kernel would not find them, so such a fault in new code would oops"),
    ("__jump_table", "static-key (jump label) entries; the kernel would never flip the new code's branches, so they would stay at their compile-time default"),
    (".altinstructions", "CPU-feature alternatives; the new code would run the unpatched sequence, which may be wrong for this CPU"),
    (".altinstr_replacement", "replacement code for CPU-feature alternatives"),
    (".altinstr_aux", "auxiliary code for static_cpu_has() alternatives"),
    (".static_call_sites", "static-call sites; the new code's calls would not follow static_call_update()"),
    (".static_call.text", "static-call trampolines"),
    ("__bug_table", "BUG()/WARN() records; a WARN in new code would be reported as an invalid-opcode oops"),
    (".parainstructions", "paravirt patch sites; the new code would keep the slow indirect paravirt calls with the wrong clobbers"),
    (".init.*", "init code or data: it only runs at boot or module load, and the kernel frees it; a patch cannot run it"),
    (".initcall*", "an initcall table entry: initcalls run only at boot; a patch cannot run them"),
    (".exit.*", "exit code or data: it only runs at module unload; a patch cannot run it"),
    ("__ksymtab*", "symbol exports; a patch cannot add exports to the running kernel"),
    ("__kcrctab*", "symbol-version CRCs of exports; a patch cannot add exports"),
    (".gnu.linkonce.this_module", "a `struct module`: this is a kernel module, not a lucos bundle"),
    ("__param", "module parameters; a patch has no parameters"),
    (".modinfo", "module metadata: this looks like a kernel module, not a lucos bundle"),
    (".data..percpu*", "per-CPU variables, which need per-CPU allocation"),
    ("__tracepoints*", "tracepoint definitions, which must be registered with the tracing core"),
    ("_ftrace_events", "trace event definitions, which must be registered with the tracing core"),
    ("__dyndbg*", "dynamic-debug descriptors, which must be registered with dynamic debug"),
];

/// (pattern, why dropping it is safe).
const DROPPED: &[(&str, &str)] = &[
    (".smp_locks", "LOCK-prefix records: the kernel only uses them to turn LOCK prefixes into NOPs on a single CPU, so new code keeps its LOCK prefixes, which is correct either way"),
    ("__mcount_loc", "lists fentry call sites for ftrace; the linker turns those calls into NOPs and new code is deliberately not traceable"),
    ("__patchable_function_entries", "lists -fpatchable-function-entry sites for ftrace; new code is deliberately not traceable"),
    (".retpoline_sites", "lets alternatives inline retpoline thunk calls; the calls keep going through the kernel's thunks, which are correct for the active mitigation"),
    (".return_sites", "lets alternatives rewrite `jmp __x86_return_thunk`; returns keep using the kernel's return thunk, which is correct for the active mitigation"),
    (".call_sites", "call-depth-tracking sites; only an accounting optimisation"),
    (".ibt_endbr_seal", "ENDBR instructions objtool found unneeded; sealing them is hardening only"),
    (".orc_unwind", "ORC unwind data, which the kernel only looks up for vmlinux and modules; limitation: stack traces through new code are unreliable"),
    (".orc_unwind_ip", "ORC unwind addresses (see .orc_unwind); limitation: stack traces through new code are unreliable"),
    (".discard.*", "objtool annotations; the kernel's own link discards them too"),
    (".note.*", "ELF notes (GNU-stack, build properties); neither code nor data"),
    (".comment", "the compiler's version string"),
    (".eh_frame", "DWARF call-frame info; the kernel never reads it (kernel builds use -fno-asynchronous-unwind-tables)"),
    (".printk_index", "the debugfs printk format index; the new formats are just not listed there"),
];

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Why the linker refuses a section of this name, if it does: the one list
/// that `lucos build` also consults, so the two never disagree.
pub fn refused_by_name(name: &str) -> Option<&'static str> {
    REFUSED
        .iter()
        .find(|(p, _)| matches(p, name))
        .map(|(_, why)| *why)
}

/// Reason text for refusing `name`, ending in the note that support is planned.
pub(crate) fn refusal(what: &str) -> String {
    format!("{what}; {LATER}")
}

/// Classifies a non-relocation section by name, type and flags.
pub(crate) fn classify(name: &str, sh_type: u32, flags: u64) -> Class {
    if let Some(why) = refused_by_name(name) {
        return Class::Refuse(why);
    }
    if let Some((_, why)) = DROPPED.iter().find(|(p, _)| matches(p, name)) {
        return Class::Drop(why);
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
            "__ex_table",
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
