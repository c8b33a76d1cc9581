//! Every failure branch of staging and of the site switch, on a fake kernel that bundles
//! really apply to (no QEMU): which calls fail is chosen with `introspect::fake::Failing`,
//! and each case checks the guest's memory afterwards.

mod common;

use std::ops::Range;

use common::fake::{GPA, SIZE};
use common::kernel::{FakeKernel, ENTRY_CODE, OLD_CODE, OPS};
use common::switch::{apply_with, assert_unchanged, registry, revert_with, site};
use lucos_introspect::fake::{Call, Failing, FakeMachine};
use lucos_introspect::{GuestPhysAddr, MachineError, PhysMem};
use lucos_patch::memory::{PatchMemLayout, REGISTRY_SLOT_SIZE};
use lucos_patch::registry::{BundleState, Header, HEADER_LEN};
use lucos_patch::{Bundle, EngineError, GateScope, GateSite, Retry, NOP5};

/// The writes of a successful apply of `b`, in order, and the guest after it.
fn dry_run(k: &FakeKernel, b: &Bundle) -> (Vec<(u64, Vec<u8>)>, FakeMachine) {
    let mut m = k.fresh.clone();
    apply_with(k, &mut m, b, |f| f).unwrap();
    (m.writes.clone(), m)
}

/// 1-based positions, among all writes of a successful apply, of the writes that matter.
struct Writes {
    /// The record committed inside the pause (slot, then header).
    commit: usize,
    /// The first word of the rewritten `ops_table`.
    word: usize,
    site1: usize,
    site2: usize,
}

fn positions(k: &FakeKernel, writes: &[(u64, Vec<u8>)]) -> Writes {
    let at = |pa: u64| writes.iter().position(|w| w.0 == pa).unwrap() + 1;
    let ops = k.pa("ops_table");
    let word = writes
        .iter()
        .position(|w| w.0 >= ops && w.0 < ops + 16)
        .unwrap()
        + 1;
    let w = Writes {
        commit: word - 2,
        word,
        site1: at(k.pa("old_lucos_f1")),
        site2: at(k.pa("old_lucos_f2")),
    };
    let patch = GPA..GPA + (1 << 20);
    assert!(patch.contains(&writes[w.commit - 1].0) && patch.contains(&writes[w.commit].0));
    assert_eq!(
        (w.word + 2, w.site1 + 1),
        (w.site1, w.site2),
        "words, then sites"
    );
    w
}

fn two(k: &FakeKernel) -> Bundle {
    k.bundle("two", &["lucos_f1", "lucos_f2"], true)
}

#[test]
fn every_failed_write_of_staging_leaves_the_guest_unchanged_and_running() {
    let k = FakeKernel::new();
    let b = two(&k);
    let w = positions(&k, &dry_run(&k, &b).0);
    assert!(
        w.commit > 4,
        "staging writes code, page tables and a record"
    );
    for n in 1..w.commit {
        let mut m = k.fresh.clone();
        let mut f = Failing::new(&mut m).fail(Call::Write, n);
        let err = k.session(&mut f).unwrap().apply(&b).unwrap_err();
        assert!(matches!(err, EngineError::Machine(_)), "write {n}: {err}");
        assert_eq!(f.count(Call::Pause), 0, "write {n}: staging never pauses");
        assert_unchanged(&k, &m, &format!("staging write {n} failed"));
    }
}

/// The record's commit (slot or header), either word of the rewritten object, the first
/// site, or the second one after the first was switched (its restore works).
#[test]
fn every_failed_write_inside_the_pause_is_undone() {
    let k = FakeKernel::new();
    let b = two(&k);
    let w = positions(&k, &dry_run(&k, &b).0);
    for n in w.commit..=w.site2 {
        let mut m = k.fresh.clone();
        let err = apply_with(&k, &mut m, &b, |f| f.fail(Call::Write, n)).unwrap_err();
        assert!(matches!(err, EngineError::Machine(_)), "write {n}: {err}");
        assert_unchanged(&k, &m, &format!("write {n} in the pause failed"));
    }
    // The restore of a site is checked, and a lost reply of a site write is restored too.
    let mut m = k.fresh.clone();
    apply_with(&k, &mut m, &b, |f| f.lose_reply(Call::CodeWrite, 2)).unwrap_err();
    assert_unchanged(&k, &m, "the second site write's reply was lost");
}

