//! Correlation and comparison on small objects compiled here from C snippets with kernel-like
//! flags (`-O2 -ffunction-sections -fdata-sections -mcmodel=kernel -pg -mfentry`). Every
//! object diff that yields code is packed into a bundle and checked with lucos's own parser
//! and linker planner.

use std::path::Path;
use std::process::Command;

use lucos_diffobj::diff::{compare_objects, parse_diff, ObjectDiff, Refusal};
use lucos_patch::{Bundle, Manifest, Replacement, Target, FORMAT_VERSION, NOP5};

const FLAGS: &[&str] = &[
    "-O2",
    "-ffunction-sections",
    "-fdata-sections",
    "-mcmodel=kernel",
    "-fno-pic",
    "-mno-red-zone",
    "-fno-common",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
    "-fno-asynchronous-unwind-tables",
    "-fno-stack-protector",
    "-c",
];

fn cc(dir: &Path, name: &str, src: &str, extra: &[&str]) -> Vec<u8> {
    let c = dir.join(format!("{name}.c"));
    let o = dir.join(format!("{name}.o"));
    std::fs::write(&c, src).unwrap();
    // Relative source path, so `__FILE__` is the same for both versions.
    let out = Command::new("gcc")
        .args(FLAGS)
        .args(extra)
        .arg(format!("{name}.c"))
        .arg("-o")
        .arg(&o)
        .current_dir(dir)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&o).unwrap()
}

/// Compiles both versions (as `t.c`, so `__FILE__` is the same) and compares them, with the
/// line map of their `diff -u`.
fn diff(orig: &str, patched: &str) -> ObjectDiff {
    diff_with(orig, patched, &[])
}

/// [`diff`] with extra compiler flags (`-g`: type layouts are compared from DWARF).
fn diff_with(orig: &str, patched: &str, extra: &[&str]) -> ObjectDiff {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let o = cc(&a, "t", orig, extra);
    let p = cc(&b, "t", patched, extra);
    let text = Command::new("diff")
        .args(["-u", "--label", "a/t.c", "--label", "b/t.c"])
        .arg(a.join("t.c"))
        .arg(b.join("t.c"))
        .output()
        .unwrap()
        .stdout;
    let text = String::from_utf8(text).unwrap();
    let changes = if text.is_empty() {
        Vec::new()
    } else {
        parse_diff(Path::new("t.patch"), &text).unwrap()
    };
    let d = compare_objects("t.c", &o, &p, changes.first().map(|c| &c.lines)).unwrap();
    eprintln!("{d:#?}");
    if let Some(object) = &d.object {
        check_bundle(object, &d);
    }
    d
}

/// Packs the object with a manifest redirecting each changed function and checks it.
fn check_bundle(object: &[u8], d: &ObjectDiff) {
    let manifest = Manifest {
        format: FORMAT_VERSION,
        id: "unit".into(),
        description: String::new(),
        target: Target {
            build_id: "00".into(),
            release: "test".into(),
        },
        replacements: d
            .redirected
            .iter()
            .map(|f| Replacement {
                old: f.clone(),
                old_file: None,
                module: None,
                new: f.clone(),
                site_offset: 0,
                no_fentry: false,
                expect: NOP5.to_vec(),
                expect_abs: Vec::new(),
            })
            .collect(),
        resolve: Default::default(),
        aliases: Default::default(),
        rewrites: d
            .rewritten
            .iter()
            .map(|o| lucos_patch::Rewrite {
                old: o.clone(),
                old_file: None,
                new: format!("{o}.lucos_rewrite"),
                expect: vec![0; 8],
                skip: Vec::new(),
            })
            .collect(),
        frame_types: d.frame_types.clone(),
        exports: d
            .exports
            .iter()
            .map(|name| lucos_patch::Export {
                name: name.clone(),
                symbol: None,
                gpl: false,
                namespace: None,
            })
            .collect(),
    };
    let bundle = lucos_patch::pack(object, &manifest).expect("pack");
    let parsed = Bundle::parse(&bundle).expect("bundle parses");
    lucos_patch::plan(&parsed).expect("bundle plans");
}

