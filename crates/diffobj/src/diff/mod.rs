//! `lucos build`: from a unified diff of the kernel source to a bundle — the job of kpatch's
//! create-diff-object, re-thought for lucos.
//!
//! 1. Apply the diff to an overlay of the cached Kbuild tree ([`scratch`]).
//! 2. Find every vmlinux object whose recorded dependencies include a changed file
//!    ([`cmdfile`]) and compile its original and patched versions with Kbuild's own command
//!    plus `-ffunction-sections -fdata-sections` ([`compile`]); originals are cached.
//! 3. Compare them function by function ([`compare`]) and plan what the bundle must carry
//!    ([`include`]); refuse what it cannot carry ([`Refusal`]).
//! 4. Write the object ([`emit`]), describe each redirect from vmlinux
//!    ([`crate::target::replacement_for`]) and pack the manifest.

mod affected;
mod cmdfile;
mod compare;
mod compile;
mod correlate;
mod dwarf;
mod dwarfdeps;
mod emit;
mod error;
mod frames;
mod include;
mod instances;
mod keep;
mod keys;
mod layout;
mod names;
mod obj;
mod objects;
mod padding;
mod pairs;
mod patchfile;
mod promote;
mod report;
mod scratch;
mod signature;
mod special;
mod strings;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use lucos_introspect::symbols::KernelSymbols;
use lucos_patch::{Bundle, Manifest, FORMAT_VERSION};

pub use cmdfile::KbuildObject;
pub use error::{DiffError, Refusal};
pub use objects::{compare_objects, ObjectDiff};
pub use patchfile::{parse as parse_diff, ChangeKind, FileChange, LineMap};
pub use report::{
    BuildOptions, BuildOutcome, BuildReport, Built, NoProgress, ObjectReport, Progress, Stage,
    Times,
};

use crate::error::BuildError;
use crate::tree::KernelTree;
use compare::Status;
use compile::Side;
use pairs::{parse_compiled, read_compiled, CompiledPairs};

/// The manifest id for a diff file: its stem, restricted to `[A-Za-z0-9._-]`.
fn default_id(diff: &Path) -> String {
    let stem = diff.file_stem().map(|s| s.to_string_lossy().into_owned());
    let id: String = stem
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() {
        "patch".into()
    } else {
        id
    }
}

fn cache_root(options: &BuildOptions) -> Option<PathBuf> {
    if !options.use_cache {
        return None;
    }
    options
        .cache_dir
        .clone()
        .or_else(|| Some(crate::cache_dir()?.join("diffobj")))
}

/// Every object linked into the kernel of `tree` (a kernel cache directory or its Kbuild
/// tree), with the files it depends on: what "in this kernel" means for a change.
pub fn kernel_objects(tree: &Path) -> Result<Vec<KbuildObject>, DiffError> {
    cmdfile::objects(&KernelTree::open(tree)?)
}

/// Builds a bundle for `diff` against the kernel cache directory `tree` (the directory of
/// `guest/kernel.sh --print-dir`, holding `vmlinux` and `build/`; the Kbuild tree itself
/// is accepted too). A diff refused only because it drops struct members is built again
/// with them kept, unused ([`keep`]); that result is taken when it gets further.
pub fn build(
    tree: &Path,
    diff: &Path,
    options: &BuildOptions,
    progress: &dyn Progress,
) -> Result<BuildOutcome, DiffError> {
    let first = build_keeping(tree, diff, options, progress, &[]);
    let Err(DiffError::Refused { refusals, .. }) = &first else {
        return first;
    };
    let removed: Vec<keep::Removed> = refusals
        .iter()
        .filter_map(|r| match r {
            Refusal::TypeLayout {
                type_name, removed, ..
            } => Some(removed.iter().map(|member| keep::Removed {
                type_name: type_name.clone(),
                member: member.clone(),
            })),
            _ => None,
        })
        .flatten()
        .collect();
    if removed.is_empty() {
        return first;
    }
    tracing::info!(?removed, "rebuilding with the members the diff drops kept");
    let before = refusals.len();
    let second = build_keeping(tree, diff, options, progress, &removed);
    match &second {
        Err(DiffError::Refused { refusals, .. }) if refusals.len() >= before => first,
        Ok(_) | Err(DiffError::Refused { .. }) => second,
        Err(e) => {
            tracing::info!(error = %e, "the rebuild with kept members failed");
            first
        }
    }
}

