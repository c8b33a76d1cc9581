//! The kernel edit of a switch (linking the bundle's `struct module` into the kernel's module
//! list, bug list and module tree, inside the pause) failing, on a fake kernel with module
//! bookkeeping (no QEMU). Each case checks the guest's memory afterwards: the edit comes
//! after the registry commit, so its failure must undo the kernel words written so far,
//! the commit and the staged code.

mod common;

use common::fake::GPA;
use common::kernel::FakeKernel;
use lucos_introspect::fake::{Call, Failing, FakeMachine};
use lucos_introspect::{GuestPhysAddr, PhysMem};
use lucos_patch::kmod::{KmodError, RegisterError};
use lucos_patch::{Bundle, EngineError};

fn bundle(k: &FakeKernel) -> Bundle {
    k.bundle("one", &["lucos_f1"], false)
}

fn read_u64(m: &FakeMachine, pa: u64) -> u64 {
    let mut b = [0u8; 8];
    m.read_phys(GuestPhysAddr(pa), &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// The writes of a successful apply, and the guest after it.
fn dry_run(k: &FakeKernel, b: &Bundle) -> (Vec<(u64, Vec<u8>)>, FakeMachine) {
    let mut m = k.fresh.clone();
    k.session(&mut m).unwrap().apply(b).unwrap();
    (m.writes.clone(), m)
}

/// 1-based positions, among the writes of a successful apply, of the kernel edit: the
/// writes after the commit inside the pause (its header write) and before the site.
fn edit_writes(k: &FakeKernel, writes: &[(u64, Vec<u8>)]) -> std::ops::Range<usize> {
    let site = writes
        .iter()
        .position(|w| w.0 == k.pa("old_lucos_f1"))
        .unwrap();
    let commit = writes[..site].iter().rposition(|w| w.0 == GPA).unwrap();
    commit + 2..site + 1
}

fn assert_unchanged(before: &FakeMachine, m: &FakeMachine, what: &str) {
    assert!(m.mem == before.mem, "{what}: the guest's memory changed");
    assert!(!m.paused, "{what}: the VM was left paused");
}

/// Guards the fake itself: on it an apply does link a module into the kernel's list, so
/// the failures below are failures of a real kernel edit.
#[test]
fn an_apply_links_the_bundles_module_into_the_kernel() {
    let k = FakeKernel::with_modules();
    let (writes, m) = dry_run(&k, &bundle(&k));
    let head = k.pa("modules");
    assert_eq!(
        read_u64(&k.fresh, head),
        k.syms.lookup("modules").unwrap().addr
    );
    let first = read_u64(&m, head);
    assert_ne!(
        first,
        k.syms.lookup("modules").unwrap().addr,
        "no module linked"
    );
    let edit = edit_writes(&k, &writes);
    assert!(
        writes[edit.start - 1..edit.end - 1]
            .iter()
            .any(|w| w.0 == head),
        "the list head is written in the edit"
    );
    let reg = k.session(&mut m.clone()).unwrap().registry().unwrap();
    let rec = reg.find_applied("one").unwrap();
    assert_eq!(
        rec.module.as_ref().unwrap().va + 8,
        first,
        "list at offset 8"
    );
}

#[test]
fn every_failed_write_of_the_kernel_edit_is_undone() {
    let k = FakeKernel::with_modules();
    let b = bundle(&k);
    let edit = edit_writes(&k, &dry_run(&k, &b).0);
    assert!(
        edit.len() >= 6,
        "list, bug list, latch, two trees, bounds: {edit:?}"
    );
    for n in edit {
        let mut m = k.fresh.clone();
        let mut f = Failing::new(&mut m).fail(Call::Write, n);
        let err = k.session(&mut f).unwrap().apply(&b).unwrap_err();
        assert!(matches!(err, EngineError::Machine(_)), "write {n}: {err}");
        assert_eq!(f.count(Call::Pause), 1, "write {n} is inside the pause");
        drop(f);
        assert_unchanged(&k.fresh, &m, &format!("kernel edit write {n} failed"));
    }
}

/// The kernel holds `module_mutex`: the edit is refused inside the pause, after the commit.
#[test]
fn a_kernel_edit_refused_in_the_pause_leaves_the_guest_unchanged() {
    let k = FakeKernel::with_modules();
    let b = bundle(&k);
    let mut m = k.fresh.clone();
    m.mem.write_u64(k.pa("module_mutex"), 0xffff_8880_0123_4000);
    let before = m.clone();
    let mut f = Failing::new(&mut m);
    let err = k.session(&mut f).unwrap().apply(&b).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Kmod(KmodError::Register(RegisterError::Busy {
                lock: "module_mutex",
                ..
            }))
        ),
        "{err}"
    );
    assert_eq!(f.count(Call::Pause), 1);
    drop(f);
    assert!(
        m.writes[before.writes.len()..].iter().any(|w| w.0 == GPA),
        "the record was committed before the edit"
    );
    assert_unchanged(&before, &m, "the edit was refused");
}

