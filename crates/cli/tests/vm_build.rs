//! `lucos build` turns the sample diffs in guest/patches into
//! bundles that change a running guest's behaviour (and revert cleanly).

mod common;

use common::*;
use lucos::patchcmd::{apply_bundle, revert_bundle};
use lucos_diffobj::diff::{self, BuildOptions, BuildOutcome, Built, NoProgress};
use lucos_patch::Bundle;

fn build(patch: &str) -> Result<BuildOutcome, lucos_diffobj::diff::DiffError> {
    let path = lucos::guest::guest_dir().join("patches").join(patch);
    diff::build(
        &guest().kernel_dir,
        &path,
        &BuildOptions::default(),
        &NoProgress,
    )
}

fn bundle_of(patch: &str) -> (Box<Built>, Bundle) {
    match build(patch).unwrap_or_else(|e| panic!("{patch}: {e}")) {
        BuildOutcome::Bundle(b) => {
            let parsed = sign_and_store(&b.bundle);
            (b, parsed)
        }
        BuildOutcome::NoChange { reason, .. } => {
            panic!("{patch}: unexpectedly no change: {reason}")
        }
    }
}

/// `len` bytes of kernel memory at `va`, read with the guest paused (a consistent copy).
fn live_bytes(s: &mut Shared, va: u64, len: usize) -> Vec<u8> {
    use lucos_introspect::{read_virt, GuestVirtAddr, Machine};
    let mut bytes = vec![0u8; len];
    s.a.vm.pause().unwrap();
    read_virt(&s.a.vm, s.a.layout.cr3, GuestVirtAddr(va), &mut bytes).unwrap();
    s.a.vm.resume().unwrap();
    bytes
}

/// Applies the bundle built from `patch`, runs `cmd` before, during and after.
fn apply_observe_revert(patch: &str, cmd: &str) -> (String, String, String) {
    let (_, b) = bundle_of(patch);
    let mut s = shared();
    let before = s.sh(cmd);
    apply_bundle(&mut s.a, &b).unwrap();
    let during = s.sh(cmd);
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    let after = s.sh(cmd);
    (before, during, after)
}

#[test]
fn plain_body_change() {
    let (before, during, after) =
        apply_observe_revert("01-cmdline-prefix.patch", "cat /proc/cmdline");
    assert!(!before.starts_with("lucos-patched"));
    assert_eq!(during, format!("lucos-patched {before}"));
    assert_eq!(after, before);
}

#[test]
fn new_static_helper() {
    let (b, _) = bundle_of("02-uptime-new-helper.patch");
    assert!(
        b.included
            .iter()
            .any(|f| f.contains("lucos_uptime_minutes")),
        "{:?}",
        b.included
    );
    let (before, during, after) =
        apply_observe_revert("02-uptime-new-helper.patch", "cat /proc/uptime");
    assert!(!before.contains("min)"));
    assert!(during.trim_end().ends_with("min)"), "{during}");
    assert!(!after.contains("min)"));
}

#[test]
fn static_local_variable_use() {
    // show_interrupts() keeps the column width in a static local `prec`;
    // the patch widens the IRQ-number column by two.
    let cmd = "grep -m1 ':' /proc/interrupts | sed 's/:.*//' | wc -c";
    let (before, during, after) = apply_observe_revert("03-interrupts-static-local.patch", cmd);
    let n = |s: &str| s.trim().parse::<i32>().unwrap();
    assert_eq!(
        n(&during),
        n(&before) + 2,
        "before {before} during {during}"
    );
    assert_eq!(after, before);
}

#[test]
fn changed_string_literal() {
    let (before, during, after) =
        apply_observe_revert("04-version-string.patch", "cat /proc/version");
    assert!(!before.contains("(lucos-patched)"));
    assert!(during.contains("(lucos-patched)"), "{during}");
    assert_eq!(after, before);
}

