//! The one section policy: what every special section is to lucos, read by both the
//! builder (`lucos build`: what it compares, which tables belong to functions, what new
//! code must not add) and the linker (what it loads, drops or refuses). One row per
//! section, with the reason users see.

/// The builder's view of a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Compared like any code or data.
    Compare,
    /// A table of fixed-size entries, each pointing into some function, which is compared
    /// together with its entries.
    Table(TableSpec),
    /// Data the running kernel only knows once registered: new items cannot be added.
    Registered,
    /// Code or data that ran at boot and was freed (`__init`, `__exit`).
    Init,
    /// Not compared and never carried: hints, metadata, debug information.
    Ignored,
    /// Filled in when vmlinux is linked (BTF-ID lists): never compared or carried, but its
    /// symbols are matched, so references to them name the running kernel's copy on both
    /// sides of a diff.
    LinkTime,
}

/// Layout of one table entry (x86-64, Linux 6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSpec {
    /// Entry size in bytes; the last entry may be shorter (padding).
    pub entry: u64,
    /// Offset of a `u16` line number inside an entry, ignored when comparing.
    pub line: Option<u64>,
    /// (offset of a relocation to anonymous data, offset of a `u8` with its length).
    pub data_len: Option<(u64, u64)>,
    /// A parallel table without relocations whose entry `i` (of this many bytes) goes with
    /// entry `i` here (`.orc_unwind` for `.orc_unwind_ip`).
    pub pair: Option<(&'static str, u64)>,
}

/// The linker's view of a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A bundle with this section cannot be loaded yet (the reason says why).
    Refuse,
    /// Left out, with the reason why that is safe.
    Drop,
    /// Classified by its flags (code, rodata, data, or not allocated).
    ByFlags,
    /// Loaded (by its flags) and applied by lucos at link time for the live CPU: the
    /// builder must carry the entries for the functions it includes.
    Apply,
    /// Loaded, and handed to the running kernel through the bundle's `struct module`
    /// (`crate::kmod`), where the kernel's own lookups find it: the builder carries the
    /// entries of the functions it includes.
    Register,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionRule {
    /// Section name; a trailing `*` matches any suffix.
    pub pattern: &'static str,
    pub role: Role,
    pub link: Link,
    /// What the section is, for builder messages ("CPU-feature alternatives").
    pub what: &'static str,
    /// Why the linker refuses or drops it.
    pub reason: &'static str,
}

const fn table(entry: u64, line: Option<u64>, data_len: Option<(u64, u64)>) -> Role {
    Role::Table(TableSpec {
        entry,
        line,
        data_len,
        pair: None,
    })
}

const fn rule(
    pattern: &'static str,
    role: Role,
    link: Link,
    what: &'static str,
    reason: &'static str,
) -> SectionRule {
    SectionRule {
        pattern,
        role,
        link,
        what,
        reason,
    }
}

use Link::{Apply, ByFlags, Drop, Refuse, Register};
use Role::{Compare, Ignored, Init, LinkTime, Registered};

