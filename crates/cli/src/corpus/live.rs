//! Applying a unit's bundle to a running guest, the smoke suite, and the revert.
//!
//! One guest serves many units in turn: each apply is followed by the smoke suite and a
//! check of the kernel log and taint, then the revert and the same checks. A guest that an
//! apply broke (a failed check, a console that stopped answering, a revert that failed) is
//! replaced by a fresh one before the next unit, so one bad bundle cannot spoil the rest.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use lucos_backend::{RunningVm, Vm};
use serde::{Deserialize, Serialize};

use crate::guest::Guest;
use crate::harness::{self, Booted};
use crate::info::{attach_vm, Attached};
use crate::patchcmd::{apply_bundle, load_bundle, revert_bundle};
use crate::run::VmOpts;

const SMOKE_TIMEOUT: Duration = Duration::from_secs(240);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// The taint bit a lucos bundle sets on purpose (`K`, livepatched), like a livepatch module.
const TAINT_LIVEPATCH: u64 = 1 << 15;
/// Kernel log lines that mean something went wrong.
const BAD_LOG: &str = "Oops|BUG:|WARNING:|Kernel panic|general protection|Call Trace|RIP:";

/// One round of checks: what failed, if anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Failed smoke checks (`smoke <name> FAIL <why>` lines).
    pub smoke_failures: Vec<String>,
    /// Kernel log lines matching Oops/BUG/WARNING/... since the last check.
    pub bad_log: Vec<String>,
    /// Taint bits that appeared, other than the livepatch bit.
    pub new_taint: u64,
    /// The guest stopped answering (or a command failed outright): why.
    pub dead: Option<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.smoke_failures.is_empty() && self.bad_log.is_empty() && self.new_taint == 0 && self.dead.is_none()
    }
}

/// What happened to a bundle on the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    /// Why the apply was refused or failed (the guest is then unchanged).
    pub apply_error: Option<String>,
    /// Guest-visible pause of the apply, in microseconds.
    pub pause_us: Option<u64>,
    pub after_apply: Option<Check>,
    pub revert_error: Option<String>,
    pub after_revert: Option<Check>,
}

impl Live {
    /// Applied, passed the smoke suite, reverted, and passed again.
    pub fn passed(&self) -> bool {
        self.apply_error.is_none()
            && self.revert_error.is_none()
            && self.after_apply.as_ref().is_some_and(Check::passed)
            && self.after_revert.as_ref().is_some_and(Check::passed)
    }

    /// The guest must be replaced before the next unit.
    pub fn broke_guest(&self) -> bool {
        self.revert_error.is_some()
            || [&self.after_apply, &self.after_revert]
                .iter()
                .any(|c| c.as_ref().is_some_and(|c| !c.passed()))
    }
}

/// A booted guest with its baseline.
pub struct LiveGuest {
    _vm: RunningVm,
    booted: Booted,
    a: Attached,
    taint: u64,
}

impl LiveGuest {
    pub fn boot(opts: &VmOpts, guest: &Guest) -> Result<Self> {
        let (vm, booted) = harness::boot(opts, guest).context("booting the corpus guest")?;
        let a = attach_vm(Vm::attach_desc(booted.desc.clone())?).context("attaching to the corpus guest")?;
        let mut g = LiveGuest {
            _vm: vm,
            booted,
            a,
            taint: 0,
        };
        // The boot log is the baseline; so is the boot's taint.
        g.sh("dmesg -c > /dev/null")?;
        g.taint = g.read_taint()?;
        Ok(g)
    }

    fn sh(&self, cmd: &str) -> Result<String> {
        let out = self.booted.console.run(cmd, CMD_TIMEOUT)?;
        anyhow::ensure!(out.status == 0, "`{cmd}` failed in the guest: {}", out.output.trim());
        Ok(out.output)
    }

    fn read_taint(&self) -> Result<u64> {
        let t = self.sh("cat /proc/sys/kernel/tainted")?;
        t.trim().parse().with_context(|| format!("reading the taint: '{}'", t.trim()))
    }

    /// Runs the smoke suite and reads the log and taint.
    pub fn check(&mut self) -> Check {
        let mut c = Check::default();
        match self.booted.console.run("lucos-smoke", SMOKE_TIMEOUT) {
            Ok(out) => {
                c.smoke_failures = out
                    .output
                    .lines()
                    .filter(|l| l.starts_with("smoke ") && l.contains(" FAIL "))
                    .map(str::to_owned)
                    .collect();
            }
            Err(e) => {
                c.dead = Some(format!("smoke suite: {e}"));
                return c;
            }
        }
        match self.sh(&format!("dmesg -c | grep -E '{BAD_LOG}' || true")) {
            Ok(log) => c.bad_log = log.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect(),
            Err(e) => c.dead = Some(format!("reading the kernel log: {e:#}")),
        }
        match self.read_taint() {
            Ok(t) => c.new_taint = t & !self.taint & !TAINT_LIVEPATCH,
            Err(e) => c.dead = Some(format!("{e:#}")),
        }
        c
    }

    /// Apply, check, revert, check.
    pub fn exercise(&mut self, bundle: &Path) -> Live {
        let mut live = Live::default();
        let b = match load_bundle(bundle) {
            Ok(b) => b,
            Err(e) => {
                live.apply_error = Some(format!("{e:#}"));
                return live;
            }
        };
        match apply_bundle(&mut self.a, &b) {
            Ok(r) => live.pause_us = Some(r.pause.as_micros() as u64),
            Err(e) => {
                live.apply_error = Some(format!("{e:#}"));
                return live;
            }
        }
        live.after_apply = Some(self.check());
        if let Err(e) = revert_bundle(&mut self.a, &b.manifest().id) {
            live.revert_error = Some(format!("{e:#}"));
            return live;
        }
        live.after_revert = Some(self.check());
        live
    }
}
