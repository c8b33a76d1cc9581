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

/// Shows the next line the watching guest process prints.
fn watch(console: &Console, label: &str) -> Result<String> {
    let line = console.next_line_with("probe uname_release=", LINE_TIMEOUT)?;
    let line = line[line.find("probe ").unwrap_or(0)..].to_owned();
    println!("  guest| {}   <- {label}", esc(&line));
    Ok(line)
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
    watch(&booted.console, "original kernel")?;
    for b in [&cmdline, &uname, &version] {
        let r = apply_bundle(&mut a, b)?;
        print_apply(&r);
    }
    // A line may already have been produced just before the switch.
    watch(&booted.console, "patched (no reboot)")?;
    watch(&booted.console, "patched (no reboot)")?;
    for b in [&version, &uname, &cmdline] {
        let r = revert_bundle(&mut a, &b.manifest().id)?;
        print_revert(&r);
    }
    watch(&booted.console, "reverted")?;
    watch(&booted.console, "reverted")?;
    booted.console.send("kill %1\n")?;

    step(6, "shutting down");
    drop(a);
    drop(vm);
    println!(
        "  done in {:.1} s; no QEMU or files left behind",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