#[test]
fn a_failed_pause_leaves_the_guest_unchanged_and_running() {
    let k = FakeKernel::new();
    let b = two(&k);
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| f.fail(Call::Pause, 1)).unwrap_err();
    assert!(matches!(err, EngineError::Machine(_)), "{err}");
    assert_unchanged(&k, &m, "pause refused");
    // The VM stopped, but the reply was lost: it is resumed.
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| f.lose_reply(Call::Pause, 1)).unwrap_err();
    assert!(matches!(err, EngineError::Machine(_)), "{err}");
    assert_unchanged(&k, &m, "pause reply lost");
    // Whether it stopped cannot be told either: resumed all the same.
    let mut m = k.fresh.clone();
    apply_with(&k, &mut m, &b, |f| {
        f.lose_reply(Call::Pause, 1).fail(Call::IsPaused, 2)
    })
    .unwrap_err();
    assert_unchanged(&k, &m, "pause reply lost, state unknown");
    // It stopped and cannot be resumed: the error says so.
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| {
        f.lose_reply(Call::Pause, 1).fail(Call::Resume, 1)
    })
    .unwrap_err();
    assert!(matches!(err, EngineError::StillPaused { .. }), "{err}");
    assert!(err.to_string().contains("lucos resume"), "{err}");
    assert!(m.paused && m.mem == k.fresh.mem);
}

/// Applies `b` with a stack-check gate that answers `busy` (a holder's description) or
/// clean, and records the sites it was shown.
fn apply_gated(
    k: &FakeKernel,
    m: &mut FakeMachine,
    b: &Bundle,
    faults: impl FnOnce(Failing<'_, FakeMachine>) -> Failing<'_, FakeMachine>,
    busy: Option<&str>,
    seen: &mut Vec<(String, bool)>,
) -> Result<(), EngineError> {
    let mut f = faults(Failing::new(m));
    let mut gate = |_: &mut Failing<'_, FakeMachine>, sites: &[GateSite]| {
        seen.extend(sites.iter().map(|g| (g.function.clone(), g.window)));
        Ok(busy.map(str::to_owned))
    };
    let mut sess = k.session(&mut f)?;
    let retry = Retry {
        tries: 2,
        backoff: std::time::Duration::from_millis(1),
    };
    sess.set_gate(&mut gate, retry, GateScope::EntryWindows);
    sess.apply(b).map(|_| ())
}

#[test]
fn a_failed_check_in_the_pause_leaves_the_guest_unchanged_and_running() {
    let k = FakeKernel::new();
    let entry = k.bundle("entry", &["lucos_f1", "lucos_f4"], false);
    let mut seen = Vec::new();
    let mut m = k.fresh.clone();
    let err = apply_gated(
        &k,
        &mut m,
        &entry,
        |f| f.fail(Call::Registers, 1),
        None,
        &mut seen,
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Machine(_)), "{err}");
    assert_unchanged(&k, &m, "reading a vCPU's rip failed");
    let mut m = k.fresh.clone();
    m.regs[0].rip = k.syms.lookup("old_lucos_f4").unwrap().addr + 1;
    let err = apply_gated(&k, &mut m, &entry, |f| f, None, &mut seen).unwrap_err();
    assert!(
        matches!(err, EngineError::RipInSite { vcpu: 0, .. }),
        "{err}"
    );
    assert_unchanged(&k, &m, "a vCPU inside an entry window");
    // Fentry sites hold one instruction, so no rip can be inside one: they are not read.
    let mut m = k.fresh.clone();
    m.regs[0].rip = k.syms.lookup("old_lucos_f2").unwrap().addr + 2;
    apply_with(&k, &mut m, &two(&k), |f| f.fail(Call::Registers, 1)).unwrap();
}

