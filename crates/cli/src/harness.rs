//! Booting a guest with its console on a socket and waiting for its shell:
//! shared by `lucos demo` and the integration tests.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lucos_backend::{Console, RunningVm, SerialMode, VmDescriptor};

use crate::guest::Guest;
use crate::run::VmOpts;

/// Printed by the guest's /init once userspace is up.
pub const BOOT_MARKER: &str = "LUCOS-BOOTED";
pub const PROMPT: &str = "lucos# ";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Booted {
    pub desc: VmDescriptor,
    pub console: Console,
    /// QEMU start to the boot marker.
    pub boot_time: Duration,
}

fn wait_shell(desc: &VmDescriptor, started: Instant) -> Result<(Console, Duration)> {
    let sock = desc.serial.as_ref().context("VM has no console socket")?;
    let console = Console::connect(sock)?;
    console
        .wait_for(BOOT_MARKER, BOOT_TIMEOUT)
        .context("waiting for the guest to boot")?;
    let boot_time = started.elapsed();
    console
        .wait_for(PROMPT, BOOT_TIMEOUT)
        .context("waiting for the guest shell")?;
    Ok((console, boot_time))
}

/// Boots a VM owned by the caller (dropping the `RunningVm` stops it).
pub fn boot(opts: &VmOpts, guest: &Guest) -> Result<(RunningVm, Booted)> {
    lucos_backend::exit_on_signal().context("installing signal handlers")?;
    let cfg = opts.launch_config(guest, SerialMode::Socket)?;
    let vm = RunningVm::start(&cfg).context("starting the VM")?;
    let (console, boot_time) = wait_shell(&vm.desc, vm.started)?;
    let desc = vm.desc.clone();
    Ok((
        vm,
        Booted {
            desc,
            console,
            boot_time,
        },
    ))
}

/// Boots a VM that lives until this process exits. QEMU dies with the
/// thread that started it, so a dedicated thread starts it and never ends;
/// an exit hook kills QEMU and removes its files.
pub fn boot_for_process(opts: &VmOpts, guest: &Guest) -> Result<Booted> {
    let cfg = opts.launch_config(guest, SerialMode::Socket)?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("vm-keeper-{}", opts.name))
        .spawn(move || {
            let started = RunningVm::start(&cfg).map(|vm| {
                let t = vm.started;
                (vm.keep_until_exit(), t)
            });
            let _ = tx.send(started);
            loop {
                std::thread::park();
            }
        })
        .context("spawning the VM keeper thread")?;
    let (desc, started) = rx.recv().context("VM keeper thread died")??;
    let (console, boot_time) = wait_shell(&desc, started)?;
    Ok(Booted {
        desc,
        console,
        boot_time,
    })
}