/// [`build`], with the `keep` members put back into the patched sources.
fn build_keeping(
    tree: &Path,
    diff: &Path,
    options: &BuildOptions,
    progress: &dyn Progress,
    keep: &[keep::Removed],
) -> Result<BuildOutcome, DiffError> {
    let started = Instant::now();
    let tree = KernelTree::open(tree)?;
    let release = tree.release()?;
    let text = std::fs::read_to_string(diff).map_err(DiffError::io("read", diff))?;
    let changes = patchfile::parse(diff, &text)?;
    let mut report = BuildReport {
        files: changes.iter().map(|c| c.path.clone()).collect(),
        ..BuildReport::default()
    };

    std::thread::scope(|scope| {
        let symbols = scope.spawn(|| KernelSymbols::load(&tree.vmlinux));
        let t = Instant::now();
        let objects = cmdfile::objects(&tree)?;
        let (mut affected, refusals) = affected::affected_objects(&objects, &changes);
        if let Some(only) = &options.only_sources {
            affected.retain(|o| only.contains(&o.source));
        }
        affected::narrow(&mut affected, &objects, &changes, &options.narrow_headers);
        if !refusals.is_empty() {
            return Err(DiffError::Refused {
                refusals,
                report: Box::new(report),
            });
        }
        if affected.is_empty() {
            report.times.total = started.elapsed();
            return Ok(BuildOutcome::NoChange {
                report: Box::new(report),
                reason: "no object linked into vmlinux depends on the changed files".into(),
            });
        }
        let _tree_lock = tree.lock().map_err(DiffError::io("lock", &tree.dir))?;
        let affected = cmdfile::with_commands(&tree, &affected, options.jobs)?;
        let affected: Vec<&KbuildObject> = affected.iter().collect();
        let overlay = scratch::Overlay::create(&tree.root, &changes, diff, &release)?;
        report.kept_members = keep::apply(&tree.root, &overlay.root(), &changes, keep)?;
        let syms = symbols.join().map_err(|_| DiffError::Emit {
            reason: "symbol loader panicked".into(),
        })??;
        let cache = cache_root(options)
            .map(|c| c.join(syms.build_id_hex().unwrap_or_else(|_| "no-build-id".into())));
        progress.start(Stage::Rebuild, affected.len() as u64 * 2);
        let built = compile_all(
            &tree.root,
            &overlay.root(),
            &affected,
            cache.as_deref(),
            options.jobs,
            progress,
        )?;
        report.times.rebuild = t.elapsed();
        progress.finish(Stage::Rebuild, report.times.rebuild);

        let t = Instant::now();
        progress.start(Stage::Compare, affected.len() as u64);
        let mut refusals = Vec::new();
        // Read first: the parsed objects borrow their bytes.
        let bytes = read_compiled(&built)?;
        let (objs, padded, prototypes) = parse_compiled(
            &affected,
            &built,
            &bytes,
            &changes,
            &mut report,
            &mut refusals,
        )?;
        let zeroed = padding::prove(&tree, &syms, &padded, &mut refusals)?;
        report.padded_types = padded.iter().map(|p| p.type_name.clone()).collect();
        report.padded_types.sort();
        report.padded_types.dedup();
        drop(overlay);
        once_per_type(&mut refusals);
        let moved = |from: u64, to: u64| line_moved(&changes, from, to);
        let diffs: Vec<compare::Diff<'_>> = objs
            .iter()
            .map(|(o, p, k, _)| {
                progress.step(Stage::Compare, &k.object);
                compare::compare(o, p, &k.source, &moved)
            })
            .collect();
        report.objects.extend(object_reports(&objs, &diffs));
        let mut plan = include::plan(&diffs);
        refusals.append(&mut plan.refusals);
        let (mut refused, consistent) = signature::check(&plan, &diffs, &prototypes);
        refusals.append(&mut refused);
        report.prototypes = consistent;
        report.times.compare = t.elapsed();
        progress.finish(Stage::Compare, report.times.compare);
        if !refusals.is_empty() {
            return Err(DiffError::Refused {
                refusals,
                report: Box::new(report),
            });
        }
        if plan.is_empty() {
            report.times.total = started.elapsed();
            let reason = no_change_reason(&report);
            return Ok(BuildOutcome::NoChange {
                report: Box::new(report),
                reason,
            });
        }

        let t = Instant::now();
        progress.start(Stage::Emit, plan.redirects.len() as u64);
        let target = (
            release.as_str(),
            (&report.frame_types[..], &report.prototypes[..]),
            zeroed,
        );
        let built = match emit_bundle(&diffs, &plan, &syms, target, diff, options, progress) {
            Err(DiffError::Refused { refusals, .. }) => {
                return Err(DiffError::Refused {
                    refusals,
                    report: Box::new(report),
                })
            }
            other => other?,
        };
        report.times.emit = t.elapsed();
        progress.finish(Stage::Emit, report.times.emit);
        report.times.total = started.elapsed();
        tracing::info!(
            rebuild = ?report.times.rebuild,
            compare = ?report.times.compare,
            emit = ?report.times.emit,
            total = ?report.times.total,
            "built bundle"
        );
        Ok(BuildOutcome::Bundle(Box::new(Built { report, ..built })))
    })
}

