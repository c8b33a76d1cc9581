//! Both compiles of each object, read and parsed, with the object-level checks (type
//! layouts, prototypes) made before functions are compared.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::{DiffError, Refusal};
use super::obj::{self, Obj};
use super::report::BuildReport;
use super::{padding, patchfile::FileChange, verify, Compiled, KbuildObject};

/// The bytes of an object's original and patched compiles.
pub(super) type CompiledBytes = (Vec<u8>, Vec<u8>);

/// Both compiles of each object.
pub(super) fn read_compiled(built: &[Compiled]) -> Result<Vec<CompiledBytes>, DiffError> {
    let read = |p: &Path| std::fs::read(p).map_err(DiffError::io("read", p));
    built
        .iter()
        .map(|b| Ok((read(&b.original)?, read(&b.patched)?)))
        .collect()
}

/// The compiled pairs, the types that only add members in padding, and per pair the
/// functions whose prototype changes.
pub(super) type ParsedPairs<'a> = (
    CompiledPairs<'a>,
    Vec<padding::Padded>,
    Vec<BTreeMap<String, String>>,
);

/// Parses both compiles of each object and checks them as objects (type layouts, exports);
/// assembly objects end here, compared whole since they are not compared by function.
pub(super) fn parse_compiled<'a>(
    affected: &[&'a KbuildObject],
    built: &[Compiled],
    bytes: &'a [CompiledBytes],
    changes: &[FileChange],
    report: &mut BuildReport,
    refusals: &mut Vec<Refusal>,
) -> Result<ParsedPairs<'a>, DiffError> {
    let mut objs = Vec::new();
    let mut padded = Vec::new();
    let mut prototypes = Vec::new();
    for ((&obj, b), (orig_bytes, patched_bytes)) in affected.iter().zip(built).zip(bytes) {
        let layout = verify::layout_check(&obj.object, &obj.source, orig_bytes, patched_bytes)?;
        refusals.extend(layout.refusals);
        padded.extend(layout.padded);
        for t in layout.frame_types {
            if !report.frame_types.contains(&t) {
                report.frame_types.push(t);
            }
        }
        let orig = Obj::parse(&obj.object, orig_bytes)?;
        let patched = Obj::parse(&obj.object, patched_bytes)?;
        if obj.is_assembly() {
            if obj::same_allocated_contents(&orig, &patched) {
                report.unchanged_assembly.push(obj.object.clone());
            } else {
                let path = changes
                    .iter()
                    .find(|c| obj.source == c.path || obj.deps.contains(&c.path));
                refusals.push(Refusal::AssemblyDependent {
                    path: path.map_or_else(|| obj.source.clone(), |c| c.path.clone()),
                    object: obj.object.clone(),
                });
            }
            continue;
        }
        objs.push((orig, patched, obj, b.cached));
        prototypes.push(layout.prototypes);
    }
    Ok((objs, padded, prototypes))
}

/// Original, patched, the object, and whether the original came from the cache.
pub(super) type CompiledPairs<'a> = Vec<(Obj<'a>, Obj<'a>, &'a KbuildObject, bool)>;
