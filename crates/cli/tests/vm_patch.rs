//! Live function replacement from outside the guest: apply, revert,
//! stacking, refusals that leave memory byte-identical, module functions, load.

mod common;

use std::time::{Duration, Instant};

use common::refusal::{expect_refusal, guest_hash};
use common::*;
use lucos::patchcmd::{apply_bundle, revert_bundle, session};
use lucos_introspect::fake::{Call, Failing};
use lucos_introspect::{GuestPhysAddr, GuestVirtAddr, Machine};
use lucos_patch::{Bundle, EngineError, Session};

fn probe(s: &Shared) -> String {
    s.sh("probe")
}

#[test]
fn cmdline_and_uname_apply_observe_revert() {
    let mut s = shared();
    let before = probe(&s);
    assert!(
        !before.contains("lucos-patched") && !before.contains("+lucos"),
        "{before}"
    );
    let cmdline = bundle("cmdline");
    let uname = bundle("uname");
    let r = apply_bundle(&mut s.a, &cmdline).unwrap();
    eprintln!("cmdline apply paused the guest {} us", r.pause.as_micros());
    assert!(s.sh("cat /proc/cmdline").starts_with("lucos-patched "));
    // uname calls the static override_release() and reads a static variable.
    apply_bundle(&mut s.a, &uname).unwrap();
    let release = s.sh("uname -r");
    assert!(release.trim().ends_with("+lucos"), "{release}");
    let status = session(&mut s.a).unwrap().registry().unwrap();
    assert_eq!(status.applied().count(), 2);
    revert_bundle(&mut s.a, &uname.manifest().id).unwrap();
    revert_bundle(&mut s.a, &cmdline.manifest().id).unwrap();
    assert_eq!(probe(&s), before);
}

#[test]
fn stacking_and_revert_order() {
    let mut s = shared();
    let original = s.sh("cat /proc/version");
    let (v1, v2) = (bundle("version"), bundle("version2"));
    apply_bundle(&mut s.a, &v1).unwrap();
    assert!(s.sh("cat /proc/version").contains("lucos-v1"));
    apply_bundle(&mut s.a, &v2).unwrap();
    assert!(s.sh("cat /proc/version").contains("lucos-v2"));
    let before = guest_hash(&mut s);
    let err = revert_bundle(&mut s.a, &v1.manifest().id).unwrap_err();
    assert!(
        format!("{err:#}").contains("revert 'version-v2' first"),
        "{err:#}"
    );
    assert_eq!(guest_hash(&mut s), before, "refused revert changed memory");
    revert_bundle(&mut s.a, &v2.manifest().id).unwrap();
    assert!(s.sh("cat /proc/version").contains("lucos-v1"));
    revert_bundle(&mut s.a, &v1.manifest().id).unwrap();
    assert_eq!(s.sh("cat /proc/version"), original);
}

#[test]
fn refusals_leave_the_guest_byte_identical() {
    let mut s = shared();
    let good = bundle("cmdline");
    // Malformed and truncated files never reach the guest.
    let bytes = std::fs::read(bundle_path(&good.manifest().id)).unwrap();
    assert!(Bundle::parse(b"not an ELF file").is_err());
    assert!(Bundle::parse(&bytes[..bytes.len() / 2]).is_err());

    expect_refusal(
        &mut s,
        &with_manifest(&good, |m| m.target.build_id = "00".repeat(20)),
        "build id",
    );
    expect_refusal(
        &mut s,
        &with_manifest(&good, |m| m.replacements[0].expect[6] ^= 0xff),
        "does not hold the bytes",
    );
    expect_refusal(
        &mut s,
        &snippet_bundle("unknown-sym", UNKNOWN_SYMBOL),
        "lucos_no_such_symbol",
    );
    expect_refusal(
        &mut s,
        &snippet_bundle("overflow", RELOC_OVERFLOW),
        "overflows",
    );
    expect_refusal(
        &mut s,
        &snippet_bundle("too-big", TOO_BIG),
        "patch memory is full",
    );

    // A site somebody else owns (ftrace's `call`): refused, untouched.
    let cmd_site = site_of(&s, "cmdline_proc_show");
    let call = [0xe8, 0, 0, 0, 0];
    s.a.vm.write_phys(cmd_site, &call).unwrap();
    expect_refusal(&mut s, &good, "ftrace owns");
    s.a.vm.write_phys(cmd_site, &lucos_patch::NOP5).unwrap();

    // One function under two spellings: refused (revert could never undo both).
    let twice = with_manifest(&good, |m| {
        let mut again = m.replacements[0].clone();
        m.replacements[0].old_file = Some("cmdline.c".into());
        again.old_file = Some("fs/proc/cmdline.c".into());
        m.replacements.push(again);
    });
    expect_refusal(&mut s, &twice, "same function");

    // A jmp nobody recorded (another live-patching tool): refused.
    s.a.vm.write_phys(cmd_site, &[0xe9, 0, 0, 0, 0]).unwrap();
    expect_refusal(&mut s, &good, "no applied lucos bundle wrote");
    s.a.vm.write_phys(cmd_site, &lucos_patch::NOP5).unwrap();

    // Applied twice: refused the second time.
    apply_bundle(&mut s.a, &good).unwrap();
    expect_refusal(&mut s, &good, "already applied");
    revert_bundle(&mut s.a, &good.manifest().id).unwrap();
}

