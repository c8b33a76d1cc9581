//! The pause guard: a killed lucos never leaves the guest paused.
//!
//! Every attached [`crate::Vm`] starts a guard process (the lucos binary's hidden
//! `pause-guard` command) whose stdin is a pipe from lucos. Before each pause lucos
//! sends `P`; before each write while paused, the bytes the write replaces (`W` for a
//! code write through the gdbstub, `D` for a data write through shared memory); after the
//! resume, `R`. `K` means a pause the operator asked for (`lucos pause`), left alone.
//!
//! When the pipe closes (lucos exited or was killed, whatever the signal) with a pause
//! open, the guard asks QEMU whether the VM still stands. If it does, the switch did not
//! finish: the guard writes back every journalled byte range, newest first, which puts the
//! guest exactly as it was at the pause (sites, kernel words and registry alike: the
//! journal holds whatever was there, so ranges never written are rewritten unchanged),
//! and resumes. Nothing ran in the guest meanwhile, so no vCPU saw the half-done state.
//! What lucos staged before the pause (code, page tables, a first mapping, recorded as
//! pending) stays unreachable and recorded. If the VM runs, lucos resumed it after the
//! switch had settled (committed, or undone by the engine itself), and the guard does
//! nothing. A pause open past the deadline gets lucos killed first, then the same.
//!
//! So the guest is stopped for at most the deadline plus one recovery (a QMP and a
//! gdbstub connection and the journal's writes).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use lucos_introspect::{GuestPhysAddr, Machine};

use crate::error::BackendError;

/// How long lucos may keep a guest paused before its guard kills it and resumes the guest.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

struct Config {
    program: PathBuf,
    deadline: Duration,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Guards every VM this process attaches to from now on; `program` is a lucos binary.
/// Without this (a library user, the guard itself) VMs are attached unguarded.
pub fn enable(program: PathBuf, deadline: Duration) {
    let _ = CONFIG.set(Config { program, deadline });
}

/// The deadline from `LUCOS_PAUSE_DEADLINE_MS`, else [`DEFAULT_DEADLINE`].
pub fn deadline_from_env() -> Duration {
    std::env::var("LUCOS_PAUSE_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_DEADLINE, Duration::from_millis)
}

const HEAD: usize = 1 + 8 + 4;

/// lucos's end of the pipe.
pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

fn guard_err(source: std::io::Error) -> BackendError {
    BackendError::GuardGone { source }
}

impl Guard {
    /// Starts the guard for VM `name`, if guards are enabled.
    pub fn spawn(name: &str) -> Result<Option<Guard>, BackendError> {
        let Some(cfg) = CONFIG.get() else {
            return Ok(None);
        };
        let mut cmd = Command::new(&cfg.program);
        cmd.arg("pause-guard")
            .arg(name)
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--deadline-ms")
            .arg(cfg.deadline.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        // Its own process group: a Ctrl-C at the terminal must not take it with lucos.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| BackendError::GuardSpawn {
            program: cfg.program.clone(),
            source,
        })?;
        let pipe = child.stdin.take();
        Ok(Some(Guard { child, pipe }))
    }

    fn send(&mut self, kind: u8, pa: u64, old: &[u8]) -> Result<(), BackendError> {
        let mut frame = Vec::with_capacity(HEAD + old.len());
        push_frame(&mut frame, kind, pa, old);
        let pipe = self.pipe.as_mut().expect("open until drop");
        pipe.write_all(&frame).map_err(guard_err)
    }

    /// Journals several data writes with one pipe write (one wake-up of the guard instead
    /// of one per word inside the pause).
    pub fn journal_all(&mut self, entries: &[(u64, Vec<u8>)]) -> Result<(), BackendError> {
        let mut frames = Vec::new();
        for (pa, old) in entries {
            push_frame(&mut frames, b'D', *pa, old);
        }
        let pipe = self.pipe.as_mut().expect("open until drop");
        pipe.write_all(&frames).map_err(guard_err)
    }

    pub fn paused(&mut self) -> Result<(), BackendError> {
        self.send(b'P', 0, &[])
    }

    pub fn resumed(&mut self) -> Result<(), BackendError> {
        self.send(b'R', 0, &[])
    }

    /// The pause is the operator's: leave the VM paused whatever happens to lucos.
    pub fn keep(&mut self) -> Result<(), BackendError> {
        self.send(b'K', 0, &[])
    }

    /// `old` is what a write at `pa` is about to replace; `coherent` for code writes.
    pub fn journal(&mut self, coherent: bool, pa: u64, old: &[u8]) -> Result<(), BackendError> {
        self.send(if coherent { b'W' } else { b'D' }, pa, old)
    }
}

fn push_frame(out: &mut Vec<u8>, kind: u8, pa: u64, old: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&pa.to_le_bytes());
    out.extend_from_slice(&(old.len() as u32).to_le_bytes());
    out.extend_from_slice(old);
}

impl Drop for Guard {
    fn drop(&mut self) {
        drop(self.pipe.take());
        let _ = self.child.wait();
    }
}

