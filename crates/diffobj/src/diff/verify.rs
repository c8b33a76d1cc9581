//! Verify, before emitting: object-level checks (type layouts, new exports) and proof that
//! the tree compiles the running kernel.
//!
//! **Run-pre** (after Ksplice): the original compile of every function a bundle redirects
//! must be byte for byte the function in vmlinux, except where the linker or the boot
//! rewrites it — relocated fields (calls, data addresses, the `call __fentry__`) and
//! static-branch sites, which objtool turns into NOPs in the kernel's own build. vmlinux
//! stands for the running kernel here: the engine refuses a bundle whose build id is not
//! the live kernel's, and re-checks the live entry bytes before it writes. A mismatch
//! means another compiler, another config or another source version: then the "changed
//! function" lucos found is not a change of *this* kernel, and nothing is emitted.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Decoder, DecoderOptions, Instruction};
use lucos_introspect::symbols::KernelSymbols;
use object::elf;

use super::compare::Diff;
use super::error::{DiffError, DwarfError, Refusal};
use super::include::Redirect;
use super::layout::Layout;
use super::obj::{Obj, Target};

/// Width of the field a relocation patches.
fn reloc_width(r_type: u32) -> usize {
    match r_type {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 => 8,
        _ => 4,
    }
}

/// Which bytes of function `sym` of `obj` the link or the kernel's build may change.
fn masked(obj: &Obj, sym: usize) -> Vec<bool> {
    let s = &obj.symbols[sym];
    let len = s.size as usize;
    let mut mask = vec![false; len];
    let mut hide = |from: usize, width: usize| {
        for m in mask.iter_mut().skip(from).take(width) {
            *m = true;
        }
    };
    for r in obj.sym_relocs(sym) {
        let at = r.offset.saturating_sub(s.value) as usize;
        hide(at, reloc_width(r.r_type));
    }
    // Static-branch sites: `struct jump_entry` starts with a PC32 to the site.
    let code = obj.sym_bytes(sym);
    for (si, sec) in obj.sections.iter().enumerate() {
        if sec.name != "__jump_table" {
            continue;
        }
        for r in sec.relocs.iter().filter(|r| r.offset % 16 == 0) {
            if let Target::Sym { sym: t, addend } = obj.target(si, r) {
                if t == sym && addend >= 0 {
                    let at = addend as usize;
                    hide(at, insn_len(code, at).unwrap_or(5));
                }
            }
        }
    }
    mask
}

fn insn_len(code: &[u8], at: usize) -> Option<usize> {
    let mut d = Decoder::with_ip(64, code.get(at..)?, 0, DecoderOptions::NONE);
    let i = d.decode();
    (!i.is_invalid()).then_some(i.len())
}

/// The instruction of `code` (starting at `addr`) that covers `offset`, as text.
fn insn_text(code: &[u8], offset: usize, addr: u64) -> String {
    let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    let mut fmt = iced_x86::FastFormatter::new();
    while d.can_decode() {
        d.decode_out(&mut insn);
        let start = (insn.ip() - addr) as usize;
        if offset < start + insn.len() {
            let mut out = String::new();
            fmt.format(&insn, &mut out);
            let bytes = hex::encode(&code[start..(start + insn.len()).min(code.len())]);
            return format!("{out} [{bytes}]");
        }
    }
    "(undecodable)".into()
}

/// The run-pre check for one redirect; `None` when it passes.
pub(crate) fn run_pre(
    diffs: &[Diff<'_>],
    r: &Redirect,
    spec: &str,
    syms: &KernelSymbols,
) -> Option<Refusal> {
    let d = &diffs[r.obj];
    let o = d.twin[r.sym]?;
    let ours = d.orig.sym_bytes(o);
    let refuse = |reason: String| {
        Some(Refusal::RunPre {
            function: r.old.clone(),
            file: r.old_file.clone().unwrap_or_else(|| d.file.clone()),
            reason,
        })
    };
    let k = match syms.resolve_spec(spec) {
        Ok(k) => k,
        Err(e) => return refuse(format!("vmlinux has no such function ({e})")),
    };
    let len = ours.len().min(k.size as usize);
    let theirs = match syms.section_bytes(k.addr, len) {
        Ok(b) => b,
        Err(e) => return refuse(format!("its code cannot be read from vmlinux ({e})")),
    };
    let mask = masked(d.orig, o);
    let first = (0..len).find(|&i| !mask[i] && ours[i] != theirs[i]);
    let at = |i: usize| {
        format!(
            "at +{i:#x} the tree compiles `{}` where the running kernel has `{}`",
            insn_text(ours, i, k.addr),
            insn_text(&theirs, i, k.addr)
        )
    };
    if k.size as usize != ours.len() {
        return refuse(format!(
            "the running kernel's `{}` is {} bytes but the tree compiles {} bytes{} (or it \
             is another definition, e.g. a __weak one overridden elsewhere)",
            k.qualified_name(),
            k.size,
            ours.len(),
            first.map(|i| format!("; {}", at(i))).unwrap_or_default()
        ));
    }
    first.map(at).and_then(refuse)
}

/// A symbol the patched object exports and the original did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewExport {
    pub name: String,
    pub gpl: bool,
    /// `EXPORT_SYMBOL_NS`'s namespace (`__kstrtabns_<name>`), if any.
    pub namespace: Option<String>,
}

