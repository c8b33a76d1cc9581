//! `lucos soak`: many apply/revert cycles on a private guest while a syscall loop runs on
//! every vCPU through the patched function, with the checks that make the count mean
//! something: no oops or new kernel warning, no new taint, no lost operation (each loop's
//! calls are all answered, by the old function or the new one, and each loop is still
//! running at the end; every apply and revert is in the registry), and the pause
//! percentiles.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::harness::Booted;
use crate::patchcmd::{apply_bundle, print_percentiles, revert_bundle, session};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// A bundle spec (`guest/bundles/*.json`, built first) or bundle file; it should
    /// replace a function the loops call (the default replaces `uname`'s).
    #[arg(default_value = "guest/bundles/uname.json")]
    pub bundle: PathBuf,
    /// Apply/revert cycles.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub cycles: usize,
    /// vCPUs of the private guest; one syscall loop runs per vCPU.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
}

/// What a soak counted; [`SoakReport::check`] says whether it passed.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub cycles: usize,
    pub applies: usize,
    pub reverts: usize,
    /// Per loop: total calls, calls answered by the original and by the patched function.
    pub loops: Vec<(u64, u64, u64)>,
    /// Loops that exited before they were stopped, or not with status 0.
    pub loops_died: usize,
    pub oopses: usize,
    pub new_warnings: usize,
    pub taint_before: String,
    pub taint_after: String,
    /// Records the registry holds for this soak (applied + reverted + dropped).
    pub recorded: u64,
    /// Patch memory the cycles allocated (ranges are never reused).
    pub patch_bytes: u64,
    pub apply_pause: Vec<Duration>,
    pub revert_pause: Vec<Duration>,
    pub wall: Duration,
}

impl SoakReport {
    /// Operations lost: loop calls answered by neither function, plus applies or reverts
    /// that did not complete or are not in the registry.
    pub fn lost(&self) -> u64 {
        let calls: u64 = self
            .loops
            .iter()
            .map(|(total, same, other)| total.abs_diff(same + other))
            .sum();
        let ops = (2 * self.cycles).abs_diff(self.applies + self.reverts) as u64;
        calls + ops + (self.cycles as u64).abs_diff(self.recorded)
    }

    pub fn check(&self) -> Result<()> {
        ensure!(self.oopses == 0, "{} oops on the console", self.oopses);
        ensure!(
            self.new_warnings == 0,
            "{} new BUG/WARNING lines in the kernel log",
            self.new_warnings
        );
        ensure!(
            self.taint_before == self.taint_after,
            "the kernel became tainted ({} -> {})",
            self.taint_before,
            self.taint_after
        );
        ensure!(
            self.loops_died == 0,
            "{} syscall loop(s) died",
            self.loops_died
        );
        ensure!(self.lost() == 0, "{} operations lost", self.lost());
        for (i, (total, same, other)) in self.loops.iter().enumerate() {
            ensure!(
                *same > 0 && *other > 0,
                "loop {i} never saw both functions ({total} calls: {same} old, {other} new)"
            );
        }
        Ok(())
    }

    pub fn print(&self) {
        println!(
            "soak: {} apply/revert cycles in {:.1} s, a syscall loop on each of {} vCPUs",
            self.cycles,
            self.wall.as_secs_f64(),
            self.loops.len()
        );
        for (i, (total, same, other)) in self.loops.iter().enumerate() {
            println!("  loop {i}: {total} calls, {same} by the original, {other} by the patch");
        }
        println!(
            "  oops {}, new kernel warnings {}, taint {} -> {}, loops died {}, lost operations {}",
            self.oopses,
            self.new_warnings,
            self.taint_before.trim(),
            self.taint_after.trim(),
            self.loops_died,
            self.lost()
        );
        println!(
            "  patch memory allocated: {} KiB ({} per cycle)",
            self.patch_bytes >> 10,
            self.patch_bytes / self.cycles.max(1) as u64
        );
        print_percentiles("  apply pause", &mut self.apply_pause.clone());
        print_percentiles("  revert pause", &mut self.revert_pause.clone());
    }
}

const CMD: Duration = Duration::from_secs(60);

fn sh(b: &Booted, cmd: &str) -> Result<String> {
    let out = b.console.run(cmd, CMD)?;
    if out.status != 0 {
        bail!(
            "guest command `{cmd}` failed ({}): {}",
            out.status,
            out.output
        );
    }
    Ok(out.output)
}

