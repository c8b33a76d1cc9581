//! Starting QEMU the way lucos needs it: TCG (or KVM), guest RAM and patch
//! memory in shared files, QMP and gdbstub sockets, serial console on a
//! terminal or a socket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::descriptor::{self, KernelInfo, MemFile, RamRegion, VmDescriptor};
use crate::error::BackendError;
use crate::sys;

/// The qdev id of the patch-memory device; attach finds its BAR by this id.
pub const PATCH_DEVICE: &str = "lucos-patch";
/// ivshmem-plain maps its shared memory as BAR 2.
pub const PATCH_BAR: u64 = 2;
/// Below this much RAM the `pc` machine puts all of it below 4 GiB, so
/// guest-physical address == RAM file offset.
const MAX_LOWMEM_MIB: u64 = 3 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

#[derive(Debug, Clone)]
pub enum SerialMode {
    /// Console on this process's terminal (stdin/stdout), for `lucos run`.
    Terminal,
    /// Console on a unix socket in the VM directory, for harnesses.
    Socket,
}

#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub name: String,
    pub qemu: String,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
    pub kernel: KernelInfo,
    pub append: String,
    pub vcpus: usize,
    pub mem_mib: u64,
    pub patch_mib: u64,
    pub accel: Accel,
    pub serial: SerialMode,
    /// Where the console is logged; default: `serial.log` in the VM
    /// directory (removed with the VM).
    pub serial_log: Option<PathBuf>,
}