/// Exports (`___ksymtab+name` / `___ksymtab_gpl+name` sections) the patched object has and
/// the original had not. The comparison ignores export tables, since existing exports do
/// not change with a fix; a new one would be lost without a word, so the bundle's module
/// exports it.
pub(crate) fn new_exports(orig: &Obj, patched: &Obj) -> Vec<NewExport> {
    let exports = |o: &Obj| -> BTreeMap<String, bool> {
        o.sections
            .iter()
            .filter_map(|s| {
                let (kind, name) = s.name.strip_prefix("___ksymtab")?.split_once('+')?;
                Some((name.to_string(), kind == "_gpl"))
            })
            .collect()
    };
    let old = exports(orig);
    exports(patched)
        .into_iter()
        .filter(|(n, _)| !old.contains_key(n))
        .map(|(name, gpl)| {
            let ns = format!("__kstrtabns_{name}");
            let namespace = (0..patched.symbols.len())
                .find(|&i| patched.symbols[i].name == ns)
                .map(|i| patched.sym_bytes(i))
                .map(|b| b.split(|&c| c == 0).next().unwrap_or_default())
                .filter(|b| !b.is_empty())
                .map(|b| String::from_utf8_lossy(b).into_owned());
            NewExport {
                name,
                gpl,
                namespace,
            }
        })
        .collect()
}

/// What the layout check of one object found: refusals, and the types whose layout changes
/// but whose instances live only in frames ([`super::frames`]), so that a consistent switch
/// makes the change safe.
#[derive(Debug, Default)]
pub(crate) struct LayoutCheck {
    pub refusals: Vec<Refusal>,
    pub frame_types: Vec<String>,
    /// Types that only add members in padding holes: refused unless
    /// [`super::padding`] proves every old object holds zero there.
    pub padded: Vec<super::padding::Padded>,
    /// Functions whose prototype differs between the compiles: name → how.
    pub prototypes: BTreeMap<String, String>,
}

/// An object's type layouts and function prototypes, from one read of its DWARF.
fn read_dwarf(
    bytes: &[u8],
) -> Result<(BTreeMap<String, Layout>, super::signature::Prototypes), DwarfError> {
    let (mut types, mut functions) = (BTreeMap::new(), BTreeMap::new());
    super::dwarf::each_unit(bytes, "a unit's types and functions", |dwarf, unit| {
        super::layout::collect(dwarf, unit, &mut types)?;
        super::signature::collect(dwarf, unit, &mut functions)
    })?;
    Ok((super::layout::known(types), functions))
}

/// Checks every struct or union the original object knew whose layout the patched one
/// changes: frame-local in both compiles, or refused.
pub(crate) fn layout_check(
    object: &str,
    source: &str,
    orig: &[u8],
    patched: &[u8],
) -> Result<LayoutCheck, DiffError> {
    let dwarf_error = |source| DiffError::ObjectDwarf {
        object: object.to_string(),
        source,
    };
    let read = |bytes: &[u8]| read_dwarf(bytes).map_err(dwarf_error);
    let ((old, old_fns), (new, new_fns)) = (read(orig)?, read(patched)?);
    let prototypes = super::signature::changed(&old_fns, &new_fns);
    if old.is_empty() {
        tracing::warn!(
            %object,
            "no debug info: struct layout changes cannot be checked (build the kernel with \
             CONFIG_DEBUG_INFO)"
        );
    }
    type Change = (
        String,
        Vec<String>,
        Option<(Vec<std::ops::Range<u64>>, u64)>,
    );
    let changed: BTreeMap<String, Change> = old
        .iter()
        .filter_map(|(name, o)| {
            let n = new.get(name)?;
            let what = super::layout::first_difference(o, n)?;
            let removed = super::layout::only_removed(o, n).unwrap_or_default();
            let holes = super::layout::padding_only(o, n).map(|h| (h, n.size));
            Some((name.clone(), (what, removed, holes)))
        })
        .collect();
    let mut out = LayoutCheck {
        prototypes,
        ..LayoutCheck::default()
    };
    if changed.is_empty() {
        return Ok(out);
    }
    let names: BTreeSet<String> = changed.keys().cloned().collect();
    let before = super::frames::frame_local(orig, &names).map_err(dwarf_error)?;
    let after = super::frames::frame_local(patched, &names).map_err(dwarf_error)?;
    for (name, (what, removed, holes)) in changed {
        let verdict = |v: &BTreeMap<String, Result<_, String>>| v.get(&name).cloned();
        match (verdict(&before), verdict(&after)) {
            (Some(Ok(owners)), Some(Ok(_))) => {
                tracing::info!(%name, ?owners, %what, "layout changes, but only frames hold it");
                out.frame_types.push(name);
            }
            (b, a) => {
                let why = [b, a]
                    .into_iter()
                    .flatten()
                    .find_map(Result::err)
                    .unwrap_or_else(|| "its debug info does not describe it".into());
                if let Some((holes, size)) = holes {
                    tracing::info!(%name, ?holes, %what, "members added in padding only");
                    out.padded.push(super::padding::Padded {
                        type_name: name,
                        file: source.to_string(),
                        what,
                        lives: why,
                        holes,
                        size,
                    });
                    continue;
                }
                out.refusals.push(Refusal::TypeLayout {
                    type_name: name,
                    file: source.to_string(),
                    what,
                    lives: why,
                    removed,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_text_covers_the_offset() {
        // mov eax, 1 ; ret
        let code = [0xb8, 1, 0, 0, 0, 0xc3];
        assert!(insn_text(&code, 3, 0x1000).starts_with("mov eax,1"));
        assert!(insn_text(&code, 5, 0x1000).starts_with("ret"));
        assert_eq!(insn_len(&code, 0), Some(5));
        assert_eq!(reloc_width(elf::R_X86_64_PLT32), 4);
        assert_eq!(reloc_width(elf::R_X86_64_64), 8);
    }
}