/// A changed read-only table is rewritten in place inside the pause (no function changes:
/// `get_task_state` keeps reading the live `task_state_array`), and the revert puts back
/// its exact bytes.
#[test]
fn read_only_table_rewritten_in_place_and_restored() {
    let (b, bundle) = bundle_of("15-rodata-task-states.patch");
    assert!(b.replaced.is_empty(), "{:?}", b.replaced);
    assert_eq!(bundle.manifest().rewrites.len(), 1);
    let mut s = shared();
    let sym =
        s.a.syms
            .lookup_in_file("fs/proc/array.c", "task_state_array")
            .unwrap();
    let (va, size) = (s.a.layout.live(sym.addr), sym.size as usize);
    let table = |s: &mut Shared| live_bytes(s, va, size);
    // The shell reading its own status runs; init, waiting for the shell, sleeps.
    let cmd = "grep State /proc/self/status /proc/1/status";
    let (before_bytes, before) = (table(&mut s), s.sh(cmd));
    assert!(
        before.contains("R (running)") && before.contains("S (sleeping)"),
        "{before}"
    );
    apply_bundle(&mut s.a, &bundle).unwrap();
    let during = s.sh(cmd);
    assert!(during.contains("R (running, lucos)"), "{during}");
    assert!(during.contains("S (sleeping, lucos)"), "{during}");
    assert_ne!(table(&mut s), before_bytes);
    revert_bundle(&mut s.a, &bundle.manifest().id).unwrap();
    assert_eq!(
        table(&mut s),
        before_bytes,
        "revert restores the table's exact bytes"
    );
    assert_eq!(s.sh(cmd), before);
}

#[test]
fn static_inline_in_a_header_replaces_every_caller() {
    let (b, _) = bundle_of("05-fd-header-inline.patch");
    assert!(
        b.replaced.len() >= 2,
        "every caller of the inline must be replaced: {:?}",
        b.replaced
    );
    let (before, during, after) = apply_observe_revert(
        "05-fd-header-inline.patch",
        "ls /proc/self/fd | wc -l; cat /proc/self/fdinfo/0 | head -1",
    );
    assert_eq!(
        during, before,
        "behaviour for real descriptors is unchanged"
    );
    assert_eq!(after, before);
}

#[test]
fn line_number_shift_only_is_no_change() {
    match build("06-params-line-shift.patch").unwrap() {
        BuildOutcome::NoChange { .. } => {}
        BuildOutcome::Bundle(b) => panic!(
            "a __LINE__-only diff produced a bundle replacing {:?}",
            b.replaced
        ),
    }
}

#[test]
fn changed_global_size_is_refused() {
    let err = build("07-acpi-global-size.patch").unwrap_err().to_string();
    assert!(
        err.contains("acpi_video_backlight_string") && err.contains("size"),
        "{err}"
    );
}

#[test]
fn syscall_body_inlined_into_its_wrapper() {
    // __do_sys_newuname is a notrace static inline: its caller
    // __x64_sys_newuname (which has an fentry site) is replaced instead.
    let (b, _) = bundle_of("08-uname-machine.patch");
    assert!(
        b.replaced.iter().any(|f| f.contains("__x64_sys_newuname")),
        "{:?}",
        b.replaced
    );
    let (before, during, after) = apply_observe_revert("08-uname-machine.patch", "uname -m");
    assert_eq!(before.trim(), "x86_64");
    assert_eq!(during.trim(), "lucos");
    assert_eq!(after, before);
}

