//! What a bundle carries never reaches the operator's terminal as control
//! sequences: `lucos bundle show` prints a hostile bundle's description and
//! symbol names escaped. (No VM needed.)

use std::process::Command;

/// ESC sequences, an OSC window title, BEL, CR, DEL and the C1 CSI.
const HOSTILE: &str = "ok\x1b[2J\x1b]0;pwned\x07\rFAKE\x7f\u{9b}31m";

/// Raw terminal controls in `out`: C0 except LF, DEL, and C1 (UTF-8 c2 80..9f).
fn raw_controls(out: &[u8]) -> Vec<usize> {
    let mut at = Vec::new();
    for (i, &b) in out.iter().enumerate() {
        let c1 = b == 0xc2 && out.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n));
        if (b < 0x20 && b != b'\n') || b == 0x7f || c1 {
            at.push(i);
        }
    }
    at
}

fn lucos(args: &[&std::ffi::OsStr]) -> std::process::Output {
    // `bundle pack` signs: with a key of this test's own, not the user's.
    static KEYS: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(|| tempfile::tempdir().unwrap()).path();
    Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(args)
        .env("LUCOS_SIGNING_KEY", keys.join("signing.key"))
        .env("LUCOS_TRUST_DIR", keys.join("trusted"))
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn bundle_show_escapes_what_the_bundle_says() {
    let dir = tempfile::tempdir().unwrap();
    // The new code calls a function whose name holds an OSC title and a CR.
    let asm = dir.path().join("t.s");
    std::fs::write(
        &asm,
        ".text\n.globl lucos_new\n.type lucos_new,@function\nlucos_new:\n nopl 0(%rax,%rax,1)\n \
         call \"evil\x1b]0;title\x07\rx\"\n ret\n.size lucos_new,.-lucos_new\n",
    )
    .unwrap();
    let obj = dir.path().join("t.o");
    let st = Command::new("gcc")
        .arg("-c")
        .arg(&asm)
        .arg("-o")
        .arg(&obj)
        .status()
        .expect("gcc is required for this test");
    assert!(st.success());
    let manifest = serde_json::json!({
        "format": 1,
        "id": "hostile",
        "description": HOSTILE,
        "target": { "build_id": "0123456789abcdef0123456789abcdef01234567", "release": "6.1.0" },
        "replacements": [{ "old": "cmdline_proc_show", "new": "lucos_new", "expect": "0f1f44000055" }],
    });
    let mpath = dir.path().join("m.json");
    std::fs::write(&mpath, manifest.to_string()).unwrap();
    let bundle = dir.path().join("b.lcb");
    let out = lucos(&[
        "bundle".as_ref(),
        "pack".as_ref(),
        obj.as_os_str(),
        mpath.as_os_str(),
        "-o".as_ref(),
        bundle.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = lucos(&["bundle".as_ref(), "show".as_ref(), bundle.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("lucos_new"), "{text}");
    let raw = raw_controls(&out.stdout);
    assert!(
        raw.is_empty(),
        "raw control bytes at {raw:?} of `lucos bundle show`: {:?}",
        text
    );
    // Shown, not dropped: the operator can still see what the bundle holds.
    assert!(text.contains(r"evil\x1b]0;title\x07\rx"), "{text}");
    assert!(text.contains(r"\u007f"), "{text}");
}

#[test]
fn a_huge_vm_name_is_refused_without_being_echoed() {
    let name = "n".repeat(5000);
    for cmd in ["info", "pause", "status"] {
        let out = lucos(&[cmd.as_ref(), name.as_ref()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.len() < 400, "`lucos {cmd}` said {} bytes", err.len());
        assert!(
            err.contains("VM name of 5000 bytes must be 1-48 characters"),
            "{err}"
        );
    }
}