/// Reading the kernel's state for the edit fails (the first read of `module_mutex`, which
/// only the edit reads).
#[test]
fn a_failed_read_for_the_kernel_edit_leaves_the_guest_unchanged() {
    let k = FakeKernel::with_modules();
    let b = bundle(&k);
    let mut m = k.fresh.clone();
    let mutex = k.pa("module_mutex");
    let mut f = Failing::new(&mut m).fail_read(mutex..mutex + 8, 1);
    let err = k.session(&mut f).unwrap().apply(&b).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Kmod(KmodError::Register(RegisterError::Read { .. }))
        ),
        "{err}"
    );
    assert_eq!(f.count(Call::Pause), 1, "the edit is read inside the pause");
    drop(f);
    assert_unchanged(&k.fresh, &m, "the edit's read failed");
}

/// A kernel edit that fails and whose undo fails too: as the switch documents, the record
/// is kept, marked half-applied, with its module (the kernel may still link it) and its
/// pages (not rolled back), and without sites (none was written). A revert then unlinks
/// what is linked and leaves the kernel's bookkeeping as before the apply.
#[test]
fn a_kernel_edit_that_cannot_be_undone_keeps_a_half_applied_record() {
    let k = FakeKernel::with_modules();
    let b = bundle(&k);
    let (writes, _) = dry_run(&k, &b);
    let edit = edit_writes(&k, &writes);
    // The second word fails after the first landed; then the first word of the undo.
    let n = edit.start + 1;
    let mut m = k.fresh.clone();
    let err = {
        let mut f = Failing::new(&mut m)
            .fail(Call::Write, n)
            .fail(Call::Write, n + 1);
        k.session(&mut f).unwrap().apply(&b).unwrap_err()
    };
    assert!(matches!(err, EngineError::Machine(_)), "{err}");
    assert!(!m.paused);
    let site = k.pa("old_lucos_f1");
    assert_eq!(
        read_u64(&m, site),
        read_u64(&k.fresh, site),
        "no site was written"
    );
    let reg = k.session(&mut m).unwrap().registry().unwrap();
    let rec = reg.find_applied("one").expect("the record is kept").clone();
    assert!(rec.half_applied && rec.sites.is_empty());
    let module = rec.module.as_ref().expect("the module record is kept");
    let mut region = vec![0u8; 16];
    let staged = GPA + rec.ranges.iter().map(|r| r.offset).max().unwrap();
    m.read_phys(GuestPhysAddr(staged), &mut region).unwrap();
    assert_ne!(region, [0u8; 16], "the staged module was not rolled back");
    assert!(module.va != 0);

    k.session(&mut m).unwrap().revert("one").unwrap();
    for name in ["modules", "module_bug_list", "mod_tree"] {
        let len = k.syms.lookup(name).unwrap().size as usize;
        assert!(len >= 16, "{name}");
        let mut now = vec![0u8; len];
        let mut then = vec![0u8; len];
        m.read_phys(GuestPhysAddr(k.pa(name)), &mut now).unwrap();
        k.fresh
            .read_phys(GuestPhysAddr(k.pa(name)), &mut then)
            .unwrap();
        if name == "mod_tree" {
            // The latch sequence moves on with every change, as the kernel's does.
            now[..4].fill(0);
            then[..4].fill(0);
        }
        assert_eq!(now, then, "{name} after the revert");
    }
}

/// A boot whose direct map puts patch memory in an empty top-level slot (page_offset_base
/// 1 GiB below the end of one): a bundle without static-branch sites, which the kernel
/// never rewrites, applies all the same, and nothing is written into the direct map.
#[test]
fn a_bundle_the_kernel_never_pokes_applies_where_the_direct_map_cannot_reach() {
    let k = FakeKernel::with_modules();
    let mut m = k.fresh.clone();
    let pob = 0xffff_8900_0000_0000u64 - (1 << 30);
    m.mem.write_u64(k.pa("page_offset_base"), pob);
    let before = m.clone();
    k.session(&mut m).unwrap().apply(&bundle(&k)).unwrap();
    let reg = k.session(&mut m).unwrap().registry().unwrap();
    assert!(reg.find_applied("one").is_some());
    let dm = lucos_patch::memory::PatchMem {
        layout: lucos_patch::memory::PatchMemLayout::new(common::fake::SIZE).unwrap(),
        gpa: GPA,
        va_base: reg.va_base,
    };
    let err = lucos_patch::memory::direct_map_entries(&m, k.layout.cr3, &dm, pob).unwrap_err();
    assert!(err.to_string().contains("direct map"), "{err}");
    assert!(m.mem != before.mem, "the apply wrote nothing");
}

