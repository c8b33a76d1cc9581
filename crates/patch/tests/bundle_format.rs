mod common;

use common::{assemble, binutils, bundle, compile_c, manifest};
use lucos_patch::{
    link, pack, plan, AbsField, Bundle, BundleError, Manifest, Regions, ENDBR64, MANIFEST_SECTION,
    NOP5,
};

const SRC: &str = r#"
extern int printk(const char *fmt, ...);
static int counter;
int shared_table[4] = { 1, 2, 3, 4 };
int lucos_new(int x) { counter++; printk("hi %d\n", x); return counter + shared_table[x & 3]; }
int lucos_other(int x) { return x + 1; }
"#;

fn object() -> Vec<u8> {
    compile_c(SRC, &[])
}

#[test]
fn pack_parse_round_trip_and_replace() {
    let obj = object();
    let m = manifest(&["lucos_new"]);
    let packed = pack(&obj, &m).unwrap();
    let b = Bundle::parse(&packed).unwrap();
    assert_eq!(b.manifest(), &m);

    // binutils accept the rewritten object and see exactly one non-alloc manifest section.
    let (ok, out, err) = binutils("readelf", &["-SW"], &packed);
    assert!(
        ok && !err.contains("Warning") && !err.contains("Error"),
        "{err}"
    );
    let line = out.lines().find(|l| l.contains(MANIFEST_SECTION)).unwrap();
    assert!(line.contains("PROGBITS"), "{line}");
    assert_eq!(out.matches(MANIFEST_SECTION).count(), 1);
    let (ok, _, err) = binutils("objdump", &["-dr"], &packed);
    assert!(ok && err.is_empty(), "{err}");

    // Packing again replaces the manifest instead of adding a second one.
    let mut m2 = m.clone();
    m2.id = "second".into();
    m2.replacements
        .push(manifest(&["lucos_other"]).replacements.remove(0));
    let repacked = pack(&packed, &m2).unwrap();
    assert_eq!(Bundle::parse(&repacked).unwrap().manifest(), &m2);
    let (_, out, _) = binutils("readelf", &["-SW"], &repacked);
    assert_eq!(out.matches(MANIFEST_SECTION).count(), 1);

    // Section indices are untouched, so the linker sees the same layout.
    let p1 = plan(&b).unwrap();
    let p2 = plan(&Bundle::parse(&repacked).unwrap()).unwrap();
    assert_eq!(p1.text, p2.text);
    assert_eq!(p1.data, p2.data);
}

#[test]
fn objcopy_and_assembler_manifests_are_accepted() {
    // What a Kbuild recipe would do with objcopy.
    let obj = object();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("m.json");
    let o = dir.path().join("o.o");
    std::fs::write(&json, manifest(&["lucos_new"]).to_json().unwrap()).unwrap();
    std::fs::write(&o, &obj).unwrap();
    let status = std::process::Command::new("objcopy")
        .arg("--add-section")
        .arg(format!("{MANIFEST_SECTION}={}", json.display()))
        .args([
            "--set-section-flags",
            &format!("{MANIFEST_SECTION}=readonly"),
        ])
        .arg(&o)
        .status()
        .unwrap();
    assert!(status.success());
    let b = Bundle::parse(&std::fs::read(&o).unwrap()).unwrap();
    assert_eq!(b.manifest().id, "test-bundle");

    // Embedded from assembly as a NUL-terminated string.
    let text = String::from_utf8(manifest(&["f"]).to_json().unwrap()).unwrap();
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let asm = format!(
        ".text\n.globl f\n.type f,@function\nf: ret\n.size f,.-f\n\
         .section {MANIFEST_SECTION},\"\",@progbits\n.asciz \"{escaped}\"\n"
    );
    assert_eq!(
        Bundle::parse(&assemble(&asm)).unwrap().manifest().id,
        "test-bundle"
    );

    // ... but not as an allocated section, which would be loaded.
    let asm = asm.replace(
        &format!("{MANIFEST_SECTION},\"\""),
        &format!("{MANIFEST_SECTION},\"a\""),
    );
    let err = Bundle::parse(&assemble(&asm)).unwrap_err();
    assert!(
        matches!(err, BundleError::BadManifestSection { .. }),
        "{err}"
    );
}

#[test]
fn not_a_bundle() {
    assert!(matches!(Bundle::parse(b"hello"), Err(BundleError::NotElf)));
    assert!(matches!(Bundle::parse(&[]), Err(BundleError::NotElf)));
    let obj = object();
    let err = Bundle::parse(&obj).unwrap_err();
    assert!(matches!(err, BundleError::NoManifest), "{err}");
    assert!(err.to_string().contains("pack"), "{err}");

    let packed = pack(&obj, &manifest(&["lucos_new"])).unwrap();
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = packed.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        Bundle::parse(&b).unwrap_err()
    };
    assert!(matches!(patched(4, &[1]), BundleError::WrongFormat { .. })); // ELFCLASS32
    assert!(matches!(patched(5, &[2]), BundleError::WrongFormat { .. })); // big-endian
    let e = patched(16, &[2, 0]); // ET_EXEC
    assert!(e.to_string().contains("ET_REL"), "{e}");
    let e = patched(18, &[3, 0]); // EM_386
    assert!(e.to_string().contains("EM_X86_64"), "{e}");
}

