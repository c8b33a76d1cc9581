//! Generated-input tests (proptest) for what reads untrusted bytes: the bundle parser, the
//! signature check, manifest validation, the linker, and the registry decoder over a fake
//! guest. Each must never panic, and every refusal must leave the fake guest's memory
//! byte-identical (the whole FakeMem compared).
//!
//! CI runs [`DEFAULT_CASES`] per property; a long run sets `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=100000 cargo test --release -p lucos-patch --test fuzz`.

mod common;

use std::sync::OnceLock;

use common::fake::{guest_with, guest_with_bytes, layout, mapped_registry, symbols, GPA, SIZE};
use lucos_introspect::KernelSymbols;
use lucos_patch::registry::{BundleRecord, BundleState, Header, RangeRecord, Registry, SiteRecord};
use lucos_patch::{
    link, pack, plan, reset_registry, signing, Bundle, BundleError, Manifest, RegionKind, Regions,
    Replacement, Session, TrustStore,
};
use proptest::prelude::*;

const DEFAULT_CASES: u32 = 2000;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // The failing input is in the panic message; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const SRC: &str = r#"
extern int printk(const char *fmt, ...);
static int counter;
int shared_table[4] = { 1, 2, 3, 4 };
int lucos_new(int x) { counter++; printk("hi %d\n", x); return counter + shared_table[x & 3]; }
int lucos_other(int x) { return x + 1; }
"#;

struct Fixture {
    packed: Vec<u8>,
    trust: TrustStore,
    key: ed25519_dalek::SigningKey,
    syms: KernelSymbols,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (dir, trust, key) = common::trusted_key();
        Fixture {
            packed: pack(
                &common::compile_c(SRC, &[]),
                &common::manifest(&["lucos_new", "lucos_other"]),
            )
            .unwrap(),
            trust,
            key,
            syms: symbols(),
            _dir: dir,
        }
    })
}

/// Byte edits (position as a fraction of the length, new value) and a truncation.
fn mutations() -> impl Strategy<Value = (Vec<(f64, u8)>, Option<f64>)> {
    (
        prop::collection::vec((0.0..1.0f64, any::<u8>()), 1..8),
        prop::option::weighted(0.1, 0.0..1.0f64),
    )
}

fn mutate(base: &[u8], edits: &[(f64, u8)], cut: Option<f64>) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(at, v) in edits {
        let i = ((at * b.len() as f64) as usize).min(b.len() - 1);
        b[i] = v;
    }
    if let Some(c) = cut {
        b.truncate((c * b.len() as f64) as usize);
    }
    b
}

const BASES: Regions = Regions {
    text: 0xffff_ffff_c000_0000,
    rodata: 0xffff_ffff_c100_0000,
    data: 0xffff_ffff_c200_0000,
};

/// Plans and links a parsed bundle; a successful link fills exactly the planned regions.
/// Returns whether it linked.
fn plan_and_link(b: &Bundle) -> bool {
    let resolver = |_: &str| Ok(0xffff_ffff_8100_0000u64);
    let Ok(p) = plan(b) else { return false };
    let Ok(l) = link(b, &p, BASES, &resolver) else {
        return false;
    };
    assert_eq!(l.text.len() as u64, p.text.size);
    assert_eq!(l.rodata.len() as u64, p.rodata.size);
    assert_eq!(l.data.len() as u64, p.data.size);
    true
}

/// Applies `b` to a fake guest with an empty, mapped registry: it must be refused (this
/// fake kernel matches no bundle) and leave every byte of guest memory as it was.
fn apply_is_refused_cleanly(b: &Bundle) {
    let f = fixture();
    let reg = mapped_registry();
    let mut m = guest_with(&reg, GPA);
    m.mem.write_u64(reg.pd_entries[0].0, reg.pd_entries[0].1);
    let before = m.mem.clone();
    let refused = Session::new(&mut m, &f.syms, layout(), GPA, SIZE)
        .unwrap()
        .apply(b)
        .is_err();
    assert!(refused, "a bundle for another kernel was applied");
    assert!(m.mem == before, "a refused apply changed guest memory");
}

