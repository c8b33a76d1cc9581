//! The only `unsafe` code in lucos: shared memory mappings of guest RAM and
//! patch memory, and a few process-control syscalls.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::BackendError;

/// A shared mapping of a QEMU memory-backend file. The guest writes it
/// concurrently, so it is only ever accessed by copying through raw
/// pointers, never through references to its contents.
pub struct SharedMem {
    map: MmapRaw,
}

impl SharedMem {
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let err = |source| BackendError::Map {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let map = MmapOptions::new().map_raw(&file).map_err(err)?;
        Ok(SharedMem { map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn check(&self, off: usize, len: usize) -> bool {
        off.checked_add(len)
            .is_some_and(|end| end <= self.map.len())
    }

    /// Copies out; returns false if the range is outside the mapping.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        if !self.check(off, buf.len()) {
            return false;
        }
        // SAFETY: the range was bounds-checked against the live mapping,
        // which stays mapped for the lifetime of `self`; `buf` is a distinct
        // Rust allocation, so the regions do not overlap. Concurrent guest
        // writes can tear the copy, which callers tolerate (they pause the
        // VM when they need a consistent view).
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        true
    }

    /// Copies in; returns false if the range is outside the mapping.
    pub fn write(&self, off: usize, data: &[u8]) -> bool {
        if !self.check(off, data.len()) {
            return false;
        }
        // SAFETY: bounds-checked as in `read`; the mapping is writable
        // (opened read-write, MAP_SHARED) and `data` cannot alias it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(off), data.len())
        };
        true
    }
}

/// Makes the child receive SIGKILL when the spawning thread dies, so a
/// crashed or killed lucos never leaves QEMU behind.
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls
    // prctl(2) and getppid(2), both async-signal-safe; it touches no Rust
    // state of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent exited before QEMU started"));
            }
            Ok(())
        });
    }
}

/// Makes the child create its files for its owner only (umask 077): QEMU
/// creates the guest RAM and patch memory files, the sockets and the
/// console log itself, and with this they are never accessible to anyone
/// else, not even for a moment (see rundir.rs).
pub fn owner_only_files(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls
    // umask(2), which is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
}

/// The effective uid: who must own the directories lucos trusts.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a process with this pid exists (signal 0 probes without sending).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 only checks for existence/permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends SIGTERM or SIGKILL to a process.
pub fn signal(pid: u32, kill: bool) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: plain kill(2) on a pid we started; failure is harmless.
        unsafe { libc::kill(pid, if kill { libc::SIGKILL } else { libc::SIGTERM }) };
    }
}

/// QEMUs this process started and has not shut down yet, with their VM
/// directories: what the exit hook and the signal handler clean up.
static LIVE: std::sync::Mutex<Vec<(u32, std::path::PathBuf)>> = std::sync::Mutex::new(Vec::new());
static EXIT_HOOK: std::sync::Once = std::sync::Once::new();

fn live() -> std::sync::MutexGuard<'static, Vec<(u32, std::path::PathBuf)>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

extern "C" fn kill_live_vms() {
    for (pid, dir) in live().drain(..) {
        signal(pid, true);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Records a started QEMU. When the process exits normally, whatever is
/// still recorded is killed and its directory removed (VMs kept in statics
/// by test harnesses are never dropped).
pub fn track(pid: u32, dir: std::path::PathBuf) {
    EXIT_HOOK.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn()` that only takes a
        // mutex, sends signals and removes files; atexit has no other
        // preconditions.
        unsafe { libc::atexit(kill_live_vms) };
    });
    live().push((pid, dir));
}

/// Forgets a QEMU that was shut down normally.
pub fn untrack(pid: u32) {
    live().retain(|(p, _)| *p != pid);
}

/// On SIGINT/SIGTERM/SIGHUP: kill every tracked QEMU, remove its files and
/// exit (130). For commands that own VMs but no event loop (demo, bench,
/// tests); `lucos run` shuts down through QMP instead.
pub fn exit_on_signal() -> std::io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        result =
            signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).map(|mut signals| {
                std::thread::spawn(move || {
                    if signals.forever().next().is_some() {
                        kill_live_vms();
                        std::process::exit(130);
                    }
                });
            });
    });
    result
}

/// Pid of the process at the other end of a connected unix socket
/// (SO_PEERCRED): how lucos learns which QEMU it adopted.
pub fn peer_pid(stream: &std::os::unix::net::UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a properly
    // sized and aligned ucred that outlives the call; the fd is valid for the
    // lifetime of `stream`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(cred.pid).map_err(|_| std::io::Error::other("no peer pid"))
}
