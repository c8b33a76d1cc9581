//! The JSON manifest carried in a bundle's `.lucos.manifest` section (format 1).
//!
//! Unknown fields are rejected: a misspelt optional field (say `site_ofset`) would otherwise
//! be silently ignored and the patch applied with the wrong defaults.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::bundle::BundleError;
use crate::site::{ENDBR64, NOP5};

mod rewrite;

use rewrite::validate_rewrite;
pub use rewrite::{
    Field, Rewrite, Zeroed, MAX_FIELDS_OBJECT, MAX_REWRITE, MAX_REWRITES, MAX_ZEROED,
};

/// The only manifest format this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Longest `expect` prefix; enough for endbr64 + NOP5 + a few prologue instructions.
pub const MAX_EXPECT: usize = 16;

/// Bounds of the other fields. Every applied bundle's record must fit the registry with
/// room to revert it (see `Registry::reserve`); these keep one record of a maximal manifest
/// to a fraction of a registry slot, so that several fit at once.
pub const MAX_DESCRIPTION: usize = 1024;
pub const MAX_REPLACEMENTS: usize = 32;
/// Symbol names: the longest in Debian's 6.1 vmlinux has 76 characters.
pub const MAX_SYMBOL: usize = 128;
pub const MAX_PATH: usize = 128;
pub const MAX_RELEASE: usize = 128;
/// Entries of `resolve` and of `aliases`, each.
pub const MAX_NAMES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub target: Target,
    pub replacements: Vec<Replacement>,
    /// Ambiguous undefined symbol -> source file whose static to use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resolve: BTreeMap<String, String>,
    /// Undefined symbols of the object that stand for kernel symbols of other names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, Alias>,
    /// Read-only objects of the running kernel rewritten in place in the switch (e.g. an
    /// ops table that now points to a new function), restored on revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrites: Vec<Rewrite>,
    /// Types (`struct name`, `union name`) whose layout the bundle changes and whose
    /// instances live only in the frames of the functions it replaces (as lucos build
    /// proves from DWARF). Safe only if no task is in the code a switch leaves, so every
    /// switch of the bundle, apply and revert, must be consistent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_types: Vec<String>,
    /// Static functions whose prototype changes, all of whose callers the bundle replaces
    /// (lucos build proves it from both compiles): an old caller still running would pass
    /// the old arguments, so every switch of the bundle must be consistent too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prototypes: Vec<String>,
    /// Symbols the update newly exports (`EXPORT_SYMBOL`): the bundle's module exports
    /// them, so that modules loaded later link against them as they would against the new
    /// kernel's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<Export>,
    /// Bytes of running-kernel objects the new code reads as a member the old layout did
    /// not have (added in a padding hole): right only while they hold zero, so the switch
    /// is refused unless every one does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zeroed: Vec<Zeroed>,
}

/// One new export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// The exported name.
    pub name: String,
    /// The bundle object's symbol it names (a new function the bundle carries); `None`:
    /// the running kernel's symbol `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// `EXPORT_SYMBOL_GPL`: only GPL-compatible modules may use it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpl: bool,
    /// `EXPORT_SYMBOL_NS`: a user must import this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The most frame-local types one bundle may change.
pub const MAX_FRAME_TYPES: usize = 16;

/// Which kernel build the bundle was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Hex GNU build ID of the target vmlinux.
    pub build_id: String,
    pub release: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    /// Function in the running kernel to redirect.
    pub old: String,
    /// Source file of `old`, to pick one of several statics with the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_file: Option<String>,
    /// The loaded module `old` is in; `None` for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Function in the bundle that replaces it.
    pub new: String,
    /// Offset of the 5-byte fentry NOP in `old`: 0, or 4 after `endbr64`.
    #[serde(default)]
    pub site_offset: u32,
    /// `old` has no fentry NOP: the `jmp` goes over its first instructions (after
    /// `endbr64`), which `expect` then covers whole. See [`crate::entry`] for when that is
    /// safe; the engine checks it again against vmlinux and the stopped guest's stacks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_fentry: bool,
    /// First bytes of `old` as they are in the live kernel at KASLR slide 0 (site as NOP5,
    /// unless `no_fentry`).
    #[serde(with = "hex_bytes")]
    pub expect: Vec<u8>,
    /// Absolute-address fields inside `expect` that move with the KASLR slide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_abs: Vec<AbsField>,
}

