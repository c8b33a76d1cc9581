//! The engine side of lucos: QEMU started or attached through standard
//! interfaces only (QMP, the gdbstub, and guest RAM shared through
//! memory-backend files), so lucos can drive a VM it did not start.

pub mod adopt;
pub mod console;
pub mod descriptor;
pub mod error;
pub mod gdb;
pub mod guard;
pub mod launch;
pub mod qmp;
pub mod rundir;
#[allow(unsafe_code)] // the one module with `unsafe`: mappings and libc calls
mod sys;
pub mod vm;

pub use console::Console;
pub use descriptor::VmDescriptor;
pub use error::BackendError;
pub use launch::{Accel, LaunchConfig, RunningVm, SerialMode};
pub use vm::Vm;

pub use sys::exit_on_signal;

/// SIGKILLs a process (tests use it to make a VM disappear).
pub fn sys_kill(pid: u32) {
    sys::signal(pid, true);
}
