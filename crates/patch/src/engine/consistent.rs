//! Consistent mode: the switch happens only at a pause in which no task has a replaced
//! function on its stack. livepatch gets that guarantee from per-task transitions inside
//! the guest; lucos gets it from outside by checking every stack while the guest is
//! stopped, and resuming and trying again (a bounded number of times) when one is not clean.

use std::time::{Duration, Instant};

use lucos_introspect::Machine;

use super::{EngineError, Session, Site};
use crate::registry::ModuleSite;

/// A site about to be switched, as the gate sees it.
#[derive(Debug, Clone)]
pub struct GateSite {
    pub function: String,
    pub func_addr: u64,
    pub site_addr: u64,
    /// What the site holds now (an earlier bundle's `jmp`, or the function's entry).
    pub current: [u8; 5],
    pub module: Option<ModuleSite>,
    /// The site is an entry whose 5 bytes span several instructions: no frame may be in
    /// `site_addr + 1 .. site_addr + 5`, whether or not the switch is consistent.
    pub window: bool,
}

/// Decides, with the guest paused, whether the switch may happen now: `Ok(None)` when no
/// task is in the code the sites lead to, `Ok(Some(who))` naming the tasks that are.
/// Borrowed, not boxed: a `Session` has no destructor, so callers may read the machine
/// again while one is still in scope.
pub type Gate<'a, M> =
    &'a mut (dyn FnMut(&mut M, &[GateSite]) -> Result<Option<String>, String> + 'a);

/// What a gate checks, so that the engine can tell whether it is enough for a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateScope {
    /// No task in any code a switch leaves (every replaced function, whole): consistent.
    Functions,
    /// Only no task inside an entry's first 5 bytes (a site without fentry).
    EntryWindows,
}

/// How often and how patiently to try.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub tries: u32,
    /// The guest runs this long between two pauses (doubling, up to 8 times this).
    pub backoff: Duration,
}

/// What a consistent switch cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consistency {
    /// Pauses taken, the successful one included.
    pub tries: u32,
    /// Time paused in the tries that found a task in old code.
    pub failed_pause: Duration,
}

impl<'a, M: Machine + ?Sized> Session<'a, M> {
    /// Makes each next switch first pass `gate`, which checks what `scope` says.
    pub fn set_gate(&mut self, gate: Gate<'a, M>, retry: Retry, scope: GateScope) {
        self.gate = Some((gate, retry, scope));
    }

    /// A bundle that changes a frame-local type, or the prototype of a static function
    /// whose callers it replaces, is safe only if every switch of it is consistent (see
    /// `Manifest::frame_types` and `Manifest::prototypes`); `id` is refused otherwise,
    /// unchanged.
    pub(super) fn check_needs_consistency(
        &self,
        id: &str,
        types: &[String],
        prototypes: &[String],
    ) -> Result<(), EngineError> {
        if matches!(&self.gate, Some((_, _, GateScope::Functions))) {
            return Ok(());
        }
        if let Some(t) = types.first() {
            return Err(EngineError::FrameTypeNeedsConsistency {
                id: id.to_owned(),
                type_name: t.clone(),
            });
        }
        match prototypes.first() {
            Some(f) => Err(EngineError::PrototypeNeedsConsistency {
                id: id.to_owned(),
                function: f.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The cost of the last consistent switch.
    pub fn consistency(&self) -> Option<Consistency> {
        self.consistency
    }

    /// Pauses the guest for a switch. Without a gate, once. With one, until the gate finds
    /// it clean (the guest stays paused) or the tries run out (the guest is resumed, and the
    /// error says who held it). Returns when the successful pause began.
    pub(super) fn pause_for_switch(
        &mut self,
        sites: &[(&Site, [u8; 5])],
        was_paused: bool,
    ) -> Result<Instant, EngineError> {
        let Some((gate, retry, scope)) = self.gate.take() else {
            let t = Instant::now();
            self.m.pause()?;
            return Ok(t);
        };
        let view: Vec<GateSite> = sites
            .iter()
            .map(|(s, _)| GateSite {
                function: s.function.clone(),
                func_addr: s.func_addr,
                site_addr: s.site_addr,
                current: s.current,
                module: s.module.clone(),
                window: s.window,
            })
            .collect();
        let mut stats = Consistency::default();
        let mut backoff = retry.backoff;
        let out = loop {
            stats.tries += 1;
            let t = Instant::now();
            if let Err(e) = self.m.pause() {
                break Err(e.into());
            }
            let who = match gate(&mut *self.m, &view) {
                Ok(None) => break Ok(t),
                Ok(Some(who)) => who,
                Err(e) => {
                    if !was_paused {
                        let _ = self.m.resume();
                    }
                    break Err(EngineError::Gate(e));
                }
            };
            if !was_paused {
                if let Err(e) = self.m.resume() {
                    break Err(EngineError::ResumeFailed(e));
                }
            }
            stats.failed_pause += t.elapsed();
            if stats.tries >= retry.tries || was_paused {
                break Err(EngineError::NotQuiescent {
                    tries: stats.tries,
                    paused_us: stats.failed_pause.as_micros() as u64,
                    holders: who,
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(retry.backoff * 8);
        };
        self.consistency = Some(stats);
        self.gate = Some((gate, retry, scope));
        out
    }
}