/// A name the bundle's object uses for a kernel symbol of another name: two statics of one
/// name from two files cannot both keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alias {
    pub symbol: String,
    /// Source file of the static; `None` for a global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// A little-endian absolute address inside `expect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbsField {
    pub offset: u32,
    /// 4 (a sign- or zero-extended 32-bit address) or 8.
    pub width: u8,
}

impl Replacement {
    /// The bytes `old` must start with in a kernel whose KASLR slide is `slide`.
    pub fn expected_bytes(&self, slide: u64) -> Vec<u8> {
        let mut out = self.expect.clone();
        for f in &self.expect_abs {
            let at = f.offset as usize;
            // Validated manifests always fit; skip rather than panic on unvalidated ones.
            let Some(field) = out.get_mut(at..at + usize::from(f.width)) else {
                continue;
            };
            match f.width {
                4 => {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(field);
                    let v = u32::from_le_bytes(b).wrapping_add(slide as u32);
                    field.copy_from_slice(&v.to_le_bytes());
                }
                8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(field);
                    let v = u64::from_le_bytes(b).wrapping_add(slide);
                    field.copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        out
    }

    /// A label for messages: `old` or `old@file`.
    pub fn label(&self) -> String {
        let base = match &self.old_file {
            Some(f) => format!("{}@{f}", self.old),
            None => self.old.clone(),
        };
        match &self.module {
            Some(m) => format!("{base} [{m}]"),
            None => base,
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError::InvalidManifest {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_symbol_name(field: &str, name: &str) -> Result<(), BundleError> {
    if name.is_empty() || name.len() > MAX_SYMBOL {
        return Err(invalid(
            field,
            format!("must be a symbol name of 1..{MAX_SYMBOL} characters"),
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("`{name}` contains whitespace or non-ASCII; give the ELF symbol name"),
        ));
    }
    Ok(())
}

/// Source paths in a manifest are relative to the kernel tree and name a
/// file in it: no absolute paths, no `..` climbing out of it.
fn check_source_path(field: &str, path: &str) -> Result<(), BundleError> {
    if path.trim().is_empty() {
        return Err(invalid(field, "is empty; omit it or give a path"));
    }
    if path.len() > MAX_PATH {
        return Err(invalid(
            field,
            format!(
                "is {} bytes long; a source path has at most {MAX_PATH}",
                path.len()
            ),
        ));
    }
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(invalid(
            field,
            "must be a path relative to the kernel tree (e.g. fs/proc/cmdline.c), without `..`",
        ));
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates manifest JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, BundleError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| BundleError::ManifestJson { source: e })?;
        m.validate()?;
        Ok(m)
    }

    /// Serializes to the pretty JSON stored in the section.
    pub fn to_json(&self) -> Result<Vec<u8>, BundleError> {
        serde_json::to_vec_pretty(self).map_err(|e| BundleError::ManifestJson { source: e })
    }

    /// Checks everything that can be checked without the object file.
    pub fn validate(&self) -> Result<(), BundleError> {
        if self.format != FORMAT_VERSION {
            return Err(BundleError::UnsupportedFormat { found: self.format });
        }
        let id_ok = (1..=64).contains(&self.id.len())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            // It names files and is passed on command lines.
            && !matches!(self.id.as_str(), "." | "..")
            && !self.id.starts_with('-');
        if !id_ok {
            return Err(invalid(
                "id",
                format!(
                    "`{}` must be 1..64 characters from [A-Za-z0-9._-], not `.` or `..` and \
                     not starting with `-` (it names files and logs)",
                    self.id
                ),
            ));
        }
        let bid = &self.target.build_id;
        if bid.is_empty() || bid.len() > 128 || hex::decode(bid).is_err() {
            return Err(invalid(
                "target.build_id",
                format!(
                    "`{bid}` is not an even-length hex string; copy it from \
                     `readelf -n vmlinux` (Build ID)"
                ),
            ));
        }
        let limits = [
            (
                "description",
                self.description.len(),
                MAX_DESCRIPTION,
                "bytes",
            ),
            (
                "target.release",
                self.target.release.len(),
                MAX_RELEASE,
                "bytes",
            ),
            (
                "replacements",
                self.replacements.len(),
                MAX_REPLACEMENTS,
                "entries",
            ),
            ("rewrites", self.rewrites.len(), MAX_REWRITES, "entries"),
            (
                "frame_types",
                self.frame_types.len(),
                MAX_FRAME_TYPES,
                "entries",
            ),
            (
                "prototypes",
                self.prototypes.len(),
                MAX_FRAME_TYPES,
                "entries",
            ),
            ("resolve", self.resolve.len(), MAX_NAMES, "entries"),
            ("exports", self.exports.len(), MAX_NAMES, "entries"),
            ("aliases", self.aliases.len(), MAX_NAMES, "entries"),
            ("zeroed", self.zeroed.len(), MAX_ZEROED, "entries"),
        ];
        for (field, len, max, unit) in limits {
            if len > max {
                return Err(invalid(
                    field,
                    format!(
                        "has {len} {unit}, more than the {max} allowed (the registry in the \
                         guest must hold every applied bundle's record); split the bundle or \
                         shorten it"
                    ),
                ));
            }
        }
        if self.target.release.trim().is_empty() {
            return Err(invalid(
                "target.release",
                "is empty; give the kernel release, e.g. 6.1.0",
            ));
        }
        if self.replacements.is_empty() && self.rewrites.is_empty() && self.exports.is_empty() {
            return Err(invalid(
                "replacements",
                "is empty; a bundle must replace at least one function, rewrite an object or \
                 export a symbol",
            ));
        }
        for (i, r) in self.rewrites.iter().enumerate() {
            validate_rewrite(i, r)?;
            if self.rewrites[..i].iter().any(|o| o.label() == r.label()) {
                return Err(invalid(
                    format!("rewrites[{i}].old"),
                    format!("`{}` is rewritten twice", r.label()),
                ));
            }
        }
        let mut seen: HashMap<&str, Vec<Option<&str>>> = HashMap::new();
        for (i, r) in self.replacements.iter().enumerate() {
            self.validate_replacement(i, r)?;
            let files = seen.entry(r.old.as_str()).or_default();
            // The same name twice is only meaningful as two different statics.
            if files
                .iter()
                .any(|f| f.is_none() || r.old_file.is_none() || *f == r.old_file.as_deref())
            {
                return Err(BundleError::DuplicateOld { old: r.label() });
            }
            files.push(r.old_file.as_deref());
        }
        for (alias, a) in &self.aliases {
            check_symbol_name("aliases", alias)?;
            check_symbol_name(&format!("aliases.{alias}.symbol"), &a.symbol)?;
            if let Some(file) = &a.file {
                check_source_path(&format!("aliases.{alias}.file"), file)?;
            }
        }
        for (i, t) in self.frame_types.iter().enumerate() {
            let name = t
                .strip_prefix("struct ")
                .or_else(|| t.strip_prefix("union "));
            let ident = |n: &str| {
                n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !n.is_empty()
                    && n.len() <= MAX_SYMBOL
                    && !n.as_bytes()[0].is_ascii_digit()
            };
            if !name.is_some_and(ident) {
                return Err(invalid(
                    format!("frame_types[{i}]"),
                    format!("`{t}` is not `struct <name>` or `union <name>` with a C name"),
                ));
            }
        }
        for (i, e) in self.exports.iter().enumerate() {
            check_symbol_name(&format!("exports[{i}].name"), &e.name)?;
            if let Some(s) = &e.symbol {
                check_symbol_name(&format!("exports[{i}].symbol"), s)?;
            }
            if let Some(ns) = &e.namespace {
                check_symbol_name(&format!("exports[{i}].namespace"), ns)?;
            }
            if self.exports[..i].iter().any(|o| o.name == e.name) {
                return Err(invalid(
                    format!("exports[{i}].name"),
                    format!("`{}` is exported twice", e.name),
                ));
            }
        }
        for (sym, file) in &self.resolve {
            check_symbol_name("resolve", sym)?;
            if file.trim().is_empty() {
                return Err(invalid(
                    format!("resolve.{sym}"),
                    "is empty; give the source file (e.g. kernel/sys.c)",
                ));
            }
            check_source_path(&format!("resolve.{sym}"), file)?;
        }
        Ok(())
    }

    fn validate_replacement(&self, i: usize, r: &Replacement) -> Result<(), BundleError> {
        let f = |name: &str| format!("replacements[{i}].{name}");
        check_symbol_name(&f("old"), &r.old)?;
        check_symbol_name(&f("new"), &r.new)?;
        if let Some(m) = &r.module {
            let ok = (1..56).contains(&m.len())
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
            if !ok {
                return Err(invalid(
                    f("module"),
                    format!("`{m}` is not a module name (1..55 characters of [A-Za-z0-9_-])"),
                ));
            }
        }
        if let Some(file) = &r.old_file {
            check_source_path(&f("old_file"), file)?;
        }
        let site = match r.site_offset {
            0 => 0usize,
            4 => 4,
            n => {
                return Err(invalid(
                    f("site_offset"),
                    format!("is {n}; it must be 0, or 4 when `old` starts with endbr64"),
                ))
            }
        };
        let n = r.expect.len();
        if n > MAX_EXPECT || n < site + NOP5.len() {
            return Err(invalid(
                f("expect"),
                format!(
                    "has {n} bytes; it must cover the fentry site (at least {} bytes) and be \
                     at most {MAX_EXPECT}",
                    site + NOP5.len()
                ),
            ));
        }
        if site == 4 && r.expect[..4] != ENDBR64 {
            return Err(invalid(
                f("expect"),
                "does not start with endbr64 (f3 0f 1e fa) although site_offset is 4",
            ));
        }
        if r.module.is_some() && r.no_fentry {
            return Err(invalid(
                f("no_fentry"),
                "is set for a module function; only vmlinux functions can be redirected \
                 without an fentry site (their first bytes are checked against vmlinux)",
            ));
        }
        if !r.no_fentry && r.expect[site..site + 5] != NOP5 {
            return Err(invalid(
                f("expect"),
                format!(
                    "bytes {site}..{} are {}, not the fentry NOP5 0f1f440000; record them as \
                     the NOP ftrace leaves at boot",
                    site + 5,
                    hex::encode(&r.expect[site..site + 5])
                ),
            ));
        }
        let mut covered = vec![false; n];
        for (j, a) in r.expect_abs.iter().enumerate() {
            let name = f(&format!("expect_abs[{j}]"));
            if a.width != 4 && a.width != 8 {
                return Err(invalid(
                    name,
                    format!("width is {}; it must be 4 or 8", a.width),
                ));
            }
            let start = a.offset as usize;
            let end = start + usize::from(a.width);
            if end > n {
                return Err(invalid(
                    name,
                    format!("bytes {start}..{end} run past the {n} expected bytes"),
                ));
            }
            if !r.no_fentry && start < site + 5 && end > site {
                return Err(invalid(name, "overlaps the fentry site"));
            }
            if covered[start..end].iter().any(|&c| c) {
                return Err(invalid(name, "overlaps another expect_abs field"));
            }
            covered[start..end].iter_mut().for_each(|c| *c = true);
        }
        Ok(())
    }
}

/// `Vec<u8>` as a hex string in JSON (also used by the registry).
pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        hex::decode(&compact)
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a hex byte string ({e})")))
    }
}
