//! Members added in a struct's padding holes, made safe by proving that every object the
//! running kernel has holds zero there (the value an initializer gives a member it does
//! not name).
//!
//! Old code never touches those bytes, so old objects keep whatever was there when they
//! were made. Static objects were made by the compiler, which writes zero into padding;
//! the dbg vmlinux lists them ([`super::instances`]) and their bytes are checked in
//! vmlinux here, and again live before the switch (the manifest's `zeroed`). Objects
//! made at run time could hold anything: a type that any compile unit points to without
//! `const` (so code could fill one) is refused. Modules' statics are the compiler's too.

use std::ops::Range;

use lucos_introspect::symbols::KernelSymbols;
use lucos_patch::{Zeroed, MAX_ZEROED};

use super::error::{DiffError, DwarfError, Refusal};
use crate::tree::KernelTree;

/// A type whose new layout only adds members in padding (see [`super::layout::padding_only`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Padded {
    pub type_name: String,
    /// The object's source, for the refusal.
    pub file: String,
    /// The layout difference, for the refusal.
    pub what: String,
    /// Why its objects outlive a call (the frames check), for a refusal without vmlinux.
    pub lives: String,
    /// Byte ranges of the added members.
    pub holes: Vec<Range<u64>>,
    /// The type's size (the stride of arrays of it).
    pub size: u64,
}

impl Padded {
    /// The layout refusal of this type, its objects living as `lives` says.
    pub(crate) fn refusal(&self, lives: String) -> Refusal {
        Refusal::TypeLayout {
            type_name: self.type_name.clone(),
            file: self.file.clone(),
            what: self.what.clone(),
            lives,
            removed: Vec::new(),
        }
    }
}

/// The zero checks that make `padded` safe, or the refusal of each type that cannot be.
pub(crate) fn prove(
    tree: &KernelTree,
    syms: &KernelSymbols,
    padded: &[Padded],
    refusals: &mut Vec<Refusal>,
) -> Result<Vec<Zeroed>, DiffError> {
    let mut zeroed = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for p in padded.iter().filter(|p| seen.insert(p.type_name.clone())) {
        match checks_for(tree, syms, p)? {
            Ok(mut z) => zeroed.append(&mut z),
            Err(lives) => refusals.push(p.refusal(lives)),
        }
    }
    if zeroed.len() > MAX_ZEROED {
        let many = format!(
            "{} ranges of its objects' padding would have to be checked, more than {MAX_ZEROED}",
            zeroed.len()
        );
        refusals.extend(padded.iter().map(|p| p.refusal(many.clone())));
        zeroed.clear();
    }
    Ok(zeroed)
}

/// The checks for one type, or why its objects cannot be proven zeroed (the refusal's
/// `lives`).
fn checks_for(
    tree: &KernelTree,
    syms: &KernelSymbols,
    p: &Padded,
) -> Result<Result<Vec<Zeroed>, String>, DiffError> {
    let build_id = syms.build_id_hex().unwrap_or_else(|_| "no-build-id".into());
    let slug: String = p
        .type_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cache = tree.index_file(&format!("instances-{slug}.json"));
    let found = match super::instances::load_or_scan(&tree.vmlinux, &build_id, &p.type_name, &cache)
    {
        Ok(f) => f,
        Err(DiffError::VmlinuxDwarf {
            source: DwarfError::NoDebugInfo,
            ..
        }) => {
            return Ok(Err(
                "vmlinux has no debug info to list its objects; use the -dbg package's vmlinux"
                    .into(),
            ))
        }
        Err(e) => return Err(e),
    };
    if let Some(first) = found.writable_pointers.first() {
        return Ok(Err(format!(
            "code may fill objects of it at run time: {first} and {} other unit(s) point to it \
             without `const`, so their padding is not known to be zero",
            found.writable_pointers.len() - 1
        )));
    }
    let mut out = Vec::new();
    for v in &found.vars {
        if !syms.in_image(v.addr) {
            // A per-CPU variable's DWARF address is an offset into each CPU's copy.
            return Ok(Err(format!(
                "`{}` ({:#x}) is not in a section of the kernel image (a per-CPU variable?), \
                 so lucos cannot check it",
                v.name, v.addr
            )));
        }
        for i in 0..v.count {
            for h in &p.holes {
                let addr = v.addr + i * p.size + h.start;
                let len = h.end - h.start;
                let bytes = syms.section_bytes(addr, len as usize);
                if let Ok(b) = &bytes {
                    if b.iter().any(|&x| x != 0) {
                        return Ok(Err(format!(
                            "`{}` holds {b:02x?} where a new member goes (vmlinux {addr:#x})",
                            v.name
                        )));
                    }
                }
                out.push(Zeroed {
                    object: v.name.clone(),
                    addr,
                    len: len as u32,
                });
            }
        }
        if out.len() > MAX_ZEROED {
            break;
        }
    }
    tracing::info!(
        type_name = %p.type_name,
        objects = found.vars.len(),
        checks = out.len(),
        "members added in padding: every object is static and zero there"
    );
    Ok(Ok(out))
}
