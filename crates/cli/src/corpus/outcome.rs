//! Building one unit: its diff, the bundle, and what became of it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use lucos_diffobj::diff::{self, BuildOptions, BuildOutcome, BuildReport, DiffError};
use serde::{Deserialize, Serialize};

use super::retries::{self, Takeable};
use super::units::{Unit, UnitKind};
use super::{needs, source};

/// What building a unit gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Built {
    /// A bundle, at `bundle`.
    Bundle {
        bundle: PathBuf,
        replaced: Vec<String>,
    },
    /// Nothing to apply.
    NoChange { reason: String },
    /// The builder refused: (cause, message) per refusal.
    Refused { refusals: Vec<(String, String)> },
    /// The unit could not be built at all (it does not compile alone, the diff does not
    /// apply, a tool failed): kind and message.
    ToolError { kind: String, message: String },
    /// A change lucos cannot build yet for a reason outside the builder's refusals.
    Unsupported { cause: String },
    /// Not built: the unit would recompile more objects than the run's budget.
    NotMeasured { reason: String },
}

/// The functions a unit changes, as `source:function`, and whether they were read off
/// compiled objects or estimated from the diff's hunk headers (when nothing compiled).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Functions {
    pub changed: Vec<String>,
    /// Changed `__init` code and data: ran at boot, not applied.
    pub not_applicable: Vec<String>,
    pub estimated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildResult {
    pub built: Built,
    pub functions: Functions,
    /// The candidate headers were added because the source did not compile alone.
    #[serde(default)]
    pub with_headers: bool,
    /// The files the unit took beyond its own to compile: candidate headers, or what its
    /// errors asked for (other units' headers; for a header unit, its users' sources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Changed headers left out of the unit for the budget.
    #[serde(default)]
    pub left_out: Vec<String>,
    /// Headers over the budget that the whole update recompiled only where its other
    /// changes touch too (`BuildOptions::narrow_headers`), not in all their users.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub narrow: Vec<String>,
    /// The `--max-objects` of the build, so that a run with a larger one redoes it.
    #[serde(default)]
    pub budget: usize,
    pub seconds: f64,
    /// The names the compiler complained about, read off its whole output (the stored
    /// message is cut short): what the header retry works from. Not stored.
    #[serde(skip)]
    pub complained: BTreeSet<String>,
    /// The files the compiler reported errors in, likewise. Not stored.
    #[serde(skip)]
    pub error_files: BTreeSet<String>,
}

impl BuildResult {
    /// A result of one build: nothing taken or left out yet.
    pub fn new(built: Built, functions: Functions) -> BuildResult {
        BuildResult {
            built,
            functions,
            with_headers: false,
            headers: Vec::new(),
            left_out: Vec::new(),
            narrow: Vec::new(),
            budget: 0,
            seconds: 0.0,
            complained: BTreeSet::new(),
            error_files: BTreeSet::new(),
        }
    }

    /// A larger budget could change this result.
    pub fn budget_limited(&self) -> bool {
        matches!(self.built, Built::NotMeasured { .. })
            || !self.left_out.is_empty()
            || !self.narrow.is_empty()
    }
}

/// How many objects one unit may make the builder recompile. A header used by more
/// objects is left out of combined units (a source's retry, the whole update) and its own
/// unit is reported as not measured, instead of every unit that touches it recompiling
/// half the kernel.
pub struct Budget<'a> {
    pub max_objects: usize,
    /// Header -> objects of this kernel compiled with it.
    pub users: &'a BTreeMap<String, usize>,
}

impl Budget<'_> {
    fn fits(&self, file: &str) -> bool {
        self.users.get(file).is_none_or(|&n| n <= self.max_objects)
    }

    /// `unit` without the headers over the budget, and those headers.
    fn trim(&self, unit: &Unit) -> (Unit, Vec<String>) {
        let (files, left_out) = unit.files.iter().cloned().partition(|f| self.fits(f));
        (
            Unit {
                files,
                ..unit.clone()
            },
            left_out,
        )
    }
}

