//! Builds each sample diff of guest/patches/ against the cached guest kernel and checks the
//! outcome: which functions are replaced, the refusal text, or "no function changed"; every
//! bundle must be accepted by lucos's own bundle parser and linker planner.
//!
//! Needs the cached guest kernel (`guest/debian.sh`); fails under CI without it, and is
//! skipped with a message elsewhere.

mod common;

use common::{repo, tree};
use std::path::{Path, PathBuf};

use std::time::Instant;

use lucos_diffobj::diff::{build, BuildOptions, BuildOutcome, Built, DiffError, NoProgress};
use lucos_patch::Bundle;

fn sample(name: &str) -> PathBuf {
    repo().join("guest/patches").join(name)
}

fn options(cache: &Path) -> BuildOptions {
    BuildOptions {
        cache_dir: Some(cache.to_owned()),
        ..BuildOptions::default()
    }
}

fn run(name: &str) -> Option<Result<BuildOutcome, DiffError>> {
    let tree = tree()?;
    let cache = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let r = build(&tree, &sample(name), &options(cache.path()), &NoProgress);
    eprintln!("{name}: {:?}", t.elapsed());
    Some(r)
}

fn bundle(name: &str) -> Option<Box<Built>> {
    match run(name)? {
        Ok(BuildOutcome::Bundle(b)) => {
            let parsed = Bundle::parse(&b.bundle).expect("bundle parses");
            lucos_patch::plan(&parsed).expect("bundle links");
            eprintln!(
                "{name}: replaced {:?} included {:?}",
                b.replaced, b.included
            );
            if let Some(dir) = std::env::var_os("LUCOS_DIFF_OUT") {
                std::fs::write(Path::new(&dir).join(format!("{name}.o")), &b.bundle).unwrap();
            }
            Some(b)
        }
        Ok(BuildOutcome::NoChange { reason, .. }) => panic!("{name}: no change: {reason}"),
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn plain_body_change() {
    let Some(b) = bundle("01-cmdline-prefix.patch") else {
        return;
    };
    assert_eq!(b.replaced, vec!["cmdline_proc_show@fs/proc/cmdline.c"]);
}

#[test]
fn new_static_helper() {
    let Some(b) = bundle("02-uptime-new-helper.patch") else {
        return;
    };
    assert_eq!(b.replaced, vec!["uptime_proc_show@fs/proc/uptime.c"]);
    // GCC may clone it (lucos_uptime_minutes.isra.0): the clone is what is included.
    assert!(
        b.included
            .iter()
            .any(|s| s.starts_with("lucos_uptime_minutes")),
        "{:?}",
        b.included
    );
}

#[test]
fn static_local_use() {
    let Some(b) = bundle("03-interrupts-static-local.patch") else {
        return;
    };
    assert_eq!(b.replaced, vec!["show_interrupts"]);
    // The kernel's own `prec`, not a copy.
    assert!(
        b.external.iter().any(|s| s.starts_with("prec.")),
        "{:?}",
        b.external
    );
    assert!(
        !b.included.iter().any(|s| s.starts_with("prec.")),
        "{:?}",
        b.included
    );
}

#[test]
fn changed_string_literal() {
    let Some(b) = bundle("04-version-string.patch") else {
        return;
    };
    assert_eq!(b.replaced, vec!["version_proc_show@fs/proc/version.c"]);
    let parsed = Bundle::parse(&b.bundle).unwrap();
    assert_eq!(parsed.manifest().replacements.len(), 1);
    assert!(
        b.bundle.windows(16).any(|w| w == b"(lucos-patched) "),
        "the new string is in the bundle"
    );
    // The kernel has no such literal: it travels, and the code points at the bundle's copy.
    let (to_strings, _) = string_relocations(&b.bundle);
    assert!(to_strings > 0, "the new literal is not referred to");
}

#[test]
fn header_inline_replaces_all_callers() {
    let Some(b) = bundle("05-fd-header-inline.patch") else {
        return;
    };
    let mut replaced = b.replaced.clone();
    replaced.sort();
    assert_eq!(
        replaced,
        vec![
            "proc_fd_link@fs/proc/fd.c",
            "seq_show@fs/proc/fd.c",
            "tid_fd_revalidate@fs/proc/fd.c"
        ]
    );
    let objects: Vec<&str> = b.report.objects.iter().map(|o| o.object.as_str()).collect();
    assert_eq!(objects, vec!["fs/proc/base.o", "fs/proc/fd.o"]);
}

#[test]
fn line_shift_is_no_change() {
    let Some(r) = run("06-params-line-shift.patch") else {
        return;
    };
    match r {
        Ok(BuildOutcome::NoChange { report, reason }) => {
            eprintln!("{reason}");
            let line_only: Vec<&String> =
                report.objects.iter().flat_map(|o| &o.line_only).collect();
            assert_eq!(line_only, vec!["param_sysfs_init"]);
        }
        Ok(BuildOutcome::Bundle(b)) => panic!("expected no change, got {:?}", b.replaced),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn global_size_change_is_refused() {
    let Some(r) = run("07-acpi-global-size.patch") else {
        return;
    };
    let e = match r {
        Err(e) => e,
        Ok(_) => panic!("a size change must be refused"),
    };
    let text = e.to_string();
    eprintln!("{text}");
    assert!(text.contains("`acpi_video_backlight_string`"), "{text}");
    assert!(text.contains("from 16 to 32 bytes"), "{text}");
    assert!(text.contains("data-transfer"), "{text}");
}

#[test]
fn fentry_less_static_inline_is_replaced_through_its_caller() {
    // SYSCALL_DEFINE bodies are `static inline` (so notrace): __do_sys_newuname has no
    // fentry site, and its callers, the syscall wrappers, are redirected instead: the
    // 64-bit one, and the 32-bit one on a kernel with IA32_EMULATION (Debian's).
    let Some(b) = bundle("08-uname-machine.patch") else {
        return;
    };
    let syms = lucos_introspect::KernelSymbols::load(tree().unwrap().join("vmlinux")).unwrap();
    let wrappers: Vec<&str> = ["__x64_sys_newuname", "__ia32_sys_newuname"]
        .into_iter()
        .filter(|w| syms.lookup(w).is_ok())
        .collect();
    assert_eq!(wrappers[0], "__x64_sys_newuname");
    assert_eq!(b.replaced, wrappers);
    assert!(
        b.included.iter().any(|s| s == "__do_sys_newuname"),
        "{:?}",
        b.included
    );
}

#[test]
fn a_function_without_fentry_reached_by_pointer_is_redirected_at_its_entry() {
    // kernel/trace is built without -pg, and tracefs calls rb_simple_read through its
    // file_operations: no caller can be replaced instead, so the jmp goes over its entry.
    let Some(b) = bundle("16-tracing-on-entry.patch") else {
        return;
    };
    assert_eq!(b.replaced, vec!["rb_simple_read@kernel/trace/trace.c"]);
    let m = Bundle::parse(&b.bundle).unwrap().manifest().clone();
    let r = &m.replacements[0];
    assert!(r.no_fentry, "{r:?}");
    let site = r.site_offset as usize;
    assert_ne!(r.expect[site..site + 5], lucos_patch::NOP5);
}

/// `struct lb_env` (kernel/sched/fair.c) gains a member that moves every later one. Only
/// load-balancing frames hold one, so the change builds, and the bundle asks for
/// consistent switches; a type kept anywhere else would be refused (diff_units).
#[test]
fn a_frame_local_type_changes_layout_under_a_consistent_switch() {
    let Some(b) = bundle("17-sched-frame-local-layout.patch") else {
        return;
    };
    assert_eq!(b.manifest.frame_types, vec!["struct lb_env"]);
    for f in [
        "load_balance",
        "active_load_balance_cpu_stop",
        "can_migrate_task",
    ] {
        let label = format!("{f}@kernel/sched/fair.c");
        assert!(b.replaced.contains(&label), "{f}: {:?}", b.replaced);
    }
}

/// A new `pr_debug()` call site: its descriptor travels in the bundle as writable data
/// (not registered with dynamic debug, so its key stays off) with the new code's static
/// branch on that key, in the bundle's own jump table.
#[test]
fn a_new_debug_call_site_travels_as_data_with_its_static_branch() {
    let Some(b) = bundle("19-new-debug-call-site.patch") else {
        return;
    };
    assert_eq!(b.replaced, vec!["loadavg_proc_show@fs/proc/loadavg.c"]);
    let sites = &b.report.objects[0].debug_sites_off;
    assert_eq!(sites.len(), 1);
    assert!(b.included.contains(&sites[0]), "{:?}", b.included);
    let p = lucos_patch::plan(&Bundle::parse(&b.bundle).unwrap()).unwrap();
    assert!(p.data.sections.iter().any(|s| s.name == "__dyndbg"));
    assert!(p.data.sections.iter().any(|s| s.name == "__jump_table"));
}

/// A new exported function: no function changes, the bundle carries the new one and its
/// module exports it (GPL only, as `EXPORT_SYMBOL_GPL` says).
#[test]
fn a_new_export_is_carried_and_exported() {
    let Some(b) = bundle("18-new-export.patch") else {
        return;
    };
    assert!(b.replaced.is_empty(), "{:?}", b.replaced);
    let e = &b.manifest.exports;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].name, "lucos_sample_answer");
    assert!(e[0].gpl);
    let symbol = e[0].symbol.as_deref().expect("the bundle's new function");
    assert!(b.included.iter().any(|i| i == symbol), "{:?}", b.included);
}

/// A diff of `file` (relative to the tree) with `edits` (old, new) applied, in `dir`.
fn edited(tree: &Path, dir: &Path, file: &str, edits: &[(&str, &str)]) -> PathBuf {
    let (a, b) = (dir.join("a"), dir.join("b"));
    let old = std::fs::read_to_string(tree.join("build").join(file)).unwrap();
    let mut new = old.clone();
    for (from, to) in edits {
        assert!(new.contains(from), "{file} has no {from:?}");
        new = new.replacen(from, to, 1);
    }
    let name = Path::new(file).file_name().unwrap();
    for (d, t) in [(&a, &old), (&b, &new)] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join(name), t).unwrap();
    }
    let text = std::process::Command::new("diff")
        .arg("-u")
        .args([
            "--label",
            &format!("a/{file}"),
            "--label",
            &format!("b/{file}"),
        ])
        .arg(a.join(name))
        .arg(b.join(name))
        .output()
        .unwrap()
        .stdout;
    let patch = dir.join("edit.patch");
    std::fs::write(&patch, text).unwrap();
    patch
}

