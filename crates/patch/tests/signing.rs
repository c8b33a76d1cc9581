//! Signed bundles: round trip, tampering refused for its signature, trust store.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{binutils, compile_c, manifest};
use lucos_patch::trust::{create_key, load_key, parse_public, public_line};
use lucos_patch::{pack, signing, Bundle, BundleError, KeyError, SignatureError, TrustStore};
use object::{Object, ObjectSection};

const SRC: &str = r#"
extern int printk(const char *fmt, ...);
static int counter;
int lucos_new(int x) { counter++; printk("hi %d\n", x); return counter; }
"#;

fn packed() -> Vec<u8> {
    pack(&compile_c(SRC, &[]), &manifest(&["lucos_new"])).unwrap()
}

fn keyed() -> (tempfile::TempDir, ed25519_dalek::SigningKey, TrustStore) {
    let (dir, trust, key) = common::trusted_key();
    (dir, key, trust)
}

/// File offset range of section `name` in `file`.
fn section_range(file: &[u8], name: &str) -> std::ops::Range<usize> {
    let f = object::File::parse(file).unwrap();
    let s = f.section_by_name(name).unwrap();
    let (off, len) = s.file_range().unwrap();
    off as usize..(off + len) as usize
}

#[test]
fn signed_bundle_round_trips() {
    let (_d, key, trust) = keyed();
    let body = packed();
    let signed = signing::sign(&body, &key);
    assert_eq!(signed.len(), body.len() + signing::TRAILER_LEN);
    let b = Bundle::open(&signed, &trust).unwrap();
    let signer = b.signer().unwrap();
    assert_eq!(signer.name, "test");
    assert_eq!(signer.key, key.verifying_key().to_bytes());
    // The identity of what is applied does not depend on who signed it.
    assert_eq!(b.sha256(), Bundle::parse(&body).unwrap().sha256());
    assert!(Bundle::parse(&body).unwrap().signer().is_none());
    // Re-signing replaces the signature instead of stacking one more.
    assert!(signing::sign(&signed, &key) == signed);
    // binutils still read a signed bundle.
    let (ok, _, err) = binutils("readelf", &["-SW"], &signed);
    assert!(ok, "{err}");
    // Re-packing drops the signature, which would no longer match.
    let repacked = pack(&signed, &manifest(&["lucos_new"])).unwrap();
    assert!(signing::claimed_key(&repacked).is_none());
    assert!(pack(&body, &manifest(&["lucos_new"])).unwrap() == repacked);
}

fn refusal(file: &[u8], trust: &TrustStore) -> SignatureError {
    match Bundle::open(file, trust) {
        Err(BundleError::Signature(e)) => e,
        Err(other) => panic!("refused for something else than its signature: {other}"),
        Ok(_) => panic!("opened"),
    }
}

#[test]
fn a_byte_changed_after_signing_is_refused_for_its_signature() {
    let (_d, key, trust) = keyed();
    let signed = signing::sign(&packed(), &key);
    let mut checked = 0;
    for section in [".text.lucos_new", ".rela.text.lucos_new", ".lucos.manifest"] {
        let range = section_range(&signed, section);
        assert!(!range.is_empty(), "{section} is empty");
        for at in [range.start, range.start + range.len() / 2, range.end - 1] {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut t = signed.clone();
                t[at] ^= flip;
                let e = refusal(&t, &trust);
                assert!(
                    matches!(e, SignatureError::BadSignature),
                    "{section}+{at}: {e}"
                );
                assert!(e.to_string().contains("changed after it was signed"), "{e}");
                checked += 1;
            }
        }
    }
    // So is a change of the signature itself or of the ELF header.
    for at in [0, 16, signed.len() - signing::TRAILER_LEN] {
        let mut t = signed.clone();
        t[at] ^= 0x10;
        assert!(matches!(refusal(&t, &trust), SignatureError::BadSignature));
        checked += 1;
    }
    assert_eq!(checked, 30);
}