/// Runs `body` on `cases` generated values, counts each case's outcome, prints the
/// counts and checks that every outcome in `must_see` happened: a property whose deep
/// path was never reached proves nothing.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    must_see: &[&str],
    body: impl Fn(S::Value) -> &'static str,
) where
    S::Value: std::fmt::Debug,
{
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    let counts: Mutex<BTreeMap<&'static str, u64>> = Mutex::default();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&strategy, |v| {
        let outcome = body(v);
        *counts.lock().unwrap().entry(outcome).or_default() += 1;
        Ok(())
    });
    let counts = counts.into_inner().unwrap();
    eprintln!("{name}: {counts:?}");
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    for want in must_see {
        assert!(
            counts.contains_key(want),
            "{name}: no case reached `{want}`: {counts:?}"
        );
    }
}

/// Any bytes: parse never panics.
#[test]
fn parser_survives_arbitrary_bytes() {
    fuzz(
        "arbitrary bytes",
        prop::collection::vec(any::<u8>(), 0..4096),
        &["refused"],
        |bytes| {
            let parsed = Bundle::parse(&bytes).is_ok();
            assert!(Bundle::open(&bytes, &fixture().trust).is_err());
            if parsed {
                "parsed"
            } else {
                "refused"
            }
        },
    );
}

/// A signed bundle changed afterwards never opens, and is refused for its signature
/// before its contents are looked at.
#[test]
fn any_change_after_signing_is_refused_for_its_signature() {
    let f = fixture();
    let signed = signing::sign(&f.packed, &f.key);
    fuzz(
        "tampered signed bundles",
        mutations(),
        &["bad signature"],
        |(edits, cut)| {
            let t = mutate(&signed, &edits, cut);
            if t == signed {
                return "unchanged";
            }
            match Bundle::open(&t, &f.trust) {
                Err(BundleError::Signature(lucos_patch::SignatureError::BadSignature)) => {
                    "bad signature"
                }
                Err(BundleError::Signature(_)) => "unsigned or untrusted",
                Err(e) => panic!("refused for something else than its signature: {e}"),
                Ok(_) => panic!("a tampered bundle opened"),
            }
        },
    );
}

/// A hostile maker signs whatever they like: mutated bundles, validly signed, are parsed,
/// planned and linked without panicking, and each apply of one is refused with guest
/// memory unchanged.
#[test]
fn signed_hostile_bundles_are_refused_cleanly() {
    let f = fixture();
    fuzz(
        "signed hostile bundles",
        mutations(),
        &["refused by the parser", "linked, apply refused"],
        |(edits, cut)| {
            let t = signing::sign(&mutate(&f.packed, &edits, cut), &f.key);
            match Bundle::open(&t, &f.trust) {
                Err(BundleError::Signature(e)) => panic!("validly signed, refused: {e}"),
                Err(_) => "refused by the parser",
                Ok(b) => {
                    let linked = plan_and_link(&b);
                    apply_is_refused_cleanly(&b);
                    if linked {
                        "linked, apply refused"
                    } else {
                        "link refused, apply refused"
                    }
                }
            }
        },
    );
}

/// Generated manifests: validation never panics, from_json agrees with validate, and
/// what validates packs into a bundle that parses back to the same manifest.
#[test]
fn manifest_validation() {
    let f = fixture();
    fuzz("manifests", manifests(), &["valid", "invalid"], |m| {
        let ok = m.validate().is_ok();
        if let Ok(json) = m.to_json() {
            assert_eq!(
                Manifest::from_json(&json).is_ok(),
                ok,
                "from_json and validate disagree on {m:?}"
            );
        }
        match pack(&f.packed, &m) {
            Ok(p) => {
                assert!(ok, "pack accepted an invalid manifest {m:?}");
                let b = Bundle::parse(&p).unwrap();
                assert_eq!(b.manifest(), &m);
                plan_and_link(&b);
                apply_is_refused_cleanly(
                    &Bundle::open(&signing::sign(&p, &f.key), &f.trust).unwrap(),
                );
                "valid"
            }
            Err(_) if ok => "valid, refused by pack (new function)",
            Err(_) => "invalid",
        }
    });
}

/// Manifest JSON with bytes changed: from_json never panics.
#[test]
fn manifest_json_bytes() {
    let json = common::manifest(&["lucos_new"]).to_json().unwrap();
    fuzz(
        "manifest JSON bytes",
        mutations(),
        &["refused"],
        |(edits, cut)| match Manifest::from_json(&mutate(&json, &edits, cut)) {
            Ok(_) => "accepted",
            Err(_) => "refused",
        },
    );
}

