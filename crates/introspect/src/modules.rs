//! Loaded kernel modules, read from outside: the kernel's `modules` list, each `struct
//! module`'s name, state, core memory and kallsyms, with member offsets from BTF.
//!
//! Nothing here trusts guest memory: the walk is bounded, every pointer is translated
//! through the kernel's page tables (a bad one is an error, not a crash), and names are
//! length-limited.

use std::sync::{Arc, Mutex};

use crate::addr::GuestVirtAddr;
use crate::btf::{Btf, BtfError};
use crate::kaslr::KernelLayout;
use crate::machine::PhysMem;
use crate::paging::{read_virt, read_virt_u64, PagingError};
use crate::symbols::KernelSymbols;

/// More modules than any kernel loads: a longer list is corrupt or changing under us.
const MAX_MODULES: usize = 4096;
/// Longer symbol tables are taken as corrupt.
const MAX_SYMBOLS: u64 = 1 << 20;
/// `MODULE_NAME_LEN` on 64-bit.
const NAME_LEN: usize = 56;
const ELF64_SYM: u64 = 24;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("the kernel's struct module layout: {0}")]
    Layout(#[from] BtfError),
    #[error("reading module memory at {va:#x}: {source}")]
    Read {
        va: u64,
        #[source]
        source: PagingError,
    },
    #[error("the module list does not end after {MAX_MODULES} entries (changing or corrupt)")]
    TooMany,
    #[error("module {name}: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("the kernel's BTF (__start_BTF..__stop_BTF) is {len} bytes, which is implausible")]
    ImplausibleBtf { len: u64 },
    #[error("boot_cpu_data.x86_capability has {words} words, which is implausible")]
    ImplausibleCapabilities { words: u64 },
    #[error("vmlinux has no {what} ({source})")]
    NoSymbol {
        what: &'static str,
        #[source]
        source: crate::symbols::SymbolError,
    },
}

/// Offsets in `struct module` and `struct mod_kallsyms` (Linux 6.1 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleOffsets {
    list: u64,
    name: u64,
    state: u64,
    base: u64,
    size: u64,
    text_size: u64,
    kallsyms: u64,
    symtab: u64,
    num_symtab: u64,
    strtab: u64,
}

impl ModuleOffsets {
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let m = |p: &str| btf.offset_of("module", p);
        let k = |p: &str| btf.offset_of("mod_kallsyms", p);
        Ok(ModuleOffsets {
            list: m("list")?,
            name: m("name")?,
            state: m("state")?,
            base: m("core_layout.base")?,
            size: m("core_layout.size")?,
            text_size: m("core_layout.text_size")?,
            kallsyms: m("kallsyms")?,
            symtab: k("symtab")?,
            num_symtab: k("num_symtab")?,
            strtab: k("strtab")?,
        })
    }
}

/// `enum module_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleState {
    Live,
    Coming,
    Going,
    Unformed,
    Other(u32),
}

