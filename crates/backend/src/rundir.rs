//! The run directory (`$LUCOS_RUN_DIR`, else /dev/shm/lucos) and the VM
//! directories in it: where guest RAM, patch memory, the console log, the
//! QMP/gdbstub/serial sockets and `vm.json` live.
//!
//! Guest RAM is everything the guest knows (keys included), the sockets
//! control the VM, and lucos trusts what a `vm.json` says about where those
//! sockets are, and deletes a VM directory when its VM stops. So:
//!
//! - lucos creates these directories 0700 and its files 0600, and starts
//!   QEMU with umask 077 so that what QEMU creates there (the
//!   memory-backend files, the sockets, the console log) is owner-only from
//!   the moment it exists. A chmod after QEMU created them would leave a
//!   window in which another user could open the RAM file and keep that
//!   descriptor (permissions are only checked at open); with the umask
//!   there is no such window, and the 0700 directory alone already keeps
//!   other users from reaching anything inside it by path.
//! - lucos refuses a run or VM directory that is a symlink, is not owned by
//!   the user running lucos, or is writable by group or others: another
//!   user could otherwise plant a `vm.json` pointing at their own QMP
//!   socket, or have lucos delete their files. Because an accepted
//!   directory is ours and only we can write it, its contents cannot be
//!   swapped between the check and the use; `vm.json` is still opened with
//!   O_NOFOLLOW.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::BackendError;
use crate::sys;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;
/// Largest `vm.json` lucos reads; real ones are about 1 KiB.
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// Where VM directories live: `$LUCOS_RUN_DIR`, else /dev/shm/lucos (RAM
/// files belong on tmpfs), else the temp dir. Not checked: see
/// [`checked_run_dir`].
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LUCOS_RUN_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.join("lucos")
    } else {
        std::env::temp_dir().join("lucos")
    }
}

fn io_at(what: &'static str, path: &Path, source: std::io::Error) -> BackendError {
    if source.kind() == ErrorKind::PermissionDenied {
        return BackendError::PermissionDenied {
            what: what.to_owned(),
            path: path.to_owned(),
            source,
        };
    }
    BackendError::Io { what, source }
}

/// Refuses `dir` unless it is a real directory (not a symlink, which is not
/// followed) owned by the caller and not writable by group or others.
pub fn check_private_dir(dir: &Path, what: &'static str) -> Result<(), BackendError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io_at(what, dir, e))?;
    let me = sys::euid();
    let reason = if meta.file_type().is_symlink() {
        "is a symbolic link".to_owned()
    } else if !meta.is_dir() {
        "is not a directory".to_owned()
    } else if meta.uid() != me {
        format!("belongs to uid {}, not to you", meta.uid())
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(BackendError::UnsafeDir {
        what,
        path: dir.to_owned(),
        reason,
        uid: me,
    })
}

/// The run directory, checked; with `create`, made (0700) if missing.
/// `Ok(None)`: it does not exist and was not to be created.
pub fn checked_run_dir(create: bool) -> Result<Option<PathBuf>, BackendError> {
    let dir = run_dir();
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound && !create => return Ok(None),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // If someone else creates it first, the check below refuses it.
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&dir)
                .map_err(|e| io_at("run directory", &dir, e))?;
        }
        Err(e) => return Err(io_at("run directory", &dir, e)),
    }
    check_private_dir(&dir, "run directory")?;
    Ok(Some(dir))
}

/// The directory of VM `name` in the checked run directory, if both exist;
/// an existing VM directory must pass the same checks.
pub fn existing_vm_dir(name: &str) -> Result<Option<PathBuf>, BackendError> {
    crate::descriptor::validate_name(name)?;
    let Some(run) = checked_run_dir(false)? else {
        return Ok(None);
    };
    let dir = run.join(name);
    match std::fs::symlink_metadata(&dir) {
        Ok(_) => check_private_dir(&dir, "VM directory").map(|()| Some(dir)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at("VM directory", &dir, e)),
    }
}

/// Creates the directory of VM `name` (0700, whatever the umask). One left
/// by a VM that is gone is replaced; a live VM of that name is refused.
pub fn create_vm_dir(name: &str) -> Result<PathBuf, BackendError> {
    crate::descriptor::validate_name(name)?;
    let run = checked_run_dir(true)?.expect("created");
    let dir = run.join(name);
    if existing_vm_dir(name)?.is_some() {
        if crate::descriptor::VmDescriptor::load(name).is_ok() {
            return Err(BackendError::NameTaken(name.to_owned()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Not recursive: fails if the directory appeared meanwhile.
    DirBuilder::new()
        .mode(DIR_MODE)
        .create(&dir)
        .map_err(|e| io_at("VM directory", &dir, e))?;
    std::fs::set_permissions(&dir, Permissions::from_mode(DIR_MODE))
        .map_err(|e| io_at("VM directory", &dir, e))?;
    Ok(dir)
}

/// Reads a small file without following a symlink in its last component.
/// `Ok(None)`: it does not exist.
pub fn read_private(path: &Path, what: &'static str) -> Result<Option<String>, BackendError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(BackendError::UnsafeDir {
                what,
                path: path.to_owned(),
                reason: "is a symbolic link".into(),
                uid: sys::euid(),
            })
        }
        Err(e) => return Err(io_at(what, path, e)),
    };
    let mut text = String::new();
    f.take(MAX_DESCRIPTOR)
        .read_to_string(&mut text)
        .map_err(|e| io_at(what, path, e))?;
    Ok(Some(text))
}

/// Creates (or replaces) a file readable and writable by its owner only,
/// never following a symlink.
pub fn create_private(path: &Path, what: &'static str) -> Result<std::fs::File, BackendError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_at(what, path, e)),
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_at(what, path, e))
}

/// Writes `text` to `path` through a private temporary file and a rename,
/// so a reader sees the old or the new contents, never a mix.
pub fn write_private(path: &Path, text: &[u8], what: &'static str) -> Result<(), BackendError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    let mut f = create_private(&tmp, what)?;
    f.write_all(text).map_err(|e| io_at(what, &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_at(what, path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_real_directories_pass() {
        let t = tempfile::tempdir().unwrap();
        let ok = t.path().join("ok");
        DirBuilder::new().mode(0o700).create(&ok).unwrap();
        check_private_dir(&ok, "run directory").unwrap();
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, Permissions::from_mode(0o777)).unwrap();
        let e = check_private_dir(&open, "run directory").unwrap_err();
        assert!(
            e.to_string()
                .contains("writable by group or others (mode 777)"),
            "{e}"
        );
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        let e = check_private_dir(&link, "run directory").unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert!(e.to_string().contains("LUCOS_RUN_DIR"), "{e}");
    }

    #[test]
    fn private_files_are_0600_and_symlinks_are_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("vm.json");
        write_private(&p, b"{}", "VM descriptor").unwrap();
        let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private(&p, "VM descriptor").unwrap().unwrap(), "{}");
        let link = t.path().join("link.json");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = read_private(&link, "VM descriptor").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(read_private(&t.path().join("none"), "x").unwrap().is_none());
    }
}
