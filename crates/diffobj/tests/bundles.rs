//! Builds the test bundles of guest/bundles against the cached guest kernel tree.
//!
//! Needs the cached guest kernel (`guest/debian.sh`, which scripts/test.sh runs); without it
//! the tests fail under CI and are skipped with a message elsewhere.

mod common;

use common::{repo, tree};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use lucos_diffobj::{
    check_undefined, find_spec_files, kbuild, load_symbols, make_from_spec_file, read_spec_file,
    replacement_for, BuildError,
};
use lucos_introspect::symbols::{Binding, KernelSymbols, SymbolError, SymbolKind};
use lucos_patch::{plan, Bundle, NOP5};
use object::{Object, ObjectSection, ObjectSymbol};

fn syms(tree: &Path) -> &'static KernelSymbols {
    static SYMS: OnceLock<KernelSymbols> = OnceLock::new();
    SYMS.get_or_init(|| load_symbols(tree).expect("load vmlinux symbols"))
}

/// Files under `tree` modified after `stamp` (some may predate the test: compare sets).
fn newer_than(tree: &Path, stamp: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(tree)
        .arg("-newer")
        .arg(stamp)
        .output()
        .expect("run find");
    assert!(out.status.success());
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// Build id as `readelf -n` reports it (independent of lucos's ELF reader).
fn readelf_build_id(vmlinux: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(vmlinux)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Build ID:")).unwrap();
    line.split_whitespace().last().unwrap().to_string()
}

/// Addresses from System.map (independent of lucos's ELF reader).
fn system_map(tree: &Path) -> BTreeMap<String, Vec<u64>> {
    let text = std::fs::read_to_string(tree.join("System.map")).unwrap();
    let mut map: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(a), Some(_), Some(n)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        map.entry(n.to_string())
            .or_default()
            .push(u64::from_str_radix(a, 16).unwrap());
    }
    map
}

fn section_names(bundle: &[u8]) -> Vec<String> {
    let f = object::File::parse(bundle).unwrap();
    f.sections()
        .filter_map(|s| s.name().ok().map(String::from))
        .collect()
}

fn undefined_names(bundle: &[u8]) -> Vec<String> {
    let f = object::File::parse(bundle).unwrap();
    f.symbols()
        .filter(|s| s.is_undefined())
        .filter_map(|s| s.name().ok().map(String::from))
        .filter(|n| !n.is_empty())
        .collect()
}