/// What the guard did when lucos went away.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No pause was open.
    Idle,
    /// A pause was open but the VM runs: lucos resumed it after the switch settled.
    Running,
    /// The VM stood paused: `restored` journal entries written back, then resumed.
    Recovered { restored: usize, killed: bool },
}

enum Frame {
    Mark(u8),
    Write {
        coherent: bool,
        pa: u64,
        old: Vec<u8>,
    },
}

/// Frames from lucos until EOF; a torn last frame (lucos killed while sending it) is
/// dropped: its write never started.
fn read_frames(mut input: impl Read, tx: mpsc::Sender<Frame>) {
    let mut head = [0u8; HEAD];
    while input.read_exact(&mut head).is_ok() {
        let pa = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
        let mut old = vec![0u8; len];
        if input.read_exact(&mut old).is_err() {
            return;
        }
        let frame = match head[0] {
            k @ (b'W' | b'D') => Frame::Write {
                coherent: k == b'W',
                pa,
                old,
            },
            k => Frame::Mark(k),
        };
        if tx.send(frame).is_err() {
            return;
        }
    }
}

/// The guard process: follows lucos's pauses on stdin; see the module docs.
pub fn run(vm: &str, parent: u32, deadline: Duration) -> Result<Outcome, BackendError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || read_frames(std::io::stdin().lock(), tx));
    let mut paused_since: Option<Instant> = None;
    let mut journal: Vec<(bool, u64, Vec<u8>)> = Vec::new();
    let mut killed = false;
    loop {
        let wait = match paused_since {
            Some(t) if !killed => deadline.saturating_sub(t.elapsed()),
            _ => Duration::from_secs(3600),
        };
        match rx.recv_timeout(wait) {
            Ok(Frame::Mark(b'P')) => {
                paused_since = Some(Instant::now());
                journal.clear();
            }
            Ok(Frame::Mark(_)) => {
                paused_since = None;
                journal.clear();
            }
            Ok(Frame::Write { coherent, pa, old }) => journal.push((coherent, pa, old)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if paused_since.is_some_and(|t| t.elapsed() >= deadline) {
                    eprintln!(
                        "lucos pause guard: the guest has been paused for {} ms, past the \
                         deadline; stopping lucos (pid {parent}) and resuming the guest",
                        deadline.as_millis()
                    );
                    crate::sys::signal(parent, true);
                    killed = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if paused_since.is_none() {
        return Ok(Outcome::Idle);
    }
    recover(vm, &journal, killed)
}

fn recover(
    name: &str,
    journal: &[(bool, u64, Vec<u8>)],
    killed: bool,
) -> Result<Outcome, BackendError> {
    let desc = crate::VmDescriptor::load(name)?;
    {
        let mut qmp = crate::qmp::Qmp::connect_timeout(&desc.qmp, Duration::from_secs(30))?;
        if qmp.running()? {
            return Ok(Outcome::Running);
        }
    }
    let mut vm = crate::Vm::attach_desc(desc)?;
    let undo = |vm: &mut crate::Vm| -> Result<(), lucos_introspect::MachineError> {
        if vm.is_paused()? {
            for (coherent, pa, old) in journal.iter().rev() {
                // The journal's wire frames carry bare numbers.
                let pa = GuestPhysAddr(*pa);
                if *coherent {
                    vm.write_phys(pa, old)?;
                } else {
                    vm.write_phys_data(pa, old)?;
                }
            }
            vm.resume()?;
        }
        Ok(())
    };
    undo(&mut vm).map_err(|source| BackendError::GuardRestore {
        name: name.to_string(),
        source,
    })?;
    eprintln!(
        "lucos pause guard: lucos went away with '{name}' paused; restored {} range(s) \
         written during the pause and resumed the guest",
        journal.len()
    );
    Ok(Outcome::Recovered {
        restored: journal.len(),
        killed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, pa: u64, old: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        push_frame(&mut f, kind, pa, old);
        f
    }

    /// A frame torn by a kill is dropped: its write had not started.
    #[test]
    fn frames_are_read_until_eof_and_a_torn_last_one_is_dropped() {
        let mut bytes = frame(b'P', 0, &[]);
        bytes.extend(frame(b'W', 0x1000, &[1, 2, 3, 4, 5]));
        bytes.extend(frame(b'D', 0x2000, &[9; 40]));
        let torn = frame(b'W', 0x3000, &[7; 5]);
        bytes.extend_from_slice(&torn[..torn.len() - 1]);
        let (tx, rx) = mpsc::channel();
        read_frames(&bytes[..], tx);
        let got: Vec<Frame> = rx.iter().collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(got[0], Frame::Mark(b'P')));
        assert!(
            matches!(&got[1], Frame::Write { coherent: true, pa: 0x1000, old } if old == &[1, 2, 3, 4, 5])
        );
        assert!(
            matches!(&got[2], Frame::Write { coherent: false, pa: 0x2000, old } if old.len() == 40)
        );
    }
}