const PRELUDE: &str = "extern int _printk(const char *fmt, ...);\n\
                       extern int __warn_printk(const char *fmt, ...);\n\
                       extern int ext(int);\n\
                       extern int ext_a(int);\n\
                       extern int ext_b(int);\n";

#[test]
fn unchanged_source_has_no_change() {
    let src = format!("{PRELUDE}int f(int x) {{ return ext(x) + 1; }}\n");
    let d = diff(&src, &src);
    assert!(d.changed.is_empty() && d.new_functions.is_empty() && d.line_only.is_empty());
    assert!(d.object.is_none());
}

#[test]
fn numbered_static_locals_correlate_by_user() {
    // Swapping the two functions swaps GCC's numbering of their `calls` statics.
    let orig = format!(
        "{PRELUDE}int first(int x) {{ static int calls; calls += x; return calls; }}\n\
         int second(int x) {{ static int calls; calls++; return calls + ext(x); }}\n"
    );
    let patched = format!(
        "{PRELUDE}int second(int x) {{ static int calls; calls++; return calls + ext(x); }}\n\
         int first(int x) {{ static int calls; calls += x; return calls * 2; }}\n"
    );
    let d = diff(&orig, &patched);
    assert_eq!(d.changed, vec!["first"]);
    assert_eq!(d.redirected, vec!["first"]);
    assert!(d.new_data.is_empty(), "{:?}", d.new_data);
    // GCC swapped the numbers; first's static keeps the running kernel's name (calls.1).
    assert!(
        d.renamed.contains(&("calls.1".into(), "calls.0".into())),
        "{:?}",
        d.renamed
    );
    let statics: Vec<&String> = d
        .external
        .iter()
        .filter(|e| e.starts_with("calls."))
        .collect();
    assert_eq!(statics, vec!["calls.1"]);
    assert!(!d.included.iter().any(|s| s.starts_with("calls.")));
}

#[test]
fn compiler_renamed_clones_correlate() {
    // The same clone under another number (as after unrelated changes elsewhere).
    let src = |n: u32| {
        format!(
            "{PRELUDE}static int __attribute__((noinline)) helper(int a) __asm__(\"helper.isra.{n}\");\n\
             static int __attribute__((noinline)) helper(int a) {{ return ext(a) * 3; }}\n\
             static int __attribute__((noinline)) scale(int a, int b) {{ return ext(a) * b + ext(b); }}\n\
             int use1(int x) {{ return helper(x) + scale(x, 3); }}\n"
        )
    };
    let d = diff(&src(0), &src(4));
    assert!(d.changed.is_empty(), "{:?}", d.changed);
    assert!(d.new_functions.is_empty(), "{:?}", d.new_functions);
    assert!(d
        .renamed
        .contains(&("helper.isra.0".into(), "helper.isra.4".into())));
}

#[test]
fn constprop_clone_change_is_found() {
    let src = |k: u32| {
        format!(
            "{PRELUDE}static int __attribute__((noinline)) scale(int a, int b) {{ return ext(a) * b + ext(b + {k}); }}\n\
             int use1(int x) {{ return scale(x, 3); }}\n"
        )
    };
    let d = diff(&src(1), &src(2));
    // GCC specialises scale for b == 3: scale.constprop.0 is what changed.
    assert_eq!(d.changed.len(), 1, "{:?}", d.changed);
    assert!(d.changed[0].starts_with("scale"), "{:?}", d.changed);
    assert!(d.object.is_some());
}

