//! `lucos apply`, `revert`, `status`, `bench`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use lucos_patch::registry::{BundleState, Registry};
use lucos_patch::{ApplyReport, Bundle, RevertReport, Session};

use crate::complete::Guard;
use crate::info::{attach, Attached};
use crate::show::esc;
use lucos_introspect::Machine;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    pub vm: String,
    pub bundle: PathBuf,
    /// Switch only at a pause in which no task has a replaced function on its stack;
    /// otherwise resume and try again. A bundle that changes a frame-local type (`lucos
    /// bundle show` lists them as `frame_types`) is always applied and reverted this way.
    #[arg(long)]
    pub consistent: bool,
    /// With --consistent: pauses to try before giving up.
    #[arg(long, default_value_t = CONSISTENT_RETRY.tries, requires = "consistent")]
    pub tries: u32,
    /// With --consistent: the guest runs this long after a failed try (doubling, up to 8x).
    #[arg(long, default_value_t = CONSISTENT_RETRY.backoff.as_millis() as u64, requires = "consistent")]
    pub backoff_ms: u64,
}

#[derive(Debug, Args)]
pub struct RevertArgs {
    pub vm: String,
    pub id: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub vm: String,
    #[arg(long)]
    pub json: bool,
}

/// Largest input file lucos reads (bundles, objects, manifests): far above any real bundle,
/// far below what would exhaust memory.
pub const MAX_INPUT: u64 = 256 << 20;

/// Reads a regular file of at most [`MAX_INPUT`] bytes: a device, FIFO or directory given by
/// mistake (`/dev/zero`) is refused at once instead of read forever.
pub fn read_input(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!(
            "{} is not a regular file; give a bundle file",
            path.display()
        );
    }
    if meta.len() > MAX_INPUT {
        anyhow::bail!(
            "{} is {} bytes, more than the {} MiB lucos reads; it is not a bundle",
            path.display(),
            meta.len(),
            MAX_INPUT >> 20
        );
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while read: never take more than the limit.
    f.take(MAX_INPUT + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_INPUT {
        anyhow::bail!(
            "{} grew past {} MiB while being read",
            path.display(),
            MAX_INPUT >> 20
        );
    }
    Ok(bytes)
}

/// Reads a bundle to apply: its signature is checked against the trust store first.
pub fn load_bundle(path: &std::path::Path) -> Result<Bundle> {
    let bytes = read_input(path)?;
    crate::signing::open(&bytes, path)
}

/// Opens an engine session on an attached VM.
pub fn session(a: &mut Attached) -> Result<Session<'_, lucos_backend::Vm>> {
    let w = a.vm.patch_window()?;
    Ok(Session::new(
        &mut a.vm,
        &a.syms,
        a.layout.clone(),
        w.gpa,
        w.size,
    )?)
}

/// Applies `bundle` with the stack check its switch needs: a consistent one for a bundle
/// that changes a frame-local type, one of the entry bytes for a bundle with entry sites
/// (functions without fentry), none otherwise.
pub fn apply_bundle(a: &mut Attached, bundle: &Bundle) -> Result<ApplyReport> {
    let man = bundle.manifest();
    let entries = man.replacements.iter().any(|r| r.no_fentry);
    let consistent = !man.frame_types.is_empty() || !man.prototypes.is_empty();
    let r = match (!consistent, entries) {
        (false, _) => apply_checked(a, bundle, CONSISTENT_RETRY, Guard::Consistent),
        (true, true) => apply_checked(a, bundle, crate::complete::ENTRY_RETRY, Guard::Entries),
        (true, false) => session(a)?
            .apply(bundle)
            .map(|r| (r, Default::default()))
            .map_err(anyhow::Error::new),
    };
    r.map(|(r, _)| r).map_err(|e| apply_context(e, bundle))
}

/// A gated apply ([`crate::complete::apply_gated`]) whose errors say whether the guest
/// was changed.
pub fn apply_checked(
    a: &mut Attached,
    bundle: &Bundle,
    retry: lucos_patch::Retry,
    guard: Guard,
) -> Result<(ApplyReport, lucos_patch::Consistency)> {
    crate::complete::apply_gated(a, bundle, retry, guard).map_err(|e| apply_context(e, bundle))
}

/// Only a failed resume comes after the change; every other engine error undid it.
fn apply_context(e: anyhow::Error, bundle: &Bundle) -> anyhow::Error {
    let id = esc(&bundle.manifest().id);
    let note = match e.downcast_ref::<lucos_patch::EngineError>() {
        Some(lucos_patch::EngineError::ResumeFailed(_)) | None => "",
        Some(_) => " (the guest was left unchanged)",
    };
    e.context(format!("applying bundle '{id}'{note}"))
}

