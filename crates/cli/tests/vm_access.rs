//! Who can reach a VM: another user can read none of its files nor connect
//! to its sockets; lucos refuses run and VM directories it does not own
//! (another user's descriptor must not redirect it); and what `lucos
//! status` prints from a bundle is escaped. The tests run `lucos` as a
//! real second user (created here when missing).

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use common::*;
use lucos::harness::Booted;
use lucos_backend::{Vm, VmDescriptor};
use lucos_introspect::Machine;

const OTHER: &str = "lucos-other";

/// The second user's uid and gid, created on first use.
fn other_user() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| Command::new("id").args([flag, OTHER]).output().unwrap();
        if !id("-u").status.success() {
            let st = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    OTHER,
                ])
                .status()
                .expect("useradd (these tests run as root)");
            assert!(st.success(), "useradd {OTHER} failed");
        }
        let num = |flag| {
            String::from_utf8(id(flag).stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        (num("-u"), num("-g"))
    })
}

/// Runs a command as the second user; LUCOS_RUN_DIR only if given.
fn as_other(args: &[&OsStr], run_dir: Option<&Path>) -> Output {
    other_user();
    let mut c = Command::new("runuser");
    c.args(["-u", OTHER, "--"])
        .args(args)
        .env_remove("LUCOS_RUN_DIR");
    if let Some(d) = run_dir {
        c.env("LUCOS_RUN_DIR", d);
    }
    c.output().unwrap()
}

fn lucos(args: &[&str], run_dir: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lucos"));
    c.args(args).env_remove("LUCOS_RUN_DIR");
    if let Some(d) = run_dir {
        c.env("LUCOS_RUN_DIR", d);
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// This file's VM, booted once, not attached (the tests' `lucos` processes
/// attach to it; QEMU serves one QMP client at a time).
fn vm() -> MutexGuard<'static, Booted> {
    static VM: OnceLock<Mutex<Booted>> = OnceLock::new();
    VM.get_or_init(|| {
        let b = lucos::harness::boot_for_process(&opts("access", 1), guest()).expect("boot");
        Mutex::new(b)
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn assert_running(desc: &VmDescriptor) {
    let mut vm = Vm::attach_desc(desc.clone()).expect("attach");
    assert!(!vm.is_paused().unwrap(), "the guest was paused");
}

#[test]
fn another_user_can_read_no_vm_file_nor_connect_to_its_sockets() {
    let b = vm();
    let d = &b.desc;
    let files = [
        d.ram.path.clone(),
        d.patch.path.clone(),
        d.serial_log.clone().unwrap(),
        d.dir.join("vm.json"),
        d.dir.join("qemu.stderr"),
    ];
    let sockets = [d.qmp.clone(), d.gdb.clone(), d.serial.clone().unwrap()];
    assert_eq!(mode(&d.dir), 0o700, "{}", d.dir.display());
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for s in &sockets {
        assert_eq!(mode(s) & 0o077, 0, "{} is {:o}", s.display(), mode(s));
    }
    // Check each layer alone: with the directory open for traversal, the
    // files' and sockets' own modes must still keep the other user out.
    for dir_mode in [0o700, 0o711] {
        std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        for f in &files {
            let cat = as_other(&["cat".as_ref(), f.as_os_str()], None);
            assert!(
                !cat.status.success() && cat.stdout.is_empty(),
                "{OTHER} read {}",
                f.display()
            );
            let r = as_other(&["test".as_ref(), "-r".as_ref(), f.as_os_str()], None);
            assert!(!r.status.success(), "{} readable by {OTHER}", f.display());
        }
        for s in &sockets {
            let connect = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])";
            let c = as_other(
                &[
                    "/usr/bin/python3".as_ref(),
                    "-c".as_ref(),
                    connect.as_ref(),
                    s.as_os_str(),
                ],
                None,
            );
            let err = text(&c.stderr);
            assert!(
                !c.status.success() && err.contains("PermissionError"),
                "{} {err}",
                s.display()
            );
        }
    }
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    // lucos run by the other user says what is wrong: the run directory is not theirs.
    let lucos_bin: &OsStr = env!("CARGO_BIN_EXE_lucos").as_ref();
    let out = as_other(&[lucos_bin, "info".as_ref(), d.name.as_ref()], None);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("belongs to uid 0, not to you"), "{err}");
    // With a descriptor of their own naming root's sockets: permission, not "is it running?".
    let theirs = foreign_run_dir(d, other_user());
    let out = as_other(
        &[lucos_bin, "pause".as_ref(), d.name.as_ref()],
        Some(theirs.path()),
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("permission denied connecting to the QMP socket"),
        "{err}"
    );
    assert!(!err.contains("still running"), "{err}");
    assert_running(d);
}

/// A run directory holding a copy of `d`'s descriptor (naming `d`'s real
/// sockets), owned by `owner`: what another user could plant.
fn foreign_run_dir(d: &VmDescriptor, owner: (u32, u32)) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let vm_dir = t.path().join(&d.name);
    std::fs::create_dir(&vm_dir).unwrap();
    std::fs::copy(d.dir.join("vm.json"), vm_dir.join("vm.json")).unwrap();
    for p in [&vm_dir.join("vm.json"), &vm_dir, &t.path().to_path_buf()] {
        std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1)).unwrap();
    }
    t
}