/// New code that calls a function the running kernel does not have is refused with the
/// typed `Absent` refusal, which `lucos corpus` answers by adding the changed files that
/// define the symbol.
#[test]
fn a_call_to_a_function_the_kernel_lacks_is_refused_as_absent() {
    let Some(tree) = tree() else { return };
    let dir = tempfile::tempdir().unwrap();
    let patch = edited(
        &tree,
        dir.path(),
        "fs/proc/cmdline.c",
        &[
            (
                "\tseq_puts(m, saved_command_line);",
                "\tlucos_absent_helper();\n\tseq_puts(m, saved_command_line);",
            ),
            (
                "static int cmdline_proc_show",
                "void lucos_absent_helper(void);\n\nstatic int cmdline_proc_show",
            ),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let e = match build(&tree, &patch, &options(cache.path()), &NoProgress) {
        Err(e) => e,
        Ok(_) => panic!("a call to a missing function must be refused"),
    };
    let absent: Vec<&str> = e
        .refusals()
        .iter()
        .filter_map(|r| match r {
            lucos_diffobj::diff::Refusal::Absent { symbol, .. } => Some(symbol.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(absent, ["lucos_absent_helper"], "{e}");
    assert!(
        e.to_string().contains("the running kernel does not have"),
        "{e}"
    );
}

/// A new `pr_debug()` before others renumbers every later descriptor
/// (`__UNIQUE_ID_ddebug<counter>`): descriptors are matched by what they describe, so
/// the existing ones are the same call sites, moved, and only the new one travels.
#[test]
fn a_new_debug_call_site_before_others_leaves_them_matched() {
    let Some(tree) = tree() else { return };
    let dir = tempfile::tempdir().unwrap();
    let patch = edited(
        &tree,
        dir.path(),
        "kernel/params.c",
        &[(
            "\t\t\tpr_debug(\"handling %s with %p\\n\", param,",
            "\t\t\tpr_debug(\"lucos: %s\\n\", param);\n\t\t\tpr_debug(\"handling %s with %p\\n\", param,",
        )],
    );
    let cache = tempfile::tempdir().unwrap();
    let b = match build(&tree, &patch, &options(cache.path()), &NoProgress) {
        Ok(BuildOutcome::Bundle(b)) => b,
        Ok(BuildOutcome::NoChange { reason, .. }) => panic!("no change: {reason}"),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(b.replaced, vec!["parse_args"]);
    let o = &b.report.objects[0];
    assert_eq!(o.debug_sites_off.len(), 1, "{:?}", o.new_data);
}

/// The running kernel's symbols as lucos reads them from Debian's dbg vmlinux: names,
/// statics by file, lookups by address, and the absolute-relocation fields of a function.
#[test]
fn debian_vmlinux_symbols_resolve() {
    let Some(tree) = tree() else { return };
    let s = lucos_introspect::KernelSymbols::load(tree.join("vmlinux")).unwrap();
    assert!(s.symbols().len() > 100_000, "{}", s.symbols().len());
    assert_eq!(s.build_id_hex().unwrap().len(), 40);
    for name in [
        "_text",
        "asm_exc_page_fault",
        "cmdline_proc_show",
        "fs/proc/cmdline.c:cmdline_proc_show",
    ] {
        let sym = s
            .resolve_spec(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        s.abs_reloc_offsets(sym.addr, sym.size as usize).unwrap();
    }
    let pf = s.lookup("asm_exc_page_fault").unwrap().addr;
    assert_eq!(s.symbol_at(pf + 3).unwrap().0.name, "asm_exc_page_fault");
    assert!(s.lookup("current_task").unwrap().percpu);
}

/// A symlink view of `tree` whose Kbuild tree has `file` replaced by `text` (every
/// directory on the way is real, the rest links to the original).
fn tree_with_changed_source(tree: &Path, file: &str, text: &str) -> tempfile::TempDir {
    use std::os::unix::fs::symlink;
    let view = tempfile::tempdir().unwrap();
    let mut from = tree.to_path_buf();
    let mut to = view.path().to_path_buf();
    let mut parts: Vec<&str> = vec!["build"];
    parts.extend(file.split('/'));
    let (last, dirs) = parts.split_last().unwrap();
    let link_all_but = |from: &Path, to: &Path, keep: &str| {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_name() != keep {
                symlink(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    };
    for d in dirs {
        link_all_but(&from, &to, d);
        from.push(d);
        to.push(d);
        std::fs::create_dir(&to).unwrap();
    }
    link_all_but(&from, &to, last);
    std::fs::write(to.join(last), text).unwrap();
    view
}

#[test]
fn a_tree_that_does_not_compile_the_running_kernel_fails_run_pre() {
    let Some(tree) = tree() else { return };
    // Kbuild records the command in the real tree; the view reuses it.
    bundle("04-version-string.patch");
    let real = std::fs::read_to_string(tree.join("build/fs/proc/version.c")).unwrap();
    let changed = real.replacen("\treturn 0;\n}", "\treturn 1;\n}", 1);
    assert_ne!(
        changed, real,
        "fs/proc/version.c no longer ends version_proc_show so"
    );
    let view = tree_with_changed_source(&tree, "fs/proc/version.c", &changed);
    let cache = tempfile::tempdir().unwrap();
    let r = build(
        view.path(),
        &sample("04-version-string.patch"),
        &options(cache.path()),
        &NoProgress,
    );
    let text = match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a tree whose version_proc_show is not the kernel's must be refused"),
    };
    eprintln!("{text}");
    assert!(text.contains("`version_proc_show`"), "{text}");
    assert!(text.contains("run-pre"), "{text}");
    assert!(
        text.contains("mov eax,1"),
        "names the first differing instruction: {text}"
    );
}

#[test]
fn struct_member_inserted_is_refused_naming_type_and_member() {
    let Some(r) = run("09-struct-member-inserted.patch") else {
        return;
    };
    let text = match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a struct layout change must be refused"),
    };
    eprintln!("{text}");
    assert!(text.contains("`struct fd_data` changes layout"), "{text}");
    assert!(
        text.contains("member `lucos_cookie` takes the place of `fd`"),
        "{text}"
    );
    // Once, not once per function that uses the type.
    assert_eq!(text.matches("struct fd_data").count(), 1, "{text}");
}

/// A member the diff only removes (6.1.190's `struct hist_field`'s `ref`) is kept, unused,
/// by a rebuild: the layout stays and the bundle builds, replacing the functions whose code
/// the fix changes.
#[test]
fn a_removed_member_is_kept_and_the_layout_stays() {
    let Some(b) = bundle("20-struct-member-removed.patch") else {
        return;
    };
    assert_eq!(
        b.report.kept_members,
        ["struct hist_field.ref (kernel/trace/trace_events_hist.c:163)"]
    );
    assert!(
        b.manifest.frame_types.is_empty(),
        "{:?}",
        b.manifest.frame_types
    );
    let changed: Vec<&String> = b.report.objects.iter().flat_map(|o| &o.changed).collect();
    for f in ["create_hist_field", "create_var_ref"] {
        assert!(changed.iter().any(|c| c.as_str() == f), "{f}: {changed:?}");
    }
    // `hist_field->type = "u64"` is later kfree_const()d: every literal of the new code is
    // one the kernel has, and is used from the kernel's .rodata, not from patch memory.
    let (to_strings, to_rodata) = string_relocations(&b.bundle);
    assert_eq!(
        to_strings, 0,
        "relocations into the bundle's own string sections"
    );
    assert!(to_rodata > 0, "no literal points at the kernel's .rodata");
}

/// A member added in padding (`struct pid_entry`'s `hidden`) builds: every `pid_entry` of
/// the running kernel is a static whose new byte is zero, and the manifest asks the engine
/// to check each live. The same kind of change to a type that code fills at run time
/// (`struct map_files_info`, allocated in a radix tree) is refused, naming why.
#[test]
fn a_member_added_in_padding_builds_only_for_static_objects() {
    let Some(b) = bundle("21-struct-member-in-padding.patch") else {
        return;
    };
    assert_eq!(b.report.padded_types, ["struct pid_entry"]);
    assert_eq!(b.replaced, ["proc_pident_readdir@fs/proc/base.c"]);
    let zeroed = &b.manifest.zeroed;
    assert!(zeroed.len() > 50, "{}", zeroed.len());
    assert!(
        zeroed.iter().all(|z| z.len == 1 && z.addr % 8 == 6),
        "{zeroed:?}"
    );
    for table in ["tgid_base_stuff", "tid_base_stuff"] {
        assert!(zeroed.iter().any(|z| z.object == table), "{table}");
    }

    let Some(tree) = tree() else { return };
    let dir = tempfile::tempdir().unwrap();
    let patch = edited(
        &tree,
        dir.path(),
        "fs/proc/base.c",
        &[(
            "\tfmode_t\t\tmode;\n};",
            "\tfmode_t\t\tmode;\n\tu8\t\tlucos;\n};",
        )],
    );
    let cache = tempfile::tempdir().unwrap();
    let err = match build(&tree, &patch, &options(cache.path()), &NoProgress) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a member added in padding of a run-time type must be refused"),
    };
    assert!(
        err.contains("`struct map_files_info` changes layout"),
        "{err}"
    );
    assert!(err.contains("without `const`"), "{err}");
}

/// How many relocations of the bundle's object point into its own string sections, and how
/// many at `__start_rodata` (a literal of the running kernel).
fn string_relocations(bundle: &[u8]) -> (usize, usize) {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
    let elf = &bundle[bundle.windows(4).position(|w| w == b"\x7fELF").unwrap()..];
    let file = object::File::parse(elf).unwrap();
    let (mut strings, mut rodata) = (0, 0);
    for sec in file.sections() {
        for (_, r) in sec.relocations() {
            let RelocationTarget::Symbol(i) = r.target() else {
                continue;
            };
            let sym = file.symbol_by_index(i).unwrap();
            if sym.name() == Ok("__start_rodata") {
                rodata += 1;
            }
            let target = sym
                .section_index()
                .and_then(|s| file.section_by_index(s).ok());
            if target.is_some_and(|t| t.name().is_ok_and(|n| n.contains(".str1."))) {
                strings += 1;
            }
        }
    }
    (strings, rodata)
}

/// The files the sample diffs touch, and a BPF object whose `bpf_func_proto` tables refer
/// to BTF-ID lists.
const COMMENT_ONLY_FILES: &[&str] = &[
    "fs/proc/cmdline.c",
    "fs/proc/uptime.c",
    "kernel/irq/proc.c",
    "fs/proc/version.c",
    "fs/proc/fd.h",
    "fs/proc/fd.c",
    "kernel/params.c",
    "drivers/acpi/utils.c",
    "kernel/sys.c",
    "net/core/filter.c",
];

#[test]
fn comment_only_changes_change_nothing() {
    let Some(tree) = tree() else { return };
    // One diff appending a comment to each file: no line moves, nothing compiles differently.
    let mut diff = String::new();
    for f in COMMENT_ONLY_FILES {
        let text = std::fs::read_to_string(tree.join("build").join(f)).unwrap();
        let n = text.lines().count();
        let last = text.lines().last().unwrap();
        diff.push_str(&format!(
            "--- a/{f}\n+++ b/{f}\n@@ -{n},1 +{n},2 @@\n {last}\n+/* lucos: a comment only */\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("comments.patch");
    std::fs::write(&path, diff).unwrap();
    let cache = tempfile::tempdir().unwrap();
    match build(&tree, &path, &options(cache.path()), &NoProgress) {
        Ok(BuildOutcome::NoChange { report, .. }) => {
            let objects: Vec<&str> = report.objects.iter().map(|o| o.object.as_str()).collect();
            assert!(objects.contains(&"net/core/filter.o"), "{objects:?}");
        }
        Ok(BuildOutcome::Bundle(b)) => panic!("comments produced a bundle: {:?}", b.replaced),
        Err(e) => panic!("comments were refused: {e}"),
    }
}