#[test]
fn an_entry_site_is_switched_only_after_a_stack_check() {
    let k = FakeKernel::new();
    let entry = k.bundle("entry", &["lucos_f1", "lucos_f4"], false);
    let f4 = k.pa("old_lucos_f4");
    // Without a gate nothing is even staged.
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &entry, |f| f).unwrap_err();
    assert!(
        matches!(&err, EngineError::EntryNeedsStackCheck { function } if function == "old_lucos_f4"),
        "{err}"
    );
    assert_unchanged(&k, &m, "no stack check");
    assert!(m.writes.is_empty());
    // A task in the window at every try: refused, unchanged; only f4 is a window.
    let (mut m, mut seen) = (k.fresh.clone(), Vec::new());
    let err = apply_gated(&k, &mut m, &entry, |f| f, Some("pid 7"), &mut seen).unwrap_err();
    assert!(
        matches!(&err, EngineError::NotQuiescent { tries: 2, holders, .. } if holders == "pid 7"),
        "{err}"
    );
    assert_unchanged(&k, &m, "a task in an entry window");
    let windows: Vec<bool> = seen.iter().map(|s| s.1).collect();
    assert_eq!(windows, [false, true, false, true]);
    // Clean: the entry takes the jmp, and revert puts its own instructions back.
    let (mut m, mut seen) = (k.fresh.clone(), Vec::new());
    apply_gated(&k, &mut m, &entry, |f| f, None, &mut seen).unwrap();
    assert_eq!(site(&m, f4)[0], 0xe9);
    assert_eq!(
        registry(&k, &mut m).bundles[0].sites[1].original,
        ENTRY_CODE[..5]
    );
    revert_with(&k, &mut m, "entry", |f| f).unwrap();
    let mut back = [0u8; 6];
    m.read_phys(GuestPhysAddr(f4), &mut back).unwrap();
    assert_eq!(back, ENTRY_CODE);
}

/// The defect this guards against: a site that cannot be put back while its record was
/// rewritten to the old registry, leaving a live `jmp` no record describes, into pages a
/// later apply would be given again.
#[test]
fn a_site_that_cannot_be_restored_keeps_a_half_applied_record() {
    let k = FakeKernel::new();
    let b = two(&k);
    let (_, done) = dry_run(&k, &b);
    let (s1, s2) = (k.pa("old_lucos_f1"), k.pa("old_lucos_f2"));
    let mut m = k.fresh.clone();
    // The second site write fails, then the first site's restore.
    let err = apply_with(&k, &mut m, &b, |f| {
        f.fail(Call::CodeWrite, 2).fail(Call::CodeWrite, 3)
    })
    .unwrap_err();
    assert!(matches!(err, EngineError::Machine(_)), "{err}");
    assert!(!m.paused);
    assert_eq!(site(&m, s1), site(&done, s1), "the first site kept its jmp");
    assert_eq!(site(&m, s2), NOP5);
    let mut ops = [0u8; 16];
    m.read_phys(GuestPhysAddr(k.pa("ops_table")), &mut ops)
        .unwrap();
    assert_eq!(ops, OPS, "the rewritten words were put back");
    let reg = registry(&k, &mut m);
    let rec = reg.find_applied("two").expect("the record is kept");
    assert!(rec.half_applied);
    assert_eq!(rec.sites.len(), 1, "only the site that may hold the jmp");
    assert_eq!(rec.sites[0].site_pa, s1);
    assert!(rec.rewrites.is_empty() && rec.module.is_none());
    // Its pages stay allocated and keep the staged code the jmp leads to.
    let end = rec.ranges.iter().map(|r| r.offset + r.len).max().unwrap();
    assert!(reg.next_free >= end);
    for r in &rec.ranges {
        let mut now = vec![0u8; r.len as usize];
        let mut then = vec![0u8; r.len as usize];
        m.read_phys(GuestPhysAddr(GPA + r.offset), &mut now)
            .unwrap();
        done.read_phys(GuestPhysAddr(GPA + r.offset), &mut then)
            .unwrap();
        assert_eq!(now, then, "range at {:#x} was rolled back", r.offset);
    }
    // A following apply is given other pages.
    let other = k.bundle("other", &["lucos_f3"], false);
    apply_with(&k, &mut m, &other, |f| f).unwrap();
    let reg = registry(&k, &mut m);
    let o = reg.find_applied("other").unwrap();
    assert!(o.ranges.iter().all(|r| r.offset >= end), "{:?}", o.ranges);
    // Revert puts the site back and clears the mark.
    revert_with(&k, &mut m, "two", |f| f).unwrap();
    assert_eq!(site(&m, s1), NOP5);
    assert_eq!(site(&m, s2), NOP5);
    let reg = registry(&k, &mut m);
    let rec = reg.bundles.iter().find(|r| r.id == "two").unwrap();
    assert!(rec.state == BundleState::Reverted && !rec.half_applied);
    revert_with(&k, &mut m, "other", |f| f).unwrap();
    let mut code = [0u8; 8];
    for f in ["old_lucos_f1", "old_lucos_f2", "old_lucos_f3"] {
        m.read_phys(GuestPhysAddr(k.pa(f)), &mut code).unwrap();
        assert_eq!(code, OLD_CODE, "{f}");
    }
}

