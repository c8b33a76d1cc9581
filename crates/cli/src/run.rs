//! `lucos run`: the foreground owner of one VM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use lucos_backend::{Accel, LaunchConfig, RunningVm, SerialMode};

use crate::guest::{self, Guest};

#[derive(Debug, Clone, Args)]
pub struct VmOpts {
    /// Name other lucos commands use to attach.
    #[arg(long, default_value = "lucos")]
    pub name: String,
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// Patch memory in MiB (power of two).
    #[arg(long, default_value_t = 8)]
    pub patch_mem: u64,
    /// tcg everywhere; kvm only on hosts with a working /dev/kvm.
    #[arg(long, value_parser = ["tcg", "kvm"], default_value = "tcg")]
    pub accel: String,
    #[command(flatten)]
    pub guest: guest::GuestSel,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub append: String,
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
}

impl VmOpts {
    pub fn launch_config(&self, guest: &Guest, serial: SerialMode) -> Result<LaunchConfig> {
        let accel = if self.accel == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        let mut append = String::from("console=ttyS0 panic=-1");
        if matches!(serial, SerialMode::Socket) {
            // Harness consoles: no tty echo or line editing (whose cursor
            // queries can swallow typed input), few kernel messages.
            append.push_str(" lucos.echo=0 lucos.loglevel=1");
        }
        if !self.append.is_empty() {
            append.push(' ');
            append.push_str(&self.append);
        }
        Ok(LaunchConfig {
            name: self.name.clone(),
            qemu: self.qemu.clone(),
            bzimage: guest.bzimage.clone(),
            initrd: guest.initrd.clone(),
            kernel: guest.kernel_info()?,
            append,
            vcpus: self.vcpus,
            mem_mib: self.mem,
            patch_mib: self.patch_mem,
            accel,
            serial,
            serial_log: None,
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Serial console on a socket in the VM directory instead of this terminal.
    #[arg(long)]
    pub headless: bool,
    /// Also log the serial console to this file (kept after the VM stops).
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
    /// Boot your own kernel (a bzImage) instead of the flavour's; needs --vmlinux.
    #[arg(long, requires = "vmlinux")]
    pub kernel: Option<PathBuf>,
    /// The vmlinux (ELF with symbols) of --kernel: lucos reads symbols and the build id
    /// from it.
    #[arg(long, requires = "kernel")]
    pub vmlinux: Option<PathBuf>,
    /// Initramfs to boot instead of lucos's busybox one.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
}

impl RunArgs {
    /// The flavour's guest with the user's own kernel or initramfs put in, checked to exist.
    fn guest(&self) -> Result<Guest> {
        let mut g = if self.kernel.is_some() && self.initrd.is_some() {
            Guest {
                kernel_dir: PathBuf::new(),
                bzimage: PathBuf::new(),
                vmlinux: PathBuf::new(),
                initrd: PathBuf::new(),
                meta: serde_json::Value::Null,
            }
        } else {
            self.vm.guest.ensure()?
        };
        if let (Some(k), Some(v)) = (&self.kernel, &self.vmlinux) {
            g.bzimage = k.clone();
            g.vmlinux = v.clone();
            g.kernel_dir = v.parent().map(PathBuf::from).unwrap_or_default();
        }
        if let Some(i) = &self.initrd {
            g.initrd = i.clone();
        }
        for (what, p) in [
            ("--kernel", &g.bzimage),
            ("--vmlinux", &g.vmlinux),
            ("--initrd", &g.initrd),
        ] {
            if !p.is_file() {
                bail!("{what} {} is not a file", p.display());
            }
        }
        Ok(g)
    }
}

/// SIGINT/SIGTERM set a flag that the wait loops poll.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing signal handler")?;
    }
    Ok(flag)
}

pub fn run(args: RunArgs) -> Result<()> {
    let stop = stop_flag()?;
    let guest = args.guest()?;
    let serial = if args.headless {
        SerialMode::Socket
    } else {
        SerialMode::Terminal
    };
    let mut cfg = args.vm.launch_config(&guest, serial)?;
    cfg.serial_log = args.log.clone();
    let mut vm = RunningVm::start(&cfg).context("starting the VM")?;
    eprintln!(
        "lucos: VM '{}' running (QEMU pid {}); attach with e.g. `lucos info {}`; descriptor {}",
        vm.desc.name,
        vm.desc.qemu_pid,
        vm.desc.name,
        vm.desc.dir.join("vm.json").display()
    );
    if let Some(sock) = &vm.desc.serial {
        eprintln!("lucos: serial console at {}", sock.display());
    }
    loop {
        if let Some(status) = vm.try_wait() {
            eprintln!("\nlucos: QEMU exited ({status})");
            break;
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!("\nlucos: shutting the VM down");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.shutdown();
    Ok(())
}
