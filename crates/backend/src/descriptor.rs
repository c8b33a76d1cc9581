//! The VM descriptor: what a `lucos` process needs to attach to a VM by
//! name. Written by whoever starts the VM; any QEMU started with the same
//! interfaces can be described by hand.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::BackendError;
use crate::{rundir, sys};

pub const FORMAT: u32 = 1;
pub const FILE_NAME: &str = "vm.json";

/// A contiguous piece of guest-physical RAM and where it sits in the RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub gpa: u64,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFile {
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Cached guest build (holds vmlinux, System.map, the build tree).
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    /// GNU build id of vmlinux, hex.
    pub build_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescriptor {
    pub format: u32,
    pub name: String,
    pub dir: PathBuf,
    pub qemu_pid: u32,
    pub qmp: PathBuf,
    pub gdb: PathBuf,
    /// Serial console socket, when the console is not on a terminal.
    pub serial: Option<PathBuf>,
    pub serial_log: Option<PathBuf>,
    pub ram: MemFile,
    pub ram_regions: Vec<RamRegion>,
    /// Patch memory: a file-backed ivshmem-plain BAR the guest never allocates.
    pub patch: MemFile,
    pub patch_device: String,
    pub kernel: KernelInfo,
    pub vcpus: usize,
    pub accel: String,
    pub started_unix_ms: u64,
}

impl RamRegion {
    /// All of a RAM file at guest-physical 0: a VM whose RAM sits below the
    /// PCI hole in one piece.
    pub fn below_4g(size: u64) -> Vec<RamRegion> {
        vec![RamRegion {
            gpa: 0,
            offset: 0,
            len: size,
        }]
    }
}

/// Milliseconds since the Unix epoch, for `started_unix_ms`.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub use crate::rundir::run_dir;

/// Longest VM name: it names a directory and appears in socket paths.
pub const MAX_NAME: usize = 48;

/// VM names are path components: no '/', '.' or '..', nothing to escape.
pub fn validate_name(name: &str) -> Result<(), BackendError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        return Ok(());
    }
    // A name given by mistake can be a whole file: do not echo it back.
    let shown = if name.len() <= MAX_NAME {
        format!("'{name}'")
    } else {
        format!("of {} bytes", name.len())
    };
    Err(BackendError::Config(format!(
        "VM name {shown} must be 1-{MAX_NAME} characters of letters, digits, '-' or '_'"
    )))
}

impl VmDescriptor {
    pub fn parse(path: &Path, text: &str) -> Result<Self, BackendError> {
        let bad = |reason: String| BackendError::BadDescriptor {
            path: path.to_owned(),
            reason,
        };
        let d: VmDescriptor =
            serde_json::from_str(text).map_err(|source| BackendError::DescriptorJson {
                path: path.to_owned(),
                source,
            })?;
        if d.format != FORMAT {
            return Err(bad(format!(
                "format {} is not the supported {FORMAT}",
                d.format
            )));
        }
        if d.ram_regions.is_empty() {
            return Err(bad("no RAM regions".into()));
        }
        for r in &d.ram_regions {
            if r.offset
                .checked_add(r.len)
                .is_none_or(|end| end > d.ram.size)
            {
                return Err(bad(format!("RAM region {r:?} lies outside the RAM file")));
            }
        }
        Ok(d)
    }

