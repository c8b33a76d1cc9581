//! `lucos corpus`: a whole Debian kernel update, unit by unit, built, applied live to the
//! guest, smoke-tested and reverted, with the coverage it reaches.
//!
//! The pipeline: sources (fetch both versions) → scope (what this kernel contains) →
//! units (a changed file with the headers it needs) → build, and beside it live (apply,
//! smoke, revert) → report. Every step's result goes into a state file at once, so a run can be stopped
//! and resumed, and the report can be printed from it at any time.

mod live;
mod needs;
mod outcome;
mod partners;
mod pipeline;
mod report;
mod retries;
mod scope;
mod source;
mod state;
mod units;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use crate::guest::{Flavour, Guest, GuestSel};
use state::State;

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
    /// Build again the units whose outcome mentions one of these strings (e.g. a refusal
    /// cause that a newer lucos removed).
    #[arg(long)]
    pub redo: Vec<String>,
    /// Apply again the bundles whose live run failed (e.g. after a smoke-suite fix).
    #[arg(long)]
    pub redo_live: bool,
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

/// Scope and units of the update, from both source trees and the guest kernel.
/// The units a newer lucos makes of the same scope. A unit whose definition changed keeps
/// its result unless that result could change: a unit that did not compile (its extra
/// headers matter), or the whole update.
fn refresh_units(g: &Guest, cache: &Path, args: &CorpusArgs, mut st: State) -> Result<State> {
    let a = source::ensure(cache, &args.from)?;
    let objects = lucos_diffobj::diff::kernel_objects(&g.kernel_dir)
        .context("listing the objects of the guest kernel")?;
    let fresh = units::units(&st.scope, &objects, &a);
    if fresh
        .iter()
        .map(|u| &u.id)
        .ne(st.units.iter().map(|u| &u.id))
    {
        anyhow::bail!("the saved units do not match this lucos's; run again with --fresh");
    }
    // Reasons are worded by this lucos too.
    let out = std::mem::take(&mut st.scope.out);
    for f in out.into_values().flatten() {
        let reason = scope::out_reason(&f).to_owned();
        st.scope.out.entry(reason).or_default().push(f);
    }
    let mut redone = 0;
    for (old, new) in st.units.iter_mut().zip(fresh) {
        if *old == new {
            continue;
        }
        let stale = st
            .results
            .get(&new.id)
            .and_then(|r| r.build.as_ref())
            .is_some_and(|b| {
                matches!(b.built, outcome::Built::ToolError { .. })
                    || new.kind == units::UnitKind::Whole
            });
        if stale {
            st.results.remove(&new.id);
            redone += 1;
        }
        *old = new;
    }
    if redone > 0 {
        println!("{redone} units changed their files since: built again");
    }
    Ok(st)
}

fn scan(g: &Guest, cache: &Path, args: &CorpusArgs, kernel: &str) -> Result<State> {
    println!("sources: {} and {}", args.from, args.to);
    let a = source::ensure(cache, &args.from)?;
    let b = source::ensure(cache, &args.to)?;
    let changed = source::changed_files(&a, &b)?;
    let objects = lucos_diffobj::diff::kernel_objects(&g.kernel_dir)
        .context("listing the objects of the guest kernel")?;
    let tree = g.kernel_dir.join("build");
    let mut modules = BTreeMap::new();
    for ko in scope::loadable_modules(&g.kernel_dir.join("modules.cpio.gz"))? {
        let name = ko
            .rsplit('/')
            .next()
            .unwrap_or(&ko)
            .trim_end_matches(".ko")
            .to_owned();
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

pub fn corpus(args: CorpusArgs) -> Result<()> {
    let g = GuestSel {
        flavour: Flavour::Debian,
        kernel_version: args.from.clone(),
    }
    .ensure()
    .context("the guest kernel of --from")?;
    let cache = lucos_diffobj::cache_dir().context("set HOME or LUCOS_CACHE for lucos's cache")?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        cache
            .join("corpus")
            .join(format!("{}_{}", args.from, args.to))
    });
    for d in ["diffs", "bundles"] {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let info = g.kernel_info()?;
    let kernel = format!(
        "{} (build id {})",
        g.meta["release"].as_str().unwrap_or("?"),
        info.build_id
    );
    let path = dir.join("state.json");
    let resumed = if args.fresh {
        None
    } else {
        State::load(&path, &args.from, &args.to, &kernel)
    };
    let mut st = match resumed {
        Some(s) => {
            println!(
                "resuming {} ({} of {} units built)",
                path.display(),
                s.results.len(),
                s.units.len()
            );
            refresh_units(&g, &cache, &args, s)?
        }
        None => scan(&g, &cache, &args, &kernel)?,
    };
    st.save(&path)?;
    pipeline::run(&args, &g, &cache, &dir, &mut st, &path)?;
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