/// Whether the diff moved line `from` of a changed file to line `to`.
fn line_moved(changes: &[FileChange], from: u64, to: u64) -> bool {
    let (Ok(from), Ok(to)) = (u32::try_from(from), u32::try_from(to)) else {
        return false;
    };
    changes.iter().any(|c| c.lines.map(from) == Some(to))
}

/// Objects sharing a header see its layout change alike: report each type once.
fn once_per_type(refusals: &mut Vec<Refusal>) {
    let mut seen_types = std::collections::BTreeSet::new();
    refusals.retain(|r| match r {
        Refusal::TypeLayout { type_name, .. } => seen_types.insert(type_name.clone()),
        _ => true,
    });
}

/// What each compared object changed, for the build report.
fn object_reports(objs: &CompiledPairs<'_>, diffs: &[compare::Diff<'_>]) -> Vec<ObjectReport> {
    objs.iter()
        .zip(diffs)
        .map(|((_, _, k, cached), d)| ObjectReport {
            object: k.object.clone(),
            source: k.source.clone(),
            original_cached: *cached,
            changed: d.names_with(Status::Changed, true),
            new_functions: d.names_with(Status::New, true),
            new_data: d.names_with(Status::New, false),
            line_only: d.names_with(Status::LineOnly, true),
            not_applicable: d.not_applicable.clone(),
            debug_sites_off: d.new_debug_sites(),
        })
        .collect()
}

/// Why a diff that compiled needs no bundle.
fn no_change_reason(report: &BuildReport) -> String {
    let line_only: usize = report.objects.iter().map(|o| o.line_only.len()).sum();
    let init: usize = report.objects.iter().map(|o| o.not_applicable.len()).sum();
    if init > 0 {
        format!("only __init code or data changed ({init} symbol(s)), which ran at boot")
    } else if line_only > 0 {
        format!("only __LINE__ values moved (in {line_only} function(s))")
    } else {
        "the compiled code is the same".to_string()
    }
}

