//! Manifest pieces taken from the target kernel's vmlinux: its identity, where each old
//! function's fentry site is and what its first bytes look like in the live kernel.

use std::collections::BTreeMap;
use std::path::Path;

use lucos_introspect::symbols::{
    Binding, KernelSymbols, RelocField, RelocKind, SymbolError, SymbolKind,
};
use lucos_patch::{AbsField, Replacement, Target, ENDBR64, MAX_EXPECT, NOP5};
use object::{Object, ObjectSymbol};
use tracing::debug;

use crate::error::BuildError;
use crate::tree::KernelTree;

const FENTRY: &str = "__fentry__";

/// The kernel release of a cached tree ([`KernelTree::release`]).
pub fn kernel_release(tree: &Path) -> Result<String, BuildError> {
    Ok(KernelTree::open(tree)?.release()?)
}

/// `target` of the manifest: the vmlinux build id, which the engine checks against the
/// running kernel, and the release for messages.
pub fn target_for(syms: &KernelSymbols, release: &str) -> Result<Target, BuildError> {
    Ok(Target {
        build_id: syms.build_id_hex()?,
        release: release.to_string(),
    })
}

/// Offset of the fentry site in `code` (the first bytes of a function at link-time `addr`
/// in vmlinux): a `call rel32` to `fentry` at offset 0, or at 4 after `endbr64`.
///
/// vmlinux holds the compiler's `call __fentry__`; ftrace turns it into the NOP5 at boot.
pub fn find_fentry_site(code: &[u8], addr: u64, fentry: u64) -> Option<u32> {
    let calls_fentry = |at: usize| {
        let Some(insn) = code.get(at..at + 5) else {
            return false;
        };
        // e8 is always `call rel32` in 64-bit mode; no prefix can precede it here.
        if insn[0] != 0xe8 {
            return false;
        }
        let rel = i32::from_le_bytes([insn[1], insn[2], insn[3], insn[4]]);
        let next = addr.wrapping_add(at as u64 + 5);
        next.wrapping_add(rel as i64 as u64) == fentry
    };
    if calls_fentry(0) {
        Some(0)
    } else if code.starts_with(&ENDBR64) && calls_fentry(4) {
        Some(4)
    } else {
        None
    }
}

/// `expect` and `expect_abs` from a function's first bytes (`code`, at most [`MAX_EXPECT`])
/// and the KASLR-relocated fields around them (offsets from the function start; include
/// those straddling the end of `code`).
///
/// At an fentry site the site becomes the NOP5. `expect` is cut short before any field the
/// manifest cannot express, so the engine never compares bytes that move with the slide: a
/// field that straddles the end, or a per-CPU PC32 field (which moves *against* the slide).
/// An entry site (`entry_end`: the end of the instructions its `jmp` overlaps) keeps its
/// own bytes, which must all be expected: `None` if a field cuts them.
fn expectation(
    code: &[u8],
    site: usize,
    fields: &[RelocField],
    entry_end: Option<usize>,
) -> Option<(Vec<u8>, Vec<AbsField>)> {
    let mut len = code.len().min(MAX_EXPECT);
    let mut fields: Vec<RelocField> = fields.to_vec();
    fields.sort_by_key(|f| f.offset);
    let mut abs = Vec::new();
    for f in fields {
        let (start, end) = (f.offset, f.offset + f.width());
        if start >= len {
            break;
        }
        // Only endbr64 can precede an fentry site and the site itself becomes the NOP5, so
        // a field here cannot occur in real code; it would not matter for the site anyway.
        if entry_end.is_none() && start < site + NOP5.len() {
            continue;
        }
        if f.kind == RelocKind::InversePc32 || end > len {
            len = start;
            break;
        }
        abs.push(AbsField {
            offset: start as u32,
            width: f.width() as u8,
        });
    }
    if entry_end.is_some_and(|e| e > len) {
        return None;
    }
    let mut expect = code[..len].to_vec();
    if entry_end.is_none() {
        expect[site..site + NOP5.len()].copy_from_slice(&NOP5);
    }
    Some((expect, abs))
}

