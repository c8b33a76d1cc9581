//! Bundle format v1: an x86-64 ELF relocatable object with a JSON manifest in the
//! non-allocated section `.lucos.manifest` (see docs/bundle-format.md).

use object::elf;
use object::read::elf::{FileHeader, SectionHeader};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::elf::{check_header, parse_object, Object, SymPlace};
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
    #[error("malformed or truncated ELF object: {what}; rebuild the bundle")]
    Malformed { what: String },
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
    pub(crate) object: Object,
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
        let object = parse_object(bytes)?;
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

fn manifest_bytes(object: &Object) -> Result<&[u8], BundleError> {
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
    let mut json = section.data.as_slice();
    while let [rest @ .., 0] = json {
        json = rest;
    }
    Ok(json)
}

fn check_new_function(object: &Object, new: &str) -> Result<(), BundleError> {
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

fn pack_err(reason: impl Into<String>) -> BundleError {
    BundleError::Pack {
        reason: reason.into(),
    }
}

fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

const SHDR_SIZE: usize = 64;

/// Returns `object` with `.lucos.manifest` set to `manifest`, added or replaced.
///
/// Written in place rather than via objcopy: existing bytes and section indices stay as they
/// are (symbols and relocations refer to indices); the manifest, a grown section-name table
/// and a new section header table are appended. The result is validated with
/// [`Bundle::parse`].
///
/// The result is unsigned (a signature of `object` is dropped: it no longer matches).
pub fn pack(object: &[u8], manifest: &Manifest) -> Result<Vec<u8>, BundleError> {
    let object = signing::strip(object);
    manifest.validate()?;
    let json = manifest.to_json()?;
    let header = check_header(object)?;
    let endian = header.endian().map_err(|e| pack_err(e.to_string()))?;
    let table = header
        .sections(endian, object)
        .map_err(|e| BundleError::Malformed {
            what: format!("section header table: {e}"),
        })?;
    let shnum = table.len();
    let shoff = header.e_shoff(endian) as usize;
    let shstrndx = usize::from(header.e_shstrndx(endian));
    if header.e_shnum(endian) == 0 || shstrndx == usize::from(elf::SHN_XINDEX) || shstrndx == 0 {
        return Err(pack_err(
            "the object uses extended section numbering or has no section-name table; \
             split it into smaller objects",
        ));
    }
    if shnum + 1 >= usize::from(elf::SHN_LORESERVE) {
        return Err(pack_err("the object has too many sections to add one more"));
    }
    let mut headers: Vec<[u8; SHDR_SIZE]> = Vec::with_capacity(shnum + 1);
    for i in 0..shnum {
        let at = shoff + i * SHDR_SIZE;
        let raw = object
            .get(at..at + SHDR_SIZE)
            .ok_or_else(|| pack_err("section header table runs past the end of the file"))?;
        let mut h = [0u8; SHDR_SIZE];
        h.copy_from_slice(raw);
        headers.push(h);
    }
    let existing: Vec<usize> = table
        .iter()
        .enumerate()
        .filter(|(_, sh)| table.section_name(endian, sh) == Ok(MANIFEST_SECTION.as_bytes()))
        .map(|(i, _)| i)
        .collect();
    if existing.len() > 1 {
        return Err(pack_err(format!(
            "the object already has {} {MANIFEST_SECTION} sections",
            existing.len()
        )));
    }

    let mut out = object.to_vec();
    // Drop the old header table when it is the file's tail; it is rewritten below.
    if shoff + shnum * SHDR_SIZE == out.len() {
        out.truncate(shoff);
    }
    let manifest_off = out.len() as u64;
    out.extend_from_slice(&json);

    let name_off = match existing.first() {
        Some(&i) => {
            u32::from_le_bytes([headers[i][0], headers[i][1], headers[i][2], headers[i][3]])
        }
        None => {
            let shstr = table.section(object::SectionIndex(shstrndx)).map_err(|e| {
                BundleError::Malformed {
                    what: format!("section-name table: {e}"),
                }
            })?;
            let mut names = shstr
                .data(endian, object)
                .map_err(|e| BundleError::Malformed {
                    what: format!("section-name table: {e}"),
                })?
                .to_vec();
            let name_off = u32::try_from(names.len())
                .map_err(|_| pack_err("section-name table is larger than 4 GiB"))?;
            names.extend_from_slice(MANIFEST_SECTION.as_bytes());
            names.push(0);
            let h = &mut headers[shstrndx];
            put_u64(h, 24, out.len() as u64);
            put_u64(h, 32, names.len() as u64);
            out.extend_from_slice(&names);
            name_off
        }
    };

    let mut h = [0u8; SHDR_SIZE];
    put_u32(&mut h, 0, name_off);
    put_u32(&mut h, 4, elf::SHT_PROGBITS);
    // sh_flags 0: not allocated, never loaded.
    put_u64(&mut h, 24, manifest_off);
    put_u64(&mut h, 32, json.len() as u64);
    put_u64(&mut h, 48, 1);
    match existing.first() {
        Some(&i) => headers[i] = h,
        None => headers.push(h),
    }

    while out.len() & 7 != 0 {
        out.push(0);
    }
    let new_shoff = out.len() as u64;
    for h in &headers {
        out.extend_from_slice(h);
    }
    put_u64(&mut out, 0x28, new_shoff);
    put_u16(&mut out, 0x3c, headers.len() as u16);

    Bundle::parse(&out)?;
    Ok(out)
}