/// Paths of one object's two compiles.
struct Compiled {
    original: PathBuf,
    patched: PathBuf,
    cached: bool,
    /// Where the original goes in the cache, when caching.
    cache_file: Option<PathBuf>,
}

/// Compiles original (or takes it from the cache) and patched versions of every object,
/// `jobs` at a time.
fn compile_all(
    root: &Path,
    overlay: &Path,
    objects: &[&KbuildObject],
    cache: Option<&Path>,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Vec<Compiled>, DiffError> {
    let out_dir = overlay.parent().unwrap_or(overlay).join("objects");
    std::fs::create_dir_all(&out_dir).map_err(DiffError::io("create", &out_dir))?;
    let mut results: Vec<Compiled> = Vec::with_capacity(objects.len());
    for (i, o) in objects.iter().enumerate() {
        let mut r = Compiled {
            original: out_dir.join(format!("{i}.orig.o")),
            patched: out_dir.join(format!("{i}.patched.o")),
            cached: false,
            cache_file: None,
        };
        if let Some(dir) = cache {
            let key = compile::cache_key(root, o)?;
            let p = compile::cache_path(dir, o, &key);
            if p.is_file() {
                r.original = p;
                r.cached = true;
                progress.step(Stage::Rebuild, &format!("{} (original, cached)", o.object));
            } else {
                r.cache_file = Some(p);
            }
        }
        results.push(r);
    }
    let remap_from = format!("{}/", root.display());
    let remap_to = format!("{}/", overlay.display());
    let next = AtomicUsize::new(0);
    let errors: Mutex<Vec<DiffError>> = Mutex::new(Vec::new());
    let work: Vec<(usize, Side)> = (0..objects.len())
        .flat_map(|i| [(i, Side::Patched), (i, Side::Original)])
        .filter(|&(i, side)| side == Side::Patched || !results[i].cached)
        .collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(work.len().max(1)) {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(i, side)) = work.get(n) else { break };
                let o = objects[i];
                let result = match side {
                    Side::Patched => compile::run(
                        o,
                        side,
                        (root, overlay),
                        &results[i].patched,
                        Some((&remap_from, &remap_to)),
                    ),
                    Side::Original => {
                        compile::run(o, side, (root, root), &results[i].original, None)
                    }
                };
                match result {
                    Ok(()) => progress.step(Stage::Rebuild, &o.object),
                    Err(e) => errors.lock().expect("not poisoned").push(e),
                }
            });
        }
    });
    if let Some(e) = errors
        .into_inner()
        .expect("not poisoned")
        .into_iter()
        .next()
    {
        return Err(e);
    }
    for r in &results {
        if let Some(file) = &r.cache_file {
            compile::store(&r.original, file);
        }
    }
    Ok(results)
}

/// What the manifest takes from the build besides the plan: the release, the frame-local
/// types and static prototypes that ask for consistent switches, and the zero checks.
type Target<'a> = (
    &'a str,
    (&'a [String], &'a [String]),
    Vec<lucos_patch::Zeroed>,
);