fn site_of(s: &Shared, func: &str) -> GuestPhysAddr {
    let live = s.a.layout.live(s.a.syms.lookup(func).unwrap().addr);
    lucos_introspect::translate(&s.a.vm, s.a.layout.cr3, GuestVirtAddr(live))
        .unwrap()
        .pa
}

#[test]
fn site_owned_by_the_guests_ftrace_is_refused() {
    let mut s = shared();
    // The guest's own function tracer takes over cmdline_proc_show's site.
    s.sh("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; cd /sys/kernel/tracing && echo cmdline_proc_show > set_ftrace_filter && echo function > current_tracer");
    let text = expect_refusal(&mut s, &bundle("cmdline"), "ftrace owns");
    eprintln!("{text}");
    s.sh("cd /sys/kernel/tracing && echo nop > current_tracer && echo > set_ftrace_filter");
    // Once ftrace lets go, the site is the NOP5 again and the bundle applies.
    let b = bundle("cmdline");
    apply_bundle(&mut s.a, &b).unwrap();
    assert!(s.sh("cat /proc/cmdline").starts_with("lucos-patched "));
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
}

#[test]
fn failure_mid_switch_rolls_back_and_resumes() {
    let mut s = shared();
    let cmd = bundle("cmdline");
    // Three sites: the second site write fails after the first succeeded.
    let three = diff_bundle("05-fd-header-inline.patch");
    assert_eq!(three.manifest().replacements.len(), 3);
    let before = guest_hash(&mut s);
    let w = s.a.vm.patch_window().unwrap();
    let layout = s.a.layout.clone();
    {
        let a = &mut s.a;
        // (site write to fail, data write to fail): mid-switch, first
        // staging write, a later staging write.
        for (fail_at, fail_data_at) in [(2, 0), (0, 1), (0, 4)] {
            // A VM that goes away in the middle of the switch or of staging: the engine
            // must restore and resume.
            let mut flaky = Failing::new(&mut a.vm)
                .fail(Call::CodeWrite, fail_at)
                .fail(Call::DataWrite, fail_data_at);
            let mut sess =
                Session::new(&mut flaky, &a.syms, layout.clone(), w.gpa, w.size).unwrap();
            let err = sess.apply(&three).unwrap_err();
            assert!(matches!(err, EngineError::Machine(_)), "{err}");
        }
    }
    assert!(!s.a.vm.is_paused().unwrap(), "VM left paused");
    assert_eq!(
        guest_hash(&mut s),
        before,
        "failed apply left changes behind"
    );
    assert!(!s.sh("cat /proc/cmdline").contains("lucos-patched"));

    // A lucos killed after recording an apply but before switching the site:
    // the record is reported, and revert clears it without touching the site.
    apply_bundle(&mut s.a, &cmd).unwrap();
    let site = site_of(&s, "cmdline_proc_show");
    s.a.vm.write_phys(site, &lucos_patch::NOP5).unwrap();
    let odd = session(&mut s.a).unwrap().inconsistencies().unwrap();
    assert_eq!(odd.len(), 1, "{odd:?}");
    revert_bundle(&mut s.a, &cmd.manifest().id).unwrap();
    assert!(session(&mut s.a)
        .unwrap()
        .inconsistencies()
        .unwrap()
        .is_empty());
    assert!(!s.sh("cat /proc/cmdline").contains("lucos-patched"));
}

