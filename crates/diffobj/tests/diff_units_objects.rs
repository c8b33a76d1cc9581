//! Object-level checks on small objects compiled here from C snippets (helpers in
//! `units/`): new exports, type layouts (aliases, frame-local types), statics that travel
//! with their function, and `.altinstr_aux` code of `__init` users.

mod units;

use units::*;

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

/// A `void *` given typed names over its bytes keeps the layout (6.1.190's `struct
/// devlink_port`: `type_dev` became a union of `type_eth.netdev` and `type_ib.ibdev`);
/// a new name that is not a pointer, or an old name that stays elsewhere, does not.
#[test]
fn a_pointer_given_typed_names_keeps_its_layout() {
    let src = |t: &str, use_: &str| {
        format!(
            "{PRELUDE}struct nd; struct ib;\n\
             struct port {{ int a; {t}; long b; }};\n\
             int get(struct port *p) {{ return ext(p->a) + ({use_} != 0) * 3 + (int)p->b; }}\n"
        )
    };
    let old = src("void *type_dev", "p->type_dev").replace(" * 3", "");
    let typed =
        "union { struct { struct nd *netdev; } type_eth; struct { struct ib *ibdev; } type_ib; }";
    let d = diff_with(&old, &src(typed, "p->type_eth.netdev"), &["-g"]);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.redirected, vec!["get"]);
    let refused = |new: &str| {
        let d = diff_with(&old, &src(new, "p->a"), &["-g"]);
        assert!(
            matches!(&d.refusals[..], [Refusal::TypeLayout { type_name, .. }] if type_name == "struct port"),
            "{new}: {:?}",
            d.refusals
        );
    };
    refused("union { struct { struct nd *netdev; } type_eth; long count; }");
    refused("union { struct { struct nd *netdev; int x; } type_eth; void *type_ib; }");
    refused("union { struct { struct nd *netdev; } type_eth; void *type_dev; } u");
}

/// A replaced function whose parameters change is refused: the running kernel's callers
/// (here `caller` in another file, or anyone holding its address) pass the old ones
/// (6.1.190's `tcp_v4_syn_recv_sock` gained a seventh, read from the old caller's stack).
/// A change of body only is not.
#[test]
fn a_changed_prototype_is_refused() {
    let src = |params: &str, body: &str| {
        format!("{PRELUDE}int recv_sock(int a, int b{params}) {{ return ext(a) + b{body}; }}\n")
    };
    let d = diff_with(
        &src("", ""),
        &src(", void (*init)(int)", "+ (init ? 1 : 0)"),
        &["-g"],
    );
    let [Refusal::Prototype { function, what, .. }] = &d.refusals[..] else {
        panic!("expected one prototype refusal, got {:?}", d.refusals);
    };
    assert_eq!(function, "recv_sock");
    assert_eq!(what, "(4, 4) -> 4 became (4, 4, 8) -> 4");
    let d = diff_with(&src("", ""), &src("", "+ 1"), &["-g"]);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);

    // A static helper whose callers all change with it builds, for consistent switches;
    // one whose address is taken (callers could be anywhere) does not.
    let helper = |params: &str, args: &str, extra: &str| {
        format!(
            "{PRELUDE}static __attribute__((noipa)) int helper(int a{params}) {{ return ext(a){}; }}\n\
             int caller(int x) {{ return helper(x{args}) + 1; }}\n{extra}",
            if params.is_empty() { "" } else { " + b" }
        )
    };
    let d = diff_with(&helper("", "", ""), &helper(", int b", ", 2", ""), &["-g"]);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.prototypes, vec!["helper"]);
    assert!(d.redirected.contains(&"caller".to_string()), "{d:?}");
    // A caller the new code no longer has (6.1.190 folds `devlink_port_notify` into a
    // new `__devlink_port_notify`) is fine when all of its own callers are replaced.
    let via = |params: &str, args: &str| {
        let mid = "static __attribute__((noipa)) int mid(int x) { return helper(x) * 2; }\n";
        let call = if params.is_empty() {
            "mid(x)"
        } else {
            "helper(x, 2) * 2"
        };
        format!(
            "{PRELUDE}static __attribute__((noipa)) int helper(int a{params}) {{ return ext(a){}; }}\n\
             {}int caller(int x) {{ return {call} + 1; }}\n",
            if params.is_empty() { "" } else { " + b" },
            if params.is_empty() { mid } else { "" },
        )
        .replace("{args}", args)
    };
    let d = diff_with(&via("", ""), &via(", int b", ""), &["-g"]);
    assert!(d.refusals.is_empty(), "{:?}", d.refusals);
    assert_eq!(d.prototypes, vec!["helper"]);
    let taken = "int (*hook)(int) = 0; void *where(void) { return (void *)helper; }\n";
    let d = diff_with(
        &helper("", "", taken),
        &helper(", int b", ", 2", &taken.replace("(int)", "(int, int)")),
        &["-g"],
    );
    assert!(
        matches!(&d.refusals[..], [Refusal::Prototype { function, .. }] if function == "helper"),
        "{:?}",
        d.refusals
    );
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
