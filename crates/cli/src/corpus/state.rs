//! The resumable state of a corpus run: written after every step, so an interrupted run
//! goes on where it stopped.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::live::Live;
use super::outcome::BuildResult;
use super::scope::Scope;
use super::units::Unit;

/// Bump when the state's meaning changes: an older state is then started afresh.
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub build: Option<BuildResult>,
    pub live: Option<Live>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub from: String,
    pub to: String,
    /// The guest kernel (release and build id) the bundles target.
    pub kernel: String,
    pub scope: Scope,
    pub units: Vec<Unit>,
    pub results: BTreeMap<String, UnitRecord>,
}

impl State {
    pub fn new(from: &str, to: &str, kernel: &str, scope: Scope, units: Vec<Unit>) -> Self {
        State {
            format: FORMAT,
            from: from.into(),
            to: to.into(),
            kernel: kernel.into(),
            scope,
            units,
            results: BTreeMap::new(),
        }
    }

    /// The state at `path` if it belongs to the same update and kernel.
    pub fn load(path: &Path, from: &str, to: &str, kernel: &str) -> Option<Self> {
        let s: State = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        (s.format == FORMAT && s.from == from && s.to == to && s.kernel == kernel).then_some(s)
    }

    /// Writes atomically (a rename), so a kill leaves the previous state.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn record(&mut self, id: &str) -> &mut UnitRecord {
        self.results.entry(id.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_resumes_only_for_the_same_update_and_kernel() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.json");
        let mut s = State::new("6.1.187-1", "6.1.190-1", "k1", Scope::default(), Vec::new());
        s.record("u001").live = Some(Live::default());
        s.save(&p).unwrap();
        let back = State::load(&p, "6.1.187-1", "6.1.190-1", "k1").unwrap();
        assert_eq!(back.results, s.results);
        assert!(State::load(&p, "6.1.187-1", "6.1.192-1", "k1").is_none());
        assert!(State::load(&p, "6.1.187-1", "6.1.190-1", "k2").is_none());
    }
}