/// Registry bytes changed in the guest's patch memory: opening a session, reading the
/// registry, checking sites, reverting every recorded id and `reset` never panic, and
/// every refusal leaves guest memory byte-identical.
#[test]
fn registry_bytes_in_guest_memory() {
    let reg = registry_with_records();
    let (h, json) = reg.encode(&Header::default()).unwrap();
    let strategy = (
        mutations(),
        any::<bool>(),
        prop::option::of((0usize..40, any::<u8>())),
    );
    fuzz(
        "registry bytes",
        strategy,
        &["session refused", "registry read"],
        |((edits, _), fix_crc, header_edit)| {
            let json = mutate(&json, &edits, None);
            let mut h2 = h.clone();
            if fix_crc {
                h2.crc[h.active as usize] = crc32fast::hash(&json);
            }
            let mut hb = h2.encode();
            if let Some((at, v)) = header_edit {
                hb[at] = v;
            }
            let mut m = guest_with_bytes(GPA, &hb, &json, h.active);
            m.mem.write_u64(reg.pd_entries[0].0, reg.pd_entries[0].1);
            registry_ops_refuse_cleanly(m)
        },
    );
}

/// Generated registries, well-formed but with arbitrary records (the state a buggy or
/// hostile writer could leave): the same operations, the same guarantees.
#[test]
fn generated_registries_in_guest_memory() {
    fuzz(
        "generated registries",
        registries(),
        &["session refused", "registry read"],
        |reg| {
            let (h, json) = reg.encode(&Header::default()).unwrap();
            let mut m = guest_with_bytes(GPA, &h.encode(), &json, h.active);
            // Sometimes make the first recorded page-directory entry match the kernel.
            if let Some(&(pa, v)) = reg.pd_entries.first() {
                m.mem.write_u64(pa & !7, v);
            }
            registry_ops_refuse_cleanly(m)
        },
    );
}

/// Returns whether the session opened; panics on a refusal that changed memory.
fn registry_ops_refuse_cleanly(mut m: lucos_introspect::fake::FakeMachine) -> &'static str {
    let f = fixture();
    let before = m.mem.clone();
    let (outcome, ids): (&'static str, Vec<String>) =
        match Session::new(&mut m, &f.syms, layout(), GPA, SIZE) {
            Err(_) => ("session refused", Vec::new()),
            Ok(s) => {
                let _ = s.inconsistencies();
                match s.registry() {
                    Ok(r) => (
                        "registry read",
                        r.bundles.iter().map(|b| b.id.clone()).collect(),
                    ),
                    Err(_) => ("registry refused", Vec::new()),
                }
            }
        };
    assert!(m.mem == before, "reading the registry changed guest memory");
    for id in ids.iter().chain([&"no-such-bundle".to_owned()]) {
        let snap = m.mem.clone();
        let r = Session::new(&mut m, &f.syms, layout(), GPA, SIZE).and_then(|mut s| s.revert(id));
        if r.is_err() {
            assert!(
                m.mem == snap,
                "a refused revert of '{id}' changed guest memory"
            );
        }
    }
    let snap = m.mem.clone();
    if reset_registry(&mut m, (layout().cr3, 0xffff_8880_0000_0000), GPA, SIZE).is_err() {
        assert!(m.mem == snap, "a refused reset changed guest memory");
    }
    outcome
}

fn site(func_addr: u64, i: u64) -> SiteRecord {
    SiteRecord {
        function: format!("f{i}"),
        func_addr,
        site_addr: func_addr,
        site_pa: 0x100_0000 + (func_addr & 0xf_ffff),
        original: lucos_patch::NOP5,
        written: [0xe9, 0, 0, 0, 0],
        new_addr: 0xffff_ffff_a000_0000 + i * 16,
        new_symbol: format!("g{i}"),
        module: None,
    }
}

fn record(id: &str, state: BundleState, sites: Vec<SiteRecord>) -> BundleRecord {
    BundleRecord {
        sites,
        ranges: vec![RangeRecord {
            offset: 0x10_0000,
            len: 0x1000,
            va: 0xffff_ffff_a000_0000,
            kind: RegionKind::Text,
        }],
        ..BundleRecord::empty(id, state)
    }
}

fn registry_with_records() -> Registry {
    let mut reg = mapped_registry();
    reg.bundles.push(record(
        "one",
        BundleState::Applied,
        vec![site(0xffff_ffff_8100_1000, 0)],
    ));
    reg.bundles.push(record(
        "two",
        BundleState::Reverted,
        vec![site(0xffff_ffff_8100_2000, 1)],
    ));
    reg
}

