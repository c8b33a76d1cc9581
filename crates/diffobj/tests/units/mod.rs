//! Helpers of the `diff_units*` tests: C snippets compiled here with kernel-like flags
//! (`-O2 -ffunction-sections -fdata-sections -mcmodel=kernel -pg -mfentry`), compared as
//! `lucos build` compares objects; every object diff that yields code is packed into a
//! bundle and checked with lucos's own parser and linker planner.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub use lucos_diffobj::diff::{compare_objects, parse_diff, ObjectDiff, Refusal};
use lucos_patch::{Bundle, Manifest, Replacement, Target, FORMAT_VERSION, NOP5};

pub const FLAGS: &[&str] = &[
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

pub fn cc(dir: &Path, name: &str, src: &str, extra: &[&str]) -> Vec<u8> {
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
pub fn diff(orig: &str, patched: &str) -> ObjectDiff {
    diff_with(orig, patched, &[])
}

/// [`diff`] with extra compiler flags (`-g`: type layouts are compared from DWARF).
pub fn diff_with(orig: &str, patched: &str, extra: &[&str]) -> ObjectDiff {
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
pub fn check_bundle(object: &[u8], d: &ObjectDiff) {
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
                fields: Vec::new(),
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
        zeroed: Vec::new(),
        prototypes: Vec::new(),
    };
    let bundle = lucos_patch::pack(object, &manifest).expect("pack");
    let parsed = Bundle::parse(&bundle).expect("bundle parses");
    lucos_patch::plan(&parsed).expect("bundle plans");
}

pub const PRELUDE: &str = "extern int _printk(const char *fmt, ...);\n\
                       extern int __warn_printk(const char *fmt, ...);\n\
                       extern int ext(int);\n\
                       extern int ext_a(int);\n\
                       extern int ext_b(int);\n";