/// The release the kernel itself reports: `Linux version <release> ...` in its banner.
fn kernel_release(tree: &Path) -> String {
    let banner = {
        let syms = lucos_introspect::KernelSymbols::load(tree.join("vmlinux")).unwrap();
        let b = syms.lookup("linux_banner").unwrap();
        String::from_utf8_lossy(&syms.section_bytes(b.addr, 64).unwrap()).into_owned()
    };
    banner
        .strip_prefix("Linux version ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string()
}

#[test]
fn spec_bundles_build_and_leave_the_tree_alone() {
    let Some(tree) = tree() else { return };
    let syms = syms(&tree);
    let stampdir = tempfile::tempdir().unwrap();
    let stamp = stampdir.path().join("stamp");
    std::fs::write(&stamp, "").unwrap();
    let before = newer_than(&tree, &stamp);

    let build_id = readelf_build_id(&tree.join("vmlinux"));
    let release = kernel_release(&tree);
    let map = system_map(&tree);
    let fentry = map["__fentry__"][0];

    let specs = find_spec_files(&repo().join("guest/bundles")).unwrap();
    let names: Vec<String> = specs
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["nofault", "cmdline", "uname", "version", "version2"] {
        assert!(
            names.iter().any(|n| n == want),
            "guest/bundles/{want}.json missing"
        );
    }

    let mut new_fns = Vec::new();
    for spec_path in &specs {
        let started = Instant::now();
        let bytes = make_from_spec_file(&tree, spec_path, syms)
            .unwrap_or_else(|e| panic!("{}: {e}", spec_path.display()));
        eprintln!(
            "built {} in {:.2} s ({} bytes)",
            spec_path.display(),
            started.elapsed().as_secs_f64(),
            bytes.len()
        );
        let bundle = Bundle::parse(&bytes).unwrap();
        let m = bundle.manifest();
        let (spec, _) = read_spec_file(spec_path).unwrap();
        assert_eq!(m.id, spec.id);
        assert_eq!(m.target.build_id, build_id, "{}", m.id);
        assert_eq!(m.target.release, release);
        assert_eq!(m.resolve, spec.resolve);
        assert_eq!(m.replacements.len(), spec.replacements.len());

        for r in &m.replacements {
            new_fns.push(r.new.clone());
            if let Some(module) = &r.module {
                check_module_replacement(&tree, module, r);
                continue;
            }
            check_vmlinux_replacement(syms, &map, fentry, r);
        }

        let sections = section_names(&bytes);
        let planned = plan(&bundle);
        if m.id == "nofault" {
            // Its exception-table entry is loaded, for the kernel to find.
            let p = planned.as_ref().unwrap_or_else(|e| panic!("nofault: {e}"));
            assert!(sections.iter().any(|s| s == "__ex_table"), "{sections:?}");
            assert!(
                p.rodata.sections.iter().any(|s| s.name == "__ex_table"),
                "{:?}",
                p.rodata.sections
            );
        }
        {
            let p = planned.unwrap_or_else(|e| panic!("{}: {e}", m.id));
            // Every new function (helpers too) has its fentry call, which the linker NOPs.
            for r in &m.replacements {
                assert!(
                    p.fentry_sites.iter().any(|f| f.function == r.new),
                    "{}: no fentry site for {}",
                    m.id,
                    r.new
                );
            }
        }
        match m.id.as_str() {
            "cmdline" => {
                let r = &m.replacements[0];
                assert_eq!(r.old, "cmdline_proc_show");
                assert_eq!(r.old_file.as_deref(), Some("fs/proc/cmdline.c"));
            }
            "uname" => {
                let r = &m.replacements[0];
                assert_eq!(r.old, "__x64_sys_newuname");
                assert_eq!(r.old_file, None);
                let undef = undefined_names(&bytes);
                for (name, file) in [
                    ("override_release", "kernel/sys.c"),
                    ("uts_kern_table", "kernel/utsname_sysctl.c"),
                ] {
                    assert!(
                        undef.iter().any(|u| u == name),
                        "{name} not used: {undef:?}"
                    );
                    let s = syms.lookup_in_file(file, name).unwrap();
                    assert_eq!(s.binding, Binding::Local, "{name} must be a static");
                }
                assert!(undef.iter().any(|u| u == "_copy_to_user"));
            }
            _ => {}
        }
    }
    let mut unique = new_fns.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        new_fns.len(),
        "new function names must be unique: {new_fns:?}"
    );

    assert_eq!(
        newer_than(&tree, &stamp),
        before,
        "building bundles modified the cached kernel tree"
    );
}

#[test]
fn compile_errors_carry_the_diagnostics() {
    let Some(tree) = tree() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("broken.c");
    std::fs::write(
        &src,
        "int lucos_broken(void)\n{\n\treturn undeclared_thing;\n}\n",
    )
    .unwrap();
    let e = kbuild::compile(&tree.join("build"), std::slice::from_ref(&src)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, BuildError::Compile { .. }), "{msg}");
    assert!(msg.contains("undeclared_thing"), "{msg}");
    assert!(
        msg.contains(&format!(
            "{}:3:",
            std::fs::canonicalize(&src).unwrap().display()
        )),
        "diagnostics name the user's file: {msg}"
    );
}

#[test]
fn several_sources_make_one_object() {
    let Some(tree) = tree() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.c");
    let b = dir.path().join("b-part.c");
    std::fs::write(dir.path().join("shared.h"), "int lucos_b(int x);\n").unwrap();
    std::fs::write(
        &a,
        "#include \"shared.h\"\nint lucos_a(int x) { return lucos_b(x) + 1; }\n",
    )
    .unwrap();
    std::fs::write(
        &b,
        "#include \"shared.h\"\nint lucos_b(int x) { return x * 3; }\n",
    )
    .unwrap();
    let obj = kbuild::compile(&tree.join("build"), &[a, b]).unwrap();
    let f = object::File::parse(&*obj).unwrap();
    let defined: Vec<&str> = f
        .symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok())
        .collect();
    assert!(
        defined.contains(&"lucos_a") && defined.contains(&"lucos_b"),
        "{defined:?}"
    );
}

