//! Comparing two already compiled objects, without a kernel tree: the core of
//! [`super::build`] on its own, for tests and for inspecting what a change does.

use super::compare::{self, Status};
use super::correlate::pairs;
use super::emit;
use super::error::{DiffError, Refusal};
use super::include;
use super::obj::Obj;
use super::patchfile::LineMap;

/// What changed between two compiles of one source file, and what a bundle would carry.
#[derive(Debug, Clone, Default)]
pub struct ObjectDiff {
    /// Functions whose code changed (original names).
    pub changed: Vec<String>,
    /// Functions that would be redirected: changed, at their `__fentry__` site or, without
    /// one, at their entry if vmlinux shows that safe (checked when the bundle is emitted).
    pub redirected: Vec<String>,
    pub new_functions: Vec<String>,
    pub new_data: Vec<String>,
    /// Functions that differ only in `__LINE__` values.
    pub line_only: Vec<String>,
    /// Changed `__init` code and data, which ran at boot: not applied.
    pub not_applicable: Vec<String>,
    /// Matched (original, patched) symbols whose names differ (compiler renumbering).
    pub renamed: Vec<(String, String)>,
    /// Objects rewritten in place (kernel names).
    pub rewritten: Vec<String>,
    /// The writable ones among them, with the (offset, length) fields rewritten.
    pub rewritten_fields: Vec<(String, Vec<(u32, u32)>)>,
    /// Symbols copied into the bundle.
    pub included: Vec<String>,
    /// Kernel symbols the bundle would link against.
    pub external: Vec<String>,
    pub refusals: Vec<Refusal>,
    /// Types whose layout changes but whose instances only frames hold.
    pub frame_types: Vec<String>,
    /// Static functions whose prototype changes, every caller replaced (consistent
    /// switches).
    pub prototypes: Vec<String>,
    /// Symbols the patched object newly exports (the bundle's module exports them).
    pub exports: Vec<String>,
    /// The bundle's ELF object (no manifest yet), when nothing was refused and some
    /// function changed.
    pub object: Option<Vec<u8>>,
}

/// Compares `orig` and `patched`, compiled from source `file` with
/// `-ffunction-sections -fdata-sections`. `lines` says how the diff moved the file's lines;
/// without it, any `__LINE__`-shaped difference counts as a moved line (as in kpatch).
pub fn compare_objects(
    file: &str,
    orig: &[u8],
    patched: &[u8],
    lines: Option<&LineMap>,
) -> Result<ObjectDiff, DiffError> {
    let o = Obj::parse(&format!("{file} (original)"), orig)?;
    let p = Obj::parse(&format!("{file} (patched)"), patched)?;
    let moved = |from: u64, to: u64| match lines {
        None => true,
        Some(m) => u32::try_from(from).is_ok_and(|f| m.map(f).map(u64::from) == Some(to)),
    };
    let d = compare::compare(&o, &p, file, &moved);
    let mut out = ObjectDiff {
        changed: d.names_with(Status::Changed, true),
        new_functions: d.names_with(Status::New, true),
        new_data: d.names_with(Status::New, false),
        line_only: d.names_with(Status::LineOnly, true),
        not_applicable: d.not_applicable.clone(),
        renamed: pairs(&o, &p, &d.twin)
            .into_iter()
            .filter(|(a, b)| a != b)
            .collect(),
        ..ObjectDiff::default()
    };
    let diffs = [d];
    let plan = include::plan(&diffs);
    out.redirected = plan.redirects.iter().map(|r| r.old.clone()).collect();
    out.included = plan.units.iter().map(|u| u.name.clone()).collect();
    out.rewritten = plan.rewrites.iter().map(|(_, r)| r.old.clone()).collect();
    out.rewritten_fields = plan
        .rewrites
        .iter()
        .filter_map(|(_, r)| {
            let fields = diffs[r.obj].rewrite.get(&r.sym)?;
            (!fields.is_empty()).then(|| (r.old.clone(), fields.clone()))
        })
        .collect();
    out.external = plan.externals.keys().cloned().collect();
    // The same object-level checks as a build: type layouts and exports.
    let layout = super::verify::layout_check(file, file, orig, patched)?;
    out.refusals = layout.refusals;
    // Without the kernel's vmlinux nothing proves a padded type's objects zero there.
    out.refusals
        .extend(layout.padded.iter().map(|p| p.refusal(p.lives.clone())));
    out.frame_types = layout.frame_types;
    out.refusals.extend(plan.refusals.iter().cloned());
    let (refused, consistent) = super::signature::check(&plan, &diffs, &[layout.prototypes]);
    out.refusals.extend(refused);
    out.prototypes = consistent;
    out.exports = plan.exports.iter().map(|(e, _)| e.name.clone()).collect();
    if out.refusals.is_empty() && !plan.is_empty() {
        out.object = Some(emit::write_object(&diffs, &plan, None)?);
    }
    Ok(out)
}
