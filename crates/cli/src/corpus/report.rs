//! The corpus report: outcomes per unit and per function, refusal causes, coverage.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use super::outcome::{BuildResult, Built};
use super::state::State;
use super::units::UnitKind;

/// Counts per outcome, in units and in (distinct) changed functions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub units: usize,
    pub functions: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub from: String,
    pub to: String,
    pub kernel: String,
    pub changed_files: usize,
    pub changed_c_files: usize,
    pub c_files_in_kernel: usize,
    pub builtin_sources: usize,
    pub module_sources: usize,
    pub relevant_headers: usize,
    pub out_of_scope: BTreeMap<String, usize>,
    /// Outcome -> counts, over the per-file and per-header units.
    pub outcomes: BTreeMap<String, Row>,
    /// Refusal or error cause -> counts.
    pub causes: BTreeMap<String, Row>,
    /// Distinct changed functions in this kernel (changed or added; `__init` excluded).
    pub functions: usize,
    /// Of those, how many applied live and passed the smoke suite in some unit.
    pub covered: usize,
    pub coverage_percent: f64,
    /// Changed `__init` code and data: ran at boot, not applicable.
    pub not_applicable: usize,
    /// Functions counted from hunk headers because their unit did not compile.
    pub estimated_functions: usize,
    pub whole_update: String,
    pub units_done: usize,
    pub units_total: usize,
}

/// The outcome label of a unit, live result included.
fn label(built: &Built, live: Option<&super::live::Live>) -> String {
    match built {
        Built::Bundle { .. } => match live {
            None => "built (not applied yet)".into(),
            Some(l) if l.passed() => "applied, smoke passed, reverted".into(),
            Some(l) if l.apply_error.is_some() => "built, apply refused".into(),
            Some(l) if l.revert_error.is_some() => "applied, revert failed".into(),
            Some(_) => "applied, smoke or log check failed".into(),
        },
        Built::NoChange { .. } => "no function changed".into(),
        Built::Refused { .. } => "refused".into(),
        Built::ToolError { .. } => "tool error".into(),
        Built::Unsupported { .. } => "not supported".into(),
        Built::NotMeasured { .. } => "not measured (over --max-objects)".into(),
    }
}

fn causes_of(built: &Built) -> Vec<String> {
    let mut c: Vec<String> = match built {
        Built::Refused { refusals } => refusals.iter().map(|(c, _)| c.clone()).collect(),
        Built::ToolError { kind, .. } => vec![format!("tool error: {kind}")],
        Built::Unsupported { cause } => vec![cause.clone()],
        Built::NotMeasured { .. } => vec!["header used by too many objects for this run".into()],
        _ => Vec::new(),
    };
    c.sort();
    c.dedup();
    c
}

pub fn summarize(s: &State) -> Summary {
    let scope = &s.scope;
    let mut sum = Summary {
        from: s.from.clone(),
        to: s.to.clone(),
        kernel: s.kernel.clone(),
        changed_files: scope.all,
        changed_c_files: scope.c_files,
        c_files_in_kernel: scope.c_in_kernel(),
        builtin_sources: scope.builtin.len(),
        module_sources: scope.module.len(),
        relevant_headers: scope.headers.len(),
        out_of_scope: scope
            .out
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect(),
        units_total: s.units.len(),
        ..Summary::default()
    };
    let mut all = BTreeSet::new();
    let mut covered = BTreeSet::new();
    let mut init = BTreeSet::new();
    let mut estimated = BTreeSet::new();
    let mut per_outcome: BTreeMap<String, (usize, BTreeSet<&str>)> = BTreeMap::new();
    let mut per_cause: BTreeMap<String, (usize, BTreeSet<&str>)> = BTreeMap::new();
    for u in &s.units {
        let Some(r) = s.results.get(&u.id) else {
            continue;
        };
        let Some(b) = &r.build else { continue };
        sum.units_done += 1;
        let l = label(&b.built, r.live.as_ref());
        if u.kind == UnitKind::Whole {
            sum.whole_update = format!("{l} ({} functions)", b.functions.changed.len());
            sum.whole_update += &whole_detail(b);
            continue;
        }
        let f = &b.functions;
        all.extend(f.changed.iter().map(String::as_str));
        init.extend(f.not_applicable.iter().map(String::as_str));
        if f.estimated {
            estimated.extend(f.changed.iter().map(String::as_str));
        }
        if r.live.as_ref().is_some_and(|l| l.passed()) {
            covered.extend(f.changed.iter().map(String::as_str));
        }
        let e = per_outcome.entry(l).or_default();
        e.0 += 1;
        e.1.extend(f.changed.iter().map(String::as_str));
        for c in causes_of(&b.built) {
            let e = per_cause.entry(c).or_default();
            e.0 += 1;
            e.1.extend(f.changed.iter().map(String::as_str));
        }
    }
    let row = |(k, (n, f)): (String, (usize, BTreeSet<&str>))| {
        (
            k,
            Row {
                units: n,
                functions: f.len(),
            },
        )
    };
    sum.outcomes = per_outcome.into_iter().map(row).collect();
    sum.causes = per_cause.into_iter().map(row).collect();
    sum.functions = all.len();
    sum.covered = covered.len();
    sum.not_applicable = init.len();
    sum.estimated_functions = estimated.difference(&covered).count();
    sum.coverage_percent = if all.is_empty() {
        0.0
    } else {
        100.0 * covered.len() as f64 / all.len() as f64
    };
    if sum.whole_update.is_empty() {
        sum.whole_update = "not built yet".into();
    }
    sum
}