impl LaunchConfig {
    fn validate(&self) -> Result<(), BackendError> {
        descriptor::validate_name(&self.name)?;
        if !(1..=8).contains(&self.vcpus) {
            return Err(BackendError::Config(format!(
                "--vcpus {} must be 1..=8",
                self.vcpus
            )));
        }
        if !(64..=MAX_LOWMEM_MIB).contains(&self.mem_mib) {
            return Err(BackendError::Config(format!(
                "--mem {} MiB must be 64..={MAX_LOWMEM_MIB} (all RAM below 4 GiB keeps guest-physical = file offset)",
                self.mem_mib
            )));
        }
        if !(4..=256).contains(&self.patch_mib) || !self.patch_mib.is_power_of_two() {
            return Err(BackendError::Config(format!(
                "patch memory {} MiB must be a power of two from 4 to 256 (an ivshmem BAR that fits next to the kernel image)",
                self.patch_mib
            )));
        }
        for p in [&self.bzimage, &self.initrd, &self.kernel.vmlinux] {
            if !p.is_file() {
                return Err(BackendError::Config(format!(
                    "{} does not exist; build the guest first (`lucos guest build`)",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// The QEMU command line; only standard devices and interfaces.
    pub fn command(&self, dir: &std::path::Path) -> Command {
        let mut c = Command::new(&self.qemu);
        // RAM, patch memory, sockets and console log: owner-only from birth.
        sys::owner_only_files(&mut c);
        let ram = dir.join("ram");
        let patch = dir.join("patch");
        c.arg("-name").arg(format!("lucos-{}", self.name));
        c.args(["-machine", "pc,memory-backend=lucos-ram"]);
        match self.accel {
            Accel::Tcg => c.args(["-accel", "tcg"]),
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
        };
        c.arg("-smp").arg(self.vcpus.to_string());
        c.arg("-m").arg(format!("{}M", self.mem_mib));
        c.arg("-object").arg(format!(
            "memory-backend-file,id=lucos-ram,size={}M,mem-path={},share=on",
            self.mem_mib,
            ram.display()
        ));
        c.arg("-object").arg(format!(
            "memory-backend-file,id=lucos-patch-mem,size={}M,mem-path={},share=on",
            self.patch_mib,
            patch.display()
        ));
        c.arg("-device").arg(format!(
            "ivshmem-plain,id={PATCH_DEVICE},memdev=lucos-patch-mem"
        ));
        c.arg("-kernel").arg(&self.bzimage);
        c.arg("-initrd").arg(&self.initrd);
        c.arg("-append").arg(&self.append);
        c.args(["-nodefaults", "-display", "none", "-no-reboot"]);
        let log = self
            .serial_log
            .clone()
            .unwrap_or_else(|| dir.join("serial.log"));
        match self.serial {
            SerialMode::Terminal => c
                .arg("-chardev")
                .arg(format!("stdio,id=ser0,logfile={}", log.display())),
            SerialMode::Socket => c.arg("-chardev").arg(format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={}",
                dir.join("serial.sock").display(),
                log.display()
            )),
        };
        c.args(["-serial", "chardev:ser0"]);
        c.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ));
        c.arg("-chardev").arg(format!(
            "socket,id=gdb0,path={},server=on,wait=off",
            dir.join("gdb.sock").display()
        ));
        c.args(["-gdb", "chardev:gdb0"]);
        c
    }
}

/// A QEMU this process started. Dropping it shuts QEMU down and removes
/// every file it created.
pub struct RunningVm {
    child: Option<Child>,
    pub desc: VmDescriptor,
    pub started: Instant,
    /// False once the VM was handed to the process ([`RunningVm::keep_until_exit`]).
    owned: bool,
}

impl RunningVm {
    pub fn start(cfg: &LaunchConfig) -> Result<Self, BackendError> {
        cfg.validate()?;
        let dir = crate::rundir::create_vm_dir(&cfg.name)?;
        let mut vm = RunningVm {
            child: None,
            desc: VmDescriptor {
                format: descriptor::FORMAT,
                name: cfg.name.clone(),
                dir: dir.clone(),
                qemu_pid: 0,
                qmp: dir.join("qmp.sock"),
                gdb: dir.join("gdb.sock"),
                serial: matches!(cfg.serial, SerialMode::Socket).then(|| dir.join("serial.sock")),
                serial_log: Some(
                    cfg.serial_log
                        .clone()
                        .unwrap_or_else(|| dir.join("serial.log")),
                ),
                ram: MemFile {
                    path: dir.join("ram"),
                    size: cfg.mem_mib << 20,
                },
                ram_regions: RamRegion::below_4g(cfg.mem_mib << 20),
                patch: MemFile {
                    path: dir.join("patch"),
                    size: cfg.patch_mib << 20,
                },
                patch_device: PATCH_DEVICE.to_owned(),
                kernel: cfg.kernel.clone(),
                vcpus: cfg.vcpus,
                accel: cfg.accel.as_str().to_owned(),
                started_unix_ms: descriptor::now_unix_ms(),
            },
            started: Instant::now(),
            owned: true,
        };
        let stderr_path = dir.join("qemu.stderr");
        let stderr = crate::rundir::create_private(&stderr_path, "QEMU's stderr log")?;
        let mut cmd = cfg.command(&dir);
        cmd.stderr(stderr);
        match cfg.serial {
            SerialMode::Terminal => cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit()),
            SerialMode::Socket => cmd.stdin(Stdio::null()).stdout(Stdio::null()),
        };
        sys::kill_with_parent(&mut cmd);
        tracing::debug!(?cmd, "starting QEMU");
        let child = cmd.spawn().map_err(|source| BackendError::Spawn {
            binary: cfg.qemu.clone(),
            source,
        })?;
        vm.desc.qemu_pid = child.id();
        sys::track(child.id(), dir.clone());
        vm.child = Some(child);
        vm.started = Instant::now();
        vm.wait_for_sockets(&stderr_path)?;
        vm.desc.store()?;
        Ok(vm)
    }

    fn wait_for_sockets(&mut self, stderr_path: &std::path::Path) -> Result<(), BackendError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.try_wait() {
                return Err(BackendError::QemuDied {
                    status,
                    stderr: std::fs::read_to_string(stderr_path).unwrap_or_default(),
                });
            }
            let ready = [&self.desc.qmp, &self.desc.gdb]
                .iter()
                .chain(self.desc.serial.as_ref().iter())
                .all(|p| p.exists());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BackendError::Timeout {
                    what: "QEMU to create its sockets".into(),
                    secs: 20.0,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Hands the VM to the process: it lives until the process exits, then
    /// QEMU is killed and its files removed (for harnesses that keep one
    /// shared VM in a static).
    pub fn keep_until_exit(mut self) -> VmDescriptor {
        // Drop now leaves QEMU running; the exit hook ends it.
        self.owned = false;
        self.desc.clone()
    }

    /// Exit status, if QEMU has exited.
    pub fn try_wait(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Asks QEMU to quit (QMP, then SIGTERM, then SIGKILL) and reaps it.
    pub fn shutdown(&mut self) {
        if !self.owned {
            return;
        }
        if let Some(child) = self.child.take() {
            let pid = child.id();
            self.stop(child);
            sys::untrack(pid);
        }
        let _ = std::fs::remove_dir_all(&self.desc.dir);
    }

    fn stop(&self, mut child: Child) {
        if matches!(child.try_wait(), Ok(None)) {
            if let Ok(mut qmp) =
                crate::qmp::Qmp::connect_timeout(&self.desc.qmp, Duration::from_secs(2))
            {
                let _ = qmp.quit();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut termed = false;
            while matches!(child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                if !termed && Instant::now() + Duration::from_secs(3) > deadline {
                    sys::signal(child.id(), false);
                    termed = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