#[test]
fn line_number_only_changes_are_not_changes() {
    let body = "int f(int x) { if (ext(x)) _printk(\"%s:%d: oops\\n\", __FILE__, __LINE__); return x; }\n\
                int g(int x) { if (ext(x) > 3) __warn_printk(\"bad %d\\n\", __LINE__); return ext(x + 1); }\n";
    let orig = format!("{PRELUDE}{body}");
    let patched = format!("{PRELUDE}\n/* moved\n down */\n\n{body}");
    let d = diff(&orig, &patched);
    assert!(d.changed.is_empty(), "{:?}", d.changed);
    let mut line_only = d.line_only.clone();
    line_only.sort();
    assert_eq!(line_only, vec!["f", "g"]);
    assert!(d.object.is_none());
}

#[test]
fn changed_printk_constant_is_a_change() {
    // Looks like a moved __LINE__, but the diff did not move line 7 to line 8.
    let orig =
        format!("{PRELUDE}int f(int x) {{ if (ext(x)) _printk(\"v%d\\n\", 7); return x; }}\n");
    let patched =
        format!("{PRELUDE}int f(int x) {{ if (ext(x)) _printk(\"v%d\\n\", 8); return x; }}\n");
    let d = diff(&orig, &patched);
    assert_eq!(d.changed, vec!["f"]);
}

#[test]
fn relocation_target_change_is_a_change() {
    // Same bytes, different callee.
    let orig = format!("{PRELUDE}int f(int x) {{ return ext_a(x) + 1; }}\n");
    let patched = format!("{PRELUDE}int f(int x) {{ return ext_b(x) + 1; }}\n");
    let d = diff(&orig, &patched);
    assert_eq!(d.changed, vec!["f"]);
    assert!(d.external.contains(&"ext_b".to_string()));
}

#[test]
fn new_function_is_included() {
    let orig = format!("{PRELUDE}int f(int x) {{ return ext(x) + 1; }}\n");
    let patched = format!(
        "{PRELUDE}static int __attribute__((noinline)) twice(int x) {{ return ext(x) * 2; }}\n\
         int f(int x) {{ return twice(x) + 1; }}\n"
    );
    let d = diff(&orig, &patched);
    assert_eq!(d.changed, vec!["f"]);
    assert_eq!(d.new_functions.len(), 1);
    assert!(d.new_functions[0].starts_with("twice"));
    assert!(
        d.included.iter().any(|s| s.starts_with("twice")),
        "{:?}",
        d.included
    );
    assert!(d.object.is_some());
}

#[test]
fn string_literals_and_special_statics_travel_with_the_code() {
    let orig =
        format!("{PRELUDE}int f(int x) {{ return _printk(\"%s: one %d\\n\", __func__, x); }}\n");
    let patched =
        format!("{PRELUDE}int f(int x) {{ return _printk(\"%s: two %d\\n\", __func__, x); }}\n");
    let d = diff(&orig, &patched);
    assert_eq!(d.changed, vec!["f"]);
    // The string section and a fresh __func__ copy are included; nothing resolves them
    // in the kernel.
    assert!(
        d.included.iter().any(|s| s.contains(".str")),
        "{:?}",
        d.included
    );
    assert!(!d.external.iter().any(|s| s.starts_with("__func__")));
    let object = d.object.as_ref().unwrap();
    assert!(object.windows(7).any(|w| w == b"two %d\n"));
}

#[test]
fn changed_data_size_is_refused() {
    let orig = format!("{PRELUDE}int table[4];\nint f(int i) {{ return table[i & 3]; }}\n");
    let patched = format!("{PRELUDE}int table[8];\nint f(int i) {{ return table[i & 7]; }}\n");
    let d = diff(&orig, &patched);
    assert!(
        d.refusals.iter().any(|r| matches!(
            r,
            Refusal::DataLayout { symbol, old: 16, new: 32, .. } if symbol == "table"
        )),
        "{:?}",
        d.refusals
    );
    let text = d.refusals[0].to_string();
    assert!(text.contains("data-transfer"), "{text}");
    assert!(d.object.is_none());
}