/// Every section with a meaning beyond plain code or data. First match wins.
pub const RULES: &[SectionRule] = &[
    // Tables whose entries belong to functions.
    rule("__ex_table", table(12, None, None), Register, "exception-table fixups for instructions allowed to fault, e.g. user copies",
        "the exception table (fixups for instructions allowed to fault: user copies, rdmsr_safe ...): merged, sorted and handed to the kernel as the bundle module's extable, which search_exception_tables() finds"),
    rule("__jump_table", table(16, None, None), Register, "static-key (jump label) sites",
        "static-key (jump label) entries: set to each key's live state at the switch and linked into the key's list of module users (static_key_mod), so the kernel's own static_branch_enable()/disable() later rewrites them too"),
    // struct alt_instr: s32 instr, s32 repl, u16 cpuid, u8 instrlen, u8 replacementlen
    rule(".altinstructions", table(12, None, Some((4, 11))), Apply, "CPU-feature alternatives",
        "CPU-feature alternatives, applied at link time for the live CPU's features as the kernel's apply_alternatives() would"),
    rule(".static_call_sites", table(8, None, None), Drop, "static-call sites",
        "static-call sites: unpatched, each call goes through its trampoline (__SCT__*), which static_call_update() retargets too, so the call always reaches the current function; cost: one extra jmp per call"),
    rule("__bug_table", table(12, Some(8), None), Register, "BUG()/WARN() records",
        "BUG()/WARN() records: handed to the kernel as the bundle module's bug table (on module_bug_list), so a WARN in new code reports its file and line and continues"),
    rule(".parainstructions", table(16, None, None), Drop, "paravirt patch sites, e.g. from local_irq_save()",
        "paravirt patch sites: unpatched, each keeps its indirect call through pv_ops, which holds the very (callee-save) function the kernel's patching would call directly, compiled for those clobbers; where an alternative covers the site (native irq ops), lucos applies it; cost: one indirect call per site"),
    rule(".smp_locks", table(4, None, None), Drop, "LOCK-prefix records",
        "LOCK-prefix records: the kernel only uses them to turn LOCK prefixes into NOPs on a single CPU, so new code keeps its LOCK prefixes, which is correct either way"),
    // Data the kernel must register.
    rule(".data..percpu*", Registered, Refuse, "per-CPU data", "per-CPU variables, which need per-CPU allocation"),
    rule("__tracepoints*", Registered, Refuse, "a tracepoint definition",
        "tracepoint definitions, which must be registered with the tracing core"),
    rule("_ftrace_events", Registered, Refuse, "a trace event definition",
        "trace event definitions, which must be registered with the tracing core"),
    rule("__dyndbg*", Compare, ByFlags, "a dynamic-debug descriptor",
        "dynamic-debug descriptors: a new one (a new pr_debug()/dev_dbg() call site) is loaded as data and not registered with dynamic debug, so its static key stays off, as every call site's is unless enabled, and /proc/dynamic_debug/control does not list it; a changed one that is the same call site moved keeps the live descriptor"),
    rule(".altinstr_replacement", Registered, Apply, "alternative replacement code",
        "replacement code for CPU-feature alternatives (loaded; copied over the originals the live CPU selects)"),
    rule(".altinstr_aux", Registered, Apply, "alternative auxiliary code",
        "static_cpu_has() run-time test code (loaded: an unpatched static_cpu_has() jumps there and tests boot_cpu_data, which is correct on any CPU)"),
    rule(".static_call.text", Compare, Refuse, "static-call trampolines", "static-call trampolines"),
    // Boot-time code and data.
    rule(".init.*", Init, Refuse, "__init code or data",
        "init code or data: it only runs at boot or module load, and the kernel frees it; a patch cannot run it"),
    rule(".exit.*", Init, Refuse, "__exit code or data",
        "exit code or data: it only runs at module unload; a patch cannot run it"),
    rule(".meminit.*", Init, Refuse, "__meminit code or data",
        "memory-hotplug init code or data, freed after boot in this kernel; a patch cannot run it"),
    rule(".head.text*", Init, Refuse, "early boot code", "early boot code, which only runs before the kernel is up"),
    rule(".x86_cpu_dev.init", Init, Refuse, "CPU vendor init records", "CPU vendor records read once at boot"),
    // Metadata a patch cannot change: refused if a bundle has it, not compared by the builder
    // (which checks exports on its own).
    rule(".initcall*", Ignored, Refuse, "an initcall", "an initcall table entry: initcalls run only at boot; a patch cannot run them"),
    rule(".con_initcall*", Ignored, Refuse, "a console initcall", "a console initcall table entry, run only at boot"),
    rule("__ksymtab*", Ignored, Refuse, "symbol exports", "symbol exports; a patch cannot add exports to the running kernel"),
    rule("___ksymtab*", Ignored, Refuse, "symbol exports", "symbol exports; a patch cannot add exports to the running kernel"),
    rule("__kcrctab*", Ignored, Refuse, "export CRCs", "symbol-version CRCs of exports; a patch cannot add exports"),
    rule(".gnu.linkonce.this_module", Ignored, Refuse, "a struct module",
        "a `struct module`: this is a kernel module, not a lucos bundle"),
    rule("__param", Ignored, Refuse, "module parameters", "module parameters; a patch has no parameters"),
    rule("__modver", Ignored, Refuse, "module version records", "module version records: this looks like a kernel module, not a lucos bundle"),
    rule(".modinfo", Ignored, Refuse, "module metadata", "module metadata: this looks like a kernel module, not a lucos bundle"),
    // Hints and notes the new code can do without.
    rule("__mcount_loc", Ignored, Drop, "ftrace call sites",
        "lists fentry call sites for ftrace; the linker turns those calls into NOPs and new code is deliberately not traceable"),
    rule("__patchable_function_entries", Ignored, Drop, "ftrace call sites",
        "lists -fpatchable-function-entry sites for ftrace; new code is deliberately not traceable"),
    rule(".retpoline_sites", Ignored, Drop, "retpoline call sites",
        "lets alternatives inline retpoline thunk calls; the calls keep going through the kernel's thunks, which are correct for the active mitigation"),
    rule(".return_sites", Ignored, Drop, "return-thunk sites",
        "lists `jmp __x86_return_thunk` sites; the linker finds the same sites from their relocations and rewrites them for the live CPU as the kernel's apply_returns() did its own (patch::returns)"),
    rule(".call_sites", Ignored, Drop, "call-depth-tracking sites", "call-depth-tracking sites; only an accounting optimisation"),
    rule(".ibt_endbr_seal", Ignored, Drop, "ENDBR seal list", "ENDBR instructions objtool found unneeded; sealing them is hardening only"),
    rule(".orc_unwind_ip", Role::Table(TableSpec { entry: 4, line: None, data_len: None, pair: Some((".orc_unwind", 6)) }), Register, "ORC unwind addresses",
        "ORC unwind addresses: merged and sorted with their .orc_unwind entries into the bundle module's ORC table, which the kernel's unwinder finds"),
    rule(".orc_unwind", Ignored, Register, "ORC unwind data",
        "ORC unwind data, carried with .orc_unwind_ip (entry i goes with address i)"),
    rule(".discard.*", Ignored, Drop, "objtool annotations", "objtool annotations; the kernel's own link discards them too"),
    rule(".note.*", Ignored, Drop, "ELF notes", "ELF notes (GNU-stack, build properties); neither code nor data"),
    rule(".comment", Ignored, Drop, "the compiler version", "the compiler's version string"),
    rule(".eh_frame", Ignored, Drop, "call-frame info",
        "DWARF call-frame info; the kernel never reads it (kernel builds use -fno-asynchronous-unwind-tables)"),
    rule(".printk_index", Ignored, Drop, "the printk format index", "the debugfs printk format index; the new formats are just not listed there"),
    rule(".BTF_ids", LinkTime, Drop, "BTF ID lists",
        "BTF ID lists, filled in when vmlinux is linked; new code refers to the running kernel's lists"),
    rule(".BTF*", Ignored, Drop, "BTF type information",
        "BTF ID lists, filled in when vmlinux is linked; new code refers to the running kernel's lists"),
    rule(".debug_*", Ignored, ByFlags, "debug information", "debug information"),
];

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The rule for section `name`, if it is special.
pub fn section_rule(name: &str) -> Option<&'static SectionRule> {
    RULES.iter().find(|r| matches(r.pattern, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_is_reachable_and_consistent() {
        for (i, r) in RULES.iter().enumerate() {
            // No earlier pattern hides this one.
            let probe = r.pattern.trim_end_matches('*');
            assert_eq!(
                section_rule(probe).map(|x| x.pattern),
                Some(r.pattern),
                "rule {i} ({}) is shadowed",
                r.pattern
            );
            // What the builder compares must be loadable; what it ignores is never loaded
            // as code or data unless the flags say it is not allocated.
            if r.role == Role::Compare {
                assert_ne!(r.link, Link::Drop, "{}", r.pattern);
            }
            assert!(!r.what.is_empty() && !r.reason.is_empty());
        }
    }

    #[test]
    fn look_alikes_are_not_special() {
        assert!(section_rule(".inits").is_none());
        assert!(section_rule(".text.init.x").is_none());
        assert_eq!(section_rule("___ksymtab+f").unwrap().link, Link::Refuse);
        assert!(
            matches!(section_rule("__bug_table").unwrap().role, Role::Table(t) if t.line == Some(8))
        );
    }
}
