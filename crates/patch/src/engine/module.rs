//! Replacing functions of loaded modules: where a module function is in the live kernel,
//! how a bundle's references to the module's own symbols resolve, and what a revert does
//! once the module is gone.
//!
//! Modules are found from outside ([`lucos_introspect::modules`]); nothing is cached
//! across commands, since a module can be unloaded and loaded elsewhere at any time.

use lucos_introspect::{LoadedModule, Machine, ModuleState};

use super::{EngineError, Session};
use crate::manifest::{Manifest, Replacement};
use crate::registry::{ModuleSite, SiteRecord};

/// Kernel module names treat `-` and `_` alike (`modprobe` does too).
fn same_module(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || (x == b'-' || x == b'_') && (y == b'-' || y == b'_'))
}

impl<M: Machine + ?Sized> Session<'_, M> {
    /// The loaded modules, when `man` replaces functions in any (else none are read).
    pub(super) fn modules_for(&self, man: &Manifest) -> Result<Vec<LoadedModule>, EngineError> {
        if man.replacements.iter().all(|r| r.module.is_none()) {
            return Ok(Vec::new());
        }
        Ok(lucos_introspect::modules::loaded(
            &*self.m,
            self.syms,
            &self.layout,
        )?)
    }

    /// The live module `rep` targets, and its function's address.
    pub(super) fn module_function(
        rep: &Replacement,
        name: &str,
        modules: &[LoadedModule],
    ) -> Result<(ModuleSite, u64), EngineError> {
        let function = rep.label();
        let m = modules
            .iter()
            .find(|m| same_module(&m.name, name))
            .ok_or_else(|| EngineError::ModuleNotLoaded {
                function: function.clone(),
                module: name.to_string(),
            })?;
        if m.state != ModuleState::Live {
            return Err(EngineError::ModuleNotLive {
                function,
                module: m.name.clone(),
                state: format!("{:?}", m.state),
            });
        }
        let f = m
            .function(&rep.old)
            .ok_or_else(|| EngineError::NotAFunction {
                function: function.clone(),
            })?;
        if !(m.base..m.base + m.text_size).contains(&f.addr) {
            return Err(EngineError::NotAFunction { function });
        }
        Ok((
            ModuleSite {
                name: m.name.clone(),
                base: m.base,
            },
            f.addr,
        ))
    }

    /// A bundle symbol defined by one of the modules it patches: the module's own statics
    /// and functions, which new code compiled from that module's source refers to.
    pub(super) fn resolve_in_modules(
        man: &Manifest,
        modules: &[LoadedModule],
        name: &str,
    ) -> Option<Result<u64, crate::ResolveError>> {
        let mut found = man
            .replacements
            .iter()
            .filter_map(|r| r.module.as_deref())
            .filter_map(|t| modules.iter().find(|m| same_module(&m.name, t)))
            .flat_map(|m| {
                m.symbols
                    .iter()
                    .filter(|s| s.name == name)
                    .map(move |s| (m, s))
            });
        let (m, s) = found.next()?;
        if let Some((m2, _)) = found.find(|(m2, s2)| s2.addr != s.addr || m2.name != m.name) {
            return Some(Err(crate::ResolveError::AmbiguousInModules {
                name: name.to_string(),
                first: m.name.clone(),
                second: m2.name.clone(),
            }));
        }
        Some(Ok(s.addr))
    }

    /// Sites of `sites` whose module is no longer loaded where it was patched: their code
    /// is gone (or belongs to another load now), so a revert must not write there.
    pub(super) fn gone_sites(&self, sites: &[SiteRecord]) -> Result<Vec<bool>, EngineError> {
        if sites.iter().all(|s| s.module.is_none()) {
            return Ok(vec![false; sites.len()]);
        }
        let modules = lucos_introspect::modules::loaded(&*self.m, self.syms, &self.layout)?;
        Ok(sites
            .iter()
            .map(|s| match &s.module {
                None => false,
                Some(ms) => !modules.iter().any(|m| {
                    m.name == ms.name && m.base == ms.base && m.state == ModuleState::Live
                }),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_treat_dash_and_underscore_alike() {
        assert!(same_module("binfmt_misc", "binfmt-misc"));
        assert!(same_module("loop", "loop"));
        assert!(!same_module("loop", "loopx"));
        assert!(!same_module("a_b", "a.b"));
    }
}