#[test]
fn changed_initial_value_is_refused() {
    let orig = format!("{PRELUDE}int limit = 4;\nint f(int i) {{ return i < limit; }}\n");
    let patched = format!("{PRELUDE}int limit = 5;\nint f(int i) {{ return i < limit; }}\n");
    let d = diff(&orig, &patched);
    assert!(matches!(&d.refusals[..], [Refusal::DataInit { symbol, .. }] if symbol == "limit"));
}

/// Changed read-only data is rewritten in place, even when only code reads it: its readers
/// then need not be replaced, and a pointer to it stored at boot sees the new content too.
#[test]
fn changed_static_rodata_is_rewritten_for_its_readers() {
    let orig = format!(
        "{PRELUDE}static const int steps[4] = {{1, 2, 3, 4}};\n\
         int f(int i) {{ return steps[ext(i) & 3]; }}\n"
    );
    let patched = orig.replace("{1, 2, 3, 4}", "{1, 2, 3, 5}");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.rewritten, vec!["steps"]);
    assert!(d.redirected.is_empty(), "{:?}", d.redirected);
}

/// A global ops table that now points to a new function: other files use the live table,
/// so it is rewritten in place (its new content linked from the bundle), not refused.
#[test]
fn a_changed_global_ops_table_is_rewritten_in_place() {
    let orig = format!(
        "{PRELUDE}struct ops {{ int (*f)(int); int v; }};\n\
         int a(int x) {{ return ext(x); }}\n\
         const struct ops my_ops = {{ .f = a, .v = 1 }};\n"
    );
    let patched = orig.replace(
        "const struct ops my_ops = { .f = a, .v = 1 };",
        "int b(int x) { return ext(x + 1); }\nconst struct ops my_ops = { .f = b, .v = 1 };",
    );
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.rewritten, vec!["my_ops"]);
    assert!(d.included.iter().any(|s| s == "b"), "{:?}", d.included);
    assert!(
        d.included.iter().any(|s| s == "my_ops.lucos_rewrite"),
        "{:?}",
        d.included
    );
    assert!(d.object.is_some());
}

/// Local read-only data that other data points to: a copy would not reach the pointer, so
/// it is rewritten in place too; the data pointing to it is left alone.
#[test]
fn changed_rodata_pointed_to_by_data_is_rewritten_in_place() {
    let orig = format!(
        "{PRELUDE}static const int steps[4] = {{1, 2, 3, 4}};\n\
         const int *const table[1] = {{ steps }};\n\
         int f(int i) {{ return table[0][ext(i) & 3]; }}\n"
    );
    let patched = orig.replace("{1, 2, 3, 4}", "{1, 2, 3, 5}");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.rewritten, vec!["steps"]);
    assert!(
        d.redirected.is_empty(),
        "no code changed: {:?}",
        d.redirected
    );
}

/// BTF ID entries are named with `__COUNTER__` and `__LINE__` pasted in, so a diff that
/// moves lines renames them; they match by their order, and a table pointing to one is
/// unchanged.
#[test]
fn renamed_btf_id_entries_are_the_same_entries() {
    let entry = |n: u32| {
        format!(
            "asm(\".pushsection .BTF_ids,\\\"a\\\"\\n.local __BTF_ID__struct__foo__{n}\\n\\
             .type __BTF_ID__struct__foo__{n}, @object\\n.size __BTF_ID__struct__foo__{n}, 4\\n\\
             __BTF_ID__struct__foo__{n}:\\n.zero 4\\n.popsection\");\n\
             extern unsigned int __BTF_ID__struct__foo__{n};\n\
             const struct {{ unsigned int *id; int (*f)(int); }} foo_ops = {{ &__BTF_ID__struct__foo__{n}, ext }};\n"
        )
    };
    let orig = format!("{PRELUDE}{}", entry(1234));
    let patched = format!("{PRELUDE}\n\n{}", entry(5678));
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert!(
        d.rewritten.is_empty(),
        "a renamed BTF ID is not a change: {:?}",
        d.rewritten
    );
}

