//! A new export of an update (sample 18 adds and exports `lucos_sample_answer`). Modules
//! built against the new kernel link against it, so it must be there after a live update
//! as after a reboot: the bundle's module exports it. A module built that way fails to
//! load before the apply, loads after it, holds the bundle while loaded (the revert is
//! refused), and fails again after the revert.

mod common;

use common::*;
use lucos::patchcmd::{apply_bundle, revert_bundle};

const KO: &str = "/lib/lucos/export-user.ko";

#[test]
fn a_module_links_against_an_export_the_bundle_adds() {
    let slot = private_slot();
    let mut g = guest().clone();
    let ko = lucos::lpbench::build_guest_module(
        "exportuser",
        "lucos-export-user",
        &["KBUILD_MODPOST_WARN=1"],
    )
    .expect("guest/module.sh");
    g.initrd = lucos::lpbench::initrd_with_files(&g.initrd, &[(&ko, KO)]).expect("initrd");
    let (_vm, booted) =
        lucos::harness::boot(&opts("exports", 2), &g).expect("booting a private guest");
    let vm = lucos_backend::Vm::attach_desc(booted.desc.clone()).expect("attach");
    let mut a = lucos::info::attach_vm(vm).expect("attach: symbols + KASLR");
    let run = |cmd: &str| booted.console.run(cmd, CMD_TIMEOUT).unwrap();
    let insmod = || run(&format!("insmod {KO}"));

    let out = insmod();
    assert_ne!(out.status, 0, "loaded without the export: {}", out.output);
    assert!(
        run("dmesg | tail -n 5")
            .output
            .contains("Unknown symbol lucos_sample_answer"),
        "{}",
        run("dmesg | tail -n 5").output
    );

    let b = diff_bundle("18-new-export.patch");
    let e = &b.manifest().exports;
    assert!(
        e.len() == 1 && e[0].name == "lucos_sample_answer" && e[0].gpl,
        "{e:?}"
    );
    apply_bundle(&mut a, &b).unwrap();
    let out = insmod();
    assert_eq!(out.status, 0, "insmod after the apply: {}", out.output);
    let log = run("dmesg | tail -n 5").output;
    assert!(log.contains("lucos export user: 42"), "{log}");

    let id = &b.manifest().id;
    let err = revert_bundle(&mut a, id).unwrap_err();
    assert!(
        format!("{err:#}").contains("lucos_export_user uses symbols this bundle exports"),
        "{err:#}"
    );
    let reg = lucos::patchcmd::session(&mut a)
        .unwrap()
        .registry()
        .unwrap();
    assert!(
        reg.find_applied(id).is_some(),
        "a refused revert changed the record"
    );
    assert_eq!(run("rmmod lucos_export_user").status, 0);
    revert_bundle(&mut a, id).unwrap();
    let out = insmod();
    assert_ne!(out.status, 0, "loaded after the revert: {}", out.output);
    drop(slot);
}