#[test]
fn records_of_an_earlier_boot_are_detected_and_reset() {
    let mut s = shared();
    let b = bundle("cmdline");
    apply_bundle(&mut s.a, &b).unwrap();
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    let reg = session(&mut s.a).unwrap().registry().unwrap();
    // What a reboot does: the new kernel's page directory lacks lucos's
    // entries. Drop all but the last, so reset must also clear a survivor.
    let (pa, value) = reg.pd_entries[0];
    for &(pa, _) in &reg.pd_entries[..reg.pd_entries.len() - 1] {
        s.a.vm
            .write_phys(GuestPhysAddr(pa), &0u64.to_le_bytes())
            .unwrap();
    }
    let err = session(&mut s.a)
        .err()
        .expect("stale registry must be refused");
    assert!(format!("{err:#}").contains("earlier boot"), "{err:#}");
    let cleared = reset(&mut s.a).unwrap();
    assert!(cleared.records >= 1);
    assert_eq!(cleared.entries, 1, "the surviving entry is cleared");
    let fresh = session(&mut s.a).unwrap().registry().unwrap();
    assert!(fresh.bundles.is_empty() && fresh.va_base.is_none());
    assert_eq!(fresh.next_free, reg.next_free, "pages are never reused");
    // A fresh apply maps patch memory again and works.
    apply_bundle(&mut s.a, &b).unwrap();
    assert!(s.sh("cat /proc/cmdline").starts_with("lucos-patched "));
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    let again = session(&mut s.a).unwrap().registry().unwrap();
    assert_eq!(
        again.pd_entries, reg.pd_entries,
        "the same range is free again and reused for the mapping"
    );
    assert_eq!(again.pd_entries[0], (pa, value));
    // With live records that match the kernel, reset refuses.
    assert!(reset(&mut s.a).is_err());
}

#[test]
fn vm_gone_is_a_clear_error() {
    let (_slot, vm, booted) = private("gone", 1);
    let mut a =
        lucos::info::attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone()).unwrap())
            .unwrap();
    lucos_backend::sys_kill(vm.desc.qemu_pid);
    let err = apply_bundle(&mut a, &bundle("cmdline")).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("QMP") || text.contains("gdbstub") || text.contains("closed"),
        "{text}"
    );
}