/// Manifests near a valid one (so that validation, pack and parse are reached) and far
/// from it (control characters, wrong lengths, overlapping fields).
fn manifests() -> impl Strategy<Value = Manifest> {
    let text = "[ -~\\x00-\\x1f\\u{80}-\\u{10ffff}]{0,24}";
    let ident = |good: &'static str| {
        prop_oneof![
            4 => Just(good.to_owned()),
            1 => "[A-Za-z0-9._/-]{0,12}",
            1 => text,
        ]
    };
    let expect = prop_oneof![
        3 => Just(common::manifest(&["lucos_new"]).replacements[0].expect.clone()),
        1 => prop::collection::vec(any::<u8>(), 0..20),
    ];
    let abs = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec((0u32..20, prop_oneof![Just(4u8), Just(8), 0u8..10]), 0..3),
    ];
    let replacement = (
        ident("old_lucos_new"),
        prop::option::weighted(0.2, ident("fs/proc/cmdline.c")),
        prop_oneof![3 => Just("lucos_new".to_owned()), 1 => Just("lucos_other".to_owned()), 1 => ident("x")],
        prop_oneof![4 => Just(0u32), 1 => 0u32..8],
        expect,
        abs,
    )
        .prop_map(|(old, old_file, new, site_offset, expect, abs)| {
            let mut r: Replacement = common::manifest(&["lucos_new"]).replacements[0].clone();
            r.old = old;
            r.old_file = old_file;
            r.new = new;
            r.site_offset = site_offset;
            r.expect = expect;
            r.expect_abs = abs
                .into_iter()
                .map(|(offset, width)| lucos_patch::AbsField { offset, width })
                .collect();
            r
        });
    (
        prop_oneof![4 => Just(1u32), 1 => 0u32..4],
        ident("test-bundle"),
        prop_oneof![Just(String::new()), text.prop_map(|s: String| s)],
        prop_oneof![
            4 => Just("0123456789abcdef0123456789abcdef01234567".to_owned()),
            1 => "[0-9a-fA-Fx]{0,44}",
        ],
        prop::collection::vec(replacement, 0..3),
    )
        .prop_map(|(format, id, description, build_id, replacements)| {
            let mut m = common::manifest(&["lucos_new"]);
            m.format = format;
            m.id = id;
            m.description = description;
            m.target.build_id = build_id;
            m.replacements = replacements;
            m
        })
}

fn registries() -> impl Strategy<Value = Registry> {
    let addr = prop_oneof![
        0xffff_ffff_8100_0000u64..0xffff_ffff_8180_0000,
        any::<u64>(),
    ];
    let site = (
        addr.clone(),
        0u64..4,
        any::<[u8; 5]>(),
        any::<[u8; 5]>(),
        any::<u64>(),
    )
        .prop_map(|(a, i, original, written, pa)| {
            let mut s = site(a, i);
            s.original = original;
            s.written = written;
            s.site_pa = pa % (1 << 32);
            s
        });
    let rec = (
        "[a-z.-]{0,6}",
        any::<bool>(),
        prop::collection::vec(site, 0..3),
        prop::collection::vec((any::<u64>(), any::<u64>(), addr.clone()), 0..2),
    )
        .prop_map(|(id, applied, sites, ranges)| {
            let state = if applied {
                BundleState::Applied
            } else {
                BundleState::Reverted
            };
            let mut r = record(&id, state, sites);
            r.ranges = ranges
                .into_iter()
                .map(|(offset, len, va)| RangeRecord {
                    offset,
                    len,
                    va,
                    kind: RegionKind::Data,
                })
                .collect();
            r
        });
    (
        prop::option::of(addr),
        prop::option::of(prop_oneof![Just(GPA), any::<u64>()]),
        prop::collection::vec((0u64..(1 << 24), any::<u64>()), 0..3),
        any::<u64>(),
        prop::collection::vec(rec, 0..4),
    )
        .prop_map(|(va_base, patch_gpa, pd_entries, next_free, bundles)| {
            let mut reg = mapped_registry();
            reg.va_base = va_base;
            reg.patch_gpa = patch_gpa;
            reg.pd_entries = pd_entries;
            reg.next_free = next_free;
            reg.bundles = bundles;
            reg
        })
}
