//! The guest's own livepatch consistency check walks through lucos's new code: with a task
//! asleep inside a lucos-replaced `pipe_read` (sample 13), a livepatch module for another
//! function (`cmdline_proc_show`) must finish its transition. klp switches a task only if
//! `arch_stack_walk_reliable` finds its stack reliable, which for a frame in patch memory
//! needs the ORC data the bundle registers as a module (an address without ORC makes the
//! walk unreliable). The end is required within `LIMIT_S`, before klp's fake-signal
//! fallback (15 s) could switch the sleeper another way. Shown to fail: with the bundle's ORC
//! entries left out (a scratch build), the transition stalls and this test fails.

mod common;

use common::*;
use lucos::patchcmd::{apply_bundle, revert_bundle};

/// Below klp's SIGNALS_TIMEOUT (15 s): an end before it means klp judged every stack
/// reliable, not that its fake signal woke the sleeper.
const LIMIT_S: u32 = 12;

#[test]
fn a_livepatch_transition_completes_with_a_task_asleep_in_new_code() {
    let slot = private_slot();
    let mut g = guest().clone();
    let ko = lucos::lpbench::build_module().expect("guest/livepatch.sh");
    g.initrd = lucos::lpbench::initrd_with(&g.initrd, &ko).expect("initrd with the module");
    let (_vm, booted) =
        lucos::harness::boot(&opts("livepatch", 2), &g).expect("booting a private guest");
    let vm = lucos_backend::Vm::attach_desc(booted.desc.clone()).expect("attach");
    let mut a = lucos::info::attach_vm(vm).expect("attach: symbols + KASLR");
    let sh = |cmd: &str| {
        let out = booted.console.run(cmd, CMD_TIMEOUT).unwrap();
        assert_eq!(out.status, 0, "`{cmd}` failed: {}", out.output);
        out.output
    };
    let b = diff_bundle("13-pipe-read-sleeper.patch");
    apply_bundle(&mut a, &b).unwrap();
    sh("rm -f /tmp/lucos-fifo && mkfifo /tmp/lucos-fifo && exec 3<>/tmp/lucos-fifo");
    let pid = sh("cat /tmp/lucos-fifo > /dev/null & echo $!")
        .trim()
        .to_string();
    let mut stack = String::new();
    for _ in 0..300 {
        stack = sh(&format!("cat /proc/{pid}/stack"));
        if stack.contains("pipe_read") {
            break;
        }
    }
    // The sleeper's pipe_read frame is the bundle's (no other module is loaded yet).
    assert!(
        stack
            .lines()
            .any(|l| l.contains("pipe_read") && l.contains("[lucos_")),
        "{stack}"
    );
    let out = booted
        .console
        .run(
            &format!(
                "lpbench load {} livepatch_cmdline {LIMIT_S}",
                lucos::lpbench::GUEST_KO
            ),
            std::time::Duration::from_secs(120),
        )
        .unwrap();
    let dmesg = sh("dmesg | tail -n 20");
    assert_eq!(
        out.status, 0,
        "livepatch transition did not complete with a task asleep in new code:\n{}\n{stack}\n{dmesg}",
        out.output
    );
    assert!(sh("cat /proc/cmdline").contains("this has been live patched"));
    sh(&format!("kill {pid}; wait {pid}; exec 3>&-; true"));
    revert_bundle(&mut a, &b.manifest().id).unwrap();
    drop(slot);
}