#[test]
fn init_changes_are_not_applicable_and_the_rest_builds() {
    let orig = format!(
        "{PRELUDE}__attribute__((__section__(\".init.text\"))) int setup(int x) {{ return ext(x); }}\n\
         __attribute__((__section__(\".init.data\"))) int boot_limit = 4;\n\
         int f(int x) {{ return ext(x); }}\n"
    );
    let patched = orig
        .replace("return ext(x); }", "return ext(x + 1); }")
        .replace("boot_limit = 4", "boot_limit = 5");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    let mut na = d.not_applicable.clone();
    na.sort();
    assert_eq!(na, vec!["boot_limit", "setup"]);
    assert_eq!(d.redirected, vec!["f"]);
    assert!(!d.included.iter().any(|s| s == "setup"), "{:?}", d.included);
}

/// Without vmlinux the comparison cannot tell whether an entry takes a jmp: a function
/// without fentry site is planned as a redirect, which the build's emit step then checks
/// against vmlinux (`lucos_patch::entry`) and refuses as `NoFentry` if its entry is unsafe.
#[test]
fn notrace_functions_are_redirected_at_their_entry() {
    let orig = format!(
        "{PRELUDE}__attribute__((no_instrument_function)) int quiet(int x) {{ return ext(x); }}\n"
    );
    let patched = orig.replace("ext(x)", "ext(x + 1)");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.redirected, vec!["quiet"]);
}