fn packs_with(obj: &[u8], edit: impl FnOnce(&mut Manifest)) -> Result<Vec<u8>, BundleError> {
    let mut m = manifest(&["lucos_new"]);
    edit(&mut m);
    pack(obj, &m)
}

fn field_of(e: BundleError) -> String {
    match e {
        BundleError::InvalidManifest { field, .. } => field,
        other => panic!("expected InvalidManifest, got {other:?}: {other}"),
    }
}

#[test]
fn manifest_validation() {
    let obj = object();
    let f = |edit: fn(&mut Manifest)| packs_with(&obj, edit).unwrap_err();

    assert!(matches!(
        f(|m| m.format = 2),
        BundleError::UnsupportedFormat { found: 2 }
    ));
    assert_eq!(field_of(f(|m| m.id = "has space".into())), "id");
    assert_eq!(field_of(f(|m| m.id = String::new())), "id");
    assert_eq!(field_of(f(|m| m.id = "x".repeat(65))), "id");
    // Every field is bounded, so that a record always leaves room in the registry for its
    // revert (an unbounded description, e.g. 128 KiB, would not).
    use lucos_patch::{MAX_DESCRIPTION, MAX_PATH, MAX_RELEASE, MAX_REPLACEMENTS};
    let e = packs_with(&obj, |m| m.description = "d".repeat(128 << 10)).unwrap_err();
    assert_eq!(field_of(e), "description");
    packs_with(&obj, |m| m.description = "d".repeat(MAX_DESCRIPTION)).unwrap();
    let e = packs_with(&obj, |m| m.target.release = "r".repeat(MAX_RELEASE + 1)).unwrap_err();
    assert_eq!(field_of(e), "target.release");
    let e = packs_with(&obj, |m| {
        m.replacements[0].old_file = Some("p".repeat(MAX_PATH + 1))
    })
    .unwrap_err();
    assert_eq!(field_of(e), "replacements[0].old_file");
    let e = packs_with(&obj, |m| {
        let r = m.replacements[0].clone();
        m.replacements = (0..=MAX_REPLACEMENTS)
            .map(|i| lucos_patch::Replacement {
                old: format!("f{i}"),
                ..r.clone()
            })
            .collect();
    })
    .unwrap_err();
    assert_eq!(field_of(e), "replacements");
    let e = packs_with(&obj, |m| {
        m.resolve = (0..=256)
            .map(|i| (format!("s{i}"), "kernel/sys.c".into()))
            .collect()
    })
    .unwrap_err();
    assert_eq!(field_of(e), "resolve");
    for id in [".", "..", "-", "-rf", "--help"] {
        let e = packs_with(&obj, |m| m.id = id.into()).unwrap_err();
        assert_eq!(field_of(e), "id", "{id}");
    }
    for path in [
        "../../etc/passwd",
        "/etc/passwd",
        "fs/../../x.c",
        "fs/proc/..",
    ] {
        let e = packs_with(&obj, |m| m.replacements[0].old_file = Some(path.into())).unwrap_err();
        assert_eq!(field_of(e), "replacements[0].old_file", "{path}");
    }
    packs_with(&obj, |m| {
        m.replacements[0].old_file = Some("fs/proc/cmdline.c".into())
    })
    .unwrap();
}

