//! The site switch: the only part of an apply or revert that runs with the
//! guest stopped.

use std::time::Duration;

use lucos_introspect::Machine;

use super::kernel::{KernelEdit, KernelUndo};
use super::rewrite::WordWrite;
use super::{EngineError, Session, Site, SwitchFailure};
use crate::registry::{BundleState, Header, Registry};

impl<M: Machine + ?Sized> Session<'_, M> {
    /// Pauses, checks every vCPU and site, switches the sites to their new
    /// bytes, lets `update` record the change, commits the registry and
    /// resumes (unless the VM was paused before). With `record_first` the
    /// registry is committed before the sites are written (apply: a crash in
    /// between leaves a record that an idempotent revert clears, never a
    /// live `jmp` nobody knows about); otherwise after (revert). On failure
    /// the sites, the kernel words of `edit` and the registry are restored before resuming.
    /// `edit` (linking or unlinking the bundle's `struct module`) is computed inside the
    /// pause, from the kernel's state at that instant; `data` (objects rewritten in place)
    /// is written after it, with the same undo.
    pub(super) fn switch(
        &mut self,
        sites: &[(&Site, [u8; 5])],
        header: &Header,
        reg: &mut Registry,
        record_first: bool,
        (edit, data): (&KernelEdit<'_>, &[WordWrite]),
        update: impl FnOnce(&mut Registry),
    ) -> Result<Duration, SwitchFailure> {
        let fail = |error: EngineError| SwitchFailure {
            error,
            sites_restored: true,
        };
        let was_paused = self.m.is_paused().map_err(|e| fail(e.into()))?;
        let before = reg.clone();
        let mut update = Some(update);
        // Work that does not need the guest stopped happens before the stop:
        // the record itself and the bytes a record-first commit overwrites.
        let mut saved: Option<Vec<(u64, Vec<u8>)>> = None;
        if record_first {
            (update.take().expect("once"))(reg);
            let snapshot = self.snapshot_registry(header).map_err(|e| {
                *reg = before.clone();
                fail(e)
            })?;
            saved = Some(snapshot);
        }
        let t = match self.pause_for_switch(sites, was_paused) {
            Ok(t) => t,
            Err(e) => {
                *reg = before;
                // The stop may have happened even though its reply was lost.
                if !was_paused && self.m.is_paused().unwrap_or(false) {
                    let _ = self.m.resume();
                }
                return Err(fail(e));
            }
        };
        let mut written: Vec<&Site> = Vec::new();
        let mut done = Vec::new();
        let mut result = self.check_paused(sites).map(|d| done = d);
        if result.is_ok() && record_first {
            result = self.commit(header, reg);
        }
        let mut kernel_undo = KernelUndo::new();
        if result.is_ok() {
            result = self.edit_kernel(edit, before.module_bounds, &mut kernel_undo);
        }
        if result.is_ok() {
            result = self.write_words(data, &mut kernel_undo);
        }
        if result.is_ok() {
            for ((site, bytes), done) in sites.iter().zip(&done) {
                if *done {
                    continue; // already switched (by a crashed earlier attempt)
                }
                if let Err(e) = self.m.write_phys(site.site_pa, bytes) {
                    result = Err(e.into());
                    break;
                }
                written.push(site);
            }
        }
        if result.is_ok() {
            if let Some(update) = update.take() {
                update(reg);
                result = self.commit(header, reg);
            }
        }
        let mut sites_restored = true;
        if result.is_err() {
            for s in written {
                let restored = self.m.write_phys(s.site_pa, &s.current).is_ok()
                    && self.site_holds(s.site_pa, &s.current);
                if !restored {
                    tracing::error!(site = s.site_addr, "restoring a site failed");
                    sites_restored = false;
                }
            }
            self.undo_kernel(kernel_undo);
            *reg = before;
            for (pa, bytes) in saved.into_iter().flatten() {
                if let Err(e) = self.m.write_phys_data(pa, &bytes) {
                    tracing::error!(error = %e, "restoring the registry failed");
                }
            }
        }
        let resumed = if was_paused { Ok(()) } else { self.m.resume() };
        let pause = t.elapsed();
        match (result, resumed) {
            (Err(error), _) => Err(SwitchFailure {
                error,
                sites_restored,
            }),
            (Ok(()), Err(e)) => Err(SwitchFailure {
                error: EngineError::ResumeFailed(e),
                sites_restored: false,
            }),
            (Ok(()), Ok(())) => Ok(pause),
        }
    }

    fn site_holds(&self, pa: u64, bytes: &[u8; 5]) -> bool {
        let mut now = [0u8; 5];
        self.m.read_phys(pa, &mut now).is_ok() && now == *bytes
    }

    /// Stores the final pause time (measured after resume) in the record;
    /// the guest is running again, so this is an ordinary data write.
    pub(super) fn record_pause(&mut self, id: &str, state: BundleState, pause: Duration) {
        let res = self.read_header().and_then(|(h, mut reg)| {
            let us = pause.as_micros() as u64;
            if let Some(b) = reg
                .bundles
                .iter_mut()
                .rev()
                .find(|b| b.id == id && b.state == state)
            {
                match state {
                    BundleState::Applied => b.apply_pause_us = us,
                    BundleState::Reverted => b.revert_pause_us = Some(us),
                }
            }
            self.commit(&h, &mut reg)
        });
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not record the pause time");
        }
    }

    /// With the VM paused: no vCPU may be inside a site, and each site must
    /// still hold the bytes inspected before staging, or already the new
    /// bytes (after a crashed attempt; reported as `true`).
    fn check_paused(&mut self, sites: &[(&Site, [u8; 5])]) -> Result<Vec<bool>, EngineError> {
        for vcpu in 0..self.m.vcpu_count() {
            let rip = self.m.vcpu_rip(vcpu)?;
            if let Some((s, _)) = sites
                .iter()
                .find(|(s, _)| rip > s.site_addr && rip < s.site_addr + 5)
            {
                return Err(EngineError::RipInSite {
                    vcpu,
                    rip,
                    function: s.function.clone(),
                });
            }
        }
        let mut done = Vec::with_capacity(sites.len());
        for (s, new) in sites {
            let mut now = [0u8; 5];
            self.m.read_phys(s.site_pa, &mut now)?;
            if now != s.current && now != *new {
                return Err(EngineError::SiteChanged {
                    function: s.function.clone(),
                    site: s.site_addr,
                    expected: hex::encode(s.current),
                    found: hex::encode(now),
                });
            }
            done.push(now == *new && now != s.current);
        }
        Ok(done)
    }

    /// Applied sites whose live bytes are not the bundle's `jmp` (e.g. a
    /// lucos killed between recording and switching): (bundle, function,
    /// live bytes). A revert clears such a record.
    pub fn inconsistencies(&self) -> Result<Vec<(String, String, Vec<u8>)>, EngineError> {
        let reg = self.registry()?;
        let mut out = Vec::new();
        for b in reg.applied() {
            for s in &b.sites {
                let top = reg.top_of_site(s.site_addr).map(|(t, _)| t.id.as_str());
                if top != Some(b.id.as_str()) {
                    continue;
                }
                let mut now = vec![0u8; s.written.len()];
                self.m.read_phys(s.site_pa, &mut now)?;
                if now != s.written {
                    out.push((b.id.clone(), s.function.clone(), now));
                }
            }
        }
        Ok(out)
    }
}
