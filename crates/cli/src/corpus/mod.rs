//! `lucos corpus`: a whole Debian kernel update, unit by unit, built, applied live to the
//! guest, smoke-tested and reverted, with the coverage it reaches.
//!
//! The pipeline: sources (fetch both versions) → scope (what this kernel contains) →
//! units (a changed file with the headers it needs) → build → live (apply, smoke, revert)
//! → report. Every step's result goes into a state file at once, so a run can be stopped
//! and resumed, and the report can be printed from it at any time.

mod live;
mod outcome;
mod report;
mod scope;
mod source;
mod state;
mod units;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::guest::{Flavour, Guest, GuestSel};
use crate::run::VmOpts;
use live::LiveGuest;
use outcome::Built;
use state::State;
use units::{Unit, UnitKind};

#[derive(Debug, Args)]
pub struct CorpusArgs {
    /// Debian version of the running guest kernel (the update's starting point).
    #[arg(long, default_value = crate::guest::DEFAULT_VERSION)]
    pub from: String,
    /// Debian version to update to, e.g. 6.1.190-1.
    #[arg(long)]
    pub to: String,
    /// Run directory: state, unit diffs, bundles
    /// (default: <cache>/corpus/<from>_<to>).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Only units whose id or file contains one of these strings.
    #[arg(long)]
    pub only: Vec<String>,
    /// Build only; do not boot a guest.
    #[arg(long)]
    pub no_live: bool,
    /// Do not build; only apply what earlier runs built (and report).
    #[arg(long, conflicts_with = "no_live")]
    pub no_build: bool,
    /// Forget earlier results of this update and start again.
    #[arg(long)]
    pub fresh: bool,
    /// Print the summary as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the report as Markdown to this file (e.g. under docs/).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Most objects a unit may make the builder recompile: headers used by more objects
    /// are left out of combined units and not measured on their own. A later run with a
    /// larger value redoes what the smaller one limited.
    #[arg(long, default_value_t = 100)]
    pub max_objects: usize,
    /// Parallel compiles per build.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// tcg everywhere; kvm only on hosts with a working /dev/kvm.
    #[arg(long, value_parser = ["tcg", "kvm"], default_value = "tcg")]
    pub accel: String,
}

/// A line per step when stdout is not a terminal, a bar when it is.
struct Steps {
    bar: Option<ProgressBar>,
    stage: &'static str,
    total: usize,
    done: usize,
}

impl Steps {
    fn new(stage: &'static str, total: usize) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix:>6} [{bar:30}] {pos}/{len} {msg}")
                    .expect("template")
                    .progress_chars("=> "),
            );
            b.set_prefix(stage);
            b
        });
        Steps { bar, stage, total, done: 0 }
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

/// Scope and units of the update, from both source trees and the guest kernel.
fn scan(g: &Guest, cache: &Path, args: &CorpusArgs, kernel: &str) -> Result<State> {
    println!("sources: {} and {}", args.from, args.to);
    let a = source::ensure(cache, &args.from)?;
    let b = source::ensure(cache, &args.to)?;
    let changed = source::changed_files(&a, &b)?;
    let objects = lucos_build::diff::kernel_objects(&g.kernel_dir)
        .context("listing the objects of the guest kernel")?;
    let tree = g.kernel_dir.join("build");
    let mut modules = BTreeMap::new();
    for ko in scope::loadable_modules(&g.kernel_dir.join("modules.cpio.gz"))? {
        let name = ko.rsplit('/').next().unwrap_or(&ko).trim_end_matches(".ko").to_owned();
        for f in scope::module_sources(&tree, &ko)? {
            modules.insert(f, name.clone());
        }
    }
    let scope = scope::classify(&changed, &objects, &modules);
    let units = units::units(&scope, &objects, &a);
    println!(
        "scope: {} changed files, {} changed C files, {} in this kernel; {} relevant headers; {} units",
        scope.all,
        scope.c_files,
        scope.c_in_kernel(),
        scope.headers.len(),
        units.len()
    );
    Ok(State::new(&args.from, &args.to, kernel, scope, units))
}

fn short(b: &Built, n: usize) -> String {
    match b {
        Built::Bundle { replaced, .. } => format!("built ({} replaced, {n} functions)", replaced.len()),
        Built::NoChange { reason } => format!("no change: {reason}"),
        Built::Refused { refusals } => format!("refused: {}", refusals.first().map_or("", |r| r.0.as_str())),
        Built::ToolError { kind, .. } => format!("tool error: {kind}"),
        Built::Unsupported { cause } => format!("not supported: {cause}"),
        Built::NotMeasured { reason } => format!("not measured: {reason}"),
    }
}

