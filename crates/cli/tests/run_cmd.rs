//! Commands that own a VM (`lucos run`, `lucos bench`) shut QEMU down and
//! remove every file when they are told to stop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lucos_backend::VmDescriptor;

/// Waits until the VM `name` started by `child` has a descriptor.
fn wait_for_vm(child: &mut Child, name: &str) -> VmDescriptor {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(d) = VmDescriptor::load(name) {
            return d;
        }
        assert!(child.try_wait().unwrap().is_none(), "lucos exited early");
        assert!(Instant::now() < deadline, "no VM descriptor appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` to `child` and returns its exit code once QEMU is gone
/// and the VM directory removed.
fn stop_and_check_cleanup(mut child: Child, desc: &VmDescriptor, signal: &str) -> Option<i32> {
    assert!(std::path::Path::new(&format!("/proc/{}", desc.qemu_pid)).exists());
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let gone = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", desc.qemu_pid)).exists() {
        assert!(
            Instant::now() < gone,
            "QEMU still running after lucos exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !desc.dir.exists(),
        "VM directory {} left behind",
        desc.dir.display()
    );
    status.code()
}

#[test]
fn run_shuts_down_cleanly_on_sigterm() {
    let name = format!("test-{}-run", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args([
            "run",
            "--headless",
            "--vcpus",
            "1",
            "--mem",
            "128",
            "--name",
            &name,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let desc = wait_for_vm(&mut child, &name);
    assert_eq!(stop_and_check_cleanup(child, &desc, "-TERM"), Some(0));
}

#[test]
fn commands_owning_a_vm_clean_up_on_sigint() {
    // `lucos bench` without --vm boots a private guest; interrupt it midway.
    let spec = lucos::guest::guest_dir().join("bundles/cmdline.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["bench", "-n", "1000000"])
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let name = format!("bench-{}", child.id());
    let desc = wait_for_vm(&mut child, &name);
    assert_eq!(stop_and_check_cleanup(child, &desc, "-INT"), Some(130));
}

#[test]
fn run_boots_a_kernel_the_user_names() {
    // The flavour's files under other names, as a user's own build would be.
    let g = lucos::guest::GuestSel::default().ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (kernel, vmlinux, initrd) = (
        dir.path().join("my-bzImage"),
        dir.path().join("my-vmlinux"),
        dir.path().join("my-initrd"),
    );
    for (from, to) in [
        (&g.bzimage, &kernel),
        (&g.vmlinux, &vmlinux),
        (&g.initrd, &initrd),
    ] {
        std::os::unix::fs::symlink(from, to).unwrap();
    }
    let name = format!("test-{}-own", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args([
            "run",
            "--headless",
            "--vcpus",
            "1",
            "--mem",
            "256",
            "--name",
            &name,
        ])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--vmlinux")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initrd)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let desc = wait_for_vm(&mut child, &name);
    assert_eq!(desc.kernel.vmlinux, vmlinux);
    // Attaching proves lucos uses that vmlinux: the live build id must equal its build id.
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_lucos"))
            .args(["info", &name])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("linux_banner    Linux version") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "lucos info never succeeded: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(info.contains("(live == vmlinux)"), "{info}");
    assert_eq!(stop_and_check_cleanup(child, &desc, "-TERM"), Some(0));

    let out = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["run", "--headless", "--name", "x"])
        .arg("--kernel")
        .arg(dir.path().join("missing"))
        .arg("--vmlinux")
        .arg(&vmlinux)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing is not a file"), "{err}");
}

#[test]
fn a_closed_stdout_ends_lucos_quietly_with_success() {
    // The reader is gone before lucos prints anything: every print hits a broken pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["guest", "build"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inputs_that_are_not_regular_files_are_refused_at_once() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["bundle", "show", "/dev/zero"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/dev/zero is not a regular file"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
