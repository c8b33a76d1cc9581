//! New code made right for the live CPU at link time, as the module loader's
//! `module_finalize()` does for a module: return thunks first, then alternatives (the
//! kernel's order, so a return inside a replacement is rewritten before it is copied).

use lucos_introspect::{paging, GuestVirtAddr, Machine};

use super::{EngineError, Session};
use crate::returns::{self, ReturnMode, FEATURE_RETHUNK};
use crate::{apply_alternatives, apply_returns, Bundle, CpuFeatures, Linked, Plan};

impl<M: Machine + ?Sized> Session<'_, M> {
    pub(super) fn fit_to_cpu(
        &self,
        bundle: &Bundle,
        plan: &Plan,
        linked: &mut Linked,
    ) -> Result<(), EngineError> {
        let sites = returns::return_sites(bundle, plan);
        let alts = bundle
            .object
            .sections
            .iter()
            .any(|s| s.name == ".altinstructions");
        let indirect = returns::indirect_thunk_refs(bundle);
        if sites.is_empty() && !alts && indirect == 0 {
            return Ok(());
        }
        let cpu = CpuFeatures {
            words: lucos_introspect::modules::cpu_feature_words(&*self.m, self.syms, &self.layout)?,
        };
        returns::check_indirect_thunks(&cpu, indirect)?;
        if let Some(&thunk) = linked.resolved.get(returns::RETURN_THUNK) {
            if !sites.is_empty() {
                let mode = self.return_mode(&cpu)?;
                let text = linked.regions.text;
                apply_returns(&mut linked.text, text, &sites, thunk, mode)?;
            }
        }
        if alts {
            apply_alternatives(bundle, plan, linked, &cpu)?;
        }
        Ok(())
    }

    /// `cpu_wants_rethunk_at()`'s inputs, read from the guest: the feature bit and the
    /// live `x86_return_thunk` pointer (set by the mitigation chosen at boot).
    fn return_mode(&self, cpu: &CpuFeatures) -> Result<ReturnMode, EngineError> {
        let rethunk = cpu.has(FEATURE_RETHUNK).unwrap_or(false);
        if !rethunk {
            return Ok(ReturnMode::Ret);
        }
        let live = |name: &str| -> Result<u64, EngineError> {
            Ok(self.layout.live(self.syms.lookup(name)?.addr))
        };
        let ptr = live("x86_return_thunk")?;
        let thunk = paging::read_virt_u64(&*self.m, self.layout.cr3, GuestVirtAddr(ptr))?;
        let its = live("its_return_thunk").ok();
        Ok(ReturnMode::live(true, thunk, its))
    }
}
