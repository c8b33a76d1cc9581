//! Adopting a QEMU that lucos did not start: it only needs the standard
//! interfaces (a QMP socket, a gdbstub socket, guest RAM in a shared
//! memory-backend file and an ivshmem-plain patch-memory device).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::descriptor::{self, KernelInfo, MemFile, RamRegion, VmDescriptor};
use crate::error::BackendError;
use crate::launch::PATCH_DEVICE;

/// Largest RAM that every QEMU x86 machine keeps below 4 GiB in one piece.
const ADOPT_MAX_MIB: u64 = 2048;
use crate::qmp::Qmp;
use crate::sys;

/// What a user knows about a running QEMU.
#[derive(Debug, Clone)]
pub struct Foreign {
    pub name: String,
    pub qmp: PathBuf,
    pub gdb: PathBuf,
    pub ram: PathBuf,
    pub patch: PathBuf,
    pub patch_device: Option<String>,
    pub serial: Option<PathBuf>,
    pub kernel: KernelInfo,
}

fn file_size(path: &Path, what: &str) -> Result<u64, BackendError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|e| {
        BackendError::Config(format!(
            "{what} {}: {e}; give the mem-path of QEMU's memory-backend-file (share=on)",
            path.display()
        ))
    })
}

/// Writes a descriptor for a running QEMU so other lucos commands can
/// attach to it by name.
pub fn adopt(f: &Foreign) -> Result<VmDescriptor, BackendError> {
    descriptor::validate_name(&f.name)?;
    if VmDescriptor::load(&f.name).is_ok() {
        return Err(BackendError::NameTaken(f.name.clone()));
    }
    let mut qmp = Qmp::connect_timeout(&f.qmp, Duration::from_secs(10))?;
    let pid = sys::peer_pid(qmp.stream()).map_err(|source| BackendError::Io {
        what: "QMP peer credentials",
        source,
    })?;
    let vcpus = qmp
        .execute("query-cpus-fast", None)?
        .as_array()
        .map_or(0, Vec::len);
    let kvm = qmp.execute("query-kvm", None)?;
    let accel = if kvm["enabled"].as_bool() == Some(true) {
        "kvm"
    } else {
        "tcg"
    };
    let ram_size = file_size(&f.ram, "guest RAM file")?;
    // q35 splits RAM around the PCI hole from 2816 MiB, `pc` from 3.5 GiB
    // (either, anywhere, with max-ram-below-4g): stay below both.
    if ram_size > ADOPT_MAX_MIB << 20 {
        return Err(BackendError::Config(format!(
            "guest RAM of {} MiB may be split around the PCI hole, which adopt does not map yet; it handles up to {ADOPT_MAX_MIB} MiB",
            ram_size >> 20
        )));
    }
    let patch_size = file_size(&f.patch, "patch memory file")?;
    let dir = crate::rundir::create_vm_dir(&f.name)?;
    let desc = VmDescriptor {
        format: descriptor::FORMAT,
        name: f.name.clone(),
        dir,
        qemu_pid: pid,
        qmp: f.qmp.clone(),
        gdb: f.gdb.clone(),
        serial: f.serial.clone(),
        serial_log: None,
        ram: MemFile {
            path: f.ram.clone(),
            size: ram_size,
        },
        ram_regions: RamRegion::below_4g(ram_size),
        patch: MemFile {
            path: f.patch.clone(),
            size: patch_size,
        },
        patch_device: f
            .patch_device
            .clone()
            .unwrap_or_else(|| PATCH_DEVICE.to_owned()),
        kernel: f.kernel.clone(),
        vcpus,
        accel: accel.to_owned(),
        started_unix_ms: descriptor::now_unix_ms(),
    };
    drop(qmp);
    desc.store()?;
    Ok(desc)
}
