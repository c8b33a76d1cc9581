//! Completion of updates (`lucos status`, `lucos wait`), reclaim of reverted bundles'
//! memory (`lucos reclaim`) and consistent applies (`lucos apply --consistent`): all decided
//! from a full stack scan of the paused guest.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use lucos_introspect::stacks::{Scan, Scanner};
use lucos_patch::completion::{self, Completion, Holder, Phase};
use lucos_patch::registry::{BundleState, Registry};
use lucos_patch::{
    refs, ApplyReport, Bundle, Consistency, GateScope, Retry, RevertReport, Session,
};
use serde::Serialize;

use crate::info::{with_pause, Attached};
use crate::show::{esc, json};

#[derive(Debug, Args)]
pub struct WaitArgs {
    pub vm: String,
    /// The bundle id, as `lucos status` shows it.
    pub bundle: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ReclaimArgs {
    pub vm: String,
    /// Only these reverted bundles (default: every reverted bundle not reclaimed yet).
    pub bundles: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

/// `struct module`s of reverted bundles whose memory is still there: their code may still
/// be on a stack, and their ORC is what unwinds through it.
pub fn unlinked(reg: &Registry) -> Vec<u64> {
    reg.bundles
        .iter()
        .filter(|b| b.state == BundleState::Reverted && !b.reclaimed)
        .filter_map(|b| b.module.as_ref().map(|m| m.va))
        .collect()
}

/// Scans with the VM paused: every task's stack and every vCPU's rip.
fn scan_paused(
    vm: &mut lucos_backend::Vm,
    scanner: &Scanner,
    a: (
        &lucos_introspect::KernelSymbols,
        &lucos_introspect::KernelLayout,
    ),
    reg: &Registry,
) -> Result<Scan> {
    scanner
        .scan_with(vm, a.0, a.1, &unlinked(reg))
        .context("scanning the guest's stacks")
}

fn scanner(a: &mut Attached) -> Result<Scanner> {
    Scanner::new(&a.vm, &a.syms, &a.layout).context("reading the kernel's unwind data")
}

/// Every recorded bundle's completion, from one scan.
pub fn completion(a: &mut Attached, reg: &Registry) -> Result<Vec<Completion>> {
    let s = scanner(a)?;
    let (syms, layout) = (&a.syms, &a.layout);
    let scan = with_pause(&mut a.vm, |vm| scan_paused(vm, &s, (syms, layout), reg))?;
    Ok(completion::completion(reg, syms, layout, &scan))
}

pub fn describe(h: &Holder) -> String {
    let at = h.addr.map(|a| format!(" at {a:#x}")).unwrap_or_default();
    let cpu = h.vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default();
    format!("{} {}{cpu}: {}{at}", h.pid, esc(&h.comm), esc(&h.what))
}

pub fn print_completion(c: &[Completion]) {
    for c in c {
        let what = match c.phase {
            Phase::Apply => "old code it replaced",
            Phase::Revert => "its patch code",
        };
        if c.complete {
            println!(
                "{}: complete (no task runs or returns into {what})",
                esc(&c.id)
            );
            continue;
        }
        println!(
            "{}: NOT complete, {} task(s) in {what}:",
            esc(&c.id),
            c.holders.len()
        );
        for h in &c.holders {
            println!("  {}", describe(h));
        }
    }
}

/// The registry as JSON with each bundle's completion next to it.
pub fn status_json(reg: &Registry, c: Option<&[Completion]>) -> Result<String> {
    let mut v = serde_json::to_value(reg)?;
    if let (Some(c), Some(o)) = (c, v.as_object_mut()) {
        o.insert("completion".into(), serde_json::to_value(c)?);
    }
    Ok(json(serde_json::to_string_pretty(&v)?))
}

/// `lucos wait`: until the bundle's update is complete, scanning every 200 ms.
pub fn wait(args: WaitArgs) -> Result<()> {
    let mut a = crate::info::attach(&args.vm)?;
    let reg = crate::patchcmd::session(&mut a)?.registry()?;
    if !reg.bundles.iter().any(|b| b.id == args.bundle) {
        bail!(
            "no bundle '{}' in '{}' (see `lucos status {}`)",
            esc(&args.bundle),
            args.vm,
            args.vm
        );
    }
    let s = scanner(&mut a)?;
    let t = Instant::now();
    let deadline = Duration::from_secs(args.timeout);
    let mut scans = 0u32;
    loop {
        scans += 1;
        let (syms, layout) = (&a.syms, &a.layout);
        let scan = with_pause(&mut a.vm, |vm| scan_paused(vm, &s, (syms, layout), &reg))?;
        let c = completion::completion(&reg, syms, layout, &scan);
        let mine = c.iter().rev().find(|c| c.id == args.bundle);
        let Some(mine) = mine else {
            println!("{}: complete (its memory was reclaimed)", esc(&args.bundle));
            return Ok(());
        };
        if mine.complete {
            println!(
                "{}: complete after {:.1} s ({scans} scans)",
                esc(&mine.id),
                t.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if t.elapsed() >= deadline {
            let who: Vec<String> = mine.holders.iter().map(describe).collect();
            bail!(
                "'{}' is not complete after {} s: {}; wait longer (--timeout) or find out why \
                 these tasks stay there",
                esc(&mine.id),
                args.timeout,
                who.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Debug, Serialize)]
pub struct ReclaimOutcome {
    pub id: String,
    /// Bytes freed, none when the bundle is still referenced.
    pub freed: Option<u64>,
    pub holders: Vec<Holder>,
    pub pointers: Vec<refs::Pointer>,
}

/// Reclaims every candidate that no stack, vCPU or scanned pointer references, checking and
/// unmapping inside one pause.
pub fn reclaim_bundles(a: &mut Attached, only: &[String]) -> Result<Vec<ReclaimOutcome>> {
    let s = scanner(a)?;
    let w = a.vm.patch_window()?;
    let (syms, layout) = (&a.syms, &a.layout);
    with_pause(&mut a.vm, |vm| {
        let reg = Session::new(&mut *vm, syms, layout.clone(), w.gpa, w.size)?.registry()?;
        let scan = scan_paused(vm, &s, (syms, layout), &reg)?;
        let mut sess = Session::new(vm, syms, layout.clone(), w.gpa, w.size)?;
        let percpu: Vec<u64> = scan.cpus.iter().map(|c| c.percpu_offset).collect();
        let areas = refs::data_areas(syms, layout, &percpu, &reg)?;
        let cands: Vec<_> = reg
            .bundles
            .iter()
            .filter(|b| b.state == BundleState::Reverted && !b.reclaimed)
            .filter(|b| only.is_empty() || only.contains(&b.id))
            .cloned()
            .collect();
        for id in only {
            if !cands.iter().any(|b| &b.id == id) {
                bail!(
                    "'{}' is not a reverted bundle whose memory is still allocated (see `lucos status`)",
                    esc(id)
                );
            }
        }
        let mut found = refs::pointers_into(sess.machine(), layout.cr3, &areas, &cands)?;
        let mut out = Vec::new();
        for (i, b) in cands.iter().enumerate() {
            let holders = completion::holders(&completion::patch_code(b), &scan, &scan.rips);
            let pointers = std::mem::take(&mut found[i]);
            let freed = if holders.is_empty() && pointers.is_empty() {
                // Its data no longer holds pointers the kernel can follow (it is unmapped).
                for later in &mut found[i + 1..] {
                    later.retain(|p| !b.ranges.iter().any(|r| r.contains(p.at)));
                }
                Some(sess.reclaim(b)?.bytes)
            } else {
                None
            };
            out.push(ReclaimOutcome {
                id: b.id.clone(),
                freed,
                holders,
                pointers,
            });
        }
        Ok(out)
    })
}

pub fn reclaim(args: ReclaimArgs) -> Result<()> {
    let mut a = crate::info::attach(&args.vm)?;
    let out = reclaim_bundles(&mut a, &args.bundles)?;
    if args.json {
        println!("{}", json(serde_json::to_string_pretty(&out)?));
        return Ok(());
    }
    if out.is_empty() {
        println!("nothing to reclaim: no reverted bundle holds memory");
    }
    for o in &out {
        match o.freed {
            Some(n) => println!("{}: reclaimed {n} bytes", esc(&o.id)),
            None => {
                println!("{}: still referenced, kept", esc(&o.id));
                for h in &o.holders {
                    println!("  stack: {}", describe(h));
                }
                for p in &o.pointers {
                    println!(
                        "  pointer {:#x} at {:#x} ({})",
                        p.value,
                        p.at,
                        esc(&p.place)
                    );
                }
            }
        }
    }
    Ok(())
}

/// What a gated switch must find no task in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Every replaced function (`--consistent`).
    Consistent,
    /// Only the first 5 bytes of functions redirected at their entry (no fentry site):
    /// what any apply of such a bundle needs (see `lucos_patch::entry`).
    Entries,
}

/// How an apply of a bundle with entry sites retries when a task is in one: it rarely
/// is, since interrupted contexts seldom sit in a function's first instructions.
pub const ENTRY_RETRY: Retry = Retry {
    tries: 20,
    backoff: Duration::from_millis(20),
};

/// Applies `bundle` so that the switch happens at a pause in which no task is in the code
/// `guard` names; returns the report and the tries it took. Errors are the engine's, so
/// the caller can tell whether the guest was changed.
pub fn apply_gated(
    a: &mut Attached,
    bundle: &Bundle,
    retry: Retry,
    guard: Guard,
) -> Result<(ApplyReport, Consistency)> {
    gated(a, retry, guard, |sess| sess.apply(bundle))
}

/// Reverts bundle `id` so that the switch happens at a pause in which no task is in its
/// code: what a bundle with frame-local types needs (`Manifest::frame_types`).
pub fn revert_consistent(
    a: &mut Attached,
    id: &str,
    retry: Retry,
) -> Result<(RevertReport, Consistency)> {
    gated(a, retry, Guard::Consistent, |sess| sess.revert(id))
}

/// Runs `op` on a session whose switches pass the stack check `guard` names.
fn gated<R>(
    a: &mut Attached,
    retry: Retry,
    guard: Guard,
    op: impl FnOnce(&mut Session<'_, lucos_backend::Vm>) -> Result<R, lucos_patch::EngineError>,
) -> Result<(R, Consistency)> {
    let s = scanner(a)?;
    let w = a.vm.patch_window()?;
    let (syms, layout) = (&a.syms, &a.layout);
    let reg = Session::new(&mut a.vm, syms, layout.clone(), w.gpa, w.size)?.registry()?;
    let mut gate = move |vm: &mut lucos_backend::Vm, sites: &[lucos_patch::GateSite]| {
        let scan = scan_paused(vm, &s, (syms, layout), &reg).map_err(|e| format!("{e:#}"))?;
        let ranges: Vec<_> = match guard {
            Guard::Consistent => sites
                .iter()
                .flat_map(|g| {
                    completion::replaced_code(
                        &reg,
                        (syms, layout, &scan.modules),
                        (&g.function, g.func_addr, g.site_addr, g.module.as_ref()),
                        &g.current,
                    )
                })
                .collect(),
            Guard::Entries => sites
                .iter()
                .filter(|g| g.window)
                .map(|g| completion::CodeRange {
                    start: g.site_addr + 1,
                    end: g.site_addr + 5,
                    what: format!("the entry bytes of {}", g.function),
                })
                .collect(),
        };
        let h = completion::holders(&ranges, &scan, &scan.rips);
        Ok((!h.is_empty()).then(|| h.iter().map(describe).collect::<Vec<_>>().join("; ")))
    };
    let scope = match guard {
        Guard::Consistent => GateScope::Functions,
        Guard::Entries => GateScope::EntryWindows,
    };
    let mut sess = Session::new(&mut a.vm, syms, layout.clone(), w.gpa, w.size)?;
    sess.set_gate(&mut gate, retry, scope);
    let r = op(&mut sess);
    let stats = sess.consistency().unwrap_or_default();
    Ok((r?, stats))
}