/// Whether ftrace recorded `site` in vmlinux's `__mcount_loc` table (only recorded sites
/// are turned into NOPs at boot). `None` when vmlinux has no table to check against.
fn mcount_recorded(syms: &KernelSymbols, site: u64) -> Result<Option<bool>, BuildError> {
    let (Ok(start), Ok(stop)) = (
        syms.lookup("__start_mcount_loc"),
        syms.lookup("__stop_mcount_loc"),
    ) else {
        debug!(
            "vmlinux has no __start/__stop_mcount_loc; not checking that ftrace records the site"
        );
        return Ok(None);
    };
    let len = stop.addr.saturating_sub(start.addr) as usize;
    let table = syms.section_bytes(start.addr, len)?;
    Ok(Some(table.chunks_exact(8).any(|e| {
        u64::from_le_bytes(e.try_into().expect("8-byte chunk")) == site
    })))
}

/// A manifest replacement redirecting `old_spec` (`name` or `path/file.c:name`) to the
/// bundle function `new`.
pub fn replacement_for(
    syms: &KernelSymbols,
    old_spec: &str,
    new: &str,
) -> Result<Replacement, BuildError> {
    let sym = syms.resolve_spec(old_spec)?;
    let spec = old_spec.trim().to_string();
    if sym.kind != SymbolKind::Func {
        return Err(BuildError::NotAFunction {
            spec,
            kind: sym.kind,
        });
    }
    if sym.size == 0 {
        return Err(BuildError::NoSize { spec });
    }
    if let Some(section) = syms.section_name_at(sym.addr) {
        if section.starts_with(".init") || section.starts_with(".exit") {
            return Err(BuildError::InitCode {
                spec,
                section: section.to_string(),
            });
        }
    }
    let fentry = match syms.lookup(FENTRY) {
        Ok(s) => s.addr,
        Err(SymbolError::NotFound { .. }) => return Err(BuildError::NoFentry),
        Err(e) => return Err(e.into()),
    };
    let n = (sym.size as usize).min(MAX_EXPECT);
    let code = syms.expected_bytes(sym.addr, n, 0)?;
    let (site, entry_end) = match find_fentry_site(&code, sym.addr, fentry) {
        Some(site) => {
            let site_addr = sym.addr + u64::from(site);
            if mcount_recorded(syms, site_addr)? == Some(false) {
                return Err(BuildError::SiteNotRecorded {
                    spec,
                    site: site_addr,
                });
            }
            (site, None)
        }
        None => {
            let w = lucos_patch::entry::window_in_vmlinux(syms, &sym.name, sym.addr, sym.size)
                .map_err(|source| BuildError::EntryUnsafe {
                    spec: spec.clone(),
                    source,
                })?;
            debug!(old = %sym.qualified_name(), end = w.end, single = w.single, "no fentry site: redirecting at the entry");
            (w.site_offset, Some(w.end as usize))
        }
    };
    // Fields reaching past `n` too, so a straddling one can cut `expect` short.
    let fields = syms.abs_reloc_offsets(sym.addr, n + 8)?;
    let (expect, expect_abs) = expectation(&code, site as usize, &fields, entry_end).ok_or(
        BuildError::EntryNotExpectable {
            spec: spec.clone(),
            max: MAX_EXPECT,
        },
    )?;

    // A local is named with its file so the engine picks this one among same-named
    // statics (and not a global of the same name); prefer the user's path, which is
    // more precise than the base name vmlinux records.
    let old_file = if sym.binding == Binding::Local {
        match old_spec.trim().rsplit_once(':') {
            Some((file, _)) => Some(file.to_string()),
            None => sym.file.clone(),
        }
    } else {
        None
    };
    // The engine looks `old` up exactly so; make sure that finds this very function.
    let again = match &old_file {
        Some(f) => syms.lookup_in_file(f, &sym.name),
        None => syms.lookup(&sym.name),
    };
    match again {
        Ok(s) if s.addr == sym.addr => {}
        Ok(s) => {
            return Err(BuildError::OldNotUnique {
                spec,
                addr: sym.addr,
                found: format!("{} at {:#x}", s.qualified_name(), s.addr),
            })
        }
        Err(source) => {
            return Err(BuildError::OldLookupFails {
                spec,
                addr: sym.addr,
                source: Box::new(source),
            })
        }
    }
    debug!(
        old = %sym.qualified_name(),
        addr = format_args!("{:#x}", sym.addr),
        site,
        "fentry site found"
    );
    Ok(Replacement {
        module: None,
        old: sym.name.clone(),
        old_file,
        new: new.to_string(),
        site_offset: site,
        no_fentry: entry_end.is_some(),
        expect,
        expect_abs,
    })
}