#[test]
fn a_tampered_bundle_is_refused_before_it_is_parsed() {
    // Garbage that is no ELF at all, signed and then changed: the refusal is the signature,
    // not "not an ELF file", because nothing is parsed before the signature is checked.
    let (_d, key, trust) = keyed();
    let mut t = signing::sign(b"not an ELF object", &key);
    t[3] ^= 1;
    assert!(matches!(refusal(&t, &trust), SignatureError::BadSignature));
    // Untampered, the same garbage gets past the signature and is refused by the parser.
    let ok = signing::sign(b"not an ELF object", &key);
    assert!(matches!(
        Bundle::open(&ok, &trust),
        Err(BundleError::NotElf)
    ));
}

#[test]
fn unsigned_and_untrusted_bundles_are_refused_with_what_to_do() {
    let (_d, _key, trust) = keyed();
    let e = refusal(&packed(), &trust);
    assert!(matches!(e, SignatureError::Unsigned), "{e}");
    assert!(e.to_string().contains("lucos bundle sign"), "{e}");

    let other = tempfile::tempdir().unwrap();
    let stranger = create_key(&other.path().join("key")).unwrap();
    let signed = signing::sign(&packed(), &stranger);
    let e = refusal(&signed, &trust);
    let hex_key = hex::encode(stranger.verifying_key().to_bytes());
    assert!(matches!(e, SignatureError::Untrusted { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("lucos bundle trust {hex_key}")),
        "{msg}"
    );
    assert!(msg.contains(&trust.dir().display().to_string()), "{msg}");

    // A key signed by a stranger who claims a trusted key is a bad signature, not trusted.
    let mut forged = signed.clone();
    let n = forged.len();
    let trusted = trust.keys()[0].1;
    forged[n - 40..n - 8].copy_from_slice(&trusted);
    assert!(matches!(
        refusal(&forged, &trust),
        SignatureError::BadSignature
    ));

    // Trusting the key, by the line its owner publishes, makes the bundle acceptable.
    let mut trust = trust;
    let line = public_line(&stranger.verifying_key().to_bytes(), "stranger");
    trust
        .add("stranger", &parse_public(&line).unwrap())
        .unwrap();
    let reloaded = TrustStore::load(trust.dir()).unwrap();
    let b = Bundle::open(&signed, &reloaded).unwrap();
    assert_eq!(b.signer().unwrap().name, "stranger");
    // And removing it refuses it again.
    let mut reloaded = reloaded;
    reloaded.remove("stranger").unwrap();
    let reloaded = TrustStore::load(reloaded.dir()).unwrap();
    assert!(matches!(
        refusal(&signed, &reloaded),
        SignatureError::Untrusted { .. }
    ));
}

#[test]
fn keys_on_disk_are_private_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("key");
    let key = create_key(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode, 0o700);
    assert_eq!(load_key(&path).unwrap().to_bytes(), key.to_bytes());
    // An existing key is never overwritten.
    assert!(create_key(&path).is_err());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = load_key(&path).unwrap_err();
    assert!(matches!(e, KeyError::KeyReadable { .. }), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");

    // Malformed trust entries and names are errors, not silently skipped.
    let store = dir.path().join("trusted");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("bad.pub"), "lucos-ed25519 1234\n").unwrap();
    let e = TrustStore::load(&store).unwrap_err();
    assert!(
        matches!(&e, KeyError::BadTrustEntry { source, .. }
            if matches!(**source, KeyError::BadPublicKey { .. })),
        "{e}"
    );
    std::fs::remove_file(store.join("bad.pub")).unwrap();
    let mut t = TrustStore::load(&store).unwrap();
    for name in ["", "..", "-x", "a/b", &"x".repeat(65)] {
        assert!(
            matches!(t.add(name, &[0; 32]), Err(KeyError::BadName { .. })),
            "{name}"
        );
    }
    assert!(matches!(
        t.remove("nobody"),
        Err(KeyError::NoSuchKey { .. })
    ));
}