#[test]
fn exception_table_entries_travel_with_their_function_only() {
    use object::{Object, ObjectSection, ObjectSymbol};
    let fixup = "asm volatile(\"1: nop\\n.pushsection __ex_table,\\\"a\\\"\\n\
                 .long 1b - .\\n.long 1b - .\\n.long 0\\n.popsection\");";
    // g has an entry too, but is unchanged: its entry stays in the kernel's table.
    let orig = format!(
        "{PRELUDE}int g(int x) {{ {fixup} return ext_a(x); }}\n\
         int f(int x) {{ {fixup} return ext(x); }}\n"
    );
    let patched = orig.replace("ext(x)", "ext(x + 1)");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.changed, vec!["f"]);
    let obj = object::File::parse(&d.object.as_ref().unwrap()[..]).unwrap();
    let ex = obj
        .section_by_name("__ex_table")
        .expect("an __ex_table section");
    assert_eq!(ex.size(), 12, "exactly f's entry");
    let targets: Vec<String> = ex
        .relocations()
        .map(|(_, r)| match r.target() {
            object::RelocationTarget::Symbol(i) => {
                obj.symbol_by_index(i).unwrap().name().unwrap().to_string()
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(targets, ["f", "f"], "both fields point into f");
}

#[test]
fn jump_label_entries_travel_with_their_key_as_a_kernel_symbol() {
    use object::{Object, ObjectSection, ObjectSymbol};
    let site = "asm goto(\"1: jmp %l[l]\\n.pushsection __jump_table,\\\"aw\\\"\\n\
                .long 1b - .\\n.long %l[l] - .\\n.quad some_key + 1 - .\\n.popsection\" : : : : l);";
    let orig = format!(
        "{PRELUDE}extern int some_key;\nint f(int x) {{ {site} return ext(x); l: return 0; }}\n"
    );
    let patched = orig.replace("ext(x)", "ext(x + 1)");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert!(
        d.external.iter().any(|e| e == "some_key"),
        "{:?}",
        d.external
    );
    let obj = object::File::parse(&d.object.as_ref().unwrap()[..]).unwrap();
    let jt = obj
        .section_by_name("__jump_table")
        .expect("a __jump_table section");
    assert_eq!(jt.size(), 16);
    let key = jt
        .relocations()
        .find(|(off, _)| *off == 8)
        .map(|(_, r)| match r.target() {
            object::RelocationTarget::Symbol(i) => (
                obj.symbol_by_index(i).unwrap().name().unwrap().to_string(),
                r.addend(),
            ),
            other => (format!("{other:?}"), 0),
        });
    assert_eq!(
        key,
        Some(("some_key".to_string(), 1)),
        "the key and its branch bit"
    );
}

#[test]
fn cold_parts_go_with_their_parent() {
    let src = |k: u32| {
        format!(
            "{PRELUDE}extern void __attribute__((cold)) report(int);\n\
             int g(int x) {{ int r = 0; for (int i = 0; i < x; i++) {{ r += ext(i);\n\
             if (r > 1000) {{ report(r); _printk(\"r=%d i=%d\\n\", r, i); r = ext(r) * {k} + ext(i); }} }}\n\
             return r; }}\n"
        )
    };
    let d = diff(&src(3), &src(5));
    // The change is in the cold part; the parent is what gets redirected, and the cold
    // part (which jumps back into its parent) is copied with it.
    assert_eq!(d.redirected, vec!["g"]);
    assert!(d.included.iter().any(|s| s == "g.cold"), "{:?}", d.included);
}

#[test]
fn fentry_less_static_is_replaced_through_its_callers() {
    // Kernel `inline` implies notrace; an out-of-line copy has no fentry site.
    let orig = format!(
        "{PRELUDE}static __attribute__((noinline, no_instrument_function)) int body(int x) {{ return ext(x) + 1; }}\n\
         int caller1(int x) {{ return body(x) * 2; }}\n\
         int caller2(int x) {{ return body(x + 1) * 3; }}\n\
         int other(int x) {{ return ext(x); }}\n"
    );
    let patched = orig.replace("ext(x) + 1", "ext(x) + 2");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    let mut redirected = d.redirected.clone();
    redirected.sort();
    assert_eq!(redirected, vec!["caller1", "caller2"]);
    assert!(
        d.included.iter().any(|s| s.starts_with("body")),
        "{:?}",
        d.included
    );
}

#[test]
fn fentry_less_static_with_its_address_taken_is_redirected_at_its_entry() {
    // Replacing its callers would miss the calls through `hook`: the static itself is
    // redirected, at its entry.
    let orig = format!(
        "{PRELUDE}static __attribute__((noinline, no_instrument_function)) int body(int x) {{ return ext(x) + 1; }}\n\
         int (*hook)(int) = body;\n\
         int caller1(int x) {{ return body(x) * 2; }}\n"
    );
    let patched = orig.replace("ext(x) + 1", "ext(x) + 2");
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert!(
        matches!(&d.redirected[..], [f] if f.starts_with("body")),
        "{:?}",
        d.redirected
    );
}

#[test]
fn function_scope_statics_that_cannot_be_told_apart_are_refused() {
    // Both users of a `calls` static are renamed, so no user matches them: the patched
    // statics could be either live one. Taking them as new would silently reset the counts.
    let body = |f: &str, g: &str| {
        format!(
            "{PRELUDE}int __attribute__((noinline)) {f}(int x) {{ static int calls; calls += x; return calls; }}\n\
             int __attribute__((noinline)) {g}(int x) {{ static int calls; calls++; return calls; }}\n\
             int h(int x) {{ return {f}(x) + {g}(x); }}\n"
        )
    };
    let d = diff(&body("f", "g"), &body("f_new", "g_new"));
    let text: Vec<String> = d.refusals.iter().map(|r| r.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("cannot tell apart") && t.contains("calls")),
        "{text:?}"
    );
    assert!(d.object.is_none());
}

/// A new `EXPORT_SYMBOL` (an entry in section `___ksymtab+f`) is no refusal: the bundle's
/// module exports it, with the kernel's own `f`, or with a new function the bundle carries.
#[test]
fn a_new_export_travels_with_the_bundle() {
    let export = |f: &str| {
        format!(
            "static const void *__ksymtab_{f} __attribute__((section(\"___ksymtab+{f}\"), used)) \
             = {f};\n"
        )
    };
    let orig = format!("{PRELUDE}int f(int x) {{ return ext(x) + 1; }}\n");
    let patched = format!(
        "{PRELUDE}int f(int x) {{ return ext(x) + 2; }}\n{}\
         int g(int x) {{ return ext(x) * 3; }}\n{}",
        export("f"),
        export("g")
    );
    let d = diff(&orig, &patched);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.exports, vec!["f", "g"]);
    assert_eq!(d.redirected, vec!["f"]);
    assert!(d.included.contains(&"g".to_string()), "{:?}", d.included);
    // An export that was there before is no new one.
    let d = diff(&patched, &patched.replace("+ 2", "+ 3"));
    assert!(d.refusals.is_empty() && d.exports.is_empty(), "{d:?}");
}