impl From<u32> for ModuleState {
    fn from(v: u32) -> Self {
        match v {
            0 => ModuleState::Live,
            1 => ModuleState::Coming,
            2 => ModuleState::Going,
            3 => ModuleState::Unformed,
            n => ModuleState::Other(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleSymbol {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub is_func: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoadedModule {
    pub name: String,
    pub state: ModuleState,
    /// Address of its `struct module`.
    pub module: u64,
    /// Core memory (text, then read-only data, then data): base, size, text size.
    pub base: u64,
    pub size: u64,
    pub text_size: u64,
    pub symbols: Vec<ModuleSymbol>,
}

impl LoadedModule {
    /// The function called `name` in this module's symbol table.
    pub fn function(&self, name: &str) -> Option<&ModuleSymbol> {
        self.symbols.iter().find(|s| s.is_func && s.name == name)
    }
}

struct Reader<'a, P: PhysMem + ?Sized> {
    mem: &'a P,
    cr3: u64,
}

impl<P: PhysMem + ?Sized> Reader<'_, P> {
    fn u64(&self, va: u64) -> Result<u64, ModuleError> {
        read_virt_u64(self.mem, self.cr3, GuestVirtAddr(va))
            .map_err(|source| ModuleError::Read { va, source })
    }
    fn bytes(&self, va: u64, buf: &mut [u8]) -> Result<(), ModuleError> {
        read_virt(self.mem, self.cr3, GuestVirtAddr(va), buf)
            .map_err(|source| ModuleError::Read { va, source })
    }
    fn u32(&self, va: u64) -> Result<u32, ModuleError> {
        let mut b = [0u8; 4];
        self.bytes(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// A NUL-terminated string of at most `max` bytes (reads stop at a page end first,
    /// so a short string next to an unmapped page still reads).
    fn string(&self, va: u64, max: usize) -> Result<String, ModuleError> {
        let mut out = Vec::new();
        let mut at = va;
        while out.len() < max {
            let room = (4096 - (at % 4096) as usize).min(max - out.len()).min(64);
            let mut buf = vec![0u8; room];
            self.bytes(at, &mut buf)?;
            if let Some(end) = buf.iter().position(|&b| b == 0) {
                out.extend_from_slice(&buf[..end]);
                break;
            }
            out.extend_from_slice(&buf);
            at += room as u64;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// (build id, live address of the BTF, the parsed BTF).
type BtfEntry = (Vec<u8>, u64, Arc<Btf>);

/// The running kernel's own BTF (`__start_BTF`..`__stop_BTF` in its memory), so layouts
/// are those of the kernel that runs, whatever vmlinux lucos was given. It is read-only
/// data of a kernel whose build id matches `syms` (checked at attach), so it is read and
/// parsed once per process and kernel: one apply used to read its megabytes three times.
pub fn live_btf(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    layout: &KernelLayout,
) -> Result<Arc<Btf>, ModuleError> {
    static CACHE: Mutex<Vec<BtfEntry>> = Mutex::new(Vec::new());
    let id = syms.build_id().map(<[u8]>::to_vec).unwrap_or_default();
    let va = layout.live(syms.lookup("__start_BTF").map_or(0, |s| s.addr));
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if !id.is_empty() {
        if let Some((_, _, btf)) = cache.iter().find(|(i, v, _)| *i == id && *v == va) {
            return Ok(btf.clone());
        }
    }
    let btf = Arc::new(read_live_btf(mem, syms, layout)?);
    if !id.is_empty() {
        cache.push((id, va, btf.clone()));
    }
    Ok(btf)
}

fn read_live_btf(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    layout: &KernelLayout,
) -> Result<Btf, ModuleError> {
    let (Ok(start), Ok(stop)) = (syms.lookup("__start_BTF"), syms.lookup("__stop_BTF")) else {
        return Err(BtfError::Missing { what: "modules" }.into());
    };
    let len = stop.addr.saturating_sub(start.addr);
    if len == 0 || len > 64 << 20 {
        return Err(ModuleError::ImplausibleBtf { len });
    }
    let mut buf = vec![0u8; len as usize];
    let va = layout.live(start.addr);
    read_virt(mem, layout.cr3, GuestVirtAddr(va), &mut buf)
        .map_err(|source| ModuleError::Read { va, source })?;
    Ok(Btf::parse(&buf)?)
}

/// The boot CPU's feature words (`boot_cpu_data.x86_capability`, the bug words
/// included), which decide the kernel's alternatives; layout from the live BTF.
pub fn cpu_feature_words(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    layout: &KernelLayout,
) -> Result<Vec<u32>, ModuleError> {
    let btf = live_btf(mem, syms, layout)?;
    let off = btf.offset_of("cpuinfo_x86", "x86_capability")?;
    let n = btf.array_len("cpuinfo_x86", "x86_capability")?;
    if n == 0 || n > 64 {
        return Err(ModuleError::ImplausibleCapabilities { words: n });
    }
    let bcd = syms
        .lookup("boot_cpu_data")
        .map_err(|source| ModuleError::NoSymbol {
            what: "boot_cpu_data",
            source,
        })?;
    let va = layout.live(bcd.addr) + off;
    let mut buf = vec![0u8; (n * 4) as usize];
    read_virt(mem, layout.cr3, GuestVirtAddr(va), &mut buf)
        .map_err(|source| ModuleError::Read { va, source })?;
    Ok(buf
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect())
}

/// Every loaded module of the running kernel (pause the VM around it for a consistent
/// list).
pub fn loaded(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    layout: &KernelLayout,
) -> Result<Vec<LoadedModule>, ModuleError> {
    let off = ModuleOffsets::from_btf(&*live_btf(mem, syms, layout)?)?;
    let head = syms
        .lookup_in_file("kernel/module/main.c", "modules")
        .or_else(|_| syms.lookup("modules"))
        .map_err(|source| ModuleError::NoSymbol {
            what: "`modules` list head",
            source,
        })?;
    list_modules(mem, layout.cr3, layout.live(head.addr), &off)
}

/// Every module on the list headed at `head` (the live address of vmlinux's `modules`).
/// Read with the VM paused for a consistent list.
pub fn list_modules(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    head: u64,
    off: &ModuleOffsets,
) -> Result<Vec<LoadedModule>, ModuleError> {
    let r = Reader { mem, cr3 };
    let mut out = Vec::new();
    let mut node = r.u64(head)?;
    while node != head {
        if out.len() == MAX_MODULES {
            return Err(ModuleError::TooMany);
        }
        let m = node.wrapping_sub(off.list);
        out.push(read_module(&r, m, off)?);
        node = r.u64(node)?;
    }
    Ok(out)
}

/// The module whose `struct module` is at live `m`, whether or not it is on the list: a
/// lucos bundle unlinked at revert keeps its `struct module` (and its ORC and symbols) in
/// patch memory until reclaimed, and a task may still sleep in its code.
pub fn module_at(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    btf: &Btf,
    m: u64,
) -> Result<LoadedModule, ModuleError> {
    let off = ModuleOffsets::from_btf(btf)?;
    read_module(&Reader { mem, cr3 }, m, &off)
}

fn read_module<P: PhysMem + ?Sized>(
    r: &Reader<'_, P>,
    m: u64,
    off: &ModuleOffsets,
) -> Result<LoadedModule, ModuleError> {
    let name = r.string(m + off.name, NAME_LEN)?;
    let state = ModuleState::from(r.u32(m + off.state)?);
    let base = r.u64(m + off.base)?;
    let size = u64::from(r.u32(m + off.size)?);
    let text_size = u64::from(r.u32(m + off.text_size)?);
    let mut symbols = Vec::new();
    // A module still being loaded has no symbol table yet.
    let ks = r.u64(m + off.kallsyms)?;
    if ks != 0 && state != ModuleState::Unformed {
        let symtab = r.u64(ks + off.symtab)?;
        let count = u64::from(r.u32(ks + off.num_symtab)?);
        let strtab = r.u64(ks + off.strtab)?;
        if count > MAX_SYMBOLS {
            return Err(ModuleError::Corrupt {
                name,
                reason: format!("{count} symbols"),
            });
        }
        let mut table = vec![0u8; (count * ELF64_SYM) as usize];
        r.bytes(symtab, &mut table)?;
        for e in table.chunks_exact(ELF64_SYM as usize) {
            let st_name = u32::from_le_bytes(e[0..4].try_into().expect("4"));
            let info = e[4];
            let value = u64::from_le_bytes(e[8..16].try_into().expect("8"));
            let sz = u64::from_le_bytes(e[16..24].try_into().expect("8"));
            if st_name == 0 || value == 0 {
                continue;
            }
            symbols.push(ModuleSymbol {
                name: r.string(strtab + u64::from(st_name), 256)?,
                addr: value,
                size: sz,
                is_func: info & 0xf == 2,
            });
        }
    }
    Ok(LoadedModule {
        name,
        state,
        module: m,
        base,
        size,
        text_size,
        symbols,
    })
}
