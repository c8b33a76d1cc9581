use super::*;
use crate::fake::FakeMem;
use crate::{GuestPhysAddr as P, GuestVirtAddr as V};

const K: u64 = 0xffff_ffff_8100_0000;

fn setup() -> (FakeMem, u64) {
    let mut m = FakeMem::new();
    let cr3 = m.new_pml4();
    (m, cr3)
}

#[test]
fn maps_4k_page() {
    let (mut m, cr3) = setup();
    m.map(cr3, K, 0x20_0000, PageSize::Size4K, PRESENT | RW | GLOBAL);
    let t = translate(&m, cr3, V(K + 0x123)).unwrap();
    assert_eq!(t.pa, P(0x20_0123));
    assert_eq!(t.page_size, PageSize::Size4K);
    assert!(t.writable && !t.user && !t.nx && t.global);
    assert_eq!(t.page_pa(), P(0x20_0000));
    assert_eq!(t.bytes_left_in_page(), 0x1000 - 0x123);
}

#[test]
fn maps_2m_page_and_ignores_pat_bit() {
    let (mut m, cr3) = setup();
    // Bit 12 in a large leaf is PAT, not an address bit.
    m.map(cr3, K, 0x4000_0000, PageSize::Size2M, PRESENT | (1 << 12));
    let t = translate(&m, cr3, V(K + 0x1f_f00f)).unwrap();
    assert_eq!(t.pa, P(0x401f_f00f));
    assert_eq!(t.page_size, PageSize::Size2M);
    assert!(!t.writable);
}

#[test]
fn maps_1g_page() {
    let (mut m, cr3) = setup();
    let va = 0xffff_8880_0000_0000;
    m.map(cr3, va, 0x1_4000_0000, PageSize::Size1G, PRESENT | RW | NX);
    let t = translate(&m, cr3, V(va + 0x3fff_fff0)).unwrap();
    assert_eq!(t.pa, P(0x1_7fff_fff0));
    assert_eq!(t.page_size, PageSize::Size1G);
    assert!(t.nx && t.writable);
}

#[test]
fn permissions_combine_across_levels() {
    let (mut m, cr3) = setup();
    // Leaf says RW|US but a table level clears RW and sets NX.
    m.map_with(
        cr3,
        0x40_0000,
        0x30_0000,
        PageSize::Size4K,
        PRESENT | RW | US,
        PRESENT | US | NX,
    );
    let t = translate(&m, cr3, V(0x40_0000)).unwrap();
    assert!(!t.writable && t.user && t.nx && !t.global);
    // A table level without US makes the page supervisor-only.
    m.map_with(
        cr3,
        0x7f00_0000_0000,
        0x31_0000,
        PageSize::Size4K,
        PRESENT | RW | US,
        PRESENT | RW,
    );
    let t = translate(&m, cr3, V(0x7f00_0000_0000)).unwrap();
    assert!(t.writable && !t.user && !t.nx);
}

#[test]
fn protection_key_and_high_bits_are_ignored() {
    let (mut m, cr3) = setup();
    let pkey = 0xf << 59;
    m.map(
        cr3,
        K,
        0x20_0000,
        PageSize::Size4K,
        PRESENT | pkey | (1 << 52),
    );
    assert_eq!(translate(&m, cr3, V(K)).unwrap().pa, P(0x20_0000));
}

#[test]
fn not_present_names_each_level() {
    let (mut m, cr3) = setup();
    m.map(cr3, K, 0x20_0000, PageSize::Size4K, PRESENT);
    let cases = [
        (0xffff_8000_0000_0000u64, Level::Pml4),
        (K + (1 << 30), Level::Pdpt),
        (K + (1 << 21), Level::Pd),
        (K + 0x1000, Level::Pt),
    ];
    for (va, want) in cases {
        match translate(&m, cr3, V(va)) {
            Err(PagingError::NotMapped { va: v, level }) => {
                assert_eq!((v, level), (va, want));
            }
            other => panic!("{va:#x}: {other:?}"),
        }
        let w = walk(&m, cr3, V(va)).unwrap();
        assert_eq!(w.stopped_at(), Some(want));
        assert_eq!(
            w.entries.len(),
            Level::ALL.iter().position(|l| *l == want).unwrap() + 1
        );
    }
}

#[test]
fn walk_reports_entry_addresses() {
    let (mut m, cr3) = setup();
    m.map(cr3, K, 0x20_0000, PageSize::Size4K, PRESENT);
    let w = walk(&m, cr3, V(K + 0x1000)).unwrap();
    assert_eq!(
        w.entries[0].entry_pa,
        P(cr3 + 8 * Level::Pml4.index(K) as u64)
    );
    let pd = w.entry(Level::Pd).unwrap();
    let pt = w.entry(Level::Pt).unwrap();
    assert_eq!(pt.entry_pa, pd.table_pa() + 8);
    assert!(!pt.present());
    // Writing the PT entry from outside maps the page.
    m.write_u64(pt.entry_pa.raw(), 0x50_0000 | PRESENT);
    assert_eq!(translate(&m, cr3, V(K + 0x1008)).unwrap().pa, P(0x50_0008));
    let w = walk(&m, cr3, V(K)).unwrap();
    assert!(w.entries[3].is_leaf() && w.stopped_at().is_none());
}

