//! Switches that must be consistent (frame-local types, changed static prototypes), and
//! writable data rewritten only in its changed fields, on the fake kernel.

mod common;

use common::kernel::FakeKernel;
use common::switch::{apply_with, assert_unchanged, gated, registry, revert_with, site};
use lucos_introspect::fake::FakeMachine;
use lucos_introspect::{GuestPhysAddr, PhysMem};
use lucos_patch::{EngineError, GateScope, NOP5};

/// A bundle that changes a frame-local type (`Manifest::frame_types`) is safe only if
/// no task is in the code a switch leaves: without a consistent check, its apply and its
/// revert are refused and the guest is left as it was.
#[test]
fn a_frame_local_layout_change_switches_only_consistently() {
    let k = FakeKernel::new();
    let b = k.bundle_with("frames", &["lucos_f1"], false, |m| {
        m.frame_types = vec!["struct lb_env".into()];
    });
    let refused = |e: &EngineError| {
        matches!(e, EngineError::FrameTypeNeedsConsistency { id, type_name }
            if id == "frames" && type_name == "struct lb_env")
    };
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| f).unwrap_err();
    assert!(refused(&err), "{err}");
    let err = gated(&k, &mut m, GateScope::EntryWindows, None, |s| s.apply(&b)).unwrap_err();
    assert!(refused(&err), "{err}");
    assert_unchanged(&k, &m, "no consistent check");
    assert!(m.writes.is_empty());
    // A task in the replaced code at every try: refused, unchanged.
    let err = gated(&k, &mut m, GateScope::Functions, Some("pid 9"), |s| {
        s.apply(&b)
    });
    assert!(
        matches!(err, Err(EngineError::NotQuiescent { .. })),
        "{err:?}"
    );
    assert_unchanged(&k, &m, "a task in replaced code");
    // Clean: applied, and the record keeps the types for the revert.
    gated(&k, &mut m, GateScope::Functions, None, |s| s.apply(&b)).unwrap();
    let f1 = k.pa("old_lucos_f1");
    assert_eq!(site(&m, f1)[0], 0xe9);
    assert_eq!(
        registry(&k, &mut m).bundles[0].frame_types,
        ["struct lb_env"]
    );
    let applied = m.mem.clone();
    let err = revert_with(&k, &mut m, "frames", |f| f).unwrap_err();
    assert!(refused(&err), "{err}");
    assert!(m.mem == applied, "a refused revert changed the guest");
    gated(&k, &mut m, GateScope::Functions, None, |s| {
        s.revert("frames")
    })
    .unwrap();
    assert_eq!(site(&m, f1), NOP5);
}

/// A static function whose prototype changes (`Manifest::prototypes`, every caller in the
/// bundle) likewise: an old caller still running would pass the old arguments.
#[test]
fn a_changed_static_prototype_switches_only_consistently() {
    let k = FakeKernel::new();
    let b = k.bundle_with("proto", &["lucos_f1"], false, |m| {
        m.prototypes = vec!["helper".into()];
    });
    let refused = |e: &EngineError| {
        matches!(e, EngineError::PrototypeNeedsConsistency { id, function }
            if id == "proto" && function == "helper")
    };
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| f).unwrap_err();
    assert!(refused(&err), "{err}");
    assert_unchanged(&k, &m, "no consistent check");
    gated(&k, &mut m, GateScope::Functions, None, |s| s.apply(&b)).unwrap();
    assert_eq!(registry(&k, &mut m).bundles[0].prototypes, ["helper"]);
    let applied = m.mem.clone();
    let err = revert_with(&k, &mut m, "proto", |f| f).unwrap_err();
    assert!(refused(&err), "{err}");
    assert!(m.mem == applied, "a refused revert changed the guest");
    gated(&k, &mut m, GateScope::Functions, None, |s| {
        s.revert("proto")
    })
    .unwrap();
    assert_eq!(site(&m, k.pa("old_lucos_f1")), NOP5);
}

/// Writable data is rewritten only in the fields whose initial value the update changes:
/// the rest holds live state, which is neither compared nor written; a field the kernel
/// changed since boot refuses the apply, guest unchanged.
#[test]
fn a_writable_object_is_rewritten_only_in_its_changed_fields() {
    let k = FakeKernel::new();
    let b = k.bundle_with("fields", &["lucos_f1"], true, |m| {
        m.rewrites[0].fields = vec![lucos_patch::Field { offset: 8, len: 8 }];
    });
    let ops_at = GuestPhysAddr(k.pa("ops_table"));
    let read = |m: &FakeMachine| {
        let mut ops = [0u8; 16];
        m.read_phys(ops_at, &mut ops).unwrap();
        (
            u64::from_le_bytes(ops[..8].try_into().unwrap()),
            u64::from_le_bytes(ops[8..].try_into().unwrap()),
        )
    };
    let mut m = k.fresh.clone();
    m.mem.write(ops_at.raw(), &0x5555u64.to_le_bytes());
    apply_with(&k, &mut m, &b, |f| f).unwrap();
    assert_eq!(read(&m), (0x5555, 0x4444), "only the field is written");
    let rec = registry(&k, &mut m).bundles[0].rewrites.clone();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].original, 0x2222u64.to_le_bytes());
    revert_with(&k, &mut m, "fields", |f| f).unwrap();
    assert_eq!(read(&m), (0x5555, 0x2222), "only the field is restored");

    let mut m = k.fresh.clone();
    m.mem.write(ops_at.raw() + 8, &0x6666u64.to_le_bytes());
    let before = m.mem.clone();
    let err = apply_with(&k, &mut m, &b, |f| f).unwrap_err();
    assert!(
        matches!(err, EngineError::FieldChanged { offset: 8, .. }),
        "{err}"
    );
    assert!(
        m.mem == before && !m.paused,
        "a refused apply changed the guest"
    );
}