/// Writes the object, the manifest and checks the result with lucos's own loader.
fn emit_bundle(
    diffs: &[compare::Diff<'_>],
    plan: &include::Plan,
    syms: &KernelSymbols,
    (release, (frame_types, prototypes), zeroed): Target<'_>,
    diff: &Path,
    options: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Built, DiffError> {
    let strings = strings::KernelStrings::load(syms);
    if strings.is_none() {
        tracing::warn!("vmlinux's .rodata is not readable: string literals travel in the bundle");
    }
    let object = emit::write_object(diffs, plan, strings.as_ref())?;
    let mut refusals = Vec::new();
    let mut replacements = Vec::new();
    for r in &plan.redirects {
        let unit = plan.index[&(r.obj, include::UnitKind::Item(r.sym))];
        let new = &plan.units[unit].name;
        let spec = match &r.old_file {
            Some(f) => format!("{f}:{}", r.old),
            None => r.old.clone(),
        };
        progress.step(Stage::Emit, &r.old);
        if let Some(refusal) = verify::run_pre(diffs, r, &spec, syms) {
            refusals.push(refusal);
            continue;
        }
        let file = || {
            r.old_file
                .clone()
                .unwrap_or_else(|| diffs[r.obj].file.clone())
        };
        match crate::target::replacement_for(syms, &spec, new) {
            Ok(rep) => replacements.push(rep),
            Err(e @ (BuildError::EntryUnsafe { .. } | BuildError::EntryNotExpectable { .. })) => {
                let entry = match &e {
                    BuildError::EntryUnsafe { source, .. } => source.to_string(),
                    _ => "a relocated field in its first bytes cannot be expected".into(),
                };
                let detail = match diffs[r.obj].no_fentry.get(&r.sym) {
                    Some(w) => format!("{w}; and its entry cannot take a jmp: {entry}"),
                    None => format!("its entry cannot take a jmp: {entry}"),
                };
                refusals.push(Refusal::NoFentry {
                    function: r.old.clone(),
                    file: file(),
                    detail,
                })
            }
            Err(e) => refusals.push(Refusal::NotRedirectable {
                function: r.old.clone(),
                file: file(),
                reason: e.to_string(),
            }),
        }
    }
    let mut resolve = BTreeMap::new();
    let mut aliases = BTreeMap::new();
    for (name, ext) in &plan.externals {
        if name == "__fentry__" {
            continue;
        }
        let symbol = &ext.symbol;
        let found = syms.lookup_maybe_in(ext.file.as_deref(), symbol);
        match found {
            Ok(_) if name != symbol => {
                aliases.insert(
                    name.clone(),
                    lucos_patch::Alias {
                        symbol: symbol.clone(),
                        file: ext.file.clone(),
                    },
                );
            }
            Ok(_) => {
                if let Some(f) = &ext.file {
                    if syms.all_named(name).nth(1).is_some() {
                        resolve.insert(name.clone(), f.clone());
                    }
                }
            }
            Err(_) if ext.weak => {}
            Err(e) => refusals.push(Refusal::Absent {
                from: ext.from.clone(),
                file: ext.file.clone().unwrap_or_default(),
                symbol: name.clone(),
                lookup: e.to_string(),
            }),
        }
    }
    if !refusals.is_empty() {
        return Err(DiffError::Refused {
            refusals,
            report: Box::default(),
        });
    }
    let aliased = aliases.keys().cloned().collect();
    crate::target::check_undefined_except(syms, &object, &resolve, &aliased).map_err(|e| {
        DiffError::SelfCheck {
            source: Box::new(e),
        }
    })?;
    let target = crate::target::target_for(syms, release).map_err(|e| DiffError::Target {
        source: Box::new(e),
    })?;
    let manifest = Manifest {
        format: FORMAT_VERSION,
        id: options.id.clone().unwrap_or_else(|| default_id(diff)),
        description: options
            .description
            .clone()
            .unwrap_or_else(|| format!("built by lucos build from {}", diff.display())),
        target,
        replacements,
        resolve,
        aliases,
        rewrites: emit::rewrites(diffs, plan),
        frame_types: frame_types.to_vec(),
        exports: emit::exports(plan),
        zeroed,
        prototypes: prototypes.to_vec(),
    };
    let bundle = lucos_patch::pack(&object, &manifest)?;
    let parsed = Bundle::parse(&bundle)?;
    lucos_patch::plan(&parsed)?;
    Ok(Built {
        replaced: manifest.replacements.iter().map(|r| r.label()).collect(),
        included: plan.units.iter().map(|u| u.name.clone()).collect(),
        external: plan.externals.keys().cloned().collect(),
        bundle,
        manifest,
        report: BuildReport::default(),
    })
}
