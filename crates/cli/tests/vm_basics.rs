//! The guest boots under TCG, lucos controls it and reads and writes its
//! memory, registers and module list from outside.

mod common;

use std::time::{Duration, Instant};

use common::*;
use lucos::info::{attach_vm, facts, read_kernel_string, with_pause};
use lucos_backend::Vm;
use lucos_introspect::{read_virt, translate, GuestVirtAddr, Machine, PhysMem};

#[test]
fn shell_runs_commands() {
    let s = shared();
    assert_eq!(
        s.sh("echo hello from the guest").trim(),
        "hello from the guest"
    );
    assert_eq!(s.sh("nproc").trim(), "2");
    assert!(s.sh("uname -r").trim().starts_with("6.1."));
    let out = s.booted.console.run("false", CMD_TIMEOUT).unwrap();
    assert_eq!(out.status, 1);
    let probe = s.sh("probe");
    assert!(probe.contains("uname_release=6.1."), "{probe}");
}

#[test]
fn reads_kernel_variables_from_outside() {
    let s = shared();
    let banner = read_kernel_string(&s.a, "linux_banner", 512).unwrap();
    let version = s.sh("cat /proc/version");
    assert_eq!(banner.trim_end(), version.trim_end());
    // init_uts_ns starts with struct new_utsname { sysname[65], nodename[65], release[65], ... }.
    let sysname = read_kernel_string(&s.a, "init_uts_ns", 65).unwrap();
    assert_eq!(sysname, "Linux");
    let uts = s.a.syms.lookup("init_uts_ns").unwrap().addr;
    let mut release = [0u8; 65];
    read_virt(
        &s.a.vm,
        s.a.layout.cr3,
        GuestVirtAddr(s.a.layout.live(uts) + 2 * 65),
        &mut release,
    )
    .unwrap();
    let release =
        String::from_utf8_lossy(&release[..release.iter().position(|&b| b == 0).unwrap()])
            .into_owned();
    assert_eq!(release, s.sh("uname -r").trim());
}

#[test]
fn kaslr_slide_matches_what_the_guest_reports() {
    let s = shared();
    // Only for checking: lucos itself never trusts what the guest reports.
    let line = s.sh("grep -w -e _text -e cmdline_proc_show /proc/kallsyms");
    for l in line.lines() {
        let mut it = l.split_whitespace();
        let addr = u64::from_str_radix(it.next().unwrap(), 16).unwrap();
        let name = it.nth(1).unwrap();
        let link = s.a.syms.lookup(name).unwrap().addr;
        assert_eq!(s.a.layout.live(link), addr, "{name}");
    }
    assert_eq!(s.a.layout.slide % (2 << 20), 0);
    assert!(s.a.syms.build_id_hex().unwrap().len() >= 40);
}

#[test]
fn guest_observes_writes_from_outside() {
    let mut s = shared();
    let uts =
        s.a.layout
            .live(s.a.syms.lookup("init_uts_ns").unwrap().addr);
    let nodename = uts + 65;
    let pa = translate(&s.a.vm, s.a.layout.cr3, GuestVirtAddr(nodename))
        .unwrap()
        .pa;
    let mut old = [0u8; 65];
    s.a.vm.read_phys(pa, &mut old).unwrap();
    let mut new = [0u8; 65];
    new[..15].copy_from_slice(b"set-by-lucos-42");
    s.a.vm.write_phys(pa, &new).unwrap();
    assert_eq!(s.sh("uname -n").trim(), "set-by-lucos-42");
    s.a.vm.write_phys(pa, &old).unwrap();
    let restored =
        String::from_utf8_lossy(&old[..old.iter().position(|&b| b == 0).unwrap()]).into_owned();
    assert_eq!(s.sh("uname -n").trim(), restored);
}

