//! Bundle format v1: an x86-64 ELF relocatable object with a JSON manifest in the
//! non-allocated section `.lucos.manifest` (see docs/bundle-format.md).

use object::elf;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::elf::{detail, ElfError, Object, SymPlace};
use crate::manifest::Manifest;
use crate::signing::{self, SignatureError, Signer};
use crate::trust::TrustStore;

/// Name of the section holding the manifest JSON.
pub const MANIFEST_SECTION: &str = ".lucos.manifest";

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("not an ELF file (no \\x7fELF magic); a bundle is an ELF relocatable object")]
    NotElf,
    #[error("wrong kind of ELF file: {what}")]
    WrongFormat { what: String },
    #[error("malformed or truncated ELF object: {what}{}; rebuild the bundle", detail(.source))]
    Malformed {
        what: String,
        #[source]
        source: Option<object::read::Error>,
    },
    #[error(
        "no {MANIFEST_SECTION} section: this is a plain object, not a bundle; add a manifest \
         with lucos_patch::pack"
    )]
    NoManifest,
    #[error("{what}; a bundle must have exactly one non-allocated {MANIFEST_SECTION} section")]
    BadManifestSection { what: String },
    #[error("manifest is not valid manifest JSON: {source}")]
    ManifestJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest format {found} is not supported; this lucos reads format 1 only")]
    UnsupportedFormat { found: u32 },
    #[error("manifest field `{field}` {reason}")]
    InvalidManifest { field: String, reason: String },
    #[error(
        "function `{old}` is replaced twice; list each old function once (use old_file to tell \
         statics with the same name apart)"
    )]
    DuplicateOld { old: String },
    #[error("replacement function `{new}` {reason}")]
    BadNewFunction { new: String, reason: String },
    #[error("cannot pack the bundle: {reason}")]
    Pack { reason: String },
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// A parsed, validated bundle. Owns its bytes' contents; cheap to share by reference.
#[derive(Debug, Clone)]
pub struct Bundle {
    manifest: Manifest,
    pub(crate) object: Object<'static>,
    sha256: [u8; 32],
    signer: Option<Signer>,
}

impl Bundle {
    /// Checks the signature over the raw bytes against `trust`, then parses the signed
    /// object. The only way to get a bundle the engine applies.
    pub fn open(file: &[u8], trust: &TrustStore) -> Result<Bundle, BundleError> {
        let (body, signer) = signing::verify(file, trust)?;
        let mut bundle = Bundle::parse(body)?;
        bundle.signer = Some(signer);
        Ok(bundle)
    }

    /// Parses and validates a bundle without checking its signature (a signature trailer
    /// is ignored): for inspecting and building, not applying. Never panics on malformed
    /// input.
    pub fn parse(file: &[u8]) -> Result<Bundle, BundleError> {
        let bytes = signing::strip(file);
        let object = Object::parse(bytes)?.into_owned();
        let json = manifest_bytes(&object)?;
        let manifest = Manifest::from_json(json)?;
        for r in &manifest.replacements {
            check_new_function(&object, &r.new)?;
        }
        Ok(Bundle {
            manifest,
            object,
            sha256: Sha256::digest(bytes).into(),
            signer: None,
        })
    }

    /// Who signed the bundle, when it was opened with [`Bundle::open`].
    pub fn signer(&self) -> Option<&Signer> {
        self.signer.as_ref()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the bundle's object (the file without its signature), to identify exactly
    /// what was applied whoever signed it.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
}

/// The bundle's view of a bad object: the same facts, with what to do about them.
impl From<ElfError> for BundleError {
    fn from(e: ElfError) -> BundleError {
        match e {
            ElfError::NotElf => BundleError::NotElf,
            ElfError::WrongFormat { what } => BundleError::WrongFormat { what },
            ElfError::Malformed { what, source } => BundleError::Malformed { what, source },
        }
    }
}

fn manifest_bytes<'a>(object: &'a Object<'_>) -> Result<&'a [u8], BundleError> {
    let mut found = object
        .sections
        .iter()
        .filter(|s| s.name == MANIFEST_SECTION);
    let section = found.next().ok_or(BundleError::NoManifest)?;
    if found.next().is_some() {
        return Err(BundleError::BadManifestSection {
            what: format!("there are several {MANIFEST_SECTION} sections"),
        });
    }
    if section.is_alloc() {
        return Err(BundleError::BadManifestSection {
            what: format!("{MANIFEST_SECTION} is SHF_ALLOC, so it would be loaded"),
        });
    }
    if section.is_nobits() {
        return Err(BundleError::BadManifestSection {
            what: format!("{MANIFEST_SECTION} is SHT_NOBITS (has no contents)"),
        });
    }
    // Tolerate the NUL terminator of an assembler `.asciz`.
    let mut json = &section.data[..];
    while let [rest @ .., 0] = json {
        json = rest;
    }
    Ok(json)
}

fn check_new_function(object: &Object<'_>, new: &str) -> Result<(), BundleError> {
    let bad = |reason: String| BundleError::BadNewFunction {
        new: new.to_string(),
        reason,
    };
    let defs: Vec<_> = object
        .symbols
        .iter()
        .filter(|s| s.name == new && s.kind != elf::STT_SECTION && s.kind != elf::STT_FILE)
        .filter(|s| s.place != SymPlace::Undefined)
        .collect();
    let sym = match defs.as_slice() {
        [] => {
            return Err(bad(
                "is not defined in the object; check the name (statics may get a suffix such \
                 as .constprop.0) and that it is not inlined away (mark it noinline)"
                    .into(),
            ))
        }
        [one] => *one,
        _ => {
            return Err(bad(
                "is defined more than once in the object; rename one of them".into(),
            ))
        }
    };
    if sym.kind != elf::STT_FUNC {
        return Err(bad(format!(
            "is a symbol of ELF type {}, not a function (STT_FUNC)",
            sym.kind
        )));
    }
    let SymPlace::Section(idx) = sym.place else {
        return Err(bad("is not defined in a section of the object".into()));
    };
    let section = &object.sections[idx];
    if !(section.is_alloc() && section.is_exec()) {
        return Err(bad(format!(
            "is in section {}, which is not an executable (text) section",
            section.name
        )));
    }
    Ok(())
}