#[test]
fn functions_without_a_site_are_redirected_at_their_entry() {
    let Some(tree) = tree() else { return };
    let syms = syms(&tree);
    // SYSCALL_DEFINE's __do_sys_* is `static inline`, hence notrace: no fentry site. Its
    // entry (push %r14; push %r13; push %r12) takes the jmp, and the manifest expects
    // those instructions whole, as vmlinux has them.
    let r = replacement_for(syms, "__do_sys_newuname", "lucos_x").unwrap();
    assert!(r.no_fentry);
    let s = syms.lookup("__do_sys_newuname").unwrap();
    let w = lucos_patch::entry::window_in_vmlinux(syms, &s.name, s.addr, s.size).unwrap();
    assert!(!w.single && w.end >= 5);
    assert_eq!(r.site_offset, w.site_offset);
    assert_eq!(
        r.expect[..w.end as usize],
        syms.section_bytes(s.addr, w.end as usize).unwrap()[..]
    );
    // A static-call trampoline is rewritten by the kernel.
    match replacement_for(syms, "__SCT__might_resched", "lucos_x") {
        Err(BuildError::EntryUnsafe {
            source: lucos_patch::entry::EntryError::KernelPoked { .. },
            ..
        }) => {}
        other => panic!("__SCT__might_resched: {other:?}"),
    }
    // Entry and early boot code run on page tables without patch memory.
    for f in ["asm_load_gs_index", "verify_cpu"] {
        match replacement_for(syms, f, "lucos_x") {
            Err(BuildError::EntryUnsafe {
                source: lucos_patch::entry::EntryError::Placement { .. },
                ..
            }) => {}
            other => panic!("{f}: {other:?}"),
        }
    }
    let e = replacement_for(syms, "saved_command_line", "lucos_x").unwrap_err();
    assert!(matches!(e, BuildError::NotAFunction { .. }), "{e}");
    // Base name or path both find the static.
    let r = replacement_for(syms, "cmdline.c:cmdline_proc_show", "lucos_x").unwrap();
    assert_eq!(r.old_file.as_deref(), Some("cmdline.c"));
}

/// For every function of vmlinux: either a clear refusal, or a manifest entry whose
/// expected bytes under a KASLR slide are vmlinux's slid bytes with an fentry site as NOP5.
#[test]
fn every_vmlinux_function_gets_a_consistent_expectation() {
    let Some(tree) = tree() else { return };
    let syms = syms(&tree);
    let slide = 0x2a0_0000u64;
    let (mut ok, mut with_abs, mut shortened) = (0, 0, 0);
    let (mut entries, mut entry_refused) = (0, 0);
    for s in syms
        .symbols()
        .iter()
        .filter(|s| s.kind == SymbolKind::Func && s.size > 0)
    {
        let spec = s.qualified_name();
        let r = match replacement_for(syms, &spec, "lucos_x") {
            Ok(r) => r,
            Err(BuildError::EntryUnsafe { .. } | BuildError::EntryNotExpectable { .. }) => {
                entry_refused += 1;
                continue;
            }
            Err(
                BuildError::InitCode { .. }
                | BuildError::Symbols(SymbolError::AmbiguousInFile { .. }),
            ) => continue,
            Err(e) => panic!("{spec}: {e}"),
        };
        ok += 1;
        entries += usize::from(r.no_fentry);
        with_abs += usize::from(!r.expect_abs.is_empty());
        shortened += usize::from(r.expect.len() < 16 && s.size >= 16);
        let site = r.site_offset as usize;
        let mut live = syms
            .expected_bytes(s.addr, r.expect.len(), slide as i64)
            .unwrap();
        if !r.no_fentry {
            live[site..site + 5].copy_from_slice(&NOP5);
        }
        assert_eq!(r.expected_bytes(slide), live, "{spec}");
    }
    eprintln!(
        "{ok} redirectable functions ({entries} at their entry), {with_abs} with expect_abs, \
         {shortened} shortened; {entry_refused} without fentry refused"
    );
    assert!(ok > 1000 && with_abs > 10 && shortened > 10);
    // Both outcomes of the entry check occur in a real kernel.
    assert!(entries > 100 && entry_refused > 10);
}

/// An object needing `names` (weak when the name starts with `?`).
fn object_needing(names: &[&str]) -> Vec<u8> {
    use object::write::{Object as WObject, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolKind, SymbolScope};
    let mut o = WObject::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    for n in names {
        let (name, weak) = match n.strip_prefix('?') {
            Some(n) => (n, true),
            None => (*n, false),
        };
        o.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind: SymbolKind::Unknown,
            scope: SymbolScope::Linkage,
            weak,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
    }
    o.write().unwrap()
}