    /// Loads the descriptor of a live VM; a descriptor whose QEMU is gone is
    /// removed (with its files) and reported as stale. The run and VM
    /// directories must be the caller's own (rundir.rs).
    pub fn load(name: &str) -> Result<Self, BackendError> {
        let no_vm = || BackendError::NoSuchVm {
            name: name.to_owned(),
            path: run_dir().join(name).join(FILE_NAME),
        };
        let dir = rundir::existing_vm_dir(name)?.ok_or_else(no_vm)?;
        let path = dir.join(FILE_NAME);
        let text = rundir::read_private(&path, "VM descriptor")?.ok_or_else(no_vm)?;
        let d = Self::parse(&path, &text)?;
        if !sys::process_alive(d.qemu_pid) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(BackendError::StaleVm {
                name: name.to_owned(),
                pid: d.qemu_pid,
            });
        }
        Ok(d)
    }

    /// Writes `vm.json` (0600) into the VM directory.
    pub fn store(&self) -> Result<(), BackendError> {
        let text = serde_json::to_string_pretty(self).expect("descriptor serializes");
        rundir::write_private(&self.dir.join(FILE_NAME), text.as_bytes(), "VM descriptor")
    }

    /// All live VMs; stale descriptors are cleaned up on the way, and
    /// directories that fail the checks are skipped. An unsafe run
    /// directory is an error.
    pub fn list() -> Result<Vec<VmDescriptor>, BackendError> {
        let Some(run) = rundir::checked_run_dir(false)? else {
            return Ok(Vec::new());
        };
        let Ok(entries) = std::fs::read_dir(run) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<_> = entries
            .flatten()
            .filter_map(|e| Self::load(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Maps a guest-physical range to an offset in the RAM file.
    pub fn ram_offset(&self, gpa: u64, len: u64) -> Option<u64> {
        self.ram_regions.iter().find_map(|r| {
            let end = gpa.checked_add(len)?;
            (gpa >= r.gpa && end <= r.gpa + r.len).then(|| r.offset + (gpa - r.gpa))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmDescriptor {
        VmDescriptor {
            format: FORMAT,
            name: "t".into(),
            dir: "/x".into(),
            qemu_pid: 1,
            qmp: "/x/qmp.sock".into(),
            gdb: "/x/gdb.sock".into(),
            serial: None,
            serial_log: None,
            ram: MemFile {
                path: "/x/ram".into(),
                size: 512 << 20,
            },
            ram_regions: vec![RamRegion {
                gpa: 0,
                offset: 0,
                len: 512 << 20,
            }],
            patch: MemFile {
                path: "/x/patch".into(),
                size: 8 << 20,
            },
            patch_device: "lucos-patch".into(),
            kernel: KernelInfo {
                dir: "/k".into(),
                vmlinux: "/k/vmlinux".into(),
                build_id: "ab".into(),
            },
            vcpus: 2,
            accel: "tcg".into(),
            started_unix_ms: 0,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let d = sample();
        let text = serde_json::to_string(&d).unwrap();
        assert_eq!(VmDescriptor::parse(Path::new("vm.json"), &text).unwrap(), d);

        let mut bad = d.clone();
        bad.format = 9;
        let e = VmDescriptor::parse(Path::new("vm.json"), &serde_json::to_string(&bad).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("format 9"), "{e}");

        let mut bad = d.clone();
        bad.ram_regions[0].len = 1 << 40;
        assert!(
            VmDescriptor::parse(Path::new("vm.json"), &serde_json::to_string(&bad).unwrap())
                .is_err()
        );

        assert!(VmDescriptor::parse(Path::new("vm.json"), "{not json").is_err());
        assert!(VmDescriptor::parse(Path::new("vm.json"), "{}").is_err());
    }

    #[test]
    fn ram_offsets_respect_regions() {
        let mut d = sample();
        d.ram_regions = vec![
            RamRegion {
                gpa: 0,
                offset: 0,
                len: 0x1000,
            },
            RamRegion {
                gpa: 0x1_0000_0000,
                offset: 0x1000,
                len: 0x1000,
            },
        ];
        d.ram.size = 0x2000;
        assert_eq!(d.ram_offset(0x10, 8), Some(0x10));
        assert_eq!(d.ram_offset(0x1_0000_0010, 8), Some(0x1010));
        assert_eq!(
            d.ram_offset(0xffc, 8),
            None,
            "straddles the end of a region"
        );
        assert_eq!(d.ram_offset(0x5000, 1), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("demo-1_a").is_ok());
        for bad in ["", "a/b", "..", "x y", &"n".repeat(49)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        let long = validate_name(&"n".repeat(5000)).unwrap_err().to_string();
        assert!(long.len() < 200, "{long}");
        assert!(long.contains("of 5000 bytes"), "{long}");
    }
}
