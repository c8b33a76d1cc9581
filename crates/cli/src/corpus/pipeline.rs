//! The build and live stages, overlapped: while the builder compiles the next unit, a
//! worker thread applies, smoke-tests and reverts the bundles already built on its guest.
//! A full update is hours of compiling and of guest time; one after the other they would
//! add up. Only the main thread writes the state file.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::live::{Live, LiveGuest};
use super::outcome::{self, Built};
use super::state::State;
use super::units::{Unit, UnitKind};
use super::{source, CorpusArgs};
use crate::guest::{Flavour, Guest, GuestSel};
use crate::run::VmOpts;

/// A line per step when stdout is not a terminal, a bar when it is.
struct Steps {
    bar: Option<ProgressBar>,
    stage: &'static str,
    total: usize,
    done: usize,
}

impl Steps {
    fn new(multi: Option<&MultiProgress>, stage: &'static str, total: usize) -> Self {
        let bar = multi.map(|m| {
            let b = m.add(ProgressBar::new(total as u64));
            b.set_style(
                ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg}")
                    .expect("template")
                    .progress_chars("=> "),
            );
            b.set_prefix(stage);
            b
        });
        Steps {
            bar,
            stage,
            total,
            done: 0,
        }
    }

    fn grow(&mut self, n: usize) {
        self.total += n;
        if let Some(b) = &self.bar {
            b.set_length(self.total as u64);
        }
    }

    fn step(&mut self, id: &str, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(b) => {
                b.inc(1);
                b.set_message(format!("{id}: {what}"));
            }
            None => println!("{} {}/{} {id}: {what}", self.stage, self.done, self.total),
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `--only` matches a unit's id or the file it is about (so a file's name selects its
/// unit, not the whole update, which carries every file).
fn selected(args: &CorpusArgs, u: &Unit) -> bool {
    args.only.is_empty()
        || args
            .only
            .iter()
            .any(|s| u.id.contains(s.as_str()) || u.main.contains(s.as_str()))
}

fn short(b: &Built, n: usize) -> String {
    match b {
        Built::Bundle { replaced, .. } => {
            format!("built ({} replaced, {n} changed)", replaced.len())
        }
        Built::NoChange { reason } => format!("no change: {reason}"),
        Built::Refused { refusals } => {
            format!("refused: {}", refusals.first().map_or("", |r| r.0.as_str()))
        }
        Built::ToolError { kind, .. } => format!("tool error: {kind}"),
        Built::Unsupported { cause } => format!("not supported: {cause}"),
        Built::NotMeasured { reason } => format!("not measured: {reason}"),
    }
}

/// Units to build: not built yet, limited by a smaller budget than this run's, or whose
/// outcome names one of `--redo`.
fn to_build(args: &CorpusArgs, st: &State) -> Vec<Unit> {
    let redo = |u: &Unit| match st.results.get(&u.id).and_then(|r| r.build.as_ref()) {
        None => true,
        Some(b) => {
            (b.budget_limited() && b.budget < args.max_objects)
                || args.redo.iter().any(|r| {
                    short(&b.built, 0).contains(r.as_str())
                        || serde_json::to_string(&b.built).is_ok_and(|j| j.contains(r.as_str()))
                })
        }
    };
    st.units
        .iter()
        .filter(|u| selected(args, u) && redo(u))
        .cloned()
        .collect()
}

/// Built bundles not tried live yet.
fn to_apply(args: &CorpusArgs, st: &State) -> Vec<(Unit, PathBuf)> {
    st.units
        .iter()
        .filter(|u| selected(args, u))
        .filter_map(|u| {
            let r = st.results.get(&u.id)?;
            let again = args.redo_live && r.live.as_ref().is_some_and(|l| !l.passed());
            match (&r.build.as_ref()?.built, &r.live) {
                (Built::Bundle { bundle, .. }, None) => Some((u.clone(), bundle.clone())),
                (Built::Bundle { bundle, .. }, Some(_)) if again => {
                    Some((u.clone(), bundle.clone()))
                }
                _ => None,
            }
        })
        .collect()
}

fn vm_opts(args: &CorpusArgs) -> VmOpts {
    VmOpts {
        name: format!("corpus-{}", std::process::id()),
        vcpus: 2,
        mem: 512,
        patch_mem: 64,
        accel: args.accel.clone(),
        guest: GuestSel {
            flavour: Flavour::Debian,
            kernel_version: args.from.clone(),
        },
        append: String::new(),
        qemu: "qemu-system-x86_64".into(),
    }
}

/// Bundles applied together before one smoke run (see [`LiveGuest::exercise_batch`]).
const BATCH: usize = 8;

/// The live worker: one guest for batch after batch of what is built, a fresh one after a
/// batch broke it and for the whole update. A failed batch is retried bundle by bundle on
/// fresh guests, so a failure is always one bundle's.
fn live_worker(
    opts: &VmOpts,
    g: &Guest,
    todo: mpsc::Receiver<(Unit, PathBuf)>,
    done: mpsc::Sender<(String, Live)>,
) -> Result<()> {
    let mut guest: Option<LiveGuest> = None;
    while let Ok(first) = todo.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH && batch[0].0.kind != UnitKind::Whole {
            match todo.try_recv() {
                Ok(next) if next.0.kind == UnitKind::Whole => {
                    // Its own guest, after this batch.
                    run_batch(opts, g, &mut guest, &batch, &done)?;
                    batch = vec![next];
                    break;
                }
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        if batch[0].0.kind == UnitKind::Whole {
            guest = None;
        }
        if !run_batch(opts, g, &mut guest, &batch, &done)? {
            break;
        }
    }
    Ok(())
}

/// One batch; false when nobody listens any more.
fn run_batch(
    opts: &VmOpts,
    g: &Guest,
    guest: &mut Option<LiveGuest>,
    batch: &[(Unit, PathBuf)],
    done: &mpsc::Sender<(String, Live)>,
) -> Result<bool> {
    let items: Vec<(String, PathBuf)> = batch
        .iter()
        .map(|(u, p)| (u.id.clone(), p.clone()))
        .collect();
    let lg = match guest.as_mut() {
        Some(lg) => lg,
        None => guest.insert(LiveGuest::boot(opts, g)?),
    };
    let (mut results, good) = lg.exercise_batch(&items);
    let retry = !good || results.iter().any(|(_, l)| l.apply_error.is_some());
    if retry {
        // One by one, each on a fresh guest after a failure (and once more fresh after an
        // apply error: a long-used guest may be out of patch memory).
        results.clear();
        *guest = None;
        for item in &items {
            let lg = match guest.as_mut() {
                Some(lg) => lg,
                None => guest.insert(LiveGuest::boot(opts, g)?),
            };
            let mut live = lg.exercise(&item.1);
            if live.apply_error.is_some() {
                *guest = None;
                live = guest.insert(LiveGuest::boot(opts, g)?).exercise(&item.1);
            }
            if live.broke_guest() {
                *guest = None;
            }
            results.push((item.0.clone(), live));
        }
    }
    for r in results {
        if done.send(r).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The bytes of the bundle unit `id` last tried live, with that result.
fn tried_bundle(st: &State, id: &str) -> Option<(Vec<u8>, Live)> {
    let r = st.results.get(id)?;
    let live = r.live.clone()?;
    let Built::Bundle { bundle, .. } = &r.build.as_ref()?.built else {
        return None;
    };
    Some((std::fs::read(bundle).ok()?, live))
}

fn record_live(
    st: &mut State,
    steps: &mut Steps,
    path: &Path,
    (id, live): (String, Live),
) -> Result<()> {
    let what = if live.passed() {
        "passed".to_string()
    } else {
        format!("FAILED {}", serde_json::to_string(&live)?)
    };
    steps.step(&id, &what);
    st.record(&id).live = Some(live);
    st.save(path)
}

/// Builds what is to build and applies what is built, side by side.
pub(super) fn run(
    args: &CorpusArgs,
    g: &Guest,
    cache: &Path,
    dir: &Path,
    st: &mut State,
    path: &Path,
) -> Result<()> {
    let (a, b) = (
        source::ensure(cache, &args.from)?,
        source::ensure(cache, &args.to)?,
    );
    let build = if args.no_build {
        Vec::new()
    } else {
        to_build(args, st)
    };
    let users: BTreeMap<String, usize> = st.scope.headers.iter().cloned().collect();
    let budget = outcome::Budget {
        max_objects: args.max_objects,
        users: &users,
    };
    let (diffs, bundles) = (dir.join("diffs"), dir.join("bundles"));
    let paths = outcome::Paths {
        from: &a,
        to: &b,
        kernel_dir: &g.kernel_dir,
        diffs: &diffs,
        bundles: &bundles,
        sources: &st.scope.builtin.clone(),
        units: &st.units.clone(),
    };
    let multi = std::io::stdout().is_terminal().then(MultiProgress::new);
    let mut bsteps = Steps::new(multi.as_ref(), "build", build.len());
    let pending = if args.no_live {
        Vec::new()
    } else {
        to_apply(args, st)
    };
    let mut lsteps = Steps::new(multi.as_ref(), "live", pending.len());
    let opts = &vm_opts(args);
    let (tx, rx) = mpsc::channel();
    let (ltx, lrx) = mpsc::channel();
    std::thread::scope(|scope| -> Result<()> {
        let worker = if args.no_live {
            // Nobody will answer: close both channels so the waits below end.
            drop((rx, ltx));
            None
        } else {
            Some(scope.spawn(move || live_worker(opts, g, rx, ltx)))
        };
        for p in pending {
            let _ = tx.send(p);
        }
        for u in &build {
            let tried = tried_bundle(st, &u.id);
            let r = outcome::build(&paths, u, &budget, args.jobs)?;
            bsteps.step(
                &u.id,
                &format!(
                    "{} in {:.1} s",
                    short(&r.built, r.functions.changed.len()),
                    r.seconds
                ),
            );
            let bundle = match &r.built {
                Built::Bundle { bundle, .. } => Some(bundle.clone()),
                _ => None,
            };
            // A rebuilt bundle has not been tried live yet, unless it is byte for byte
            // the one that was (signatures are deterministic).
            let kept = match (&bundle, tried) {
                (Some(b), Some((bytes, live))) if std::fs::read(b).is_ok_and(|n| n == bytes) => {
                    Some(live)
                }
                _ => None,
            };
            let again = kept.is_none();
            let rec = st.record(&u.id);
            rec.build = Some(r);
            rec.live = kept;
            st.save(path)?;
            if let (Some(bundle), Some(_), true) = (bundle, &worker, again) {
                lsteps.grow(1);
                let _ = tx.send((u.clone(), bundle));
            }
            while let Ok(done) = lrx.try_recv() {
                record_live(st, &mut lsteps, path, done)?;
            }
        }
        drop(tx);
        for done in lrx {
            record_live(st, &mut lsteps, path, done)?;
        }
        match worker {
            Some(w) => w
                .join()
                .map_err(|_| anyhow::anyhow!("the live worker panicked"))?
                .context("the live stage"),
            None => Ok(()),
        }
    })
}
