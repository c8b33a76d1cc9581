//! From C sources to a bundle: compile with Kbuild, describe the replacements from vmlinux,
//! pack the manifest and check the result parses.
//!
//! `tree` is a kernel cache directory ([`KernelTree`]): `vmlinux` (the target) and
//! `build/` (the configured Kbuild tree of its source).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lucos_introspect::symbols::KernelSymbols;
use lucos_patch::{Bundle, Manifest, FORMAT_VERSION};
use serde::Deserialize;
use tracing::{info, warn};

use crate::error::BuildError;
use crate::kbuild;
use crate::target::{check_undefined_except, replacement_for, target_for};
use crate::tree::KernelTree;

/// What a bundle is called and which functions it replaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSpec {
    /// Manifest id: 1–64 characters of `[A-Za-z0-9._-]`.
    pub id: String,
    pub description: String,
    /// (old function spec — `name` or `path/file.c:name` —, new function in the sources).
    pub replacements: Vec<(String, String)>,
    /// Undefined symbol of the sources → source file whose static to link against.
    pub resolve: BTreeMap<String, String>,
}

/// The bundle spec file next to a bundle's sources (`guest/bundles/<name>.json`).
/// `sources` are relative to the file's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    id: String,
    #[serde(default)]
    description: String,
    sources: Vec<PathBuf>,
    /// old spec → new function.
    replace: BTreeMap<String, String>,
    #[serde(default)]
    resolve: BTreeMap<String, String>,
}

/// Loads the target's symbols (about 0.3 s); reuse them for several bundles with
/// [`make_bundle_with`].
pub fn load_symbols(tree: &Path) -> Result<KernelSymbols, BuildError> {
    Ok(KernelSymbols::load(KernelTree::open(tree)?.vmlinux)?)
}

/// Builds a bundle from `sources` for the kernel of `tree`.
pub fn make_bundle(
    tree: &Path,
    sources: &[PathBuf],
    spec: &BundleSpec,
) -> Result<Vec<u8>, BuildError> {
    let syms = load_symbols(tree)?;
    make_bundle_with(tree, &syms, sources, spec)
}

/// [`make_bundle`] with the symbols of `tree`'s vmlinux already loaded.
pub fn make_bundle_with(
    tree: &Path,
    syms: &KernelSymbols,
    sources: &[PathBuf],
    spec: &BundleSpec,
) -> Result<Vec<u8>, BuildError> {
    // Everything vmlinux can tell is checked before the (slower) compile.
    let tree = KernelTree::open(tree)?;
    let release = tree.release()?;
    let mut replacements = Vec::with_capacity(spec.replacements.len());
    let mut provided = std::collections::BTreeSet::new();
    for (old, new) in &spec.replacements {
        match crate::module::parse_spec(old) {
            Some((name, module)) => {
                let m = crate::module::ModuleObject::find(&tree.modules_dir(), module)?;
                replacements.push(m.replacement(name, new)?);
                provided.extend(m.defined());
            }
            None => replacements.push(replacement_for(syms, old, new)?),
        }
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        id: spec.id.clone(),
        description: spec.description.clone(),
        target: target_for(syms, &release)?,
        replacements,
        resolve: spec.resolve.clone(),
        aliases: Default::default(),
        rewrites: Vec::new(),
        frame_types: Vec::new(),
        exports: Vec::new(),
        zeroed: Vec::new(),
        prototypes: Vec::new(),
    };
    manifest.validate()?;

    let object = kbuild::compile(&tree.root, sources)?;
    check_undefined_except(syms, &object, &spec.resolve, &provided)?;
    let bundle = lucos_patch::pack(&object, &manifest)?;
    let parsed = Bundle::parse(&bundle)?;
    // Refused sections are only an error when applying; a bundle may be built on purpose
    // to test that, so say so here without failing.
    if let Err(e) = lucos_patch::plan(&parsed) {
        warn!("bundle `{}` will be refused when applied: {e}", spec.id);
    }
    info!(
        "built bundle `{}` ({} bytes, {} replacement(s))",
        spec.id,
        bundle.len(),
        manifest.replacements.len()
    );
    Ok(bundle)
}

/// Reads a bundle spec file: the spec and its sources (made absolute).
pub fn read_spec_file(path: &Path) -> Result<(BundleSpec, Vec<PathBuf>), BuildError> {
    let bad = |reason: String| BuildError::SpecFile {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read(path).map_err(|source| BuildError::Io {
        action: "read the bundle spec",
        path: path.to_owned(),
        source,
    })?;
    let file: SpecFile = serde_json::from_slice(&text).map_err(|e| {
        bad(format!(
            "{e}; expected {{\"id\", \"description\", \"sources\": [..], \"replace\": \
             {{old: new}}, \"resolve\": {{symbol: file}}}}"
        ))
    })?;
    if file.sources.is_empty() {
        return Err(bad(
            "\"sources\" is empty; list the bundle's .c files".into()
        ));
    }
    if file.replace.is_empty() {
        return Err(bad(
            "\"replace\" is empty; map at least one old function to its replacement".into(),
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let sources = file.sources.iter().map(|s| dir.join(s)).collect();
    let spec = BundleSpec {
        id: file.id,
        description: file.description,
        replacements: file.replace.into_iter().collect(),
        resolve: file.resolve,
    };
    Ok((spec, sources))
}

/// Builds the bundle a spec file describes.
pub fn make_from_spec_file(
    tree: &Path,
    spec_path: &Path,
    syms: &KernelSymbols,
) -> Result<Vec<u8>, BuildError> {
    let (spec, sources) = read_spec_file(spec_path)?;
    make_bundle_with(tree, syms, &sources, &spec)
}

/// The bundle spec files (`*.json`) of a directory, sorted.
pub fn find_spec_files(dir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let io = |source| BuildError::Io {
        action: "list",
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "json") && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_file_is_read_relative_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(
            &p,
            r#"{ "id": "x", "sources": ["x.c"],
                 "replace": { "fs/proc/cmdline.c:cmdline_proc_show": "lucos_x" },
                 "resolve": { "override_release": "kernel/sys.c" } }"#,
        )
        .unwrap();
        let (spec, sources) = read_spec_file(&p).unwrap();
        assert_eq!(sources, vec![dir.path().join("x.c")]);
        assert_eq!(
            spec.replacements,
            vec![(
                "fs/proc/cmdline.c:cmdline_proc_show".to_string(),
                "lucos_x".to_string()
            )]
        );
        assert_eq!(spec.resolve["override_release"], "kernel/sys.c");
        assert_eq!(find_spec_files(dir.path()).unwrap(), vec![p]);
    }

    #[test]
    fn spec_file_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(&p, r#"{ "id": "x", "sources": ["x.c"], "replac": {} }"#).unwrap();
        let e = read_spec_file(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `replac`"), "{e}");
        std::fs::write(&p, r#"{ "id": "x", "sources": ["x.c"], "replace": {} }"#).unwrap();
        let e = read_spec_file(&p).unwrap_err().to_string();
        assert!(e.contains("\"replace\" is empty"), "{e}");
    }
}
