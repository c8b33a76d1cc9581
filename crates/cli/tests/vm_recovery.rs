//! A lucos that dies in the middle of an apply: what it leaves must be recorded, and
//! lucos itself (status, apply, revert, reset) must repair it.

mod common;

use common::*;
use lucos::info::{attach_vm, Attached};
use lucos::patchcmd::{apply_bundle, revert_bundle, session};
use lucos_introspect::fake::{Call, Failing};
use lucos_introspect::{paging, GuestPhysAddr, GuestVirtAddr, Machine, PhysMem};
use lucos_patch::memory::KERNEL_MAP_START;
use lucos_patch::Session;

/// The kernel page-table entries lucos may touch, as (guest-physical address, value):
/// the page directory of the kernel-image region (`level2_kernel_pgt`) and the walk of
/// patch memory's direct-map address.
fn kernel_tables(a: &mut Attached) -> Vec<(u64, u64)> {
    let cr3 = a.layout.cr3;
    let walk = paging::walk(&a.vm, cr3, GuestVirtAddr(KERNEL_MAP_START)).unwrap();
    let pd = walk.entry(paging::Level::Pd).unwrap().entry_pa.raw() & !0xfff;
    let mut out: Vec<(u64, u64)> = (0..512)
        .map(|i| {
            (
                pd + 8 * i,
                a.vm.read_u64(GuestPhysAddr(pd + 8 * i)).unwrap(),
            )
        })
        .collect();
    let pob = lucos_patch::page_offset_base(&a.vm, &a.syms, &a.layout).unwrap();
    let gpa = a.vm.patch_window().unwrap().gpa;
    let dm = paging::walk(&a.vm, cr3, GuestVirtAddr(pob + gpa)).unwrap();
    out.extend(dm.entries.iter().map(|e| (e.entry_pa.raw(), e.value)));
    out
}

fn changed(before: &[(u64, u64)], now: &[(u64, u64)]) -> Vec<(u64, u64)> {
    now.iter()
        .filter(|e| !before.contains(e))
        .copied()
        .collect()
}

fn present(t: &[(u64, u64)]) -> usize {
    t.iter().filter(|(_, v)| v & 1 != 0).count()
}

/// A lucos killed during the first apply on a fresh VM (patch memory not yet mapped), at
/// each of its writes in turn. Each time, every kernel entry it wrote is in the registry; a following apply
/// completes the same mapping (never a second one); `reset` restores the tables exactly.
#[test]
fn a_first_apply_killed_at_any_write_leaves_only_recorded_entries() {
    let (_slot, _vm, booted) = private("killed-first-apply", 1);
    let mut a = attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone()).unwrap()).unwrap();
    let b = bundle("cmdline");
    let id = b.manifest().id.clone();
    let before = kernel_tables(&mut a);
    let w = a.vm.patch_window().unwrap();
    let layout = a.layout.clone();
    let mut kills = 0;
    let mut resets = 0;
    for n in 1.. {
        let applied = {
            // A lucos killed at its n-th write: that write and every later one (its own
            // rollback included) never reach the guest; pause and resume pass through, as
            // the pause guard makes them for a real kill.
            let mut dying = Failing::new(&mut a.vm).fail_from(Call::Write, n);
            let mut sess = Session::new(&mut dying, &a.syms, layout.clone(), w.gpa, w.size)
                .unwrap_or_else(|e| panic!("after {kills} kills: {e}"));
            sess.apply(&b).is_ok()
        };
        if applied {
            break;
        }
        kills += 1;
        assert!(
            !a.vm.is_paused().unwrap(),
            "kill at write {n}: VM left paused"
        );
        // The next lucos accepts the guest, and knows every entry the killed one wrote.
        let reg = session(&mut a)
            .unwrap_or_else(|e| panic!("kill at write {n}: {e:#}"))
            .registry()
            .unwrap();
        let now = kernel_tables(&mut a);
        for e in changed(&before, &now) {
            assert!(
                reg.pd_entries.contains(&e),
                "kill at write {n}: entry {e:x?} is not recorded ({:x?})",
                reg.pd_entries
            );
        }
        // A record written just before the kill is cleared by revert, as status says.
        for id in reg.applied().map(|r| r.id.clone()).collect::<Vec<_>>() {
            revert_bundle(&mut a, &id).unwrap_or_else(|e| panic!("kill at write {n}: {e:#}"));
        }
        // Every other interruption is reset, the others stack up for the next apply.
        if reg.bundles.is_empty() && n % 2 == 1 {
            let r = reset(&mut a).unwrap_or_else(|e| panic!("kill at write {n}: {e}"));
            assert_eq!(
                kernel_tables(&mut a),
                before,
                "kill at write {n}: reset {r:?}"
            );
            resets += 1;
        }
    }
    eprintln!("{kills} kills during the first apply, {resets} resets");
    assert!(kills >= 10, "too few writes to kill at: {kills}");
    assert!(resets >= 3, "too few resets exercised: {resets}");
    // One mapping, recorded exactly, whatever the interruptions before.
    let reg = session(&mut a).unwrap().registry().unwrap();
    let now = kernel_tables(&mut a);
    let pt_pages = (w.size >> 21) as usize;
    assert_eq!(
        present(&now[..512]),
        present(&before[..512]) + pt_pages,
        "patch memory is mapped once"
    );
    let mut added = changed(&before, &now);
    let mut recorded: Vec<_> = reg
        .pd_entries
        .iter()
        .filter(|(pa, _)| now.iter().any(|(p, _)| p == pa))
        .copied()
        .collect();
    added.sort();
    recorded.sort();
    assert_eq!(
        added, recorded,
        "the registry records exactly what was added"
    );
    assert!(!reg.map_pending);
    revert_bundle(&mut a, &id).unwrap();
    assert!(
        reset(&mut a).is_err(),
        "records of the running kernel are not reset"
    );
}