fn functions_of(report: &BuildReport) -> Functions {
    let mut f = Functions::default();
    for o in &report.objects {
        let key = |n: &String| format!("{}:{n}", o.source);
        f.changed
            .extend(o.changed.iter().chain(&o.new_functions).map(key));
        f.not_applicable.extend(o.not_applicable.iter().map(key));
    }
    f.changed.sort();
    f.changed.dedup();
    f
}

/// Function names in the hunk headers of a C diff (`@@ -1,2 +1,3 @@ int foo(void)`): an
/// estimate of what a unit changes when it cannot be compiled.
pub fn hunk_functions(diff_text: &str) -> Functions {
    let mut file = "";
    let mut changed = Vec::new();
    for line in diff_text.lines() {
        if let Some(p) = line.strip_prefix("+++ b/") {
            file = p;
        } else if let Some(rest) = line.strip_prefix("@@ ") {
            let ctx = rest.split_once(" @@").map_or("", |(_, c)| c).trim();
            let Some((head, _)) = ctx.split_once('(') else {
                continue;
            };
            let name = head
                .rsplit(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next();
            if let Some(n) = name.filter(|n| !n.is_empty() && file.ends_with(".c")) {
                changed.push(format!("{file}:{n}"));
            }
        }
    }
    changed.sort();
    changed.dedup();
    Functions {
        changed,
        not_applicable: Vec::new(),
        estimated: true,
    }
}

/// The unit's diff: the file diffs of its files between the trees, concatenated.
pub fn unit_diff(a: &Path, b: &Path, unit: &Unit) -> Result<String> {
    let mut text = String::new();
    for f in &unit.files {
        text.push_str(&source::file_diff(a, b, f)?);
    }
    Ok(text)
}

/// `e` as a tool error; `message` is its text, cut short for the state.
fn tool_error(e: &DiffError, mut message: String) -> Built {
    let kind = match e {
        DiffError::Compile {
            which: "patched", ..
        } => "does not compile alone",
        DiffError::Compile { .. } => "original does not compile",
        DiffError::PatchApply { .. } => "diff does not apply",
        DiffError::EmptyDiff { .. } => "empty diff",
        _ => "tool error",
    };
    if message.len() > 2000 {
        let mut cut = 2000;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" …");
    }
    Built::ToolError {
        kind: kind.into(),
        message,
    }
}

/// Where a unit's files come from and where its results go.
pub struct Paths<'a> {
    pub from: &'a Path,
    pub to: &'a Path,
    pub kernel_dir: &'a Path,
    pub diffs: &'a Path,
    pub bundles: &'a Path,
    /// The update's changed vmlinux sources: where a symbol a unit misses may come from.
    pub sources: &'a [String],
    /// Every unit: a partner source comes with the changed headers its own unit has.
    pub units: &'a [Unit],
}

