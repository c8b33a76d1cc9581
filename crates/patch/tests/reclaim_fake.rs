//! Reclaim on a fake guest: a reverted bundle's pages are unmapped and go to the free
//! list once; applied bundles and reclaimed ones are refused, leaving memory unchanged.

mod common;

use common::fake::{guest_with, layout, mapped_registry, symbols, GPA, PD_ENTRY, SIZE};
use lucos_introspect::PhysMem;
use lucos_patch::memory::{pte, pte_pa, PatchMem, PatchMemLayout};
use lucos_patch::registry::{BundleRecord, BundleState, RangeRecord};
use lucos_patch::{EngineError, RegionKind, Session};

fn record(id: &str, state: BundleState, offset: u64) -> BundleRecord {
    BundleRecord {
        ranges: vec![RangeRecord {
            offset,
            len: 0x2000,
            va: 0xffff_ffff_a000_0000 + offset,
            kind: RegionKind::Text,
        }],
        ..BundleRecord::empty(id, state)
    }
}

#[test]
fn a_reverted_bundle_is_unmapped_and_freed_once() {
    let syms = symbols();
    let mut reg = mapped_registry();
    let start = reg.next_free;
    reg.next_free += 0x4000;
    reg.bundles
        .push(record("old", BundleState::Reverted, start));
    reg.bundles
        .push(record("live", BundleState::Applied, start + 0x2000));
    let mut m = guest_with(&reg, GPA);
    m.mem.write_u64(PD_ENTRY, reg.pd_entries[0].1);
    let pm = PatchMem {
        layout: PatchMemLayout::new(SIZE).unwrap(),
        gpa: GPA,
        va_base: reg.va_base,
    };
    for off in [start, start + 0x1000, start + 0x2000] {
        m.mem
            .write_u64(pte_pa(&pm, off).raw(), pte(&pm, off, RegionKind::Text));
    }
    let mut s = Session::new(&mut m, &syms, layout(), GPA, SIZE).unwrap();
    let before = s.registry().unwrap();
    let err = s.reclaim(&before.bundles[1]).unwrap_err();
    assert!(
        matches!(&err, EngineError::NotReclaimable { why, .. } if why.contains("applied")),
        "{err}"
    );
    assert_eq!(s.registry().unwrap(), before, "a refusal changes nothing");
    let r = s.reclaim(&before.bundles[0]).unwrap();
    assert_eq!(r.bytes, 0x2000);
    let after = s.registry().unwrap();
    assert_eq!(after.free, vec![(start, 0x2000)]);
    assert!(after.bundles[0].reclaimed && !after.bundles[1].reclaimed);
    assert!(matches!(
        s.reclaim(&before.bundles[0]),
        Err(EngineError::NotReclaimable { .. })
    ));
    // Its pages are unmapped; the live bundle's stay.
    assert_eq!(m.mem.read_u64(pte_pa(&pm, start)).unwrap(), 0);
    assert_eq!(m.mem.read_u64(pte_pa(&pm, start + 0x1000)).unwrap(), 0);
    assert_ne!(m.mem.read_u64(pte_pa(&pm, start + 0x2000)).unwrap(), 0);
}