#[test]
fn manifest_validation_of_target_and_replacements() {
    let obj = object();
    let f = |edit: fn(&mut Manifest)| packs_with(&obj, edit).unwrap_err();
    assert_eq!(
        field_of(f(|m| m.target.build_id = "xyz".into())),
        "target.build_id"
    );
    assert_eq!(
        field_of(f(|m| m.target.build_id = "abc".into())),
        "target.build_id"
    );
    assert_eq!(
        field_of(f(|m| m.target.release = " ".into())),
        "target.release"
    );
    assert_eq!(field_of(f(|m| m.replacements.clear())), "replacements");
    assert_eq!(
        field_of(f(|m| m.replacements[0].old = "a b".into())),
        "replacements[0].old"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].site_offset = 2)),
        "replacements[0].site_offset"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].expect = vec![0x90; 17])),
        "replacements[0].expect"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].expect = NOP5[..4].to_vec())),
        "replacements[0].expect"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].expect = vec![0x55; 6])),
        "replacements[0].expect"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].site_offset = 4)),
        "replacements[0].expect"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].expect_abs = vec![AbsField {
            offset: 2,
            width: 4
        }])),
        "replacements[0].expect_abs[0]"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].expect_abs = vec![AbsField {
            offset: 5,
            width: 3
        }])),
        "replacements[0].expect_abs[0]"
    );
    assert_eq!(
        field_of(f(|m| m.replacements[0].expect_abs = vec![AbsField {
            offset: 5,
            width: 4
        }])),
        "replacements[0].expect_abs[0]",
        "runs past the 6 expected bytes"
    );

    // Duplicate old functions, unless they are different statics.
    let e = packs_with(&obj, |m| {
        let r = m.replacements[0].clone();
        m.replacements.push(r);
    })
    .unwrap_err();
    assert!(matches!(e, BundleError::DuplicateOld { .. }), "{e}");
    packs_with(&obj, |m| {
        let mut r = m.replacements[0].clone();
        r.old_file = Some("a.c".into());
        m.replacements[0].old_file = Some("b.c".into());
        m.replacements.push(r);
    })
    .unwrap();

    // `new` must be a function defined in a text section.
    for (new, what) in [
        ("missing_fn", "not defined"),
        ("shared_table", "not a function"),
        ("printk", "not defined"),
    ] {
        let e = packs_with(&obj, |m| m.replacements[0].new = new.into()).unwrap_err();
        assert!(matches!(e, BundleError::BadNewFunction { .. }), "{e}");
        assert!(e.to_string().contains(what), "{new}: {e}");
    }
}

#[test]
fn manifest_json_errors() {
    let good = String::from_utf8(manifest(&["f"]).to_json().unwrap()).unwrap();
    let e = Manifest::from_json(good.replace("site_offset", "site_ofset").as_bytes()).unwrap_err();
    assert!(e.to_string().contains("site_ofset"), "{e}");
    let e = Manifest::from_json(good.replace("0f1f44000055", "0f1f4400zz").as_bytes()).unwrap_err();
    assert!(e.to_string().contains("hex"), "{e}");
    let e = Manifest::from_json(b"{\"format\": 1").unwrap_err();
    assert!(matches!(e, BundleError::ManifestJson { .. }), "{e}");
    // Example from docs/bundle-format.md.
    let doc = r#"{ "format": 1, "id": "cmdline-hello", "description": "say hello",
      "target": { "build_id": "8d3a5c27e1f0b9a4c6d2e8f1a3b5c7d9e0f2a4b6", "release": "6.1.0" },
      "replacements": [ { "old": "cmdline_proc_show", "old_file": "fs/proc/cmdline.c",
          "new": "lucos_cmdline_proc_show", "site_offset": 4,
          "expect": "f30f1efa0f1f44000048c7c600000000", "expect_abs": [ {"offset": 12, "width": 4} ] } ],
      "resolve": { "override_release": "kernel/sys.c" } }"#;
    let m = Manifest::from_json(doc.as_bytes()).unwrap();
    let r = &m.replacements[0];
    assert_eq!(r.expect[..4], ENDBR64);
    // The absolute field moves with the KASLR slide; the rest does not.
    let slid = r.expected_bytes(0x1e00_0000);
    assert_eq!(slid[..12], r.expect[..12]);
    assert_eq!(slid[12..16], 0x1e00_0000u32.to_le_bytes());
}

#[test]
fn truncated_bundles_fail_cleanly() {
    let packed = pack(&object(), &manifest(&["lucos_new"])).unwrap();
    for len in 0..packed.len() {
        let r = Bundle::parse(&packed[..len]);
        assert!(r.is_err(), "a bundle truncated to {len} bytes parsed");
    }
}

#[test]
fn corrupted_bundles_never_panic() {
    let packed = pack(&object(), &manifest(&["lucos_new"])).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let resolver = |_: &str| Ok(0xffff_ffff_8100_0000u64);
    let bases = Regions {
        text: 0xffff_ffff_c000_0000,
        rodata: 0xffff_ffff_c100_0000,
        data: 0xffff_ffff_c200_0000,
    };
    let mut parsed = 0;
    for _ in 0..3000 {
        let mut b = packed.clone();
        for _ in 0..=(next() % 6) {
            let at = (next() % b.len() as u64) as usize;
            b[at] = next() as u8;
        }
        if let Ok(bundle) = Bundle::parse(&b) {
            parsed += 1;
            if let Ok(p) = plan(&bundle) {
                let _ = link(&bundle, &p, bases, &resolver);
            }
        }
    }
    assert!(
        parsed > 0,
        "mutations should sometimes leave the bundle valid"
    );
}

#[test]
fn helper_bundle_for_other_tests_is_valid() {
    let b = bundle(&object(), &["lucos_new", "lucos_other"]);
    assert_eq!(b.manifest().replacements.len(), 2);
}