/// How a switch that must be consistent retries by default (`lucos apply --consistent`'s
/// defaults): tasks leave the scheduler's and other hot functions within milliseconds.
pub const CONSISTENT_RETRY: lucos_patch::Retry = lucos_patch::Retry {
    tries: 50,
    backoff: Duration::from_millis(20),
};

/// Reverts bundle `id`; one that changed a frame-local type is reverted consistently, as
/// it was applied: the engine refuses it otherwise, before it changes anything, and that
/// refusal is the cue (its record is read once, by the engine).
pub fn revert_bundle(a: &mut Attached, id: &str) -> Result<RevertReport> {
    let r = match session(a)?.revert(id) {
        Err(
            lucos_patch::EngineError::FrameTypeNeedsConsistency { .. }
            | lucos_patch::EngineError::PrototypeNeedsConsistency { .. },
        ) => crate::complete::revert_consistent(a, id, CONSISTENT_RETRY).map(|(r, _)| r),
        other => other.map_err(anyhow::Error::new),
    };
    r.with_context(|| format!("reverting bundle '{id}'"))
}

pub fn print_apply(r: &ApplyReport) {
    println!(
        "applied '{}' in {:.1} ms; guest paused {} us",
        esc(&r.id),
        ms(r.total),
        r.pause.as_micros()
    );
    if let Some(va) = r.mapped_at {
        println!("  patch memory mapped into the kernel at {va:#x}");
    }
    for s in &r.sites {
        println!(
            "  {} @ {:#x}: {} -> jmp {:#x} ({})",
            esc(&s.function),
            s.site_addr,
            hex::encode(s.original),
            s.new_addr,
            esc(&s.new_symbol)
        );
    }
}

