//! Which vmlinux objects depend on which files, for a tree that was only `make prepare`d
//! (Debian's kernel: its objects were never built here, so there are no `.cmd` files).
//!
//! The dbg vmlinux's DWARF has one compile unit per object, named after its source, with a
//! line-program file table that lists every file the unit took code, types or declarations
//! from. That is the dependency list, with one limit: a header that contributes only
//! macros (no type, function or variable the unit uses) is not listed, so a change to such
//! a header is not seen through it.
//!
//! The index is built once per vmlinux (about two seconds) and cached next to it as JSON.

use std::path::{Component, Path, PathBuf};

use object::Object;
use serde::{Deserialize, Serialize};

use super::error::{DiffError, DwarfError};

/// Bump when the index format or its derivation changes.
const INDEX_FORMAT: u32 = 1;

/// One compile unit of vmlinux: its source (relative to the source root) and every file
/// its line table names (relative to the source or build root, absolute for system files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub source: String,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepsIndex {
    format: u32,
    /// Build id of the vmlinux the index was made from.
    build_id: String,
    pub units: Vec<Unit>,
}

impl DepsIndex {
    /// The cached index at `cache` if it belongs to `build_id`, else a new one made from
    /// `vmlinux` (and stored at `cache`; a failed store only costs the next run time).
    pub fn load_or_build(vmlinux: &Path, build_id: &str, cache: &Path) -> Result<Self, DiffError> {
        if let Ok(text) = std::fs::read(cache) {
            if let Ok(idx) = serde_json::from_slice::<DepsIndex>(&text) {
                if idx.format == INDEX_FORMAT && idx.build_id == build_id {
                    return Ok(idx);
                }
            }
        }
        let started = std::time::Instant::now();
        let data = std::fs::read(vmlinux).map_err(DiffError::io("read", vmlinux))?;
        let units = read_units(&data).map_err(|source| DiffError::VmlinuxDwarf {
            path: vmlinux.to_owned(),
            source,
        })?;
        tracing::info!(
            units = units.len(),
            seconds = started.elapsed().as_secs_f64(),
            "indexed vmlinux compile units"
        );
        let idx = DepsIndex {
            format: INDEX_FORMAT,
            build_id: build_id.to_owned(),
            units,
        };
        store(cache, &idx);
        Ok(idx)
    }
}

/// Writes `value` to `cache` as JSON, whole or not at all (through a renamed partial
/// file). A failure is ignored: a cache only saves the next run time.
pub(crate) fn store(cache: &Path, value: &impl Serialize) {
    if let Ok(json) = serde_json::to_vec(value) {
        let tmp = cache.with_extension("partial");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, cache);
        }
    }
}