/// A member wrapped in an anonymous union with a same-size alias keeps every byte where it
/// was (6.1.190's `struct dst_entry`: `dev` became `union { dev; dev_rcu; }`); an overlay of
/// another size does not.
#[test]
fn a_member_wrapped_in_a_union_with_an_alias_keeps_its_layout() {
    let src = |t: &str, k: i32| {
        format!(
            "{PRELUDE}struct box {{ int a; {t}; long b; }};\n\
             int get(struct box *p) {{ return ext(p->a) + {k} + (p->dev != 0) + (int)p->b; }}\n"
        )
    };
    let old = src("void *dev", 1);
    let d = diff_with(
        &old,
        &src("union { void *dev; void *dev_rcu; }", 2),
        &["-g"],
    );
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.redirected, vec!["get"]);
    let d = diff_with(&old, &src("union { void *dev; int half; }", 2), &["-g"]);
    assert!(
        matches!(&d.refusals[..], [Refusal::TypeLayout { type_name, .. }] if type_name == "struct box"),
        "{:?}",
        d.refusals
    );
    // A nested anonymous struct with the same members at the same places is no change either.
    let d = diff_with(&old, &src("struct { void *dev; }", 2), &["-g"]);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
}

/// A type the file declares and only frames hold (as `struct lb_env` of kernel/sched/fair.c)
/// may change layout: no object of it outlives the call that made it, so the bundle only
/// asks for a consistent switch. Any other place that could keep one is refused by name.
#[test]
fn a_type_only_frames_hold_may_change_layout() {
    let src = |member: &str, extra: &str| {
        format!(
            "{PRELUDE}struct env {{ int a; {member} long b; }};\n{extra}\n\
             static __attribute__((noinline)) int helper(struct env *e)\n\
             {{ return ext(e->a) + (int)e->b; }}\n\
             int owner(int x) {{ struct env e = {{ .a = x, .b = ext(x) }}; return helper(&e); }}\n"
        )
    };
    let d = diff_with(&src("", ""), &src("int pad;", ""), &["-g"]);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.frame_types, vec!["struct env"]);
    assert!(d.redirected.contains(&"owner".to_string()), "{d:?}");

    let kept_elsewhere = [
        ("struct env *saved;", "variable `saved`"),
        (
            "struct holder { struct env *e; }; struct holder held;",
            "member `e`",
        ),
        (
            "int peek(void *p) { struct env *e = p; return ext(e->a); }",
            "local variable `e` of `peek`",
        ),
        (
            "struct env *make(void *p) { return p; }",
            "`make` returns a pointer",
        ),
    ];
    for (extra, why) in kept_elsewhere {
        let d = diff_with(&src("", extra), &src("int pad;", extra), &["-g"]);
        assert!(d.frame_types.is_empty(), "{extra}: {:?}", d.frame_types);
        let [Refusal::TypeLayout { lives, .. }] = &d.refusals[..] else {
            panic!("{extra}: expected one layout refusal, got {:?}", d.refusals);
        };
        assert!(lives.contains(why), "{extra}: {lives}");
    }
    // A header's type may be named by objects this build does not compile.
    let header = |member: &str| {
        src(member, "")
            .replacen("struct env", "\n#line 1 \"t.h\"\nstruct env", 1)
            .replacen("};\n", "};\n#line 20 \"t.c\"\n", 1)
    };
    let d = diff_with(&header(""), &header("int pad;"), &["-g"]);
    let [Refusal::TypeLayout { lives, .. }] = &d.refusals[..] else {
        panic!("expected one layout refusal, got {:?}", d.refusals);
    };
    assert!(
        lives.contains("t.h, which other objects may include"),
        "{lives}"
    );
}