/// A site whose restore was reported failed but landed holds the original bytes: the
/// revert of the half-applied record accepts that and writes nothing there.
#[test]
fn reverting_a_half_applied_record_is_idempotent() {
    let k = FakeKernel::new();
    let b = two(&k);
    let s1 = k.pa("old_lucos_f1");
    let mut m = k.fresh.clone();
    apply_with(&k, &mut m, &b, |f| {
        f.fail(Call::CodeWrite, 2).lose_reply(Call::CodeWrite, 3)
    })
    .unwrap_err();
    assert_eq!(site(&m, s1), NOP5);
    assert!(
        registry(&k, &mut m)
            .find_applied("two")
            .unwrap()
            .half_applied
    );
    let writes = m.writes.len();
    revert_with(&k, &mut m, "two", |f| f).unwrap();
    assert!(
        m.writes[writes..].iter().all(|w| w.0 != s1),
        "the site already held its original bytes"
    );
    assert_eq!(site(&m, s1), NOP5);
    assert!(registry(&k, &mut m).find_applied("two").is_none());
}

#[test]
fn a_failed_revert_is_undone_or_kept_half_applied() {
    let k = FakeKernel::new();
    let b = two(&k);
    let (_, applied) = dry_run(&k, &b);
    let (s1, s2) = (k.pa("old_lucos_f1"), k.pa("old_lucos_f2"));
    // Revert writes the words (2), the sites (2), then commits (slot, header): each
    // failing write is undone.
    for n in 1..=6 {
        let mut m = applied.clone();
        let err = revert_with(&k, &mut m, "two", |f| f.fail(Call::Write, n)).unwrap_err();
        assert!(matches!(err, EngineError::Machine(_)), "write {n}: {err}");
        assert!(m.mem == applied.mem, "revert write {n}: the guest changed");
        assert!(!m.paused);
    }
    // The second site fails and the first cannot be put back: the record stays applied,
    // marked, with both sites; a second revert finishes.
    let mut m = applied.clone();
    revert_with(&k, &mut m, "two", |f| {
        f.fail(Call::CodeWrite, 2).fail(Call::CodeWrite, 3)
    })
    .unwrap_err();
    assert_eq!(site(&m, s1), NOP5);
    assert_eq!(site(&m, s2), site(&applied, s2));
    let rec = registry(&k, &mut m).find_applied("two").cloned().unwrap();
    assert!(rec.half_applied && rec.sites.len() == 2);
    revert_with(&k, &mut m, "two", |f| f).unwrap();
    assert_eq!((site(&m, s1), site(&m, s2)), (NOP5, NOP5));
}