/// Lexically resolves `.` and `..` (no file system access: the paths are the build
/// machine's).
fn clean(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `p` relative to whichever root holds it; absolute otherwise (system headers).
fn relative(p: &Path, roots: &[&Path]) -> String {
    let p = clean(p);
    // The build directory may lie inside the source root: try the deeper root first.
    let mut roots = roots.to_vec();
    roots.sort_by_key(|r| std::cmp::Reverse(r.components().count()));
    for r in roots {
        if let Ok(rel) = p.strip_prefix(r) {
            return rel.to_string_lossy().into_owned();
        }
    }
    p.to_string_lossy().into_owned()
}

/// The source root of the build: the directory `init/main.c`'s unit names it under.
fn source_root(names: &[(PathBuf, PathBuf)]) -> Option<PathBuf> {
    names.iter().find_map(|(name, _)| {
        let n = clean(name);
        n.ends_with("init/main.c")
            .then(|| n.parent()?.parent().map(Path::to_path_buf))
            .flatten()
    })
}

use super::dwarf::{parse, Slice};

fn read_units(data: &[u8]) -> Result<Vec<Unit>, DwarfError> {
    let file = object::File::parse(data).map_err(|source| DwarfError::Object { source })?;
    if file.section_by_name(".debug_info").is_none() {
        return Err(DwarfError::NoDebugInfo);
    }
    let sections = super::dwarf::dwarf_sections(&file)?;
    let dwarf = super::dwarf::dwarf(&sections)?;

    // First pass: each unit's name, compilation directory and raw file list.
    let mut raw: Vec<(PathBuf, PathBuf, Vec<PathBuf>)> = Vec::new();
    let mut headers = dwarf.units();
    while let Some(header) = headers.next().map_err(parse("a unit header"))? {
        let unit = dwarf.unit(header).map_err(parse("a unit"))?;
        let text = |s: Option<Slice<'_>>| {
            PathBuf::from(
                s.map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        };
        let name = text(unit.name);
        let comp_dir = text(unit.comp_dir);
        let mut files = Vec::new();
        if let Some(program) = &unit.line_program {
            let h = program.header();
            for f in h.file_names() {
                let name = dwarf
                    .attr_string(&unit, f.path_name())
                    .map_err(parse("a line-table file name"))?;
                let mut path = PathBuf::from(name.to_string_lossy().into_owned());
                if path.is_relative() {
                    if let Some(dir) = f.directory(h) {
                        let dir = dwarf
                            .attr_string(&unit, dir)
                            .map_err(parse("a line-table directory"))?;
                        path = PathBuf::from(dir.to_string_lossy().into_owned()).join(path);
                    }
                    if path.is_relative() {
                        path = comp_dir.join(path);
                    }
                }
                files.push(path);
            }
        }
        raw.push((name, comp_dir, files));
    }
    let names: Vec<(PathBuf, PathBuf)> =
        raw.iter().map(|(n, c, _)| (n.clone(), c.clone())).collect();
    let src_root = source_root(&names).ok_or(DwarfError::NoSourceRoot)?;
    let mut units = Vec::with_capacity(raw.len());
    for (name, comp_dir, files) in raw {
        let roots = [src_root.as_path(), comp_dir.as_path()];
        let abs_name = if name.is_relative() {
            comp_dir.join(&name)
        } else {
            name
        };
        let source = relative(&abs_name, &roots);
        if !source.ends_with(".c") {
            continue;
        }
        let mut files: Vec<String> = files.iter().map(|f| relative(f, &roots)).collect();
        files.sort();
        files.dedup();
        units.push(Unit { source, files });
    }
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::super::dwarf::tests::{object_with, TRUNCATED_UNIT};
    use super::*;

    #[test]
    fn unreadable_compile_units_are_typed() {
        assert!(matches!(
            read_units(&object_with(None)),
            Err(DwarfError::NoDebugInfo)
        ));
        assert!(matches!(
            read_units(&object_with(Some(TRUNCATED_UNIT))),
            Err(DwarfError::Parse {
                what: "a unit header",
                ..
            })
        ));
        // Readable, but no unit names init/main.c: the source root is unknown.
        assert!(matches!(
            read_units(&object_with(Some(&[]))),
            Err(DwarfError::NoSourceRoot)
        ));
    }

    #[test]
    fn paths_are_made_relative_to_either_root() {
        let src = Path::new("/b/linux");
        let out = Path::new("/b/linux/debian/build/x");
        let roots = [src, out];
        assert_eq!(
            relative(Path::new("/b/linux/fs/proc/../proc/cmdline.c"), &roots),
            "fs/proc/cmdline.c"
        );
        assert_eq!(
            relative(
                Path::new("/b/linux/debian/build/x/include/generated/a.h"),
                &roots[1..]
            ),
            "include/generated/a.h"
        );
        assert_eq!(
            relative(Path::new("/usr/lib/gcc/x/stdarg.h"), &roots),
            "/usr/lib/gcc/x/stdarg.h"
        );
        let names = vec![(
            PathBuf::from("/b/linux/init/main.c"),
            PathBuf::from("/b/linux/debian/build/x"),
        )];
        assert_eq!(source_root(&names), Some(PathBuf::from("/b/linux")));
    }
}
