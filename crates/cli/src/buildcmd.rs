//! `lucos build`: a kernel source diff to a bundle, with progress bars.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lucos_diffobj::diff::{self, BuildOptions, BuildOutcome, Progress, Stage, Times};

use crate::guest;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The unified diff (`git diff` / `diff -u` against the guest's kernel source).
    pub diff: PathBuf,
    /// Output bundle.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Cached guest kernel directory (default: the selected guest's).
    #[arg(long)]
    pub tree: Option<PathBuf>,
    #[command(flatten)]
    pub guest: guest::GuestSel,
    /// Bundle id (default: the diff's file name).
    #[arg(long)]
    pub id: Option<String>,
    /// Do not use or fill the cache of original comparison objects.
    #[arg(long)]
    pub no_cache: bool,
}

/// Draws one bar per pipeline stage.
#[derive(Default)]
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, stage: Stage, steps: u64) {
        let pb = if steps == 0 {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::new(steps)
        };
        pb.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        pb.set_prefix(stage.name());
        if let Some(old) = self.bar.lock().unwrap().replace(pb) {
            old.finish_and_clear();
        }
    }

    fn step(&self, _stage: Stage, what: &str) {
        if let Some(pb) = &*self.bar.lock().unwrap() {
            pb.inc(1);
            pb.set_message(what.to_owned());
        }
    }

    fn finish(&self, _stage: Stage, _took: Duration) {
        if let Some(pb) = self.bar.lock().unwrap().take() {
            pb.finish_and_clear();
        }
    }
}

fn tree(args: &BuildArgs) -> Result<PathBuf> {
    Ok(match &args.tree {
        Some(t) => t.clone(),
        None => args.guest.ensure()?.kernel_dir,
    })
}

fn print_times(t: &Times) {
    println!(
        "time: rebuild {:.2} s, compare {:.2} s, emit {:.2} s, total {:.2} s",
        t.rebuild.as_secs_f64(),
        t.compare.as_secs_f64(),
        t.emit.as_secs_f64(),
        t.total.as_secs_f64()
    );
}

pub fn build(args: BuildArgs) -> Result<()> {
    let tree = tree(&args)?;
    let options = BuildOptions {
        id: args.id.clone(),
        use_cache: !args.no_cache,
        ..BuildOptions::default()
    };
    let outcome = diff::build(&tree, &args.diff, &options, &Bars::default())
        .with_context(|| format!("building a bundle from {}", args.diff.display()))?;
    for o in &outcome.report().objects {
        if !o.not_applicable.is_empty() {
            println!(
                "{}: not applicable (__init, ran at boot): {}; check that the new code does \
                 not depend on what they would now set up",
                o.object,
                crate::show::esc(&o.not_applicable.join(", "))
            );
        }
    }
    match &outcome {
        BuildOutcome::NoChange { reason, .. } => {
            println!("no function changed: {reason}");
        }
        BuildOutcome::Bundle(b) => {
            for o in &b.report.objects {
                println!(
                    "{}: changed {:?}, new functions {:?}, new data {:?}, line-number-only {:?}",
                    o.object, o.changed, o.new_functions, o.new_data, o.line_only
                );
                if !o.debug_sites_off.is_empty() {
                    println!(
                        "{}: {} new dynamic-debug call site(s) stay off: lucos does not \
                         register them with dynamic debug ({})",
                        o.object,
                        o.debug_sites_off.len(),
                        o.debug_sites_off.join(", ")
                    );
                }
            }
            println!("replaces: {}", crate::show::esc(&b.replaced.join(", ")));
            for e in &b.manifest.exports {
                println!(
                    "exports {}{} (the bundle's module; for modules loaded later)",
                    crate::show::esc(&e.name),
                    if e.gpl { " (GPL only)" } else { "" }
                );
            }
            if !b.report.kept_members.is_empty() {
                println!(
                    "kept {}, which the diff removes, unused: the running kernel's objects keep \
                     the old layout and the new code reads them at the old offsets",
                    crate::show::esc(&b.report.kept_members.join(", "))
                );
            }
            for r in &b.manifest.rewrites {
                let what = match r.fields.len() {
                    0 => "whole (read-only)".to_string(),
                    n => format!(
                        "{n} field(s), {} byte(s), whose initial value changes (writable: \
                         the rest is live state)",
                        r.fields.iter().map(|f| f.len).sum::<u32>()
                    ),
                };
                println!(
                    "rewrites {} in place in the switch: {what}",
                    crate::show::esc(&r.label())
                );
            }
            if !b.report.padded_types.is_empty() {
                println!(
                    "adds members in padding of {}: every object of it is static and zero there \
                     ({} ranges checked live before the switch)",
                    crate::show::esc(&b.report.padded_types.join(", ")),
                    b.manifest.zeroed.len()
                );
            }
            if !b.manifest.prototypes.is_empty() {
                println!(
                    "changes the prototype of {}, whose every caller it replaces: apply and \
                     revert switch consistently (every stack checked)",
                    crate::show::esc(&b.manifest.prototypes.join(", "))
                );
            }
            if !b.manifest.frame_types.is_empty() {
                println!(
                    "changes the layout of {}, which only frames of the replaced functions \
                     hold: apply and revert switch consistently (every stack checked)",
                    crate::show::esc(&b.manifest.frame_types.join(", "))
                );
            }
            let out = args
                .output
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.lcb", b.manifest.id)));
            std::fs::write(&out, crate::signing::sign(&b.bundle)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} (bundle id '{}')",
                out.display(),
                crate::show::esc(&b.manifest.id)
            );
        }
    }
    print_times(&outcome.report().times);
    Ok(())
}

#[derive(Debug, Args)]
pub struct BuildBenchArgs {
    /// The diff to build (default: guest/patches/01-cmdline-prefix.patch).
    pub diff: Option<PathBuf>,
    #[arg(long)]
    pub tree: Option<PathBuf>,
    #[command(flatten)]
    pub guest: guest::GuestSel,
    /// Warm runs after the cold one.
    #[arg(long, short = 'n', default_value_t = 3)]
    pub runs: usize,
}

/// Cold (empty comparison-object cache) vs warm builds of one diff.
pub fn bench(args: BuildBenchArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let diff = args
        .diff
        .clone()
        .unwrap_or_else(|| guest::guest_dir().join("patches/01-cmdline-prefix.patch"));
    let tree = match &args.tree {
        Some(t) => t.clone(),
        None => args.guest.ensure()?.kernel_dir,
    };
    let cache = tempfile::tempdir()?;
    let options = BuildOptions {
        cache_dir: Some(cache.path().to_owned()),
        ..BuildOptions::default()
    };
    let mut totals = Vec::new();
    for run in 0..=args.runs {
        let outcome = diff::build(&tree, &diff, &options, &diff::NoProgress)?;
        let t = outcome.report().times;
        print!("{} ", if run == 0 { "cold" } else { "warm" });
        print_times(&t);
        totals.push(t.total);
    }
    let cold = totals[0].as_secs_f64();
    let mut warm: Vec<f64> = totals[1..].iter().map(Duration::as_secs_f64).collect();
    warm.sort_by(f64::total_cmp);
    let median = warm[warm.len() / 2];
    println!(
        "{}: cold {cold:.2} s, warm median {median:.2} s ({:.2}x of cold)",
        diff.display(),
        median / cold
    );
    Ok(())
}
