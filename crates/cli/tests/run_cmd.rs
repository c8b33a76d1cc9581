//! `lucos run` owns its VM: SIGTERM shuts QEMU down and removes every file.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn run_shuts_down_cleanly_on_sigterm() {
    let name = format!("test-{}-run", std::process::id());
    let dir = lucos_backend::descriptor::vm_dir(&name);
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
    let deadline = Instant::now() + Duration::from_secs(120);
    let desc = loop {
        if let Ok(d) = lucos_backend::VmDescriptor::load(&name) {
            break d;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "lucos run exited early"
        );
        assert!(Instant::now() < deadline, "no VM descriptor appeared");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(std::path::Path::new(&format!("/proc/{}", desc.qemu_pid)).exists());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "lucos run exited with {status}");
    let gone = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", desc.qemu_pid)).exists() {
        assert!(
            Instant::now() < gone,
            "QEMU still running after lucos run exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.exists(), "VM directory {} left behind", dir.display());
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
    let deadline = Instant::now() + Duration::from_secs(120);
    let desc = loop {
        if let Ok(d) = lucos_backend::VmDescriptor::load(&name) {
            break d;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "lucos bench exited early"
        );
        assert!(Instant::now() < deadline, "no VM descriptor appeared");
        std::thread::sleep(Duration::from_millis(50));
    };
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    let gone = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", desc.qemu_pid)).exists() {
        assert!(Instant::now() < gone, "QEMU still running after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !desc.dir.exists(),
        "VM directory {} left behind",
        desc.dir.display()
    );
}
