use std::path::PathBuf;

/// Everything that can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("starting the pause guard {}: {source}", program.display())]
    GuardSpawn {
        program: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pause guard process is gone ({source}); lucos will not pause the guest without it"
    )]
    GuardGone {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "lucos went away with '{name}' paused, and restoring it failed: {source}; run \
         `lucos status {name}` and `lucos resume {name}`"
    )]
    GuardRestore {
        name: String,
        #[source]
        source: lucos_introspect::MachineError,
    },
    #[error("cannot connect to {what} at {path}: {source}; is the VM still running? (`lucos list` shows live VMs)")]
    Connect {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("permission denied {what} {path}: {source}; it belongs to another user: run lucos as the user who started the VM (or as root)")]
    PermissionDenied {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing the {what} {path}: it {reason}. lucos keeps guest RAM, the VM's sockets and its descriptor there and trusts what it finds, so it must be a real directory (not a symlink) owned by you (uid {uid}) and writable only by you: fix it (chown, chmod 700) or remove it, or set LUCOS_RUN_DIR to a directory of your own")]
    UnsafeDir {
        what: &'static str,
        path: PathBuf,
        reason: String,
        uid: u32,
    },
    #[error("{what} connection failed: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("QMP protocol error: {0}")]
    Qmp(String),
    #[error("QMP protocol error: bad JSON from QEMU ({source}): {line}")]
    QmpJson {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },
    #[error("gdbstub protocol error: {0}")]
    Gdb(String),
    #[error("no VM named '{name}' (looked for {path}); start one with `lucos run --name {name}`")]
    NoSuchVm { name: String, path: PathBuf },
    #[error("VM '{name}' is not running any more (its QEMU, pid {pid}, is gone); its stale descriptor was removed")]
    StaleVm { name: String, pid: u32 },
    #[error("VM descriptor {path} is unreadable: {reason}")]
    BadDescriptor { path: PathBuf, reason: String },
    #[error("VM descriptor {path} is unreadable: {source}")]
    DescriptorJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("a VM named '{0}' is already running; pick another --name or stop it first")]
    NameTaken(String),
    #[error(
        "cannot start QEMU ({binary}): {source}; install it with `apt-get install qemu-system-x86`"
    )]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({status}); its stderr said:\n{stderr}")]
    QemuDied { status: String, stderr: String },
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("cannot map {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("patch memory: {0}")]
    PatchMemory(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Connects to a QEMU unix socket. QEMU creates the socket file (bind)
/// a moment before it listens, so a refused connection is retried briefly.
pub(crate) fn connect_unix(
    path: &std::path::Path,
    what: &'static str,
) -> Result<std::os::unix::net::UnixStream, BackendError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(BackendError::PermissionDenied {
                    what: format!("connecting to the {what} at"),
                    path: path.to_owned(),
                    source,
                })
            }
            Err(source) => {
                return Err(BackendError::Connect {
                    what,
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

impl From<BackendError> for lucos_introspect::MachineError {
    fn from(e: BackendError) -> Self {
        lucos_introspect::MachineError::Engine(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_errors_say_permission_not_vm_gone() {
        // Root ignores file modes, so the refusal is made by hand: what
        // connect_unix returns for EACCES.
        let e = BackendError::PermissionDenied {
            what: "connecting to the QMP socket at".into(),
            path: "/dev/shm/lucos/vm1/qmp.sock".into(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        let text = e.to_string();
        assert!(
            text.contains(
                "permission denied connecting to the QMP socket at /dev/shm/lucos/vm1/qmp.sock"
            ),
            "{text}"
        );
        assert!(!text.contains("still running"), "{text}");
    }
}