#[test]
fn a_failed_resume_says_the_change_was_made() {
    let k = FakeKernel::new();
    let b = two(&k);
    let (_, done) = dry_run(&k, &b);
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| f.fail(Call::Resume, 1)).unwrap_err();
    assert!(matches!(err, EngineError::ResumeFailed(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("was made") && text.contains("lucos resume"),
        "{text}"
    );
    assert!(
        !text.contains("unchanged") && !text.contains("untouched"),
        "{text}"
    );
    assert!(m.paused, "the VM is still paused");
    let s1 = k.pa("old_lucos_f1");
    assert_eq!(site(&m, s1), site(&done, s1), "the switch stands");
    assert!(registry(&k, &mut m).find_applied("two").is_some());
    // A failed switch that cannot resume either: undone, and the error says paused.
    let mut m = k.fresh.clone();
    let err = apply_with(&k, &mut m, &b, |f| {
        f.fail(Call::CodeWrite, 1).fail(Call::Resume, 1)
    })
    .unwrap_err();
    assert!(
        matches!(&err, EngineError::StillPaused { error, .. } if matches!(**error, EngineError::Machine(_))),
        "{err}"
    );
    assert!(m.paused && m.mem == k.fresh.mem);
}

#[test]
fn a_bundle_applies_and_reverts_on_the_fake_kernel() {
    let k = FakeKernel::new();
    let b = k.bundle("two", &["lucos_f1", "lucos_f2"], true);
    let (writes, mut m) = dry_run(&k, &b);
    assert!(!m.paused, "the VM was resumed");
    let (s1, s2) = (k.pa("old_lucos_f1"), k.pa("old_lucos_f2"));
    assert_eq!(site(&m, s1)[0], 0xe9);
    assert_eq!(site(&m, s2)[0], 0xe9);
    let mut ops = [0u8; 16];
    m.read_phys(GuestPhysAddr(k.pa("ops_table")), &mut ops)
        .unwrap();
    assert_eq!(&ops[..2], &[0x33, 0x33]);
    eprintln!("{} writes", writes.len());
    revert_with(&k, &mut m, "two", |f| f).unwrap();
    assert_eq!(site(&m, s1), NOP5);
    m.read_phys(GuestPhysAddr(k.pa("ops_table")), &mut ops)
        .unwrap();
    assert_eq!(ops, OPS);
}

/// Guest-physical range of registry slot `slot`.
fn slot_range(slot: u32) -> Range<u64> {
    let at = GPA + PatchMemLayout::new(SIZE).unwrap().slot_offset(slot);
    at..at + REGISTRY_SLOT_SIZE as u64
}

/// The registry slot a commit would write next: the one the header does not mark active.
fn inactive_slot(m: &FakeMachine) -> u32 {
    let mut b = [0u8; HEADER_LEN];
    m.read_phys(GuestPhysAddr(GPA), &mut b).unwrap();
    match Header::decode(&b).unwrap() {
        Some(h) => 1 - h.active,
        None => 1,
    }
}

/// Whether `err` is the read failure `Failing::fail_read` injects.
fn injected_read(err: &EngineError) -> bool {
    matches!(err, EngineError::Machine(MachineError::Engine(e))
        if e.to_string().starts_with("injected failure of read"))
}

/// The switch saves the bytes a commit overwrites (the inactive slot and the header)
/// before it pauses; when that read fails, the staged code and page tables are rolled
/// back and the guest never stops. Only the switch reads the inactive slot of a guest
/// that already has a mapping (an apply reads the active one), so failing its first read
/// fails exactly that snapshot.
#[test]
fn a_failed_registry_snapshot_read_leaves_the_guest_unchanged_and_running() {
    let k = FakeKernel::new();
    let (_, mut m) = dry_run(&k, &k.bundle("first", &["lucos_f3"], false));
    let before = m.clone();
    let b = two(&k);
    let slot = slot_range(inactive_slot(&m));
    let mut f = Failing::new(&mut m).fail_read(slot, 1);
    let err = k.session(&mut f).unwrap().apply(&b).unwrap_err();
    assert!(injected_read(&err), "{err}");
    assert_eq!(f.reads_seen(0), 1, "nothing else read the slot");
    assert_eq!(f.count(Call::Pause), 0, "it failed before the pause");
    assert!(f.count(Call::Write) > 0, "staging had written");
    drop(f);
    assert!(m.mem == before.mem, "the staged bundle was not rolled back");
    assert!(!m.paused);
    let reg = registry(&k, &mut m);
    assert!(reg.find_applied("two").is_none() && reg.find_applied("first").is_some());
    // The guest is as good as before: the same apply now succeeds.
    apply_with(&k, &mut m, &b, |f| f).unwrap();
}

/// A first apply also commits the new mapping before staging, after saving what that
/// commit overwrites (slot 1 of fresh patch memory), and saves again in the switch (slot
/// 0 then). Either read failing leaves fresh patch memory as it was.
#[test]
fn a_failed_snapshot_read_of_a_first_apply_leaves_the_guest_unchanged() {
    let k = FakeKernel::new();
    let b = two(&k);
    for (slot, writes) in [(1, false), (0, true)] {
        let mut m = k.fresh.clone();
        let mut f = Failing::new(&mut m).fail_read(slot_range(slot), 1);
        let err = k.session(&mut f).unwrap().apply(&b).unwrap_err();
        assert!(injected_read(&err), "slot {slot}: {err}");
        assert_eq!(f.count(Call::Pause), 0, "slot {slot}");
        assert_eq!(f.count(Call::Write) > 0, writes, "slot {slot}");
        drop(f);
        assert_unchanged(&k, &m, &format!("the snapshot of slot {slot} failed"));
    }
}