#[test]
fn non_canonical_is_rejected() {
    let (m, cr3) = setup();
    for va in [0x0000_8000_0000_0000u64, 0xfff0_0000_0000_0000] {
        assert!(matches!(
            translate(&m, cr3, V(va)),
            Err(PagingError::NonCanonical { .. })
        ));
    }
    assert!(is_canonical(V(K)) && is_canonical(V(0x7fff_ffff_ffff)));
}

#[test]
fn ps_in_pml4_is_reserved() {
    let (mut m, cr3) = setup();
    m.write_u64(cr3, 0x20_0000 | PRESENT | PS);
    assert!(matches!(
        translate(&m, cr3, V(0x1000)),
        Err(PagingError::ReservedBit {
            level: Level::Pml4,
            ..
        })
    ));
}

#[test]
fn cr3_pcid_and_flag_bits_are_masked() {
    let (mut m, cr3) = setup();
    m.map(cr3, K, 0x20_0000, PageSize::Size4K, PRESENT);
    let noisy = cr3 | 0x7ff | (1 << 63) | (1 << 61);
    assert_eq!(translate(&m, noisy, V(K)).unwrap().pa, P(0x20_0000));
}

#[test]
fn read_virt_crosses_pages() {
    let (mut m, cr3) = setup();
    // Two virtually adjacent pages on physically distant frames.
    m.map(cr3, K, 0x20_0000, PageSize::Size4K, PRESENT);
    m.map(cr3, K + 0x1000, 0x90_0000, PageSize::Size4K, PRESENT);
    m.write(0x20_0ffc, &[1, 2, 3, 4]);
    m.write(0x90_0000, &[5, 6, 7, 8]);
    let mut buf = [0u8; 8];
    read_virt(&m, cr3, V(K + 0xffc), &mut buf).unwrap();
    assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8]);
    let chunks = virt_to_phys_ranges(&m, cr3, V(K + 0xffc), 8).unwrap();
    assert_eq!(
        chunks,
        vec![
            PhysChunk {
                va: V(K + 0xffc),
                pa: P(0x20_0ffc),
                len: 4
            },
            PhysChunk {
                va: V(K + 0x1000),
                pa: P(0x90_0000),
                len: 4
            },
        ]
    );
    assert_eq!(
        read_virt_u64(&m, cr3, V(K + 0xffc)).unwrap(),
        0x0807060504030201
    );
    // Running into an unmapped page fails as a whole.
    let mut big = [0u8; 0x1000];
    assert!(matches!(
        read_virt(&m, cr3, V(K + 0x1800), &mut big),
        Err(PagingError::NotMapped { va, level: Level::Pt }) if va == K + 0x2000
    ));
}

#[test]
fn write_virt_is_all_or_nothing() {
    let (mut m, cr3) = setup();
    m.map(cr3, K, 0x20_0000, PageSize::Size4K, PRESENT);
    m.write(0x20_0000, &[0; 4096]);
    let mut fm = crate::fake::FakeMachine::new(m, 1);
    write_virt(&mut fm, cr3, V(K + 0xffe), &[9, 9]).unwrap();
    assert!(write_virt(&mut fm, cr3, V(K + 0xffe), &[7, 7, 7]).is_err());
    let mut b = [0u8; 2];
    read_virt(&fm, cr3, V(K + 0xffe), &mut b).unwrap();
    assert_eq!(b, [9, 9]);
}

#[test]
fn range_overflow_is_rejected() {
    let (m, cr3) = setup();
    assert!(matches!(
        virt_to_phys_ranges(&m, cr3, V(u64::MAX - 1), 4),
        Err(PagingError::RangeOverflow { .. })
    ));
    assert!(virt_to_phys_ranges(&m, cr3, V(u64::MAX), 0)
        .unwrap()
        .is_empty());
}

#[test]
fn paging_mode_checks() {
    let ok = VcpuRegs {
        cr0: CR0_PG | 1,
        cr4: CR4_PAE,
        efer: EFER_LMA | (1 << 8),
        ..Default::default()
    };
    check_paging_mode(&ok).unwrap();
    let off = VcpuRegs {
        cr0: 1,
        ..ok.clone()
    };
    assert!(matches!(
        check_paging_mode(&off),
        Err(PagingError::PagingDisabled)
    ));
    let legacy = VcpuRegs {
        efer: 0,
        ..ok.clone()
    };
    assert!(matches!(
        check_paging_mode(&legacy),
        Err(PagingError::NotLongMode {
            pae: true,
            lma: false
        })
    ));
    let la57 = VcpuRegs {
        cr4: CR4_PAE | CR4_LA57,
        ..ok
    };
    let e = check_paging_mode(&la57).unwrap_err();
    assert!(e.to_string().contains("no5lvl"), "{e}");
}