#[test]
fn two_hundred_cycles_under_syscall_load() {
    let mut s = shared();
    let uname = bundle("uname");
    let id = uname.manifest().id.clone();
    let release = s.sh("uname -r").trim().to_owned();
    // One syscall loop per vCPU, each hitting the patched function.
    s.sh(&format!("sysloop --forever --report-ms 500 --check-release {release} >/tmp/l0 2>&1 & sysloop --forever --report-ms 500 --check-release {release} >/tmp/l1 2>&1 &"));
    let mark = s.booted.console.transcript().len();
    let tainted = s.sh("cat /proc/sys/kernel/tainted");
    let dmesg_lines = s.sh("dmesg | wc -l").trim().parse::<usize>().unwrap();
    let progress = |s: &Shared, f: &str| -> u64 {
        let out = s.sh(&format!("tail -n 1 {f}"));
        out.split("progress=")
            .nth(1)
            .and_then(|x| x.split_whitespace().next())
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    // Both loops must be running before the cycles start.
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress(&s, "/tmp/l0") == 0 || progress(&s, "/tmp/l1") == 0 {
        assert!(Instant::now() < deadline, "syscall loops did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut pauses = Vec::new();
    let t = Instant::now();
    for _ in 0..200 {
        pauses.push(apply_bundle(&mut s.a, &uname).unwrap().pause);
        pauses.push(revert_bundle(&mut s.a, &id).unwrap().pause);
    }
    eprintln!("200 cycles in {:.1} s", t.elapsed().as_secs_f64());
    lucos::patchcmd::print_percentiles("pause under load", &mut pauses);
    let counts = |s: &Shared| -> (u64, u64, [u64; 2]) {
        let last = s.sh("tail -n 1 /tmp/l0; tail -n 1 /tmp/l1");
        let sum = |key: &str| -> u64 {
            last.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        };
        (
            sum("same="),
            sum("other="),
            [progress(s, "/tmp/l0"), progress(s, "/tmp/l1")],
        )
    };
    // Both kernels answered the loops: calls saw the patched release too.
    let (same, other, after) = counts(&s);
    assert!(other > 0, "the loops never ran the patched function");
    assert!(same > 0, "the loops never ran the original function");
    // And both loops are still alive after the cycles: new reports keep coming.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, now) = counts(&s);
        if now[0] > after[0] && now[1] > after[1] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a syscall loop stopped making progress"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.sh("kill %1 %2; wait");
    // No oops on the console, no new warning or BUG in the kernel log
    // (the harness console only shows urgent messages), no new taint.
    let console = &s.booted.console.transcript()[mark..];
    assert!(
        !console.contains("Oops") && !console.contains("general protection"),
        "{console}"
    );
    let new_log = s.sh(&format!("dmesg | tail -n +{}", dmesg_lines + 1));
    for bad in [
        "Oops",
        "BUG:",
        "WARNING:",
        "Call Trace",
        "general protection",
    ] {
        assert!(
            !new_log.contains(bad),
            "guest kernel log shows '{bad}':\n{new_log}"
        );
    }
    assert_eq!(
        s.sh("cat /proc/sys/kernel/tainted"),
        tainted,
        "the kernel became tainted"
    );
    let last = format!("same={same} other={other}");
    assert_eq!(s.sh("uname -r").trim(), release);
    eprintln!("{last}");
}

#[test]
fn a_function_of_a_loaded_module_is_replaced_and_restored() {
    let mut s = shared();
    let b = bundle("binfmt");
    let dir = "/proc/sys/fs/binfmt_misc";
    let status = format!("cat {dir}/status");
    let _ = s
        .booted
        .console
        .run(&format!("umount {dir}; rmmod binfmt_misc"), CMD_TIMEOUT);
    // Not loaded: refused by name, nothing changed.
    expect_refusal(&mut s, &b, "module binfmt_misc, which is not loaded");
    s.sh(&format!(
        "modprobe binfmt_misc && mount -t binfmt_misc none {dir}"
    ));
    assert_eq!(s.sh(&status).trim(), "enabled");
    apply_bundle(&mut s.a, &b).unwrap();
    assert_eq!(s.sh(&status).trim(), "lucos-enabled");
    // The new code reads the module's own static, resolved in the live module.
    s.sh(&format!("echo 0 > {dir}/status"));
    assert_eq!(s.sh(&status).trim(), "lucos-disabled");
    s.sh(&format!("echo 1 > {dir}/status"));
    revert_bundle(&mut s.a, "binfmt").unwrap();
    assert_eq!(s.sh(&status).trim(), "enabled");

    // Unloaded while patched: its code is gone, so revert writes nothing there and only
    // retires the record; a fresh load of the module is unpatched.
    apply_bundle(&mut s.a, &b).unwrap();
    s.sh(&format!("umount {dir} && rmmod binfmt_misc"));
    revert_bundle(&mut s.a, "binfmt").unwrap();
    let reg = session(&mut s.a).unwrap().registry().unwrap();
    assert_eq!(reg.applied().count(), 0);
    s.sh(&format!(
        "modprobe binfmt_misc && mount -t binfmt_misc none {dir}"
    ));
    assert_eq!(s.sh(&status).trim(), "enabled");
    s.sh(&format!("umount {dir} && rmmod binfmt_misc"));
}

#[test]
fn alternatives_in_new_code_follow_the_live_cpu() {
    let mut s = shared();
    let flags = s.sh("grep -m1 '^flags' /proc/cpuinfo");
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let want = format!(
        "lucos-alt always=2 sse2={} avx2={} not_always=1 call=20 cpu_has_sse2={} cpu_has_avx2={}",
        if has("sse2") { 2 } else { 1 },
        if has("avx2") { 2 } else { 1 },
        u8::from(has("sse2")),
        u8::from(has("avx2"))
    );
    let b = bundle("alt");
    apply_bundle(&mut s.a, &b).unwrap();
    let got = s.sh("cat /proc/cmdline");
    revert_bundle(&mut s.a, "alt").unwrap();
    assert_eq!(got.trim(), want, "cpu flags: {flags}");
    assert!(!s.sh("cat /proc/cmdline").starts_with("lucos-alt"));
}

#[test]
fn paravirt_sites_and_static_calls_in_new_code_run_unpatched() {
    let mut s = shared();
    let before = s.sh("cat /proc/cmdline");
    let b = bundle("pvcall");
    apply_bundle(&mut s.a, &b).unwrap();
    // Each read runs local_irq_save/restore (paravirt, with alternatives) and
    // preempt_enable (a static call through its trampoline) in the new code.
    let mut reads = Vec::new();
    for _ in 0..20 {
        reads.push(s.sh("cat /proc/cmdline"));
    }
    revert_bundle(&mut s.a, "pvcall").unwrap();
    let want = format!("lucos-pv irqs-were-on=1 irqs-off-inside=1 {before}");
    assert!(reads.iter().all(|r| *r == want), "{reads:?}");
    assert_eq!(s.sh("cat /proc/cmdline"), before);
    let log = s.sh("dmesg");
    assert!(
        !log.contains("BUG") && !log.contains("Oops") && !log.contains("WARNING"),
        "{log}"
    );
}