fn build_stage(args: &CorpusArgs, g: &Guest, cache: &Path, dir: &Path, st: &mut State, path: &Path) -> Result<()> {
    let (a, b) = (source::ensure(cache, &args.from)?, source::ensure(cache, &args.to)?);
    // Not built yet, or limited by a smaller budget than this run's.
    let redo = |u: &Unit| match st.results.get(&u.id).and_then(|r| r.build.as_ref()) {
        None => true,
        Some(b) => b.budget_limited() && b.budget < args.max_objects,
    };
    let todo: Vec<Unit> = st
        .units
        .iter()
        .filter(|u| selected(args, u) && redo(u))
        .cloned()
        .collect();
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
    };
    let mut steps = Steps::new("build", todo.len());
    for u in &todo {
        let r = outcome::build(&paths, u, &budget, args.jobs)?;
        steps.step(&u.id, &format!("{} in {:.1} s", short(&r.built, r.functions.changed.len()), r.seconds));
        let rec = st.record(&u.id);
        rec.build = Some(r);
        // A rebuilt bundle has not been tried live yet.
        rec.live = None;
        st.save(path)?;
    }
    Ok(())
}

fn live_stage(args: &CorpusArgs, g: &Guest, st: &mut State, path: &Path) -> Result<()> {
    let todo: Vec<(Unit, PathBuf)> = st
        .units
        .iter()
        .filter(|u| selected(args, u))
        .filter_map(|u| {
            let r = st.results.get(&u.id)?;
            match (&r.build.as_ref()?.built, &r.live) {
                (Built::Bundle { bundle, .. }, None) => Some((u.clone(), bundle.clone())),
                _ => None,
            }
        })
        .collect();
    let opts = VmOpts {
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
    };
    let mut steps = Steps::new("live", todo.len());
    let mut guest: Option<LiveGuest> = None;
    for (u, bundle) in &todo {
        // The whole update goes on a guest of its own, as a user would install it.
        if u.kind == UnitKind::Whole {
            guest = None;
        }
        let lg = match guest.as_mut() {
            Some(lg) => lg,
            None => guest.insert(LiveGuest::boot(&opts, g)?),
        };
        let mut live = lg.exercise(bundle);
        if live.apply_error.is_some() {
            // Out of patch memory or registry space on a long-used guest: once more, fresh.
            guest = None;
            live = guest.insert(LiveGuest::boot(&opts, g)?).exercise(bundle);
        }
        if live.broke_guest() {
            guest = None;
        }
        let what = if live.passed() { "passed".to_string() } else { format!("FAILED {}", serde_json::to_string(&live)?) };
        steps.step(&u.id, &what);
        st.record(&u.id).live = Some(live);
        st.save(path)?;
    }
    Ok(())
}

pub fn corpus(args: CorpusArgs) -> Result<()> {
    let g = GuestSel {
        flavour: Flavour::Debian,
        kernel_version: args.from.clone(),
    }
    .ensure()
    .context("the guest kernel of --from")?;
    let cache = lucos_build::cache_dir().context("set HOME or LUCOS_CACHE for lucos's cache")?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| cache.join("corpus").join(format!("{}_{}", args.from, args.to)));
    for d in ["diffs", "bundles"] {
        std::fs::create_dir_all(dir.join(d)).with_context(|| format!("creating {}", dir.display()))?;
    }
    let info = g.kernel_info()?;
    let kernel = format!("{} (build id {})", g.meta["release"].as_str().unwrap_or("?"), info.build_id);
    let path = dir.join("state.json");
    let resumed = if args.fresh { None } else { State::load(&path, &args.from, &args.to, &kernel) };
    let mut st = match resumed {
        Some(s) => {
            println!("resuming {} ({} of {} units built)", path.display(), s.results.len(), s.units.len());
            s
        }
        None => scan(&g, &cache, &args, &kernel)?,
    };
    st.save(&path)?;
    if !args.no_build {
        build_stage(&args, &g, &cache, &dir, &mut st, &path)?;
    }
    if !args.no_live {
        live_stage(&args, &g, &mut st, &path)?;
    }
    let sum = report::summarize(&st);
    let md = report::markdown(&sum);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&sum)?);
    } else {
        println!("\n{md}");
    }
    if let Some(p) = &args.markdown {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("state: {}", path.display());
    Ok(())
}