/// The last `key=N` of a loop's output file.
fn last_count(text: &str, key: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `cycles` apply/revert cycles of `bundle` on a booted guest, `vcpus` syscall loops
/// meanwhile, with every check of [`SoakReport`].
pub fn soak_on(
    booted: &Booted,
    a: &mut crate::info::Attached,
    bundle: &lucos_patch::Bundle,
    cycles: usize,
    vcpus: usize,
    mut progress: impl FnMut(usize),
) -> Result<SoakReport> {
    let id = bundle.manifest().id.clone();
    let release = sh(booted, "uname -r")?.trim().to_owned();
    let mut r = SoakReport {
        cycles,
        taint_before: sh(booted, "cat /proc/sys/kernel/tainted")?,
        ..Default::default()
    };
    let dmesg: usize = sh(booted, "dmesg | wc -l")?.trim().parse()?;
    let mark = booted.console.transcript().len();
    let before = session(a)?.registry()?;
    let recorded0 = before.reverted_dropped + before.bundles.len() as u64;
    for i in 0..vcpus {
        sh(
            booted,
            &format!(
                "(sysloop --forever --report-ms 500 --check-release {release} >/tmp/soak{i} \
                 2>&1; echo exit=$? >>/tmp/soak{i}) &"
            ),
        )?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..vcpus {
        while last_count(&sh(booted, &format!("cat /tmp/soak{i}"))?, "progress=") == 0 {
            ensure!(Instant::now() < deadline, "syscall loop {i} did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let t = Instant::now();
    for c in 0..cycles {
        r.apply_pause.push(
            apply_bundle(a, bundle)
                .with_context(|| format!("cycle {c}"))?
                .pause,
        );
        r.applies += 1;
        r.revert_pause.push(
            revert_bundle(a, &id)
                .with_context(|| format!("cycle {c}"))?
                .pause,
        );
        r.reverts += 1;
        progress(c + 1);
    }
    r.wall = t.elapsed();
    let after = session(a)?.registry()?;
    r.recorded = after.reverted_dropped + after.bundles.len() as u64 - recorded0;
    r.patch_bytes = after.next_free - before.next_free;
    // A loop still running now kept going through every cycle; then stop them.
    let running: usize = sh(booted, "pidof sysloop | wc -w")?.trim().parse()?;
    r.loops_died = vcpus.saturating_sub(running);
    sh(booted, "kill -TERM $(pidof sysloop); wait")?;
    for i in 0..vcpus {
        let out = sh(booted, &format!("cat /tmp/soak{i}"))?;
        if !out.contains("exit=0") {
            r.loops_died += 1;
        }
        r.loops.push((
            last_count(&out, "progress="),
            last_count(&out, "same="),
            last_count(&out, "other="),
        ));
    }
    let console = &booted.console.transcript()[mark..];
    r.oopses = console.matches("Oops").count() + console.matches("general protection").count();
    let log = sh(booted, &format!("dmesg | tail -n +{}", dmesg + 1))?;
    r.new_warnings = ["BUG:", "WARNING:", "Call Trace", "Oops"]
        .iter()
        .map(|bad| log.matches(bad).count())
        .sum();
    r.taint_after = sh(booted, "cat /proc/sys/kernel/tainted")?;
    Ok(r)
}

pub fn soak(args: SoakArgs) -> Result<()> {
    ensure!(args.cycles > 0, "--cycles must be at least 1");
    ensure!(args.vcpus > 0, "--vcpus must be at least 1");
    let g = crate::guest::GuestSel::default().ensure()?;
    let opts = crate::run::VmOpts {
        name: format!("soak-{}", std::process::id()),
        vcpus: args.vcpus,
        mem: 256,
        patch_mem: 256,
        accel: "tcg".into(),
        guest: crate::guest::GuestSel::default(),
        append: String::new(),
        qemu: "qemu-system-x86_64".into(),
    };
    let (vm, booted) = crate::harness::boot(&opts, &g)?;
    let mut a = crate::info::attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone())?)?;
    let bundle = crate::patchcmd::bench_bundle(&a, &args.bundle)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = indicatif::ProgressBar::new(args.cycles as u64);
    if !tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let r = soak_on(&booted, &mut a, &bundle, args.cycles, args.vcpus, |c| {
        bar.set_position(c as u64);
        if !tty && (c % 1000 == 0 || c == args.cycles) {
            println!("soak: {c}/{} cycles", args.cycles);
        }
    });
    bar.finish_and_clear();
    drop(a);
    drop(vm);
    let r = r?;
    r.print();
    r.check()
}
