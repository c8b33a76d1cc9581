//! `lucos demo`: build what is missing, boot the guest under TCG, read it
//! from outside, live-patch two kernel functions while a guest process
//! watches, revert, shut down.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use lucos_backend::{Console, Vm};
use lucos_patch::Bundle;

use crate::guest::guest_dir;
use crate::harness;
use crate::info::{attach_vm, facts, print_facts, read_kernel_string};
use crate::patchcmd::{apply_bundle, print_apply, print_revert, revert_bundle};
use crate::run::VmOpts;
use crate::show::{esc, esc_lines};

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub vm: VmOpts,
}

const LINE_TIMEOUT: Duration = Duration::from_secs(30);

fn step(n: u32, text: &str) {
    println!("\n[{n}/6] {text}");
}

/// What a probe line shows of the demo's three patches: uname release, /proc/cmdline and
/// /proc/version, each patched or not.
fn patched_fields(line: &str) -> Result<[bool; 3]> {
    let field = |name: &str, next: Option<&str>| -> Result<&str> {
        let start = line
            .find(name)
            .with_context(|| format!("probe line without {name}: {}", esc(line)))?
            + name.len();
        let rest = &line[start..];
        Ok(match next.and_then(|n| rest.find(n)) {
            Some(end) => &rest[..end],
            None => rest,
        })
    };
    let release = field("uname_release=", Some(" cmdline="))?;
    let cmdline = field(" cmdline=", Some(" version="))?;
    let version = field(" version=", None)?;
    Ok([
        release.ends_with("+lucos"),
        cmdline.starts_with("lucos-patched "),
        version.contains("(lucos-patched)"),
    ])
}

/// Waits for the watching guest process to show every patch applied (`patched`) or none,
/// and shows that line and the next, which must agree. Lines printed while the switches
/// were still under way are shown as such; a guest that never gets there fails the demo.
fn watch(console: &Console, patched: bool, label: &str) -> Result<()> {
    const SWITCHING_LINES: usize = 3;
    let next = || -> Result<(String, [bool; 3])> {
        let line = console.next_line_with("probe uname_release=", LINE_TIMEOUT)?;
        let line = line[line.find("probe ").unwrap_or(0)..].to_owned();
        let fields = patched_fields(&line)?;
        Ok((line, fields))
    };
    let mut seen = 0;
    loop {
        let (line, fields) = next()?;
        if fields == [patched; 3] {
            println!("  guest| {}   <- {label}", esc(&line));
            break;
        }
        seen += 1;
        anyhow::ensure!(
            seen <= SWITCHING_LINES,
            "the guest does not show the {label} kernel after {SWITCHING_LINES} lines: {}",
            esc(&line)
        );
        println!(
            "  guest| {}   <- printed while the sites were being switched",
            esc(&line)
        );
    }
    let (line, fields) = next()?;
    anyhow::ensure!(
        fields == [patched; 3],
        "the guest showed the {label} kernel, then not: {}",
        esc(&line)
    );
    println!("  guest| {}   <- {label}", esc(&line));
    Ok(())
}

