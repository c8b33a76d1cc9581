//! Correlation and comparison on small objects compiled here from C snippets with kernel-like
//! flags (helpers in `units/`). Object-level checks (type layouts, exports, special statics
//! and sections) are in `diff_units_objects.rs`.

mod units;

use units::*;

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

/// Writable data whose initial value changes is rewritten in place, only in the bytes that
/// change (the engine checks they still hold the old initial value): the other fields,
/// relocated or not, hold live state and are left alone.
#[test]
fn changed_initial_value_is_rewritten_in_its_changed_fields() {
    let src = |limit: &str, extra: &str| {
        format!(
            "{PRELUDE}struct knob {{ const char *name; int min; int max; void *extra; }};\n\
             int one = 1, other = 4096;\n\
             struct knob knob = {{ \"k\", {limit}, 9, {extra} }};\n\
             int f(int i) {{ return i < knob.min; }}\n"
        )
    };
    let d = diff(&src("4", "&one"), &src("5", "&one"));
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.rewritten, vec!["knob"]);
    assert_eq!(d.rewritten_fields, vec![("knob".to_string(), vec![(8, 1)])]);
    // A pointer that now names another object is a changed field too, all 8 bytes.
    let d = diff(&src("4", "&one"), &src("4", "&other"));
    assert_eq!(
        d.rewritten_fields,
        vec![("knob".to_string(), vec![(16, 8)])]
    );
    // A field relocated in one compile only means something else: refused.
    let d = diff(&src("4", "&one"), &src("4", "0"));
    assert!(
        matches!(&d.refusals[..], [Refusal::DataInit { symbol, .. }] if symbol == "knob"),
        "{:?}",
        d.refusals
    );
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