#[test]
fn pause_stops_the_guest_and_registers_are_read() {
    let mut s = shared();
    let f = facts(&mut s.a).unwrap();
    assert_eq!(f.vcpus.len(), 2);
    for v in &f.vcpus {
        assert_eq!(v.cpl, 0, "an idle guest sits in the kernel");
        assert_ne!(v.cr3, "0x0");
    }
    // While paused, the jiffies counter must not move; after resume it must.
    let jiffies = s.a.layout.live(s.a.syms.lookup("jiffies_64").unwrap().addr);
    let cr3 = s.a.layout.cr3;
    let read = |vm: &Vm| {
        let mut b = [0u8; 8];
        read_virt(vm, cr3, GuestVirtAddr(jiffies), &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    let (a, b) = with_pause(&mut s.a.vm, |vm| {
        assert!(vm.is_paused()?);
        let a = read(vm);
        std::thread::sleep(Duration::from_millis(300));
        Ok((a, read(vm)))
    })
    .unwrap();
    assert_eq!(a, b, "jiffies moved while paused");
    assert!(!s.a.vm.is_paused().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while read(&s.a.vm) == b {
        assert!(
            Instant::now() < deadline,
            "jiffies never moved after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn boots_with_one_vcpu_and_attaches() {
    let (_slot, vm, booted) = private("one", 1);
    eprintln!(
        "1-vCPU guest booted in {:.2} s",
        booted.boot_time.as_secs_f64()
    );
    let out = booted.console.run("nproc", CMD_TIMEOUT).unwrap();
    assert_eq!(out.output.trim(), "1");
    let a = attach_vm(Vm::attach_desc(booted.desc.clone()).unwrap()).unwrap();
    assert_eq!(a.vm.vcpu_count(), 1);
    let dir = vm.desc.dir.clone();
    let pid = vm.desc.qemu_pid;
    drop(a);
    drop(vm);
    assert!(!dir.exists(), "VM directory left behind");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU left running"
    );
}

/// Kills a hand-started QEMU when the test ends, pass or fail.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn adopts_a_qemu_it_did_not_start() {
    let _slot = private_slot();
    let g = guest();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("test-{}-adopted", std::process::id());
    let mut cfg = opts("adopted", 1)
        .launch_config(g, lucos_backend::SerialMode::Socket)
        .unwrap();
    cfg.name = name.clone();
    // Started by hand: no descriptor, files outside lucos's run directory.
    let child = cfg
        .command(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let qemu = Killed(child);
    let serial = dir.path().join("serial.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serial.exists() {
        assert!(Instant::now() < deadline, "QEMU did not create its sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = lucos_backend::Console::connect(&serial).unwrap();
    console
        .wait_for(lucos::harness::PROMPT, Duration::from_secs(120))
        .unwrap();

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["adopt", "--name", &name])
        .arg("--qmp")
        .arg(dir.path().join("qmp.sock"))
        .arg("--gdb")
        .arg(dir.path().join("gdb.sock"))
        .arg("--ram")
        .arg(dir.path().join("ram"))
        .arg("--patch")
        .arg(dir.path().join("patch"))
        .arg("--kernel-dir")
        .arg(&g.kernel_dir)
        .status()
        .unwrap();
    assert!(status.success());
    let desc = lucos_backend::VmDescriptor::load(&name).unwrap();
    assert_eq!(desc.qemu_pid, qemu.0.id(), "pid from the QMP socket's peer");
    let a = attach_vm(Vm::attach_desc(desc).unwrap()).unwrap();
    let banner = read_kernel_string(&a, "linux_banner", 512).unwrap();
    let version = console
        .run("cat /proc/version", CMD_TIMEOUT)
        .unwrap()
        .output;
    assert_eq!(banner.trim_end(), version.trim_end());
    drop(a);
    let forget = std::process::Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["forget", &name])
        .status()
        .unwrap();
    assert!(forget.success());
    assert!(lucos_backend::VmDescriptor::load(&name).is_err());
    assert!(
        dir.path().join("ram").exists(),
        "forget must not touch the VM's own files"
    );
    drop(qemu);
}

#[test]
fn loaded_modules_are_read_from_outside() {
    let mut s = shared();
    // Load a module of Debian's from the guest's /lib/modules (the flavour's overlay).
    let _ = s.booted.console.run("rmmod binfmt_misc", CMD_TIMEOUT);
    s.sh("modprobe binfmt_misc");
    let proc_line = s.sh("grep '^binfmt_misc ' /proc/modules");
    let kallsyms = s.sh("grep -w bm_status_read /proc/kallsyms");
    let mods = lucos::modules::loaded_modules(&mut s.a).unwrap();
    let m = mods
        .iter()
        .find(|m| m.name == "binfmt_misc")
        .unwrap_or_else(|| panic!("binfmt_misc not found from outside: {mods:?}"));
    // /proc/modules: name size refcount deps state address.
    let f: Vec<&str> = proc_line.split_whitespace().collect();
    assert_eq!(f[1].parse::<u64>().unwrap(), m.size, "{proc_line}");
    assert_eq!(f[4], "Live");
    assert_eq!(m.state, lucos_introspect::ModuleState::Live);
    let addr = u64::from_str_radix(f[5].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(addr, m.base, "{proc_line}");
    let k = u64::from_str_radix(kallsyms.split_whitespace().next().unwrap(), 16).unwrap();
    let f = m
        .function("bm_status_read")
        .expect("bm_status_read in its symbols");
    assert_eq!(f.addr, k, "{kallsyms}");
    assert!(f.addr >= m.base && f.addr < m.base + m.text_size);
    // Unloaded, it is gone from the list.
    s.sh("rmmod binfmt_misc");
    let mods = lucos::modules::loaded_modules(&mut s.a).unwrap();
    assert!(!mods.iter().any(|m| m.name == "binfmt_misc"), "{mods:?}");
}

#[test]
fn thousands_of_stop_cont_cycles_leave_qmp_answering_and_the_vm_running() {
    // QEMU writes a stop notification to the gdb client on every `stop`;
    // unread, they once filled the socket and wedged QMP near cycle 288.
    let mut s = shared();
    let t = Instant::now();
    for i in 0..2000 {
        s.a.vm
            .pause()
            .unwrap_or_else(|e| panic!("stop of cycle {i}: {e}"));
        s.a.vm
            .resume()
            .unwrap_or_else(|e| panic!("cont of cycle {i}: {e}"));
    }
    let took = t.elapsed();
    eprintln!("2000 stop/cont cycles in {:.1} s", took.as_secs_f64());
    assert!(took < Duration::from_secs(240), "took {took:?}");
    assert!(!s.a.vm.is_paused().unwrap(), "VM left paused");
    // The gdbstub still answers (a coherent write needs it) and the guest runs.
    let rip = with_pause(&mut s.a.vm, |vm| Ok(vm.vcpu_rip(0)?)).unwrap();
    assert_ne!(rip, 0);
    assert_eq!(s.sh("echo alive").trim(), "alive");
}