/// Checks that every kernel symbol `object` needs resolves in vmlinux the way the engine
/// will resolve it (through `resolve` for statics with the same name in several files),
/// and that every `resolve` entry names a symbol of that file.
pub fn check_undefined(
    syms: &KernelSymbols,
    object: &[u8],
    resolve: &BTreeMap<String, String>,
) -> Result<(), BuildError> {
    check_undefined_except(syms, object, resolve, &Default::default())
}

/// [`check_undefined`], where the names in `provided` (symbols of the modules a bundle
/// patches) count as defined.
pub fn check_undefined_except(
    syms: &KernelSymbols,
    object: &[u8],
    resolve: &BTreeMap<String, String>,
    provided: &std::collections::BTreeSet<String>,
) -> Result<(), BuildError> {
    for (name, file) in resolve {
        syms.lookup_in_file(file, name)
            .map_err(|source| BuildError::BadResolve {
                name: name.clone(),
                file: file.clone(),
                source: Box::new(source),
            })?;
    }
    let obj = object::File::parse(object).map_err(|source| BuildError::BadObject { source })?;
    for s in obj.symbols() {
        if !s.is_undefined() {
            continue;
        }
        let Ok(name) = s.name() else { continue };
        if name.is_empty() || name == FENTRY || provided.contains(name) {
            continue;
        }
        let found = match resolve.get(name) {
            Some(file) => syms.lookup_in_file(file, name),
            None => syms.lookup(name),
        };
        let unresolved = |source: SymbolError, hint: String| BuildError::Unresolved {
            name: name.to_string(),
            hint,
            source: Box::new(source),
        };
        match found {
            Ok(_) => {}
            Err(SymbolError::NotFound { .. }) if s.is_weak() => {
                debug!(name, "weak undefined symbol not in vmlinux; it will be 0");
            }
            Err(e @ SymbolError::Ambiguous { .. }) => {
                return Err(unresolved(
                    e,
                    format!(
                        "; say which one in the bundle spec: \"resolve\": {{ \"{name}\": \
                         \"path/file.c\" }}"
                    ),
                ))
            }
            Err(e @ SymbolError::NotFound { .. }) => {
                return Err(unresolved(
                    e,
                    "; the bundle can only use functions and variables that exist in the \
                     running kernel"
                        .into(),
                ))
            }
            Err(e) => return Err(unresolved(e, String::new())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 0xffff_ffff_8104_1f60;

    /// `call rel32` at `at` in a function at `addr` landing on `target`.
    fn call(addr: u64, at: u64, target: u64) -> [u8; 5] {
        let rel = target.wrapping_sub(addr + at + 5) as i64 as i32;
        let mut b = [0xe8, 0, 0, 0, 0];
        b[1..].copy_from_slice(&rel.to_le_bytes());
        b
    }

    #[test]
    fn site_at_entry() {
        let a = 0xffff_ffff_8120_b200;
        let mut code = call(a, 0, F).to_vec();
        code.extend_from_slice(&[0x53, 0x48, 0x8b]);
        assert_eq!(find_fentry_site(&code, a, F), Some(0));
    }

    #[test]
    fn site_after_endbr64() {
        let a = 0xffff_ffff_8100_1000;
        let mut code = ENDBR64.to_vec();
        code.extend_from_slice(&call(a, 4, F));
        assert_eq!(find_fentry_site(&code, a, F), Some(4));
        // The same call without endbr64 before it is not an entry site.
        let mut code = vec![0x90; 4];
        code.extend_from_slice(&call(a, 4, F));
        assert_eq!(find_fentry_site(&code, a, F), None);
    }

    #[test]
    fn calls_elsewhere_are_not_sites() {
        let a = 0xffff_ffff_8106_4280;
        assert_eq!(find_fentry_site(&call(a, 0, F + 0x10), a, F), None);
        // The bytes of a call to __fentry__ from another address.
        assert_eq!(find_fentry_site(&call(a + 0x40, 0, F), a, F), None);
        // jmp rel32 with the right displacement is not a call.
        let mut jmp = call(a, 0, F);
        jmp[0] = 0xe9;
        assert_eq!(find_fentry_site(&jmp, a, F), None);
        // push %r14 ... (no site: notrace) and an already NOP-ed site.
        assert_eq!(
            find_fentry_site(&[0x41, 0x56, 0x31, 0xc0, 0x41, 0x55], a, F),
            None
        );
        assert_eq!(find_fentry_site(&NOP5, a, F), None);
        assert_eq!(find_fentry_site(&[0xe8, 0, 0], a, F), None);
        assert_eq!(find_fentry_site(&[], a, F), None);
    }

    #[test]
    fn call_wraps_around_address_space() {
        // A function just above __fentry__: negative displacement.
        let a = F + 0x1000;
        assert_eq!(find_fentry_site(&call(a, 0, F), a, F), Some(0));
    }

    fn field(offset: usize, kind: RelocKind) -> RelocField {
        RelocField { offset, kind }
    }

    #[test]
    fn expect_has_nop5_at_the_site_and_abs_fields() {
        let a = 0x1000;
        let mut code = ENDBR64.to_vec();
        code.extend_from_slice(&call(a, 4, F));
        // mov $imm32s, %rsi at 9: 48 c7 c6 <abs32s at 12>
        code.extend_from_slice(&[0x48, 0xc7, 0xc6, 0xc0, 0x01, 0xa0, 0x81, 0x90]);
        let (expect, abs) = expectation(&code, 4, &[field(12, RelocKind::Abs32S)], None).unwrap();
        assert_eq!(expect.len(), 16);
        assert_eq!(&expect[..4], &ENDBR64);
        assert_eq!(&expect[4..9], &NOP5);
        assert_eq!(
            abs,
            vec![AbsField {
                offset: 12,
                width: 4
            }]
        );
    }

    #[test]
    fn straddling_and_inverse_fields_cut_expect_short() {
        let code = [0u8; 16];
        let (e, abs) = expectation(&code, 0, &[field(14, RelocKind::Abs32S)], None).unwrap();
        assert_eq!((e.len(), abs.len()), (14, 0));
        let (e, abs) = expectation(
            &code,
            0,
            &[
                field(5, RelocKind::Abs64),
                field(13, RelocKind::InversePc32),
            ],
            None,
        )
        .unwrap();
        assert_eq!(e.len(), 13);
        assert_eq!(
            abs,
            vec![AbsField {
                offset: 5,
                width: 8
            }]
        );
        // Fields beyond the cut or past the end do not matter.
        let (e, abs) = expectation(
            &code,
            0,
            &[
                field(7, RelocKind::InversePc32),
                field(11, RelocKind::Abs32),
            ],
            None,
        )
        .unwrap();
        assert_eq!((e.len(), abs.len()), (7, 0));
        let (e, _) = expectation(&code, 0, &[field(16, RelocKind::Abs64)], None).unwrap();
        assert_eq!(e.len(), 16);
    }

    #[test]
    fn short_functions_give_short_expect() {
        let code = [0xe8, 1, 2, 3, 4, 0xc3];
        let (e, abs) = expectation(&code, 0, &[], None).unwrap();
        assert_eq!(e, vec![0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3]);
        assert!(abs.is_empty());
    }

    #[test]
    fn an_entry_site_keeps_its_bytes_and_may_carry_abs_fields() {
        // mov $imm32s, %rdi (48 c7 c7 <abs32s at 3>); ret
        let code = [0x48, 0xc7, 0xc7, 0xc0, 0x01, 0xa0, 0x81, 0xc3];
        let (e, abs) = expectation(&code, 0, &[field(3, RelocKind::Abs32S)], Some(7)).unwrap();
        assert_eq!(e, code);
        assert_eq!(
            abs,
            vec![AbsField {
                offset: 3,
                width: 4
            }]
        );
        // A per-CPU field inside the window cannot be expected: refused, not cut.
        assert!(expectation(&code, 0, &[field(3, RelocKind::InversePc32)], Some(7)).is_none());
        // Past the window it only cuts.
        let (e, _) = expectation(&code, 0, &[field(7, RelocKind::InversePc32)], Some(7)).unwrap();
        assert_eq!(e.len(), 7);
    }
}