#[test]
fn two_statics_of_one_name_from_two_files_each_link_to_their_own() {
    // kernel/power/poweroff.c and kernel/reboot.c both have a static `poweroff_work`; the
    // changed handle_poweroff and orderly_poweroff each use their own file's.
    let (b, bundle) = bundle_of("10-two-statics-one-name.patch");
    let m = bundle.manifest();
    assert_eq!(m.aliases.len(), 1, "{:?}", m.aliases);
    assert!(b.replaced.iter().any(|r| r.starts_with("handle_poweroff")));
    assert!(b.replaced.iter().any(|r| r == "orderly_poweroff"));
    let mut s = shared();
    let live = |file: &str| {
        let k = s.a.syms.lookup_in_file(file, "poweroff_work").unwrap();
        s.a.layout.live(k.addr)
    };
    let (sysrq_work, reboot_work) = (live("kernel/power/poweroff.c"), live("kernel/reboot.c"));
    assert_ne!(sysrq_work, reboot_work);
    apply_bundle(&mut s.a, &bundle).unwrap();
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    let rec = reg.find_applied(&m.id).unwrap().clone();
    // The linked new code holds the address of the right `poweroff_work` (as an imm32 or
    // a PC-relative field), never the other file's.
    let code_of = |func: &str| {
        let site = rec
            .sites
            .iter()
            .find(|x| x.function.starts_with(func))
            .unwrap();
        let mut code = vec![0u8; 96];
        lucos_introspect::read_virt(
            &s.a.vm,
            s.a.layout.cr3,
            lucos_introspect::GuestVirtAddr(site.new_addr),
            &mut code,
        )
        .unwrap();
        (site.new_addr, code)
    };
    let refers_to = |(at, code): &(u64, Vec<u8>), target: u64| {
        (0..code.len() - 4).any(|i| {
            let f = u32::from_le_bytes(code[i..i + 4].try_into().unwrap());
            let pc_rel = (at + i as u64 + 4).wrapping_add(f as i32 as i64 as u64);
            f == target as u32 || (4..=8).any(|tail| pc_rel.wrapping_add(tail - 4) == target)
        })
    };
    let sysrq = code_of("handle_poweroff");
    let orderly = code_of("orderly_poweroff");
    assert!(refers_to(&sysrq, sysrq_work) && !refers_to(&sysrq, reboot_work));
    assert!(refers_to(&orderly, reboot_work) && !refers_to(&orderly, sysrq_work));
    revert_bundle(&mut s.a, &m.id).unwrap();
}

#[test]
fn a_function_without_fentry_is_redirected_at_its_entry_and_restored() {
    let (b, bundle) = bundle_of("16-tracing-on-entry.patch");
    assert_eq!(b.replaced, vec!["rb_simple_read@kernel/trace/trace.c"]);
    assert!(bundle.manifest().replacements[0].no_fentry);
    let mut s = shared();
    let sym =
        s.a.syms
            .lookup_in_file("kernel/trace/trace.c", "rb_simple_read")
            .unwrap();
    let va = s.a.layout.live(sym.addr);
    let entry = |s: &mut Shared| live_bytes(s, va, 16);
    let cmd =
        "mkdir -p /tmp/tr; mount -t tracefs nodev /tmp/tr 2>/dev/null; cat /tmp/tr/tracing_on";
    let (old, before) = (entry(&mut s), s.sh(cmd));
    assert_eq!(before.trim(), "1", "{before}");
    let r = apply_bundle(&mut s.a, &bundle).unwrap();
    let during = s.sh(cmd);
    assert_eq!(during.trim(), "1 (lucos)", "{during}");
    let now = entry(&mut s);
    assert_eq!(now[0], 0xe9, "a jmp at the entry: {now:02x?}");
    assert_eq!(
        now[5..],
        old[5..],
        "only the 5 bytes of the jmp are written"
    );
    assert_eq!(r.sites[0].original, old[..5]);
    revert_bundle(&mut s.a, &bundle.manifest().id).unwrap();
    assert_eq!(
        entry(&mut s),
        old,
        "revert restores the entry's exact bytes"
    );
    assert_eq!(s.sh(cmd), before);
}

/// `struct lb_env` gains a member that moves every later one (sample 17). Only
/// load-balancing frames hold one, so the bundle is applied and reverted at pauses in which
/// no task is in the code it replaces, and the guest keeps balancing busy loops on both
/// vCPUs through the new layout, and then the old one, without a fault.
#[test]
fn a_frame_local_layout_change_is_switched_consistently() {
    let (b, bundle) = bundle_of("17-sched-frame-local-layout.patch");
    assert_eq!(b.manifest.frame_types, ["struct lb_env"]);
    let mut s = shared();
    let faults = "dmesg | grep -cE 'Oops|BUG:|general protection|RIP:' || true";
    let load = "for i in 1 2 3 4; do (i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done) & done; \
                wait";
    assert_eq!(s.sh(faults).trim(), "0");
    // A session without a consistent stack check may not switch it.
    let err = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .apply(&bundle)
        .unwrap_err();
    assert!(
        matches!(
            err,
            lucos_patch::EngineError::FrameTypeNeedsConsistency { .. }
        ),
        "{err}"
    );
    apply_bundle(&mut s.a, &bundle).unwrap();
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    let rec = reg.find_applied(&bundle.manifest().id).unwrap();
    assert_eq!(rec.frame_types, ["struct lb_env"]);
    s.sh(load);
    assert_eq!(s.sh(faults).trim(), "0", "{}", s.sh("dmesg | tail -30"));
    revert_bundle(&mut s.a, &bundle.manifest().id).unwrap();
    s.sh(load);
    assert_eq!(s.sh(faults).trim(), "0", "{}", s.sh("dmesg | tail -30"));
}