/// Builds `unit`: alone first, then with what its compile errors ask for if it does not
/// compile alone (`retries`); headers over the budget are left out (and said so), except
/// from the whole update, which keeps them narrow: recompiled only where its other changes
/// touch too, which costs no objects beyond the budget's.
pub fn build(p: &Paths<'_>, unit: &Unit, budget: &Budget<'_>, jobs: usize) -> Result<BuildResult> {
    let started = Instant::now();
    let diff_path = p.diffs.join(format!("{}.patch", unit.id));
    let (trimmed, left_out) = budget.trim(unit);
    let (trimmed, left_out, narrow) = match unit.kind {
        UnitKind::Whole => (unit.clone(), Vec::new(), left_out),
        _ => (trimmed, left_out, Vec::new()),
    };
    let text = unit_diff(p.from, p.to, &trimmed)?;
    std::fs::write(&diff_path, &text)
        .with_context(|| format!("writing {}", diff_path.display()))?;
    let early = match unit.kind {
        UnitKind::Module => Some(Built::Unsupported {
            cause: "module code (lucos build builds vmlinux code from diffs)".into(),
        }),
        _ if trimmed.files.is_empty() => Some(Built::NotMeasured {
            reason: format!(
                "{} is used by more than {} objects",
                left_out.join(", "),
                budget.max_objects
            ),
        }),
        _ => None,
    };
    let (mut r, mut missing) = match early {
        Some(built) => (BuildResult::new(built, hunk_functions(&text)), Vec::new()),
        None => Once {
            kernel_dir: p.kernel_dir,
            bundle_dir: p.bundles,
            jobs,
            only: None,
            narrow: narrow.clone(),
        }
        .build(&trimmed, &diff_path, &text)?,
    };
    r.left_out = left_out;
    r.narrow = narrow;
    let alone_failed =
        matches!(&r.built, Built::ToolError { kind, .. } if kind == "does not compile alone");
    let mut with_headers = None;
    if alone_failed && !unit.candidates.is_empty() {
        let pool = Takeable::headers(p, &unit.candidates)?;
        let build = |with: &Unit, _: &[String]| once_with(p, with, &diff_path, jobs);
        let needed = retries::with_needed(unit, (&trimmed, &r), &pool, &build)?;
        let (again, still, with) = match needed {
            Some(found) => found,
            None => {
                // Every header it may need, however widely used: only the unit's own
                // objects are recompiled with them (a header's other users are the
                // header's own unit), so the budget does not apply.
                let mut with = trimmed.clone();
                with.files.extend(unit.candidates.iter().cloned());
                let (again, still) = once_with(p, &with, &diff_path, jobs)?;
                (again, still, with)
            }
        };
        (r, missing) = (again, still);
        r.with_headers = true;
        r.headers = with.files[trimmed.files.len()..].to_vec();
        r.left_out = Vec::new();
        with_headers = Some(with);
    } else if alone_failed && unit.kind == UnitKind::Header {
        // The other changed headers (counted only where the unit's own changes touch)
        // and the changed sources of its users.
        let others: Vec<String> = (budget.users.keys())
            .filter(|h| !trimmed.files.contains(h))
            .cloned()
            .collect();
        let pool = Takeable {
            sources: p.sources.to_vec(),
            ..Takeable::headers(p, &others)?
        };
        let build = retries::narrow_retry(p, &diff_path, jobs);
        match retries::with_needed(unit, (&trimmed, &r), &pool, &build)? {
            Some((again, still, with)) => {
                (r, missing) = (again, still);
                r.headers = with.files[trimmed.files.len()..].to_vec();
                with_headers = Some(with);
            }
            None => std::fs::write(&diff_path, &text)?,
        }
    }
    let current = with_headers.unwrap_or(trimmed);
    r = super::partners::with_partners(p, unit, (current, &missing), &diff_path, (r, jobs))?;
    r.budget = budget.max_objects;
    r.seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

/// Builds `with` recompiling only its own sources' objects.
pub(super) fn once_with(
    p: &Paths<'_>,
    with: &Unit,
    diff_path: &Path,
    jobs: usize,
) -> Result<(BuildResult, Vec<String>)> {
    let only = Some(own_sources(with));
    write_and_build(p, with, diff_path, jobs, (only, Vec::new()))
}

/// Writes `with`'s diff to `diff_path` and builds it, recompiling `only` those sources'
/// objects (all it touches if `None`), with the `narrow` headers
/// (`BuildOptions::narrow_headers`).
pub(super) fn write_and_build(
    p: &Paths<'_>,
    with: &Unit,
    diff_path: &Path,
    jobs: usize,
    (only, narrow): (Option<Vec<String>>, Vec<String>),
) -> Result<(BuildResult, Vec<String>)> {
    let text = unit_diff(p.from, p.to, with)?;
    std::fs::write(diff_path, &text)?;
    Once {
        kernel_dir: p.kernel_dir,
        bundle_dir: p.bundles,
        jobs,
        only,
        narrow,
    }
    .build(with, diff_path, &text)
}

/// The manifest description of a unit: its files, or with many headers (a retry takes
/// every header it needs) a count of them, within the manifest's 1024 bytes.
fn describe_unit(unit: &Unit) -> String {
    let all = format!("corpus unit {}: {}", unit.id, unit.files.join(" "));
    if all.len() <= 512 {
        return all;
    }
    format!(
        "corpus unit {}: {} and {} more changed files",
        unit.id,
        unit.files[0],
        unit.files.len() - 1
    )
}

fn own_sources(unit: &Unit) -> Vec<String> {
    unit.files
        .iter()
        .filter(|f| f.ends_with(".c"))
        .cloned()
        .collect()
}

/// One build of a unit's diff.
struct Once<'a> {
    kernel_dir: &'a Path,
    bundle_dir: &'a Path,
    jobs: usize,
    /// Sources whose objects alone are recompiled (see `BuildOptions::only_sources`).
    only: Option<Vec<String>>,
    /// See `BuildOptions::narrow_headers`.
    narrow: Vec<String>,
}