/// Every command refuses `run_dir` (or the VM directory in it), names it,
/// leaves the guest running and deletes nothing.
fn assert_refused(d: &VmDescriptor, run_dir: &Path, needle: &str) {
    let vm_dir = run_dir.join(&d.name);
    for args in [
        &["pause", &d.name][..],
        &["status", &d.name],
        &["run", "--headless", "--name", &d.name],
    ] {
        let out = lucos(args, Some(run_dir));
        let err = text(&out.stderr);
        assert!(
            !out.status.success(),
            "`lucos {args:?}` accepted {}: {err}",
            run_dir.display()
        );
        assert!(err.contains(needle), "`lucos {args:?}`: {err}");
        assert!(err.contains("LUCOS_RUN_DIR"), "{err}");
        assert!(
            vm_dir.join("vm.json").exists(),
            "`lucos {args:?}` deleted {}",
            vm_dir.display()
        );
    }
    assert_running(d);
}

#[test]
fn run_and_vm_directories_not_owned_by_the_caller_are_refused() {
    let b = vm();
    let d = &b.desc;
    let other = other_user();
    let foreign = foreign_run_dir(d, other);
    assert_refused(d, foreign.path(), "refusing the run directory");
    assert_refused(d, foreign.path(), &format!("belongs to uid {}", other.0));

    let open = foreign_run_dir(d, (0, 0));
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused(d, open.path(), "writable by group or others (mode 777)");

    let real = foreign_run_dir(d, (0, 0));
    let links = tempfile::tempdir().unwrap();
    let link: PathBuf = links.path().join("run");
    std::os::unix::fs::symlink(real.path(), &link).unwrap();
    assert_refused(d, &link, "is a symbolic link");

    // A run directory of our own holding another user's VM directory.
    let mixed = foreign_run_dir(d, other);
    std::os::unix::fs::chown(mixed.path(), Some(0), Some(0)).unwrap();
    assert_refused(d, mixed.path(), "refusing the VM directory");
    let vm_dir = mixed.path().join(&d.name);
    std::os::unix::fs::chown(&vm_dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&vm_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused(d, mixed.path(), "writable by group or others");
}

/// ESC sequences, an OSC window title, BEL, CR, DEL and the C1 CSI.
const HOSTILE: &str = "ok\x1b[2J\x1b]0;pwned\x07\rFAKE\x7f\u{9b}31m";

/// Raw terminal controls: C0 except LF, DEL, and C1 (UTF-8 c2 80..9f).
fn has_raw_controls(out: &[u8]) -> bool {
    out.iter().enumerate().any(|(i, &b)| {
        (b < 0x20 && b != b'\n')
            || b == 0x7f
            || (b == 0xc2 && out.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)))
    })
}

#[test]
fn status_escapes_bundle_text_and_names_an_interrupted_apply_or_revert() {
    let b = vm();
    let d = &b.desc;
    let cmdline = bundle("cmdline");
    let mut m = cmdline.manifest().clone();
    m.id = "hostile".into();
    m.description = HOSTILE.into();
    let obj = std::fs::read(bundle_path(&cmdline.manifest().id)).unwrap();
    let path = bundle_path("hostile");
    let packed = lucos_patch::pack(&obj, &m).unwrap();
    std::fs::write(&path, lucos::signing::sign(&packed).unwrap()).unwrap();
    let out = lucos(&["apply", &d.name, path.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", text(&out.stderr));

    for args in [&["status", &d.name][..], &["status", &d.name, "--json"]] {
        let out = lucos(args, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            !has_raw_controls(&out.stdout),
            "`lucos {args:?}`: {:?}",
            text(&out.stdout)
        );
        assert!(text(&out.stdout).contains("pwned"), "{}", text(&out.stdout));
    }

    // A lucos killed between recording and switching (apply), or between
    // switching back and recording (revert): the site holds its NOP again.
    {
        let mut a = lucos::info::attach_vm(Vm::attach_desc(d.clone()).unwrap()).unwrap();
        let live = a
            .layout
            .live(a.syms.lookup("cmdline_proc_show").unwrap().addr);
        let pa =
            lucos_introspect::translate(&a.vm, a.layout.cr3, lucos_introspect::GuestVirtAddr(live))
                .unwrap()
                .pa;
        a.vm.write_phys(pa, &lucos_patch::NOP5).unwrap();
    }
    let out = lucos(&["status", &d.name], None);
    let err = text(&out.stderr);
    assert!(
        err.contains("an apply or a revert of 'hostile' was interrupted"),
        "{err}"
    );
    assert!(!err.contains("died while applying"), "{err}");
    let out = lucos(&["revert", &d.name, "hostile"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(lucos(&["status", &d.name], None).stderr.is_empty());
}