#[test]
fn undefined_symbols_are_checked_like_the_engine_resolves_them() {
    let Some(tree) = tree() else { return };
    let syms = syms(&tree);
    let none = BTreeMap::new();
    check_undefined(
        syms,
        &object_needing(&["seq_puts", "__fentry__", "override_release"]),
        &none,
    )
    .unwrap();
    check_undefined(syms, &object_needing(&["?lucos_no_such_symbol"]), &none).unwrap();

    let e = check_undefined(syms, &object_needing(&["lucos_no_such_symbol"]), &none).unwrap_err();
    assert!(matches!(e, BuildError::Unresolved { .. }), "{e}");

    // `type_show` is a static in several files.
    let e = check_undefined(syms, &object_needing(&["type_show"]), &none).unwrap_err();
    assert!(e.to_string().contains("\"resolve\""), "{e}");
    let files: Vec<String> = syms
        .all_named("type_show")
        .filter_map(|s| s.file.clone())
        .collect();
    let one = files
        .iter()
        .find(|f| files.iter().filter(|g| g == f).count() == 1)
        .unwrap();
    let resolve = BTreeMap::from([("type_show".to_string(), one.clone())]);
    check_undefined(syms, &object_needing(&["type_show"]), &resolve).unwrap();

    let resolve = BTreeMap::from([("override_release".to_string(), "fs/nope.c".to_string())]);
    let e = check_undefined(syms, &object_needing(&[]), &resolve).unwrap_err();
    assert!(matches!(e, BuildError::BadResolve { .. }), "{e}");
}

/// A replacement of a vmlinux function names it where System.map has it, with
/// `old_file` exactly for statics, and expects its bytes with the NOP5 at the fentry site.
fn check_vmlinux_replacement(
    syms: &KernelSymbols,
    map: &BTreeMap<String, Vec<u64>>,
    fentry: u64,
    r: &lucos_patch::Replacement,
) {
    let addrs = &map[&r.old];
    let sym = match &r.old_file {
        Some(f) => syms.lookup_in_file(f, &r.old).unwrap(),
        None => syms.lookup(&r.old).unwrap(),
    };
    assert!(
        addrs.contains(&sym.addr),
        "{} not at a System.map address",
        r.old
    );
    assert_eq!(
        r.old_file.is_some(),
        sym.binding == Binding::Local,
        "old_file is set exactly for statics ({})",
        r.old
    );
    let site = r.site_offset as usize;
    assert!(site == 0 || site == 4);
    assert_eq!(&r.expect[site..site + 5], &NOP5, "{}", r.old);
    // vmlinux has `call __fentry__` there; the rest is vmlinux's bytes.
    let raw = syms.section_bytes(sym.addr, r.expect.len()).unwrap();
    assert_eq!(raw[site], 0xe8);
    let rel = i32::from_le_bytes(raw[site + 1..site + 5].try_into().unwrap());
    let dest = (sym.addr + site as u64 + 5).wrapping_add(rel as i64 as u64);
    assert_eq!(dest, fentry, "{}: site does not call __fentry__", r.old);
    assert_eq!(&r.expect[site + 5..], &raw[site + 5..]);
    assert_eq!(r.expected_bytes(0), r.expect);
}

/// A module function's replacement: its `expect` is the `.ko`'s bytes of the function with
/// the `call __fentry__` as the NOP, cut before the first relocated field.
fn check_module_replacement(tree: &Path, module: &str, r: &lucos_patch::Replacement) {
    use object::{Object, ObjectSection, ObjectSymbol};
    let ko = walk_files(&tree.join("modules"))
        .into_iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n == format!("{module}.ko").as_str())
        })
        .unwrap_or_else(|| panic!("{module}.ko not in the kernel's modules"));
    let data = std::fs::read(&ko).unwrap();
    let f = object::File::parse(&*data).unwrap();
    let sym = f
        .symbols()
        .find(|s| s.name() == Ok(r.old.as_str()))
        .unwrap();
    let sec = f.section_by_index(sym.section_index().unwrap()).unwrap();
    let start = sym.address() as usize;
    let code = &sec.data().unwrap()[start..start + r.expect.len()];
    let site = r.site_offset as usize;
    assert_eq!(code[site], 0xe8, "{}: no call at the site", r.old);
    assert_eq!(&r.expect[site..site + 5], &NOP5);
    assert_eq!(&r.expect[site + 5..], &code[site + 5..]);
    assert!(r.expect_abs.is_empty());
    // No relocated field inside what `expect` compares.
    for (off, _) in sec.relocations() {
        let off = off as usize;
        assert!(
            off < start + site + 5 || off >= start + r.expect.len(),
            "{}: expect covers a relocated field at +{:#x}",
            r.old,
            off - start
        );
    }
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
