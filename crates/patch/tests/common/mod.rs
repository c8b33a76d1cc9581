//! Helpers shared by the integration tests: build objects with gcc/gas like Kbuild would.
#![allow(dead_code)]

pub mod fake;
pub mod kernel;
pub mod switch;

use std::path::Path;
use std::process::Command;

use lucos_patch::{pack, Bundle, Manifest, Replacement, Target, NOP5};

/// The flags that matter for kernel code: kernel code model, fentry with mcount records, one section per
/// function and object.
pub const KERNEL_CFLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-mcmodel=kernel",
    "-fno-pic",
    "-mno-red-zone",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-common",
];

fn run_gcc(dir: &Path, src_name: &str, src: &str, flags: &[&str]) -> Vec<u8> {
    let src_path = dir.join(src_name);
    let obj = dir.join("out.o");
    std::fs::write(&src_path, src).unwrap();
    let out = Command::new("gcc")
        .args(flags)
        .arg(&src_path)
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("gcc is required for these tests (apt-get install gcc)");
    assert!(
        out.status.success(),
        "gcc failed:\n{}\nsource:\n{src}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(obj).unwrap()
}

/// Compiles C with [`KERNEL_CFLAGS`] plus `extra`.
pub fn compile_c(src: &str, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = KERNEL_CFLAGS.to_vec();
    flags.extend_from_slice(extra);
    run_gcc(dir.path(), "t.c", src, &flags)
}

/// Assembles GNU as source.
pub fn assemble(src: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    run_gcc(dir.path(), "t.s", src, &["-c"])
}

/// A valid manifest replacing `old_<new>` by each `new`.
pub fn manifest(news: &[&str]) -> Manifest {
    let mut expect = NOP5.to_vec();
    expect.push(0x55);
    Manifest {
        format: 1,
        id: "test-bundle".into(),
        description: "made by tests".into(),
        target: Target {
            build_id: "0123456789abcdef0123456789abcdef01234567".into(),
            release: "6.1.0".into(),
        },
        replacements: news
            .iter()
            .map(|n| Replacement {
                old: format!("old_{n}"),
                old_file: None,
                module: None,
                new: n.to_string(),
                site_offset: 0,
                no_fentry: false,
                expect: expect.clone(),
                expect_abs: vec![],
            })
            .collect(),
        resolve: Default::default(),
        aliases: Default::default(),
        rewrites: Vec::new(),
        frame_types: Vec::new(),
        exports: Vec::new(),
        zeroed: Vec::new(),
        prototypes: Vec::new(),
    }
}

/// Packs `object` with a manifest replacing `news` and parses the result.
pub fn bundle(object: &[u8], news: &[&str]) -> Bundle {
    let bytes = pack(object, &manifest(news)).unwrap();
    Bundle::parse(&bytes).unwrap()
}

/// Runs a binutils tool on `bytes`; returns (success, stdout, stderr).
pub fn binutils(tool: &str, args: &[&str], bytes: &[u8]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.o");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new(tool)
        .args(args)
        .arg(&path)
        .output()
        .expect("binutils is required for these tests");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh signing key and a trust store that trusts it as `test`.
pub fn trusted_key() -> (
    tempfile::TempDir,
    lucos_patch::TrustStore,
    ed25519_dalek::SigningKey,
) {
    let dir = tempfile::tempdir().unwrap();
    let key = lucos_patch::trust::create_key(&dir.path().join("key")).unwrap();
    let mut trust = lucos_patch::TrustStore::load(&dir.path().join("trusted")).unwrap();
    trust.add("test", &key.verifying_key().to_bytes()).unwrap();
    (dir, trust, key)
}