/// 6.1.190's fix that drops `struct hist_field`'s reference count removes its member `ref`,
/// which moves every later member. The build keeps `ref`, unused, so the new code reads the
/// running kernel's histogram fields at their old offsets: a histogram made by the old code
/// before the apply is read, and then freed, by the new code without a fault.
#[test]
fn a_removed_member_is_kept_so_live_objects_read_right() {
    let (b, bundle) = bundle_of("20-struct-member-removed.patch");
    // What was kept is checked by the build test (diff_samples); here, what it does live.
    assert_eq!(
        b.report.kept_members.len(),
        1,
        "{:?}",
        b.report.kept_members
    );
    let mut s = shared();
    let faults = "dmesg | grep -cE 'Oops|BUG:|general protection|RIP:|WARNING:' || true";
    let event = "/sys/kernel/tracing/events/sched/sched_process_fork";
    let spec = "hist:keys=parent_pid:vals=hitcount";
    s.sh("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; true");
    assert_eq!(s.sh(faults).trim(), "0");
    s.sh(&format!(
        "echo '{spec}' > {event}/trigger && (true) && (true)"
    ));
    apply_bundle(&mut s.a, &bundle).unwrap();
    let during = s.sh(&format!("(true); (true); cat {event}/hist"));
    s.sh(&format!("echo '!{spec}' > {event}/trigger"));
    let left = s.sh(&format!("cat {event}/trigger"));
    revert_bundle(&mut s.a, &bundle.manifest().id).unwrap();
    assert!(during.contains("parent_pid:"), "{during}");
    assert!(during.contains("hitcount:"), "{during}");
    assert!(!left.contains("hist:"), "{left}");
    let report = "dmesg | grep -m1 -A12 -E 'Oops|BUG:|general protection|RIP:|WARNING:'";
    assert_eq!(s.sh(faults).trim(), "0", "{}", s.sh(report));
}

/// The live bytes of `len` at `va` replaced by `bytes` (with the guest paused: a data
/// write, which translated code sees).
fn poke(s: &mut Shared, va: u64, bytes: &[u8]) {
    use lucos_introspect::{write_virt, GuestVirtAddr, Machine};
    s.a.vm.pause().unwrap();
    write_virt(&mut s.a.vm, s.a.layout.cr3, GuestVirtAddr(va), bytes).unwrap();
    s.a.vm.resume().unwrap();
}