/// `NL_SET_ERR_MSG`'s `static const char __msg[]` strings are numbered in order, so a new
/// message renumbers the others (net/sched/act_api.c in 6.1.190). They hold no state: each
/// replaced function carries its own copies instead of being paired with strings of other
/// sizes, which was refused as a data size change.
#[test]
fn extack_messages_travel_with_their_function() {
    let src = |first: &str| {
        format!(
            "{PRELUDE}struct ext {{ const char *msg; }};\n\
             #define MSG(e, m) do {{ static const char __msg[] = m; (e)->msg = __msg; }} while (0)\n\
             int check(struct ext *e, int x) {{\n\
             {first}\
             if (x == 1) {{ MSG(e, \"a short one\"); return -1; }}\n\
             if (x == 2) {{ MSG(e, \"a message of another length\"); return -2; }}\n\
             return ext(x); }}\n"
        )
    };
    let d = diff(
        &src(""),
        &src("if (x == 3) { MSG(e, \"new\"); return -3; }\n"),
    );
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.redirected, vec!["check"]);
    let copies = d
        .included
        .iter()
        .filter(|n| n.starts_with("__msg."))
        .count();
    assert_eq!(copies, 3, "{:?}", d.included);
    assert!(
        d.rewritten.is_empty(),
        "live strings rewritten: {:?}",
        d.rewritten
    );
}

/// `static_cpu_has()` puts its run-time test in `.altinstr_aux`, one for each use, and each
/// jumps back into its user. The section travels whole, so the test of an `__init` user
/// (arch/x86/mm/pkeys.c's `create_init_pkru_value`) came along and was refused as a
/// reference to freed code. Only that user's own site leads there: the bundle points its
/// jumps at a `ud2` trap instead, and the rest builds.
#[test]
fn an_init_functions_cpu_feature_test_is_dead_code_in_a_bundle() {
    let src = |k: i32| {
        format!(
            "{PRELUDE}extern char ext_flag;\n\
             static inline __attribute__((always_inline)) int has(void) {{\n\
             asm goto(\"jmp 6f\\n\\t.pushsection .altinstr_aux,\\\"ax\\\"\\n\"\n\
             \"6: testb $1, ext_flag(%%rip)\\n\\tjnz %l[yes]\\n\\tjmp %l[no]\\n\\t.popsection\"\n\
             : : : : yes, no);\n\
             yes: return 1;\n no: return 0; }}\n\
             __attribute__((section(\".init.text\"))) int boot_f(void) {{ return has() + ext(1); }}\n\
             int run_f(int x) {{ return has() ? ext(x) : {k}; }}\n"
        )
    };
    let d = diff(&src(1), &src(2));
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.redirected, vec!["run_f"]);
    use object::{Object, ObjectSection, ObjectSymbol};
    let bytes = d.object.as_deref().expect("a bundle object");
    let o = object::File::parse(bytes).unwrap();
    let trap = o
        .section_by_name(".text.lucos_unreachable")
        .expect("a trap");
    assert_eq!(trap.data().unwrap(), [0x0f, 0x0b]);
    let aux = o
        .section_by_name(".altinstr_aux")
        .expect("the tests travel");
    let to_trap = aux
        .relocations()
        .filter(|(_, r)| match r.target() {
            object::RelocationTarget::Symbol(i) => {
                o.symbol_by_index(i).ok().and_then(|s| s.section_index()) == Some(trap.index())
            }
            _ => false,
        })
        .count();
    assert_eq!(to_trap, 2, "the init user's jnz and jmp");
}
