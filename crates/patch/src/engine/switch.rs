//! The site switch: the only part of an apply or revert that runs with the
//! guest stopped.

use std::time::Duration;

use lucos_introspect::{GuestPhysAddr, Machine, MachineError};

use super::kernel::{KernelEdit, KernelUndo};
use super::rewrite::WordWrite;
use super::{EngineError, Session, Site, SwitchFailure};
use crate::registry::{BundleState, Header, Registry};

impl<M: Machine + ?Sized> Session<'_, M> {
    /// Lets `update` record the change and encodes the registry, pauses, checks the
    /// sites (and the vCPUs of entry sites), switches the sites to their new bytes and
    /// resumes (unless the VM was paused before). With `record_first` the registry is
    /// committed before the pause (apply: a crash in between leaves a record that an
    /// idempotent revert clears, never a live `jmp` nobody knows about); otherwise inside
    /// the pause, after the sites (revert). On failure
    /// the sites, the kernel words of `edit` and the registry are restored before resuming;
    /// when a site or word cannot be restored, the record of bundle `id` stays, marked
    /// half-applied (see [`Session::keep_half_applied`]).
    /// `edit` (linking or unlinking the bundle's `struct module`) is computed inside the
    /// pause, from the kernel's state at that instant; `data` (objects rewritten in place)
    /// is written after it, with the same undo.
    pub(super) fn switch(
        &mut self,
        sites: &[(&Site, [u8; 5])],
        (id, header): (&str, &Header),
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
        // Work that does not need the guest stopped happens before the stop: the bytes a
        // commit overwrites, the new record encoded, and for an apply (record first) its
        // commit. The guest never reads the registry, and a lucos killed between that
        // commit and the switch leaves a record whose sites still hold their old bytes,
        // as one killed inside the pause did (status warns, an idempotent revert clears
        // it). A revert's record is written inside the pause, after its sites.
        update(reg);
        let saved = self.snapshot_registry(header).map_err(|e| {
            *reg = before.clone();
            fail(e)
        })?;
        let prepared = self.prepare_commit(header, reg).map_err(|e| {
            *reg = before.clone();
            fail(e)
        })?;
        if record_first {
            if let Err(e) = self.write_commit(&prepared) {
                *reg = before;
                let restored = self.put_back_registry(&saved);
                return Err(SwitchFailure {
                    error: e,
                    sites_restored: restored,
                });
            }
        }
        let t = match self.pause_for_switch(sites, was_paused) {
            Ok(t) => t,
            Err(e) => {
                *reg = before;
                let restored = !record_first || self.put_back_registry(&saved);
                // The stop may have happened even though its reply was lost.
                let resumed = if was_paused {
                    Ok(())
                } else {
                    self.resume_if_paused()
                };
                return Err(SwitchFailure {
                    error: still_paused(e, resumed),
                    sites_restored: restored,
                });
            }
        };
        // Every site that may hold its new bytes if the switch fails.
        let mut touched: Vec<&Site> = Vec::new();
        let mut done = Vec::new();
        let mut result = self.check_paused(sites).map(|d| done = d);
        let mut kernel_undo = KernelUndo::new();
        if result.is_ok() {
            result = self.edit_kernel(edit, before.module_bounds, &mut kernel_undo);
        }
        if result.is_ok() {
            result = self.write_words(data, &mut kernel_undo);
        }
        if result.is_ok() {
            for ((site, bytes), done) in sites.iter().zip(&done) {
                // A site already switched (by a crashed earlier attempt) is not written,
                // and a failed write may still have landed (its reply lost): both are
                // restored like the written ones.
                touched.push(site);
                if *done {
                    continue;
                }
                if let Err(e) = self.m.write_phys(site.site_pa, bytes) {
                    result = Err(e.into());
                    break;
                }
            }
        }
        if result.is_ok() && !record_first {
            result = self.write_commit(&prepared);
        }
        let mut sites_restored = true;
        if result.is_err() {
            *reg = before;
            sites_restored = self.restore(&touched, kernel_undo, saved, (id, record_first));
        }
        let resumed = if was_paused { Ok(()) } else { self.m.resume() };
        let pause = t.elapsed();
        match (result, resumed) {
            (Err(error), resumed) => Err(SwitchFailure {
                error: still_paused(error, resumed),
                sites_restored,
            }),
            (Ok(()), Err(e)) => Err(SwitchFailure {
                error: EngineError::ResumeFailed(e),
                sites_restored: false,
            }),
            (Ok(()), Ok(())) => Ok(pause),
        }
    }

    /// Puts back the sites, kernel words and (when all went back) the registry of a
    /// failed switch; whether everything went back. Otherwise rewriting the old registry
    /// would leave a live `jmp` (or kernel word) no record describes, into pages a later
    /// apply could be given again: the record is kept instead.
    fn restore(
        &mut self,
        touched: &[&Site],
        kernel_undo: KernelUndo,
        saved: Vec<(GuestPhysAddr, Vec<u8>)>,
        (id, applying): (&str, bool),
    ) -> bool {
        let mut unrestored = Vec::new();
        for s in touched {
            let restored = self.m.write_phys(s.site_pa, &s.current).is_ok()
                && self.site_holds(s.site_pa, &s.current);
            if !restored {
                tracing::error!(site = s.site_addr, "restoring a site failed");
                unrestored.push(s.site_addr);
            }
        }
        let kernel_restored = self.undo_kernel(kernel_undo);
        if !unrestored.is_empty() || !kernel_restored {
            self.keep_half_applied(id, applying, &unrestored, kernel_restored);
            return false;
        }
        self.put_back_registry(&saved);
        true
    }

    /// Writes back the registry bytes a commit overwrote; whether that worked.
    fn put_back_registry(&mut self, saved: &[(GuestPhysAddr, Vec<u8>)]) -> bool {
        let writes: Vec<(GuestPhysAddr, &[u8])> =
            saved.iter().map(|(pa, b)| (*pa, b.as_slice())).collect();
        match self.m.write_phys_data_all(&writes) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "restoring the registry failed");
                false
            }
        }
    }

    /// After a failed pause request: resumes the VM if it stopped anyway (the reply was
    /// lost), or if that cannot be told (resuming a running VM changes nothing).
    fn resume_if_paused(&mut self) -> Result<(), MachineError> {
        match self.m.is_paused() {
            Ok(false) => Ok(()),
            Ok(true) | Err(_) => self.m.resume(),
        }
    }

    /// Marks the applied record of `id` half-applied after a switch that could not restore
    /// every site (`unrestored`) or kernel word. For an apply the record then lists only
    /// the sites that may hold its `jmp`, and drops its module and rewrites when those were
    /// undone; its ranges stay, so its pages stay allocated. For a revert every site stays
    /// listed (each holds the `jmp` or the original). If even this commit fails, the
    /// unmarked record committed before the writes still describes every site.
    fn keep_half_applied(
        &mut self,
        id: &str,
        applying: bool,
        unrestored: &[u64],
        kernel_restored: bool,
    ) {
        let res = self.read_header().and_then(|(h, mut reg)| {
            let Some(b) = reg
                .bundles
                .iter_mut()
                .rev()
                .find(|b| b.id == id && b.state == BundleState::Applied)
            else {
                tracing::error!(id, "no record to keep for a half-applied bundle");
                return Ok(());
            };
            b.half_applied = true;
            if applying {
                b.sites.retain(|s| unrestored.contains(&s.site_addr));
                if kernel_restored {
                    b.module = None;
                    b.rewrites.clear();
                }
            }
            self.commit(&h, &mut reg)
        });
        if let Err(e) = res {
            tracing::error!(id, error = %e, "could not mark the record half-applied");
        }
    }

    fn site_holds(&self, pa: GuestPhysAddr, bytes: &[u8; 5]) -> bool {
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
    ///
    /// Only window sites (an entry's several instructions) are checked against the rips:
    /// a site that holds one 5-byte instruction has no boundary inside it, and skipping the
    /// register reads takes two gdbstub round trips per vCPU out of the pause.
    fn check_paused(&mut self, sites: &[(&Site, [u8; 5])]) -> Result<Vec<bool>, EngineError> {
        let windows = sites.iter().any(|(s, _)| s.window);
        for vcpu in (0..self.m.vcpu_count()).filter(|_| windows) {
            let rip = self.m.vcpu_rip(vcpu)?;
            if let Some((s, _)) = sites
                .iter()
                .find(|(s, _)| s.window && rip > s.site_addr && rip < s.site_addr + 5)
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
                let mut now = [0u8; 5];
                // A record: its address is a bare number.
                self.m.read_phys(GuestPhysAddr(s.site_pa), &mut now)?;
                if now != s.written {
                    out.push((b.id.clone(), s.function.clone(), now.to_vec()));
                }
            }
        }
        Ok(out)
    }
}

/// `error`, or if the VM could not be resumed after it, both (the guest is still paused).
fn still_paused(error: EngineError, resumed: Result<(), MachineError>) -> EngineError {
    match resumed {
        Ok(()) => error,
        Err(resume) => EngineError::StillPaused {
            error: Box::new(error),
            resume,
        },
    }
}
