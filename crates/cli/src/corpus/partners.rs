//! Partners: the other changed sources that define what a unit's fix calls.
//!
//! One upstream fix is often spread over files: a new helper in one, its first caller in
//! another. Built alone, the caller is refused for a symbol the running kernel lacks; built
//! with the file that adds it, it is one fix again.

use std::path::Path;

use anyhow::Result;

use super::outcome::{once_with, unit_diff, BuildResult, Built, Paths};
use super::retries::{self, Takeable};
use super::units::{Unit, UnitKind};
use super::{needs, source};

/// Changed sources other than `unit`'s whose diff adds a line naming one of `missing`
/// followed by `(`: the files that likely define what the unit's fix calls (one upstream
/// fix spread over files). A wrong guess only compiles more; the build still decides.
fn partners(p: &Paths<'_>, unit: &Unit, missing: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in p.sources.iter().filter(|f| !unit.files.contains(f)) {
        let d = source::file_diff(p.from, p.to, f)?;
        let adds = d
            .lines()
            .filter(|l| l.starts_with('+') && !l.starts_with("+++"));
        let defines = |l: &str| {
            missing
                .iter()
                .any(|m| needs::word_at(l, m).any(|rest| rest.starts_with('(')))
        };
        if adds.into_iter().any(defines) {
            out.push(f.clone());
        }
    }
    Ok(out)
}

/// A unit refused for symbols the running kernel lacks is built again with the changed
/// sources that add them (recompiling only the unit's objects); the retry's result is
/// kept when it gets further: it builds, or is refused without missing anything.
pub(super) fn with_partners(
    p: &Paths<'_>,
    unit: &Unit,
    (current, missing): (Unit, &[String]),
    diff_path: &Path,
    (r, jobs): (BuildResult, usize),
) -> Result<BuildResult> {
    if !matches!(r.built, Built::Refused { .. }) || missing.is_empty() {
        return Ok(r);
    }
    let extra = partners(p, unit, missing)?;
    if extra.is_empty() {
        return Ok(r);
    }
    tracing::info!(unit = %unit.id, ?missing, ?extra, "retrying with the files that add them");
    let previous = unit_diff(p.from, p.to, &current)?;
    let (mut again, still) = partnered(p, &current, &extra, diff_path, jobs)?;
    let further = match again.built {
        Built::Bundle { .. } => true,
        Built::Refused { .. } => still.is_empty(),
        _ => false,
    };
    if further {
        again.with_headers = r.with_headers;
        again.headers = r.headers;
        again.left_out = r.left_out;
        return Ok(again);
    }
    tracing::info!(unit = %unit.id, outcome = ?again.built, "the retry got no further");
    std::fs::write(diff_path, previous)?;
    Ok(r)
}

/// `current` built with the partner sources `extra`, and with the changed headers of the
/// partners' own units only as far as its compile errors ask for them: a partner built
/// against the unit's new headers may need its own too (kernel/rcu/tree.c, against the
/// new rcutree.h, needs the new tree_nocb.h it includes), but taking all of them would
/// bring unrelated changes along (tcp.h's partners would bring bpf.h and its struct
/// layout change). When the errors name nothing, every such header is taken.
fn partnered(
    p: &Paths<'_>,
    current: &Unit,
    extra: &[String],
    diff_path: &Path,
    jobs: usize,
) -> Result<(BuildResult, Vec<String>)> {
    let mut with = current.clone();
    with.files = with_files(&current.files, extra.iter());
    let (r, missing) = once_with(p, &with, diff_path, jobs)?;
    let alone_failed =
        matches!(&r.built, Built::ToolError { kind, .. } if kind == "does not compile alone");
    let theirs = partner_headers(p.units, &with.files, extra);
    if !alone_failed || theirs.is_empty() {
        return Ok((r, missing));
    }
    let pool = Takeable::headers(p, &theirs)?;
    let build = |w: &Unit, _: &[String]| once_with(p, w, diff_path, jobs);
    if let Some((again, still, _)) = retries::with_needed(current, (&with, &r), &pool, &build)? {
        return Ok((again, still));
    }
    with.files = with_files(&with.files, theirs.iter());
    once_with(p, &with, diff_path, jobs)
}

/// The changed headers of the partners' own units that `files` lacks.
fn partner_headers(units: &[Unit], files: &[String], extra: &[String]) -> Vec<String> {
    let theirs = units
        .iter()
        .filter(|u| u.kind == UnitKind::Source && extra.contains(&u.main))
        .flat_map(|u| u.candidates.iter());
    with_files(&[], theirs)
        .into_iter()
        .filter(|h| !files.contains(h))
        .collect()
}

/// `files` followed by those of `more` it lacks.
fn with_files<'a>(files: &[String], more: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out = files.to_vec();
    for f in more {
        if !out.contains(f) {
            out.push(f.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_files_that_add_a_missing_function_are_its_partners() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let write = |d: &Path, f: &str, t: &str| {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), t).unwrap();
        };
        write(a.path(), "kernel/x.c", "int old(void) { return 0; }\n");
        write(
            b.path(),
            "kernel/x.c",
            "int old(void) { return 0; }\nint helper(void) { return 1; }\n",
        );
        write(a.path(), "kernel/y.c", "int y(void) { return 0; }\n");
        write(
            b.path(),
            "kernel/y.c",
            "int y(void) { return my_helper(2); }\n",
        );
        write(a.path(), "kernel/u.c", "int u(void) { return 0; }\n");
        write(b.path(), "kernel/u.c", "int u(void) { return helper(); }\n");
        let sources: Vec<String> = ["kernel/u.c", "kernel/x.c", "kernel/y.c"]
            .map(String::from)
            .to_vec();
        let p = Paths {
            from: a.path(),
            to: b.path(),
            kernel_dir: a.path(),
            diffs: a.path(),
            bundles: a.path(),
            sources: &sources,
            units: &[],
        };
        let u = Unit {
            id: "u001-kernel-u.c".into(),
            kind: super::super::units::UnitKind::Source,
            main: "kernel/u.c".into(),
            files: vec!["kernel/u.c".into()],
            candidates: Vec::new(),
        };
        // y.c calls `my_helper(`, which is not `helper(`; u.c is the unit itself.
        assert_eq!(
            partners(&p, &u, &["helper".into()]).unwrap(),
            ["kernel/x.c"]
        );
        assert!(partners(&p, &u, &["absent".into()]).unwrap().is_empty());
    }

    #[test]
    fn a_partner_offers_the_headers_of_its_own_unit() {
        let unit = |main: &str, candidates: &[&str]| Unit {
            id: format!("u-{main}"),
            kind: super::super::units::UnitKind::Source,
            main: main.into(),
            files: vec![main.into()],
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
        };
        let units = [
            unit("kernel/stop_machine.c", &["include/linux/rcutree.h"]),
            unit(
                "kernel/rcu/tree.c",
                &["include/linux/rcutree.h", "kernel/rcu/tree_nocb.h"],
            ),
            unit("kernel/other.c", &["include/other.h"]),
        ];
        let files = [
            "kernel/stop_machine.c",
            "include/linux/rcutree.h",
            "kernel/rcu/tree.c",
        ]
        .map(String::from);
        let got = partner_headers(&units, &files, &["kernel/rcu/tree.c".into()]);
        assert_eq!(got, ["kernel/rcu/tree_nocb.h"]);
        assert!(partner_headers(&units, &files, &["kernel/none.c".into()]).is_empty());
    }
}
