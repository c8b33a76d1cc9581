//! Builds again of a unit that did not compile, with what its compile errors ask for.
//!
//! A stable update's fix often spans files the unit does not have: a source needs the new
//! declarations of a header (`needs`), and a header's change needs its users' own changes
//! (a prototype that changed in both `tcp.h` and `tcp_ipv4.c`) or another header's. Each
//! retry takes only the files the last compile error points at, round after round, so an
//! unrelated change in a file the unit happens to include does not decide its outcome.

use std::path::Path;

use anyhow::Result;

use super::needs;
use super::outcome::{write_and_build, BuildResult, Built, Paths};
use super::source;
use super::units::Unit;

/// Retries that each add what the last compile error names, at most this many.
const ROUNDS: usize = 8;

/// What a unit may take in a retry.
pub(super) struct Takeable {
    /// Changed headers with their diffs: taken when their diff changes a name the
    /// compiler complained about.
    pub headers: Vec<(String, String)>,
    /// Changed sources: taken when the compiler reports errors in them.
    pub sources: Vec<String>,
}

impl Takeable {
    /// `headers` with their diffs, and no sources.
    pub fn headers(p: &Paths<'_>, headers: &[String]) -> Result<Takeable> {
        let headers = headers
            .iter()
            .map(|h| Ok((h.clone(), source::file_diff(p.from, p.to, h)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Takeable {
            headers,
            sources: Vec::new(),
        })
    }

    /// What `failed` asks for that `with` lacks: (headers, sources).
    fn wanted(&self, failed: &BuildResult, with: &Unit) -> (Vec<String>, Vec<String>) {
        let headers = needs::wanted(&failed.complained, &self.headers, &with.files);
        let sources = self
            .sources
            .iter()
            .filter(|s| !with.files.contains(s) && failed.error_files.contains(*s));
        (
            headers.into_iter().map(String::from).collect(),
            sources.cloned().collect(),
        )
    }
}

/// How one retry builds `with`, which carries the headers `taken` so far.
pub(super) type Retry<'a> = dyn Fn(&Unit, &[String]) -> Result<(BuildResult, Vec<String>)> + 'a;

/// `trimmed` (which failed to compile as `failed`) built with what its compile errors ask
/// for from `pool`, by `build`; `None` when the errors stop asking for anything more.
pub(super) fn with_needed(
    unit: &Unit,
    (trimmed, failed): (&Unit, &BuildResult),
    pool: &Takeable,
    build: &Retry<'_>,
) -> Result<Option<(BuildResult, Vec<String>, Unit)>> {
    let mut with = trimmed.clone();
    let mut taken: Vec<String> = Vec::new();
    let mut last = failed.clone();
    for _ in 0..ROUNDS {
        let (headers, sources) = pool.wanted(&last, &with);
        if headers.is_empty() && sources.is_empty() {
            return Ok(None);
        }
        tracing::info!(unit = %unit.id, ?headers, ?sources, "retrying with what its errors name");
        taken.extend(headers.iter().cloned());
        with.files.extend(headers.into_iter().chain(sources));
        let (r, missing) = build(&with, &taken)?;
        match &r.built {
            Built::ToolError { kind, .. } if kind == "does not compile alone" => last = r,
            _ => return Ok(Some((r, missing, with))),
        }
    }
    Ok(None)
}

/// A retry that recompiles every object the unit's files touch, except that the headers
/// `taken` (other units' headers, perhaps too widely used to recompile everywhere) count
/// only where the unit's other files touch too (`BuildOptions::narrow_headers`).
pub(super) fn narrow_retry<'a>(
    p: &'a Paths<'a>,
    diff_path: &'a Path,
    jobs: usize,
) -> impl Fn(&Unit, &[String]) -> Result<(BuildResult, Vec<String>)> + 'a {
    move |with: &Unit, taken: &[String]| {
        write_and_build(p, with, diff_path, jobs, (None, taken.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::outcome::Functions;
    use crate::corpus::units::UnitKind;
    use std::cell::RefCell;

    fn result(built: Built, names: &[&str], files: &[&str]) -> BuildResult {
        BuildResult {
            complained: names.iter().map(|n| n.to_string()).collect(),
            error_files: files.iter().map(|f| f.to_string()).collect(),
            ..BuildResult::new(built, Functions::default())
        }
    }

    fn failed(names: &[&str], files: &[&str]) -> BuildResult {
        let built = Built::ToolError {
            kind: "does not compile alone".into(),
            message: String::new(),
        };
        result(built, names, files)
    }

    #[test]
    fn each_round_takes_what_the_last_errors_name_until_it_compiles() {
        let unit = Unit {
            id: "u1-include-net-tcp.h".into(),
            kind: UnitKind::Header,
            main: "include/net/tcp.h".into(),
            files: vec!["include/net/tcp.h".into()],
            candidates: Vec::new(),
        };
        let pool = Takeable {
            headers: vec![
                (
                    "include/net/dst.h".into(),
                    "+int skb_dst_dev_net(void);\n".into(),
                ),
                (
                    "include/net/other.h".into(),
                    "+int unrelated(void);\n".into(),
                ),
            ],
            sources: vec!["net/ipv4/tcp_ipv4.c".into(), "net/ipv4/other.c".into()],
        };
        let seen = RefCell::new(Vec::new());
        let build = |with: &Unit, taken: &[String]| {
            seen.borrow_mut().push((with.files.clone(), taken.to_vec()));
            let r = if seen.borrow().len() == 1 {
                failed(&[], &["net/ipv4/tcp_ipv4.c"])
            } else {
                let built = Built::NoChange {
                    reason: "same".into(),
                };
                result(built, &[], &[])
            };
            Ok((r, Vec::new()))
        };
        let first = failed(&["skb_dst_dev_net"], &["include/net/tcp.h"]);
        let (r, _, with) = with_needed(&unit, (&unit, &first), &pool, &build)
            .unwrap()
            .expect("it compiles in the end");
        assert!(matches!(r.built, Built::NoChange { .. }));
        let files = [
            "include/net/tcp.h",
            "include/net/dst.h",
            "net/ipv4/tcp_ipv4.c",
        ];
        assert_eq!(with.files, files);
        // Headers are taken narrow; sources are the unit's own.
        assert_eq!(seen.borrow().len(), 2);
        assert_eq!(seen.borrow()[1].1, ["include/net/dst.h"]);
        // Errors that name nothing the pool has end the retries.
        let nothing = failed(&["no_such_name"], &["net/ipv4/unchanged.c"]);
        let none = with_needed(&unit, (&unit, &nothing), &pool, &build).unwrap();
        assert!(none.is_none());
    }
}