/// Builds the demo bundles from their sources with Kbuild.
pub fn demo_bundle(
    kernel_dir: &Path,
    syms: &lucos_introspect::KernelSymbols,
    name: &str,
) -> Result<Bundle> {
    let spec = guest_dir().join("bundles").join(format!("{name}.json"));
    let bytes = lucos_diffobj::make_from_spec_file(kernel_dir, &spec, syms)
        .with_context(|| format!("building bundle {}", spec.display()))?;
    crate::signing::sign_and_open(&bytes, &spec)
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let t = Instant::now();
    println!("lucos demo: live-patching a running Linux kernel from outside its VM");
    step(1, "guest kernel and initramfs");
    let g = args.vm.guest.ensure()?;
    println!(
        "  kernel {} ({} {})",
        g.bzimage.display(),
        g.meta["flavour"].as_str().unwrap_or("tiny"),
        g.meta["release"].as_str().unwrap_or("lucos build")
    );
    println!("  initramfs {}", g.initrd.display());

    step(
        2,
        &format!(
            "booting under QEMU {} ({} vCPUs, {} MiB)",
            args.vm.accel, args.vm.vcpus, args.vm.mem
        ),
    );
    let mut opts = args.vm.clone();
    if opts.name == "lucos" {
        opts.name = format!("demo-{}", std::process::id());
    }
    let (vm, booted) = harness::boot(&opts, &g)?;
    println!(
        "  boot to userspace: {:.2} s (QEMU start to the guest's LUCOS-BOOTED line)",
        booted.boot_time.as_secs_f64()
    );
    for cmd in ["uname -a", "cat /proc/cmdline", "sysloop --iters 20000"] {
        let out = booted.console.run(cmd, LINE_TIMEOUT)?;
        println!(
            "  guest$ {cmd}\n  guest| {}",
            esc_lines(out.output.trim_end()).replace('\n', "\n  guest| ")
        );
    }

    step(
        3,
        "reading the guest from outside (QMP, gdbstub, shared RAM; no agent)",
    );
    let mut a = attach_vm(Vm::attach_desc(booted.desc.clone())?)?;
    let f = facts(&mut a)?;
    print_facts(&f);
    let guest_version = booted
        .console
        .run("cat /proc/version", LINE_TIMEOUT)?
        .output;
    let banner = read_kernel_string(&a, "linux_banner", 512)?;
    println!(
        "  linux_banner read from outside {} the guest's /proc/version",
        if banner.trim_end() == guest_version.trim_end() {
            "equals"
        } else {
            "DIFFERS from"
        }
    );

    step(
        4,
        "building patch bundles: two from C files (Kbuild), one from a source diff",
    );
    let tb = Instant::now();
    let cmdline = demo_bundle(&g.kernel_dir, &a.syms, "cmdline")?;
    let uname = demo_bundle(&g.kernel_dir, &a.syms, "uname")?;
    println!(
        "  built 'cmdline' and 'uname' in {:.1} s",
        tb.elapsed().as_secs_f64()
    );
    let diff = guest_dir().join("patches/04-version-string.patch");
    let version = match lucos_diffobj::diff::build(
        &g.kernel_dir,
        &diff,
        &lucos_diffobj::diff::BuildOptions::default(),
        &crate::buildcmd::Bars::default(),
    )? {
        lucos_diffobj::diff::BuildOutcome::Bundle(b) => {
            let t = b.report.times;
            println!(
                "  lucos build {}: replaces {} (rebuild {:.2} s, compare {:.2} s, emit {:.3} s)",
                diff.file_name().unwrap_or_default().to_string_lossy(),
                esc(&b.replaced.join(", ")),
                t.rebuild.as_secs_f64(),
                t.compare.as_secs_f64(),
                t.emit.as_secs_f64()
            );
            crate::signing::sign_and_open(&b.bundle, &diff)?
        }
        lucos_diffobj::diff::BuildOutcome::NoChange { reason, .. } => {
            anyhow::bail!("{}: {reason}", diff.display())
        }
    };

    step(5, "live patch while a guest process prints uname -r, /proc/cmdline and /proc/version every second");
    booted.console.send("probe --every 1 &\n")?;
    watch(&booted.console, false, "original")?;
    for b in [&cmdline, &uname, &version] {
        let r = apply_bundle(&mut a, b)?;
        print_apply(&r);
    }
    watch(&booted.console, true, "patched (no reboot)")?;
    for b in [&version, &uname, &cmdline] {
        let r = revert_bundle(&mut a, &b.manifest().id)?;
        print_revert(&r);
    }
    watch(&booted.console, false, "reverted")?;
    booted.console.send("kill %1\n")?;

    step(6, "shutting down");
    let (pid, dir) = (vm.desc.qemu_pid, vm.desc.dir.clone());
    drop(a);
    drop(vm);
    // QEMU was reaped by the drop, so its pid is free: /proc has no entry for it (unless
    // the pid was reused at once, which the command line tells apart).
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let qemu_left = std::fs::read(proc_dir.join("cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir.display().to_string()));
    anyhow::ensure!(
        !qemu_left,
        "QEMU (pid {pid}) is still running after the shutdown"
    );
    anyhow::ensure!(
        !dir.exists(),
        "the VM's run directory {} is still there after the shutdown",
        dir.display()
    );
    println!(
        "  done in {:.1} s; QEMU (pid {pid}) has exited and {} is removed",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}