/// New exports go into the export tables of the bundle's module, sorted by name, each
/// entry pointing at its symbol, its name and its namespace. A module that links against
/// them holds the bundle: its revert is refused, leaving the guest unchanged, until that
/// module is gone.
#[test]
fn new_exports_are_the_modules_and_a_user_holds_the_revert() {
    use lucos_introspect::paging::{read_virt, read_virt_u64};
    use lucos_introspect::GuestVirtAddr;
    use lucos_patch::Export;
    let k = FakeKernel::with_modules();
    let export = |name: &str, symbol: Option<&str>, gpl, ns: Option<&str>| Export {
        name: name.into(),
        symbol: symbol.map(Into::into),
        gpl,
        namespace: ns.map(Into::into),
    };
    let b = k.bundle_with("ex", &["lucos_f1", "lucos_f2"], false, |m| {
        m.exports = vec![
            export("old_lucos_f3", None, false, None),
            export("lucos_f2", Some("lucos_f2"), false, None),
            export("lucos_gpl", Some("lucos_f1"), true, Some("LUCOS_NS")),
        ];
    });
    let mut m = k.fresh.clone();
    k.session(&mut m).unwrap().apply(&b).unwrap();
    let cr3 = k.layout.cr3;
    let l = lucos_patch::kmod::probe(&m, &k.syms, &k.layout)
        .unwrap()
        .layout;
    let reg = k.session(&mut m).unwrap().registry().unwrap();
    let rec = reg.find_applied("ex").unwrap().clone();
    let module = rec.module.as_ref().unwrap().va;
    let new_addr = |f: &str| {
        rec.sites
            .iter()
            .find(|s| s.new_symbol == f)
            .unwrap()
            .new_addr
    };
    let word = |va: u64| read_virt_u64(&m, cr3, GuestVirtAddr(va)).unwrap();
    let rel = |va: u64| va.wrapping_add(word(va) as u32 as i32 as i64 as u64);
    let text = |va: u64| {
        let mut b = [0u8; 16];
        read_virt(&m, cr3, GuestVirtAddr(va), &mut b).unwrap();
        let end = b.iter().position(|&c| c == 0).unwrap();
        String::from_utf8(b[..end].to_vec()).unwrap()
    };
    let table = |field: u64, count: u64| (word(module + field), word(module + count) as u32);
    let (plain, n) = table(l.syms, l.num_syms);
    assert_eq!(n, 2);
    let f3 = k.layout.live(k.syms.lookup("old_lucos_f3").unwrap().addr);
    for (i, (name, addr)) in [("lucos_f2", new_addr("lucos_f2")), ("old_lucos_f3", f3)]
        .into_iter()
        .enumerate()
    {
        let at = plain + 12 * i as u64;
        assert_eq!((rel(at), text(rel(at + 4))), (addr, name.to_string()));
        assert_eq!(word(at + 8) as u32, 0, "{name}: no namespace");
    }
    let (gpl, n) = table(l.gpl_syms, l.num_gpl_syms);
    assert_eq!(n, 1);
    assert_eq!(rel(gpl), new_addr("lucos_f1"));
    assert_eq!(text(rel(gpl + 4)), "lucos_gpl");
    assert_eq!(text(rel(gpl + 8)), "LUCOS_NS");

    // A module that uses the exports: `ref_module()` put a `struct module_use` on the
    // bundle module's source_list. It is built in the unused tail of the module's range
    // (sized from a bound), with the user's name where its `struct module` has it.
    let r = rec
        .ranges
        .iter()
        .find(|r| (r.va..r.va + r.len).contains(&module))
        .unwrap();
    let spare = r.va + r.len - 0x40;
    assert_eq!(word(spare) | word(spare + 0x38), 0, "the tail is unused");
    let pa = |va: u64| {
        lucos_introspect::paging::translate(&m, cr3, GuestVirtAddr(va))
            .unwrap()
            .pa
            .0
    };
    let (use_va, user) = (spare, spare + 0x38 - l.name);
    let head = module + l.source_list;
    let mut with_user = m.clone();
    let w = &mut with_user.mem;
    w.write_u64(pa(head), use_va + l.use_source_list);
    w.write_u64(pa(head + 8), use_va + l.use_source_list);
    w.write_u64(pa(use_va + l.use_source_list), head);
    w.write_u64(pa(use_va + l.use_source_list + 8), head);
    w.write_u64(pa(use_va + l.use_source), user);
    w.write_u64(pa(user + l.name), u64::from_le_bytes(*b"usermod\0"));
    let before = with_user.clone();
    let err = k.session(&mut with_user).unwrap().revert("ex").unwrap_err();
    assert!(
        matches!(&err, EngineError::Kmod(KmodError::Register(RegisterError::InUse { users }))
            if users == "usermod"),
        "{err}"
    );
    assert!(
        with_user.mem == before.mem,
        "a refused revert changed the guest"
    );
    // Without the user, the revert goes through.
    k.session(&mut m).unwrap().revert("ex").unwrap();
}