impl Once<'_> {
    fn build(
        self,
        unit: &Unit,
        diff_path: &Path,
        text: &str,
    ) -> Result<(BuildResult, Vec<String>)> {
        let (kernel_dir, bundle_dir) = (self.kernel_dir, self.bundle_dir);
        let options = BuildOptions {
            id: Some(unit.id.clone()),
            description: Some(describe_unit(unit)),
            jobs: self.jobs,
            only_sources: self.only,
            narrow_headers: self.narrow,
            ..BuildOptions::default()
        };
        let result = diff::build(kernel_dir, diff_path, &options, &diff::NoProgress);
        let mut missing = Vec::new();
        let (mut complained, mut error_files) = (BTreeSet::new(), BTreeSet::new());
        let (built, functions) = match result {
            Ok(BuildOutcome::Bundle(b)) => {
                let path = bundle_dir.join(format!("{}.lcb", unit.id));
                std::fs::write(&path, crate::signing::sign(&b.bundle)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                let f = functions_of(&b.report);
                (
                    Built::Bundle {
                        bundle: path,
                        replaced: b.replaced.clone(),
                    },
                    f,
                )
            }
            Ok(BuildOutcome::NoChange { report, reason }) => {
                (Built::NoChange { reason }, functions_of(&report))
            }
            Err(DiffError::Refused { refusals, report }) => {
                missing = refusals
                    .iter()
                    .filter_map(|r| match r {
                        lucos_diffobj::diff::Refusal::Absent { symbol, .. } => Some(symbol.clone()),
                        _ => None,
                    })
                    .collect();
                let mut f = functions_of(&report);
                if report.objects.is_empty() {
                    f = hunk_functions(text);
                }
                (
                    Built::Refused {
                        refusals: refusals
                            .iter()
                            .map(|r| (r.cause(), r.to_string()))
                            .collect(),
                    },
                    f,
                )
            }
            Err(e) => {
                let message = e.to_string();
                complained = needs::quoted_names(&message);
                error_files = needs::error_files(&message);
                (tool_error(&e, message), hunk_functions(text))
            }
        };
        let r = BuildResult {
            complained,
            error_files,
            ..BuildResult::new(built, functions)
        };
        Ok((r, missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_with_many_headers_has_a_short_description() {
        let files: Vec<String> = std::iter::once("net/ipv4/tcp.c".to_string())
            .chain((0..60).map(|i| format!("include/net/header_number_{i}.h")))
            .collect();
        let u = Unit {
            id: "u001-net-ipv4-tcp.c".into(),
            kind: super::super::units::UnitKind::Source,
            main: files[0].clone(),
            files,
            candidates: Vec::new(),
        };
        let d = describe_unit(&u);
        assert_eq!(
            d,
            "corpus unit u001-net-ipv4-tcp.c: net/ipv4/tcp.c and 60 more changed files"
        );
        let mut small = u.clone();
        small.files.truncate(2);
        assert!(describe_unit(&small).ends_with("tcp.c include/net/header_number_0.h"));
    }

    #[test]
    fn hunk_headers_estimate_changed_functions() {
        let d = "--- a/fs/pipe.c\n+++ b/fs/pipe.c\n@@ -10,3 +10,4 @@ static ssize_t pipe_read(struct kiocb *iocb)\n \
                 x\n@@ -40,2 +41,2 @@ struct pipe_buf_operations ops = {\n y\n\
                 --- a/include/linux/fs.h\n+++ b/include/linux/fs.h\n@@ -1 +1 @@ static inline int f(void)\n";
        let f = hunk_functions(d);
        assert_eq!(f.changed, ["fs/pipe.c:pipe_read"]);
        assert!(f.estimated);
    }
}