pub fn print_revert(r: &RevertReport) {
    println!(
        "reverted '{}' in {:.1} ms; guest paused {} us",
        esc(&r.id),
        ms(r.total),
        r.pause.as_micros()
    );
    for s in &r.sites {
        println!(
            "  {} @ {:#x}: restored {}",
            esc(&s.function),
            s.site_addr,
            hex::encode(s.original)
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn apply(args: ApplyArgs) -> Result<()> {
    let t = Instant::now();
    let bundle = load_bundle(&args.bundle)?;
    let mut a = attach(&args.vm)?;
    if args.consistent {
        let retry = lucos_patch::Retry {
            tries: args.tries.max(1),
            backoff: Duration::from_millis(args.backoff_ms),
        };
        let (r, c) = apply_checked(&mut a, &bundle, retry, Guard::Consistent)?;
        print_apply(&r);
        println!(
            "  consistent: {} tries, {} us paused in all (the switch's pause included)",
            c.tries,
            (c.failed_pause + r.pause).as_micros()
        );
    } else {
        print_apply(&apply_bundle(&mut a, &bundle)?);
    }
    println!(
        "  command total {:.1} ms (attach, symbols, KASLR, apply)",
        ms(t.elapsed())
    );
    Ok(())
}

pub fn revert(args: RevertArgs) -> Result<()> {
    let t = Instant::now();
    let mut a = attach(&args.vm)?;
    let r = revert_bundle(&mut a, &args.id)?;
    print_revert(&r);
    println!(
        "  command total {:.1} ms (attach, symbols, KASLR, revert)",
        ms(t.elapsed())
    );
    Ok(())
}

pub fn print_status(reg: &Registry) {
    match reg.va_base {
        Some(va) if reg.map_pending => println!(
            "patch memory being mapped at {va:#x}: a first apply was interrupted; the next \
             apply completes the mapping, `lucos reset` removes it"
        ),
        Some(va) => println!(
            "patch memory mapped at {va:#x}; {} bytes allocated, {} of them reclaimed for reuse",
            reg.next_free,
            reg.free.iter().map(|f| f.1).sum::<u64>()
        ),
        None => println!("patch memory not mapped yet (no bundle applied)"),
    }
    if reg.bundles.is_empty() {
        println!("no bundles");
    }
    for b in &reg.bundles {
        let state = match b.state {
            BundleState::Applied if b.half_applied => {
                "half-applied: a failed switch could not restore every site listed; \
                 `lucos revert` puts them back"
            }
            BundleState::Applied => "applied",
            BundleState::Reverted => "reverted",
        };
        let size: u64 = b.ranges.iter().map(|r| r.len).sum();
        print!(
            "{} [{state}] {} bytes, apply pause {} us",
            esc(&b.id),
            size,
            b.apply_pause_us
        );
        if let Some(p) = b.revert_pause_us {
            print!(", revert pause {p} us");
        }
        if b.reclaimed {
            print!(", memory reclaimed");
        }
        println!();
        if !b.description.is_empty() {
            println!("  {}", esc(&b.description));
        }
        for s in &b.sites {
            println!(
                "  {} @ {:#x} -> {} @ {:#x}",
                esc(&s.function),
                s.site_addr,
                esc(&s.new_symbol),
                s.new_addr
            );
        }
    }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let mut a = attach(&args.vm)?;
    let (reg, odd) = {
        let sess = session(&mut a)?;
        (sess.registry()?, sess.inconsistencies()?)
    };
    let pending = reg.bundles.iter().any(|b| !b.reclaimed);
    // A guest whose stacks cannot be read still has a status: say why completion is missing.
    let done = match pending {
        true => crate::complete::completion(&mut a, &reg)
            .map_err(|e| eprintln!("warning: completion unknown: {e:#}"))
            .ok(),
        false => None,
    };
    if args.json {
        println!("{}", crate::complete::status_json(&reg, done.as_deref())?);
    } else {
        print_status(&reg);
        if let Some(c) = &done {
            crate::complete::print_completion(c);
        }
    }
    if a.vm.is_paused()? {
        eprintln!(
            "note: the VM is paused; `lucos resume {}` continues it",
            args.vm
        );
    }
    for (id, function, live) in &odd {
        let original = reg
            .find_applied(id)
            .and_then(|b| b.sites.iter().find(|s| &s.function == function))
            .map(|s| s.original.as_slice());
        eprintln!(
            "warning: {}",
            inconsistency_warning(&args.vm, id, function, live, original)
        );
    }
    Ok(())
}

/// What `lucos status` says about an applied record whose site does not hold
/// its jmp. Apply records before it switches and revert switches before it
/// records, so a lucos killed inside either leaves the same state: the
/// record says applied, the site holds the bytes from before the bundle.
/// Other bytes mean something else rewrote the site.
pub fn inconsistency_warning(
    vm: &str,
    id: &str,
    function: &str,
    live: &[u8],
    original: Option<&[u8]>,
) -> String {
    let (id, function) = (esc(id), esc(function));
    if original == Some(live) {
        format!(
            "'{id}' is recorded as applied but `{function}` holds its original bytes {}: an \
             apply or a revert of '{id}' was interrupted (lucos stopped between recording and \
             switching the site, or between restoring it and recording that), so the bundle is \
             not in effect there; `lucos revert {vm} {id}` clears the record",
            hex::encode(live)
        )
    } else {
        format!(
            "'{id}' is recorded as applied but `{function}` holds {}, neither its jmp nor the \
             bytes it replaced: something other than lucos rewrote the site after the apply; \
             find out what before `lucos revert {vm} {id}`",
            hex::encode(live)
        )
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A bundle file, or a bundle spec (`guest/bundles/*.json`) to build first.
    pub bundle: PathBuf,
    /// Attach to this VM; without it, a private guest is booted and stopped.
    #[arg(long)]
    pub vm: Option<String>,
    /// Apply/revert cycles.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub cycles: usize,
    /// Run a syscall loop on every vCPU of the private guest meanwhile.
    #[arg(long)]
    pub load: bool,
    /// Also load the same change (sample `cmdline`) as the guest's own livepatch module
    /// and compare apply time and the cost of a read of /proc/cmdline (private guest only).
    #[arg(long)]
    pub against_livepatch: bool,
    /// Apply in consistent mode (a full stack scan inside each pause, retried while a task
    /// is in a replaced function); the apply pause then counts every try.
    #[arg(long)]
    pub consistent: bool,
}

/// A bundle file, or a bundle spec (`*.json`) built for the attached VM's kernel.
pub fn bench_bundle(a: &Attached, path: &std::path::Path) -> Result<Bundle> {
    if path.extension().is_some_and(|e| e == "json") {
        let bytes = lucos_diffobj::make_from_spec_file(&a.vm.desc.kernel.dir, path, &a.syms)?;
        crate::signing::sign_and_open(&bytes, path)
    } else {
        load_bundle(path)
    }
}

/// p50/p99/max of pause times over N apply/revert cycles, next to the cost
/// of an empty QMP stop+cont measured in the same run.
pub fn bench(args: BenchArgs) -> Result<()> {
    if args.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    if args.against_livepatch && args.vm.is_some() {
        bail!("--against-livepatch boots its own guest (with the module inside); drop --vm");
    }
    let mut private = None;
    let mut a = match &args.vm {
        Some(name) => attach(name)?,
        None => {
            let mut g = crate::guest::GuestSel::default().ensure()?;
            if args.against_livepatch {
                let ko = crate::lpbench::build_module()?;
                g.initrd = crate::lpbench::initrd_with(&g.initrd, &ko)?;
            }
            let opts = crate::run::VmOpts {
                name: format!("bench-{}", std::process::id()),
                vcpus: 2,
                mem: 256,
                patch_mem: 64,
                accel: "tcg".into(),
                guest: crate::guest::GuestSel::default(),
                append: String::new(),
                qemu: "qemu-system-x86_64".into(),
            };
            let (vm, booted) = crate::harness::boot(&opts, &g)?;
            if args.load {
                booted.console.run(
                    "sysloop --forever >/dev/null & sysloop --forever >/dev/null &",
                    Duration::from_secs(30),
                )?;
            }
            let a = crate::info::attach_vm(lucos_backend::Vm::attach_desc(booted.desc.clone())?)?;
            private = Some((vm, booted));
            a
        }
    };
    let bundle = bench_bundle(&a, &args.bundle)?;
    let id = bundle.manifest().id.clone();
    let calls = match &private {
        Some((_, b)) if args.against_livepatch => {
            let dir = crate::guest::guest_dir().join("bundles");
            let mut same = Vec::new();
            for name in crate::lpbench::SAME_BODY {
                same.push(bench_bundle(&a, &dir.join(format!("{name}.json")))?);
            }
            let all: Vec<&Bundle> = std::iter::once(&bundle).chain(&same).collect();
            Some(crate::lpbench::call_costs(&mut a, &b.console, &all)?)
        }
        _ => None,
    };
    let mut empty = Vec::new();
    for _ in 0..args.cycles {
        let t = Instant::now();
        a.vm.pause()?;
        a.vm.resume()?;
        empty.push(t.elapsed());
    }
    // One full stack scan (every task unwound with ORC) inside a stop+cont.
    let scanner = lucos_introspect::stacks::Scanner::new(&a.vm, &a.syms, &a.layout)
        .context("reading the kernel's unwind data")?;
    let (mut scans, mut ntasks) = (Vec::new(), 0);
    for _ in 0..args.cycles {
        let t = Instant::now();
        a.vm.pause()?;
        let scan = scanner.scan(&mut a.vm, &a.syms, &a.layout);
        a.vm.resume()?;
        scans.push(t.elapsed());
        ntasks = scan.context("scanning the guest's stacks")?.tasks.len();
    }
    let (mut apply, mut revert, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    let t = Instant::now();
    let mut tries = Vec::new();
    for _ in 0..args.cycles {
        let r = if args.consistent {
            let retry = lucos_patch::Retry {
                tries: 100,
                backoff: Duration::from_millis(5),
            };
            let (r, c) = apply_checked(&mut a, &bundle, retry, Guard::Consistent)?;
            tries.push(c.tries);
            apply.push(r.pause + c.failed_pause);
            r
        } else {
            let r = apply_bundle(&mut a, &bundle)?;
            apply.push(r.pause);
            r
        };
        totals.push(r.total);
        revert.push(revert_bundle(&mut a, &id)?.pause);
    }
    let wall = t.elapsed();
    println!(
        "{} apply/revert cycles of '{}' in {:.2} s ({}{})",
        args.cycles,
        esc(&id),
        wall.as_secs_f64(),
        a.vm.desc.accel,
        if args.load {
            ", syscall loop on every vCPU"
        } else {
            ""
        }
    );
    let base = print_percentiles("empty stop+cont", &mut empty);
    let ap = match args.consistent {
        true => print_percentiles("consistent apply pause (all tries)", &mut apply),
        false => print_percentiles("apply pause", &mut apply),
    };
    if !tries.is_empty() {
        tries.sort();
        println!(
            "consistent tries: p50 {}, max {}, mean {:.2}",
            tries[tries.len() / 2],
            tries[tries.len() - 1],
            tries.iter().sum::<u32>() as f64 / tries.len() as f64
        );
    }
    let rp = print_percentiles("revert pause", &mut revert);
    let sp = print_percentiles(&format!("stack scan pause ({ntasks} tasks)"), &mut scans);
    let tot = print_percentiles("apply total (engine)", &mut totals);
    println!(
        "p50 ratio to an empty stop+cont: {} {:.1}x, revert {:.1}x, full stack scan {:.1}x",
        if args.consistent {
            "consistent apply (all tries)"
        } else {
            "apply (target <= 1.5x)"
        },
        ap.as_secs_f64() / base.as_secs_f64(),
        rp.as_secs_f64() / base.as_secs_f64(),
        sp.as_secs_f64() / base.as_secs_f64()
    );
    if let (Some((_, b)), Some(c)) = (&private, calls) {
        crate::lpbench::print_against(&b.console, &c, &id, tot.as_micros() as u64)?;
    }
    drop(a);
    drop(private);
    Ok(())
}

/// Prints p50/p99/max and returns p50.
pub fn print_percentiles(label: &str, v: &mut [Duration]) -> Duration {
    v.sort();
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{label}: p50 {} us, p99 {} us, max {} us (n={})",
        pct(0.5).as_micros(),
        pct(0.99).as_micros(),
        v[v.len() - 1].as_micros(),
        v.len()
    );
    pct(0.5)
}
