//! `lucos bundle pack/sign/verify/trust` and `apply`'s signature check, through the
//! binary (no VM: a refused bundle is refused before lucos attaches to anything).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Runs lucos with this environment's key and trust store (`trust` overrides the store).
    fn lucos(&self, args: &[&str], trust: Option<&Path>) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(args)
            .env("LUCOS_SIGNING_KEY", self.path("key/signing.key"))
            .env(
                "LUCOS_TRUST_DIR",
                trust.map_or(self.path("trusted"), Path::to_owned),
            )
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .output()
            .unwrap()
    }
    fn ok(&self, args: &[&str], trust: Option<&Path>) -> String {
        let out = self.lucos(args, trust);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }
    fn refused(&self, args: &[&str], trust: Option<&Path>) -> String {
        let out = self.lucos(args, trust);
        assert!(
            !out.status.success(),
            "{args:?} succeeded: {}",
            text(&out.stdout)
        );
        text(&out.stderr)
    }
    /// A packed (and so signed) bundle.
    fn bundle(&self) -> String {
        let c = self.path("a.c");
        std::fs::write(&c, "int lucos_new(int x) { return x + 1; }\n").unwrap();
        let o = self.path("a.o");
        let st = Command::new("gcc")
            .args([
                "-c",
                "-O2",
                "-mcmodel=kernel",
                "-fno-pic",
                "-pg",
                "-mfentry",
            ])
            .arg(&c)
            .arg("-o")
            .arg(&o)
            .status()
            .unwrap();
        assert!(st.success());
        let m = self.path("m.json");
        std::fs::write(
            &m,
            r#"{"format":1,"id":"t1","target":{"build_id":"0123456789abcdef0123456789abcdef01234567","release":"6.1"},"replacements":[{"old":"x","new":"lucos_new","expect":"0f1f440000"}]}"#,
        )
        .unwrap();
        let b = self.path("b.lcb");
        let (o, m, b2) = (
            o.to_str().unwrap(),
            m.to_str().unwrap(),
            b.to_str().unwrap(),
        );
        self.ok(&["bundle", "pack", o, m, "-o", b2], None);
        b2.to_owned()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn pack_signs_with_a_key_made_on_first_use_and_apply_checks_it() {
    let e = Env::new();
    let b = e.bundle();
    let key = std::fs::metadata(e.path("key/signing.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    let out = e.ok(&["bundle", "verify", &b], None);
    assert!(out.contains("signature good, signed by 'local'"), "{out}");

    // One byte changed: apply refuses for the signature, before looking for the VM.
    let mut bytes = std::fs::read(&b).unwrap();
    bytes[0x50] ^= 1;
    let t = e.path("t.lcb");
    std::fs::write(&t, &bytes).unwrap();
    let err = e.refused(&["apply", "no-such-vm", t.to_str().unwrap()], None);
    assert!(err.contains("changed after it was signed"), "{err}");
    assert!(!err.contains("no-such-vm"), "{err}");

    // An unsigned object says how to sign it.
    let err = e.refused(
        &["apply", "no-such-vm", e.path("a.o").to_str().unwrap()],
        None,
    );
    assert!(err.contains("lucos bundle sign"), "{err}");
}

#[test]
fn an_untrusted_key_is_refused_until_trusted() {
    let e = Env::new();
    let b = e.bundle();
    let other = e.path("other-store");
    let err = e.refused(&["apply", "no-such-vm", &b], Some(&other));
    let listing = e.ok(&["bundle", "trust"], None);
    let hex_key = listing
        .lines()
        .find(|l| l.trim_start().starts_with("lucos-ed25519 "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no public key line in {listing}"))
        .to_owned();
    let advice = format!("lucos bundle trust {hex_key} --name NAME");
    assert!(err.contains(&advice), "{err}");

    // Following the advice makes it acceptable; removing the key refuses it again.
    e.ok(
        &["bundle", "trust", &hex_key, "--name", "builder"],
        Some(&other),
    );
    let out = e.ok(&["bundle", "verify", &b], Some(&other));
    assert!(out.contains("signed by 'builder'"), "{out}");
    e.ok(&["bundle", "trust", "--remove", "builder"], Some(&other));
    let err = e.refused(&["bundle", "verify", &b], Some(&other));
    assert!(err.contains("not in the trust store"), "{err}");
}

#[test]
fn sign_signs_a_bundle_and_refuses_what_is_not_one() {
    let e = Env::new();
    let b = e.bundle();
    let stripped = e.path("s.lcb");
    let bytes = std::fs::read(&b).unwrap();
    std::fs::write(&stripped, &bytes[..bytes.len() - 104]).unwrap();
    let s = stripped.to_str().unwrap();
    assert!(e
        .refused(&["bundle", "verify", s], None)
        .contains("not signed"));
    e.ok(&["bundle", "sign", s], None);
    e.ok(&["bundle", "verify", s], None);
    std::fs::write(e.path("junk"), b"not a bundle").unwrap();
    let err = e.refused(&["bundle", "sign", e.path("junk").to_str().unwrap()], None);
    assert!(err.contains("not a valid lucos bundle"), "{err}");
}