/// What the whole update's result leaves out, and why it was refused.
fn whole_detail(b: &BuildResult) -> String {
    let mut t = String::new();
    if let Built::Refused { refusals } = &b.built {
        let mut causes: BTreeMap<&str, usize> = BTreeMap::new();
        for (cause, _) in refusals {
            *causes.entry(cause.as_str()).or_default() += 1;
        }
        let causes: Vec<String> = causes.iter().map(|(c, n)| format!("{n} × {c}")).collect();
        t += &format!(": {}", causes.join(", "));
    }
    if !b.narrow.is_empty() {
        t += &format!(
            "; {} headers used by more than {} objects recompiled only where other \
             changes touch too, not in all their users ({})",
            b.narrow.len(),
            b.budget,
            b.narrow.join(", ")
        );
    }
    if !b.left_out.is_empty() {
        t += &format!(
            "; without {} headers used by more than {} objects ({})",
            b.left_out.len(),
            b.budget,
            b.left_out.join(", ")
        );
    }
    t
}

/// The report as Markdown tables (printed, and committed under docs/).
pub fn markdown(sum: &Summary) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Corpus: Debian {} → {} on {}\n",
        sum.from, sum.to, sum.kernel
    );
    let _ = writeln!(
        t,
        "**Coverage: {} of {} changed functions ({:.1}%) applied live and passed the smoke \
         suite**, with no hand-written code. Whole update as one bundle: {}.\n",
        sum.covered, sum.functions, sum.coverage_percent, sum.whole_update
    );
    let _ = writeln!(t, "| Scope | Files |\n|---|---:|");
    let _ = writeln!(t, "| changed files | {} |", sum.changed_files);
    let _ = writeln!(t, "| changed C files | {} |", sum.changed_c_files);
    let _ = writeln!(
        t,
        "| changed C files in this kernel | {} |",
        sum.c_files_in_kernel
    );
    let _ = writeln!(
        t,
        "| changed vmlinux sources (C and assembly) | {} |",
        sum.builtin_sources
    );
    let _ = writeln!(
        t,
        "| changed sources of loadable modules | {} |",
        sum.module_sources
    );
    let _ = writeln!(t, "| relevant changed headers | {} |", sum.relevant_headers);
    for (reason, n) in &sum.out_of_scope {
        let _ = writeln!(t, "| out of scope: {reason} | {n} |");
    }
    let _ = writeln!(
        t,
        "\n| Outcome (per unit) | Units | Functions |\n|---|---:|---:|"
    );
    for (k, r) in &sum.outcomes {
        let _ = writeln!(t, "| {k} | {} | {} |", r.units, r.functions);
    }
    let _ = writeln!(
        t,
        "\n| Refusal or error cause | Units | Functions |\n|---|---:|---:|"
    );
    let mut causes: Vec<_> = sum.causes.iter().collect();
    causes.sort_by_key(|(k, r)| {
        (
            std::cmp::Reverse(r.functions),
            std::cmp::Reverse(r.units),
            k.to_string(),
        )
    });
    for (k, r) in causes {
        let _ = writeln!(t, "| {k} | {} | {} |", r.units, r.functions);
    }
    let _ = writeln!(
        t,
        "\nFunctions are distinct `file:function` pairs, changed or added, over the per-file \
         and per-header units; {} of them are estimated from hunk headers because their \
         unit did not compile. {} changed `__init` symbols ran at boot and are not applicable \
         (not counted). Units done: {} of {}.",
        sum.estimated_functions, sum.not_applicable, sum.units_done, sum.units_total
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::outcome::Functions;

    #[test]
    fn the_whole_update_says_why_it_was_refused_and_what_it_left_out() {
        let refusal = |cause: &str| (cause.to_string(), format!("{cause}: details"));
        let refused = Built::Refused {
            refusals: vec![
                refusal("struct layout change"),
                refusal("struct layout change"),
                refusal("changed initial value of writable data"),
            ],
        };
        let b = BuildResult {
            left_out: vec!["include/linux/list.h".into()],
            narrow: vec!["include/linux/bpf.h".into()],
            budget: 100,
            ..BuildResult::new(refused, Functions::default())
        };
        assert_eq!(
            whole_detail(&b),
            ": 1 × changed initial value of writable data, 2 × struct layout change; 1 \
             headers used by more than 100 objects recompiled only where other changes \
             touch too, not in all their users (include/linux/bpf.h); without 1 headers \
             used by more than 100 objects (include/linux/list.h)"
        );
        let plain = BuildResult {
            built: Built::NoChange {
                reason: "none".into(),
            },
            left_out: Vec::new(),
            narrow: Vec::new(),
            ..b
        };
        assert_eq!(whole_detail(&plain), "");
    }
}
