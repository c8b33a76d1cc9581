//! The reading half of an apply: each target function checked against the live kernel
//! and the registry (its fentry site, the bytes the bundle expects), before anything is
//! written. Every refusal here leaves the guest untouched.

use lucos_introspect::{paging, GuestVirtAddr, LoadedModule, Machine, SymbolKind};

use super::{EngineError, Session, Site};
use crate::registry::Registry;
use crate::{check_fentry_site, Manifest, Replacement, SiteKind, NOP5};

impl<M: Machine + ?Sized> Session<'_, M> {
    /// Checks one target function against the live kernel and the registry.
    pub(super) fn inspect(
        &self,
        reg: &Registry,
        rep: &Replacement,
        modules: &[LoadedModule],
    ) -> Result<Site, EngineError> {
        let function = rep.label();
        // The vmlinux symbol's size, for an entry site's check (module functions have none).
        let (module, func_addr, size) = match &rep.module {
            Some(name) => {
                let (m, addr) = Self::module_function(rep, name, modules)?;
                (Some(m), addr, 0)
            }
            None => {
                let sym = self
                    .syms
                    .lookup_maybe_in(rep.old_file.as_deref(), &rep.old)
                    .map_err(|source| EngineError::Symbol {
                        function: function.clone(),
                        source,
                    })?;
                if sym.kind != SymbolKind::Func {
                    return Err(EngineError::NotAFunction { function });
                }
                (None, self.layout.live(sym.addr), sym.size)
            }
        };
        let site_addr = func_addr + u64::from(rep.site_offset);
        let mut live = vec![0u8; rep.expect.len()];
        paging::read_virt(
            &*self.m,
            self.layout.cr3,
            GuestVirtAddr(func_addr),
            &mut live,
        )?;
        let so = rep.site_offset as usize;
        let current: [u8; 5] = live[so..so + 5].try_into().expect("expect covers the site");
        let ours = |s: &crate::registry::SiteRecord| s.written == current;
        let mut cmp = live.clone();
        let window = if rep.no_fentry {
            self.check_entry(rep, &function, (func_addr, size))?;
            // An earlier bundle's jmp stands in for the entry bytes; anything else must be
            // the function's own first instructions, compared below.
            match (reg.top_of_site(site_addr), reg.base_of_site(site_addr)) {
                (Some((_, s)), Some(base)) if ours(s) => {
                    cmp[so..so + 5].copy_from_slice(&base);
                    false
                }
                _ => !crate::site::is_one_instruction(&current),
            }
        } else {
            let kind =
                check_fentry_site(&current, site_addr).map_err(|source| EngineError::Site {
                    function: function.clone(),
                    source,
                })?;
            if let SiteKind::Jmp { target } = kind {
                match reg.top_of_site(site_addr) {
                    Some((_, s)) if ours(s) => cmp[so..so + 5].copy_from_slice(&NOP5),
                    _ => {
                        return Err(EngineError::ForeignRedirect {
                            function,
                            site: site_addr,
                            target,
                        })
                    }
                }
            }
            false
        };
        let mut expected = rep.expected_bytes(self.layout.slide as u64);
        if let (Ok(thunk), None) = (self.syms.lookup("__x86_return_thunk"), &rep.module) {
            // Compared at link addresses, from vmlinux's own bytes.
            let link = func_addr.wrapping_sub(self.layout.slide as u64);
            let compiled = |at: usize| {
                let b = self.syms.section_bytes(link + at as u64, 5).ok()?;
                Some((b.try_into().ok()?, link + at as u64))
            };
            crate::site::as_patched_returns(&mut expected, &cmp, compiled, thunk.addr);
        }
        if cmp != expected {
            return Err(EngineError::ExpectMismatch {
                function,
                addr: func_addr,
                expected: hex::encode(&expected),
                live: hex::encode(&cmp),
            });
        }
        let site_pa = paging::translate(&*self.m, self.layout.cr3, GuestVirtAddr(site_addr))?.pa;
        Ok(Site {
            function,
            func_addr,
            site_addr,
            site_pa,
            current,
            module,
            window,
        })
    }

    /// Checks again, against vmlinux, that `rep`'s function may take a jmp at its entry,
    /// and that the bundle expects exactly the instructions that jmp overlaps.
    fn check_entry(
        &self,
        rep: &Replacement,
        function: &str,
        (func_addr, size): (u64, u64),
    ) -> Result<(), EngineError> {
        let link = func_addr.wrapping_sub(self.layout.slide as u64);
        let w =
            crate::entry::window_in_vmlinux(self.syms, &rep.old, link, size).map_err(|source| {
                EngineError::Entry {
                    function: function.to_owned(),
                    source,
                }
            })?;
        if w.site_offset != rep.site_offset || w.end as usize > rep.expect.len() {
            return Err(EngineError::EntryMismatch {
                function: function.to_owned(),
                site: rep.site_offset,
                manifest: rep.expect.len(),
                vmlinux: w.end,
            });
        }
        Ok(())
    }

    /// The bundle's sites in the running kernel, each checked patchable: the refusals
    /// that need nothing but reading.
    pub(super) fn targets(
        &self,
        reg: &Registry,
        man: &Manifest,
        modules: &[LoadedModule],
    ) -> Result<Vec<Site>, EngineError> {
        let live_id = self.syms.build_id_hex()?;
        if !man.target.build_id.eq_ignore_ascii_case(&live_id) {
            return Err(EngineError::WrongKernel {
                id: man.id.clone(),
                bundle: man.target.build_id.clone(),
                live: live_id,
            });
        }
        let sites = man
            .replacements
            .iter()
            .map(|r| self.inspect(reg, r, modules))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in sites.iter().enumerate() {
            if let Some(b) = sites[..i].iter().find(|b| b.site_addr == a.site_addr) {
                return Err(EngineError::SameSiteTwice {
                    first: b.function.clone(),
                    second: a.function.clone(),
                });
            }
        }
        Ok(sites)
    }
}