/// A member added in padding (`struct pid_entry`'s `hidden`, byte 14): the build proves
/// every `pid_entry` static and zero there, the engine checks it live (a nonzero byte
/// refuses the apply, guest unchanged), and the new code reads the new member where the
/// running kernel's entries have it.
#[test]
fn a_member_added_in_padding_is_read_from_live_objects() {
    use common::refusal::expect_refusal;
    let (b, bundle) = bundle_of("21-struct-member-in-padding.patch");
    assert_eq!(b.report.padded_types, vec!["struct pid_entry".to_string()]);
    assert_eq!(b.replaced, vec!["proc_pident_readdir@fs/proc/base.c"]);
    let mut s = shared();
    let sym =
        s.a.syms
            .lookup_in_file("fs/proc/base.c", "tgid_base_stuff")
            .unwrap()
            .clone();
    let zeroed = &bundle.manifest().zeroed;
    let in_table = |z: &&lucos_patch::Zeroed| (sym.addr..sym.addr + sym.size).contains(&z.addr);
    assert_eq!(zeroed.iter().filter(in_table).count() as u64, sym.size / 40);
    // Entry `environ` of /proc/<pid>: its name pointer at 0, its hole at 14.
    let base = s.a.layout.live(sym.addr);
    let table = live_bytes(&mut s, base, sym.size as usize);
    let entry = (0..table.len() / 40)
        .find(|i| {
            let p = u64::from_le_bytes(table[i * 40..i * 40 + 8].try_into().unwrap());
            live_bytes(&mut s, p, 8) == b"environ\0"
        })
        .expect("tgid_base_stuff has `environ`");
    let hole = base + entry as u64 * 40 + 14;
    assert_eq!(live_bytes(&mut s, hole, 1), [0]);
    let ls = "ls /proc/self | grep -cx environ || true";
    assert_eq!(s.sh(ls).trim(), "1");

    poke(&mut s, hole, &[1]);
    let text = expect_refusal(&mut s, &bundle, "must be zero");
    assert!(text.contains("tgid_base_stuff"), "{text}");
    poke(&mut s, hole, &[0]);

    apply_bundle(&mut s.a, &bundle).unwrap();
    let during = s.sh(ls);
    poke(&mut s, hole, &[1]);
    let hidden = s.sh(ls);
    poke(&mut s, hole, &[0]);
    revert_bundle(&mut s.a, &bundle.manifest().id).unwrap();
    assert_eq!(during.trim(), "1", "every entry still listed");
    assert_eq!(hidden.trim(), "0", "the new code reads byte 14 as `hidden`");
    assert_eq!(s.sh(ls).trim(), "1");
}

/// 6.1.190's fix of `tcp_rmem`'s minimum: only the initial value of writable data changes
/// (`ipv4_net_table`'s entry now points `extra1` at a new `tcp_min_rcvbuf = 4096`). The
/// switch rewrites that one field of the live table, which init_net's sysctl uses, and
/// leaves the rest (live state) alone; a field changed since boot refuses the apply.
#[test]
fn a_changed_initial_value_of_writable_data_is_rewritten_in_its_field() {
    use common::refusal::expect_refusal;
    let (b, bundle) = bundle_of("22-sysctl-initial-value.patch");
    assert!(b.replaced.is_empty(), "{:?}", b.replaced);
    let rw = &bundle.manifest().rewrites;
    assert_eq!(rw.len(), 1);
    assert_eq!(
        rw[0].fields,
        [lucos_patch::Field {
            offset: rw[0].fields[0].offset,
            len: 8
        }]
    );
    let mut s = shared();
    let rmem = "/proc/sys/net/ipv4/tcp_rmem";
    let original = s.sh(&format!("cat {rmem}"));
    let low = |s: &mut Shared| {
        let r = s.sh(&format!(
            "echo '1 131072 6291456' > {rmem} 2>/dev/null && echo taken || echo refused; \
             echo '{}' > {rmem}",
            original.trim()
        ));
        r.trim().to_string()
    };
    assert_eq!(low(&mut s), "taken", "6.1.187 takes a minimum of 1");

    // The field holds live state other than its boot value: refused, guest unchanged.
    let sym =
        s.a.syms
            .lookup_in_file("net/ipv4/sysctl_net_ipv4.c", "ipv4_net_table")
            .unwrap()
            .clone();
    let field = s.a.layout.live(sym.addr) + u64::from(rw[0].fields[0].offset);
    let boot = live_bytes(&mut s, field, 8);
    poke(&mut s, field, &[0u8; 8]);
    expect_refusal(&mut s, &bundle, "boot-time value");
    poke(&mut s, field, &boot);

    apply_bundle(&mut s.a, &bundle).unwrap();
    let during = low(&mut s);
    let moved = live_bytes(&mut s, field, 8);
    revert_bundle(&mut s.a, &bundle.manifest().id).unwrap();
    assert_eq!(during, "refused", "the new minimum is 4096");
    assert_ne!(moved, boot, "extra1 points at the bundle's tcp_min_rcvbuf");
    assert_eq!(
        live_bytes(&mut s, field, 8),
        boot,
        "revert restores the field"
    );
    assert_eq!(low(&mut s), "taken");
    assert_eq!(s.sh(&format!("cat {rmem}")), original);
}