/// The probe's reproduction: an entry written by a lucos that recorded nothing (as
/// versions before the fix did) is found and cleared by `reset`, and applies work after.
#[test]
fn reset_clears_unrecorded_entries_into_patch_memory() {
    let (_slot, _vm, booted) = private("unrecorded", 1);
    let mut a = attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone()).unwrap()).unwrap();
    let before = kernel_tables(&mut a);
    let b = bundle("cmdline");
    apply_bundle(&mut a, &b).unwrap();
    let mapped = kernel_tables(&mut a);
    revert_bundle(&mut a, &b.manifest().id).unwrap();
    // Forget the registry, as if it had never been written.
    let w = a.vm.patch_window().unwrap();
    a.vm.write_phys_data(GuestPhysAddr(w.gpa), &[0u8; 4096])
        .unwrap();
    let r = reset(&mut a).unwrap();
    assert_eq!(r.entries, changed(&before, &mapped).len(), "{r:?}");
    assert_eq!(kernel_tables(&mut a), before);
    apply_bundle(&mut a, &b).unwrap();
    revert_bundle(&mut a, &b.manifest().id).unwrap();
}

/// The registry never takes an apply it could not also record the revert of: maximal
/// manifests (every bounded field at its limit that a real bundle can fill) are applied until the registry refuses one, for lack of room to revert;
/// then every applied one is reverted, newest first.
#[test]
fn every_applied_bundle_can_be_reverted_with_the_registry_full() {
    let (_slot, _vm, booted) = private("registry-full", 1);
    let mut a = attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone()).unwrap()).unwrap();
    let base = bundle("cmdline");
    let maximal = |i: usize| {
        with_manifest(&base, |m| {
            m.id = format!("{}-max-{i:04}", "x".repeat(50));
            // Control characters are escaped in the registry's JSON: 6 bytes each.
            m.description = "\u{1}".repeat(lucos_patch::MAX_DESCRIPTION);
        })
    };
    let mut ids = Vec::new();
    let refusal = loop {
        let b = maximal(ids.len());
        match apply_bundle(&mut a, &b) {
            Ok(_) => ids.push(b.manifest().id.clone()),
            Err(e) => break format!("{e:#}"),
        }
        assert!(ids.len() < 1000, "the registry never filled");
    };
    eprintln!("{} maximal bundles applied; then: {refusal}", ids.len());
    assert!(refusal.contains("no room"), "{refusal}");
    assert!(refusal.contains("left unchanged"), "{refusal}");
    for id in ids.iter().rev() {
        revert_bundle(&mut a, id).unwrap_or_else(|e| panic!("{id}: {e:#}"));
    }
    assert_eq!(
        session(&mut a)
            .unwrap()
            .registry()
            .unwrap()
            .applied()
            .count(),
        0
    );
    // Reverted history makes room again.
    let b = maximal(ids.len());
    apply_bundle(&mut a, &b).unwrap();
    revert_bundle(&mut a, &b.manifest().id).unwrap();
}

/// The short soak CI runs (`lucos soak` runs 10,000 cycles): apply/revert under a syscall
/// loop on each vCPU, no oops, no taint, no lost operation.
#[test]
fn short_soak_under_a_syscall_loop_per_vcpu() {
    let (_slot, _vm, booted) = private("soak", 2);
    let mut a = attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone()).unwrap()).unwrap();
    let r = lucos::soak::soak_on(&booted, &mut a, &bundle("uname"), 100, 2, |_| {}).unwrap();
    r.print();
    r.check().unwrap();
    assert_eq!((r.applies, r.reverts, r.recorded), (100, 100, 100));
}
