//! Switch helpers for the fake-kernel engine tests.

use lucos_introspect::fake::{Failing, FakeMachine};
use lucos_introspect::{GuestPhysAddr, PhysMem};
use lucos_patch::registry::Registry;
use lucos_patch::{Bundle, EngineError, GateScope, GateSite, Retry, Session};

use super::kernel::FakeKernel;

pub fn registry(k: &FakeKernel, m: &mut FakeMachine) -> Registry {
    k.session(m).unwrap().registry().unwrap()
}

pub fn site(m: &FakeMachine, pa: u64) -> [u8; 5] {
    let mut b = [0u8; 5];
    m.read_phys(GuestPhysAddr(pa), &mut b).unwrap();
    b
}

pub fn apply_with(
    k: &FakeKernel,
    m: &mut FakeMachine,
    b: &Bundle,
    faults: impl FnOnce(Failing<'_, FakeMachine>) -> Failing<'_, FakeMachine>,
) -> Result<(), EngineError> {
    let mut f = faults(Failing::new(m));
    k.session(&mut f)?.apply(b).map(|_| ())
}

pub fn revert_with(
    k: &FakeKernel,
    m: &mut FakeMachine,
    id: &str,
    faults: impl FnOnce(Failing<'_, FakeMachine>) -> Failing<'_, FakeMachine>,
) -> Result<(), EngineError> {
    let mut f = faults(Failing::new(m));
    k.session(&mut f)?.revert(id).map(|_| ())
}

pub fn assert_unchanged(k: &FakeKernel, m: &FakeMachine, what: &str) {
    assert!(m.mem == k.fresh.mem, "{what}: the guest's memory changed");
    assert!(!m.paused, "{what}: the VM was left paused");
}

/// Runs `op` on a session whose gate checks `scope` and answers `busy` or clean.
pub fn gated<R>(
    k: &FakeKernel,
    m: &mut FakeMachine,
    scope: GateScope,
    busy: Option<&str>,
    op: impl FnOnce(&mut Session<'_, FakeMachine>) -> Result<R, EngineError>,
) -> Result<R, EngineError> {
    let mut gate = |_: &mut FakeMachine, _: &[GateSite]| Ok(busy.map(str::to_owned));
    let mut sess = k.session(m)?;
    let retry = Retry {
        tries: 2,
        backoff: std::time::Duration::from_millis(1),
    };
    sess.set_gate(&mut gate, retry, scope);
    op(&mut sess)
}
