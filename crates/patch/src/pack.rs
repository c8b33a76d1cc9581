//! Adding or replacing a bundle's manifest section in an existing object.

use object::elf::{self, FileHeader64, SectionHeader64};
use object::read::elf::{FileHeader, SectionHeader};
use object::{bytes_of, bytes_of_slice, Endianness, U32, U64};

use crate::bundle::{Bundle, BundleError, MANIFEST_SECTION};
use crate::elf::check_header;
use crate::manifest::Manifest;
use crate::signing;

/// Alignment of an ELF64 section header table (its widest field is an `Elf64_Xword`;
/// `object`'s endian-aware fields are byte arrays, so `align_of` says 1).
const SHDR_ALIGN: usize = 8;

fn pack_err(reason: impl Into<String>) -> BundleError {
    BundleError::Pack {
        reason: reason.into(),
    }
}

fn malformed(what: &str, e: object::read::Error) -> BundleError {
    BundleError::Malformed {
        what: what.to_string(),
        source: Some(e),
    }
}

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
    let endian = header.endian().map_err(|e| malformed("ELF header", e))?;
    let table = header
        .sections(endian, object)
        .map_err(|e| malformed("section header table", e))?;
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
    // `sections` checked that the table lies within the file.
    let mut headers: Vec<SectionHeader64<Endianness>> = table.iter().copied().collect();
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
    if shoff + size_of_val(&headers[..]) == out.len() {
        out.truncate(shoff);
    }
    let manifest_off = out.len() as u64;
    out.extend_from_slice(&json);

    let name_off = match existing.first() {
        Some(&i) => headers[i].sh_name.get(endian),
        None => {
            let shstr = table
                .section(object::SectionIndex(shstrndx))
                .map_err(|e| malformed("section-name table", e))?;
            let mut names = shstr
                .data(endian, object)
                .map_err(|e| malformed("section-name table", e))?
                .to_vec();
            let name_off = u32::try_from(names.len())
                .map_err(|_| pack_err("section-name table is larger than 4 GiB"))?;
            names.extend_from_slice(MANIFEST_SECTION.as_bytes());
            names.push(0);
            let h = &mut headers[shstrndx];
            h.sh_offset.set(endian, out.len() as u64);
            h.sh_size.set(endian, names.len() as u64);
            out.extend_from_slice(&names);
            name_off
        }
    };

    let h = SectionHeader64 {
        sh_name: U32::new(endian, name_off),
        sh_type: U32::new(endian, elf::SHT_PROGBITS),
        // Not allocated: never loaded.
        sh_flags: U64::new(endian, 0),
        sh_addr: U64::new(endian, 0),
        sh_offset: U64::new(endian, manifest_off),
        sh_size: U64::new(endian, json.len() as u64),
        sh_link: U32::new(endian, 0),
        sh_info: U32::new(endian, 0),
        sh_addralign: U64::new(endian, 1),
        sh_entsize: U64::new(endian, 0),
    };
    match existing.first() {
        Some(&i) => headers[i] = h,
        None => headers.push(h),
    }

    out.resize(out.len().next_multiple_of(SHDR_ALIGN), 0);
    let mut file_header: FileHeader64<Endianness> = *header;
    file_header.e_shoff.set(endian, out.len() as u64);
    file_header.e_shnum.set(endian, headers.len() as u16);
    out.extend_from_slice(bytes_of_slice(&headers));
    out[..size_of_val(&file_header)].copy_from_slice(bytes_of(&file_header));

    Bundle::parse(&out)?;
    Ok(out)
}
