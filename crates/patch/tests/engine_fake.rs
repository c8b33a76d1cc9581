//! Engine checks that need a guest in states a live VM cannot be put in
//! safely: patch memory that moved, records from an earlier boot.

mod common;

use common::fake::{
    guest_with, guest_with_bytes, layout, mapped_registry, symbols, GPA, PD_ENTRY, SIZE,
};
use lucos_patch::{reset_registry, EngineError, ResetReport, Session};

const POB: u64 = 0xffff_8880_0000_0000;

#[test]
fn patch_memory_that_moved_is_refused() {
    let syms = symbols();
    let mut reg = mapped_registry();
    reg.pd_entries.clear();
    let moved = GPA + (64 << 20);
    let mut m = guest_with(&reg, moved);
    let err = Session::new(&mut m, &syms, layout(), moved, SIZE)
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::PatchMemoryMoved { mapped: GPA, .. }),
        "{err}"
    );
}

#[test]
fn records_of_an_earlier_boot_are_stale_until_reset() {
    let syms = symbols();
    let reg = mapped_registry();
    let mut m = guest_with(&reg, GPA);
    // The page-directory entry lucos recorded is not in this kernel.
    let err = Session::new(&mut m, &syms, layout(), GPA, SIZE)
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::StaleRegistry { pa: PD_ENTRY, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("lucos reset"), "{err}");
    assert_eq!(
        reset_registry(&mut m, (layout().cr3, POB), GPA, SIZE).unwrap(),
        ResetReport {
            records: 0,
            entries: 0
        }
    );
    let s = Session::new(&mut m, &syms, layout(), GPA, SIZE).unwrap();
    let fresh = s.registry().unwrap();
    assert_eq!(fresh.va_base, None);
    assert_eq!(
        fresh.next_free, reg.next_free,
        "allocated pages are never reused"
    );
}

#[test]
fn reset_refuses_records_that_match_the_kernel() {
    let reg = mapped_registry();
    let mut m = guest_with(&reg, GPA);
    m.mem.write_u64(PD_ENTRY, reg.pd_entries[0].1);
    assert!(matches!(
        reset_registry(&mut m, (layout().cr3, POB), GPA, SIZE),
        Err(EngineError::NotStale)
    ));
}

/// Site bytes that are not 5 long make the registry corrupt: no lucos reverts (or
/// applies on) a record by guessing what its site held.
#[test]
fn a_malformed_site_record_makes_the_registry_corrupt() {
    use lucos_patch::registry::{BundleRecord, BundleState, Header, RegistryError, SiteRecord};
    let syms = symbols();
    let mut reg = mapped_registry();
    reg.bundles.push(BundleRecord {
        sites: vec![SiteRecord {
            function: "f".into(),
            func_addr: 0xffff_ffff_8100_1000,
            site_addr: 0xffff_ffff_8100_1000,
            site_pa: 0x100_1000,
            original: lucos_patch::NOP5,
            written: [0xe9, 0, 0, 0, 0],
            new_addr: 0xffff_ffff_a000_0000,
            new_symbol: "g".into(),
            module: None,
        }],
        ..BundleRecord::empty("broken", BundleState::Applied)
    });
    let (h, json) = reg.encode(&Header::default()).unwrap();
    let json = String::from_utf8(json).unwrap();
    assert!(json.contains(r#""original":"0f1f440000""#), "{json}");
    let json = json.replace(r#""original":"0f1f440000""#, r#""original":"0f1f44""#);
    let mut h = h;
    h.len[h.active as usize] = json.len() as u32;
    h.crc[h.active as usize] = crc32fast::hash(json.as_bytes());
    let mut m = guest_with_bytes(GPA, &h.encode(), json.as_bytes(), h.active);
    m.mem.write_u64(PD_ENTRY, reg.pd_entries[0].1);
    let before = m.mem.clone();
    let err = Session::new(&mut m, &syms, layout(), GPA, SIZE)
        .err()
        .expect("a malformed record is refused");
    assert!(
        matches!(&err, EngineError::Registry(RegistryError::BadJson { source }) if source.to_string().contains("not 5")),
        "{err}"
    );
    assert!(m.mem == before, "a refused session changed guest memory");
}

#[test]
fn a_bundle_not_opened_through_a_trust_store_is_refused() {
    let syms = symbols();
    let reg = mapped_registry();
    let mut m = guest_with(&reg, GPA);
    m.mem.write_u64(PD_ENTRY, reg.pd_entries[0].1);
    let before = m.mem.clone();
    let obj = common::compile_c("int lucos_new(int x) { return x + 1; }\n", &[]);
    let unverified = common::bundle(&obj, &["lucos_new"]);
    let mut s = Session::new(&mut m, &syms, layout(), GPA, SIZE).unwrap();
    let err = s.apply(&unverified).unwrap_err();
    assert!(
        matches!(&err, EngineError::Unverified(id) if id == "test-bundle"),
        "{err}"
    );
    // The same bundle, signed and opened, gets past that gate (to the next refusal: this
    // fake kernel has no build id).
    let (_dir, trust, key) = common::trusted_key();
    let signed = lucos_patch::signing::sign(
        &lucos_patch::pack(&obj, &common::manifest(&["lucos_new"])).unwrap(),
        &key,
    );
    let opened = lucos_patch::Bundle::open(&signed, &trust).unwrap();
    let err = s.apply(&opened).unwrap_err();
    assert!(!matches!(err, EngineError::Unverified(_)), "{err}");
    assert!(m.mem == before, "a refused apply changed guest memory");
}
