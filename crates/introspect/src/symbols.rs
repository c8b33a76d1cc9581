//! The kernel's symbol table, section bytes, relocations and build id,
//! read from the `vmlinux` ELF the running kernel was built from.
//!
//! All addresses here are link-time; add the KASLR slide (see
//! [`crate::kaslr`]) to get live ones.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use object::ReadCache;
use serde::Serialize;

use read::parse;
pub use slide::{apply_slide, RelocField, RelocKind};

mod read;
mod slide;
#[cfg(test)]
mod tests;

/// Start of the kernel image mapping; `phys_base` is relative to it.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum SymbolKind {
    Func,
    Object,
    NoType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Binding {
    Global,
    Weak,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Symbol {
    pub name: String,
    /// Link-time address.
    pub addr: u64,
    pub size: u64,
    pub kind: SymbolKind,
    pub binding: Binding,
    /// Source file of a local, from the STT_FILE symbol before it. vmlinux
    /// records base names (`cmdline.c`), not paths.
    pub file: Option<String>,
    /// A zero-based per-CPU offset, not an address: KASLR does not move it.
    pub percpu: bool,
}

impl Symbol {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.size
    }

    /// `file.c:name` for locals, `name` otherwise (the form `resolve_spec` takes).
    pub fn qualified_name(&self) -> String {
        match &self.file {
            Some(f) if self.binding == Binding::Local => format!("{f}:{}", self.name),
            _ => self.name.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not a usable x86-64 ELF vmlinux: {msg}")]
    BadElf {
        origin: String,
        msg: String,
        /// `object`'s reason, when its reader refused the file.
        #[source]
        source: Option<object::read::Error>,
    },
    #[error("{origin} has no symbol table (.symtab); it was stripped: use the vmlinux from the kernel build tree")]
    NoSymtab { origin: String },
    #[error("no symbol `{name}` in vmlinux{}; static and small functions are often inlined into their callers and then have no symbol of their own", variants_hint(.variants))]
    NotFound { name: String, variants: Vec<String> },
    #[error("`{name}` is a local (static) symbol in several files ({}); qualify it as `file.c:{name}`, e.g. `{}:{name}`", .files.join(", "), .files.first().map(String::as_str).unwrap_or("file.c"))]
    Ambiguous { name: String, files: Vec<String> },
    #[error("`{name}` is not defined in a file matching `{file}`; it is a local in: {}", .files.join(", "))]
    NotInFile {
        file: String,
        name: String,
        files: Vec<String>,
    },
    #[error("{} locals named `{name}` come from files matching `{file}` (vmlinux records only base names, so same-named files cannot be told apart); their addresses: {}", .addrs.len(), hex_list(.addrs))]
    AmbiguousInFile {
        file: String,
        name: String,
        addrs: Vec<u64>,
    },
    #[error("bad symbol spec `{spec}`: expected `name` or `path/file.c:name`")]
    BadSpec { spec: String },
    #[error("link-time range {addr:#x}+{len:#x} is not inside one section with file contents (is it .bss, per-CPU data, or outside the kernel?)")]
    NoSection { addr: u64, len: u64 },
    #[error("vmlinux has no relocation sections, so KASLR-adjusted bytes cannot be predicted; build with CONFIG_RELOCATABLE=y and use the unstripped vmlinux (vmlinux.unstripped on kernels that strip it), or load the build's vmlinux.relocs")]
    NoRelocs,
    #[error("{path} is not a vmlinux.relocs file: {why}")]
    BadRelocsFile { path: PathBuf, why: String },
    #[error("vmlinux has no GNU build-id note; the kernel must be linked with --build-id (the default) so lucos can check it matches the running kernel")]
    NoBuildId,
}

fn variants_hint(v: &[String]) -> String {
    if v.is_empty() {
        String::new()
    } else {
        format!(" (compiler-renamed copies exist: {})", v.join(", "))
    }
}

fn hex_list(v: &[u64]) -> String {
    v.iter()
        .map(|a| format!("{a:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug)]
struct Section {
    name: String,
    addr: u64,
    size: u64,
    offset: u64,
    alloc: bool,
    /// Allocated in memory and with bytes in the file (not NOBITS).
    loaded: bool,
    note: bool,
}

#[derive(Debug)]
enum Backing {
    Bytes(Vec<u8>),
    File(File),
}

/// Symbols, relocations and section bytes of one vmlinux.
pub struct KernelSymbols {
    origin: String,
    backing: Backing,
    sections: Vec<Section>,
    symbols: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
    /// Non-per-CPU symbols sorted by address, best name first at each address.
    by_addr: Vec<usize>,
    /// Slide-adjusted fields, sorted by link-time address.
    relocs: Vec<(u64, RelocKind)>,
    has_relocs: bool,
    /// (descriptor bytes, link-time address of the descriptor).
    build_id: Option<(Vec<u8>, u64)>,
}

impl std::fmt::Debug for KernelSymbols {
    // The tables are huge; show what identifies this vmlinux instead.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSymbols")
            .field("origin", &self.origin)
            .field("symbols", &self.symbols.len())
            .field("reloc_fields", &self.relocs.len())
            .field(
                "build_id",
                &self.build_id.as_ref().map(|b| hex::encode(&b.0)),
            )
            .finish()
    }
}

struct Parsed {
    sections: Vec<Section>,
    symbols: Vec<Symbol>,
    relocs: Vec<(u64, RelocKind)>,
    has_relocs: bool,
    build_id: Option<(Vec<u8>, u64)>,
}

impl KernelSymbols {
    /// Reads a vmlinux from disk. Only the symbol and relocation tables are
    /// loaded; section bytes are read from the file on demand (vmlinux with
    /// debug info is hundreds of MB).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SymbolError> {
        let path = path.as_ref();
        let io = |source| SymbolError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let origin = path.display().to_string();
        let cache = ReadCache::new(file);
        let parsed = parse(&cache, &origin)?;
        Ok(Self::assemble(
            origin,
            Backing::File(cache.into_inner()),
            parsed,
        ))
    }

    /// The GNU build id of the ELF file at `path`, hex, without loading
    /// its symbols.
    pub fn read_build_id_hex(path: impl AsRef<Path>) -> Result<String, SymbolError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| SymbolError::Io {
            path: path.to_owned(),
            source,
        })?;
        let cache = ReadCache::new(file);
        read::parse_build_id(&cache, &path.display().to_string())?
            .map(hex::encode)
            .ok_or(SymbolError::NoBuildId)
    }

    /// Parses an ELF image held in memory.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, SymbolError> {
        let origin = "<in-memory ELF>".to_string();
        let parsed = parse(data.as_slice(), &origin)?;
        Ok(Self::assemble(origin, Backing::Bytes(data), parsed))
    }

    fn assemble(origin: String, backing: Backing, p: Parsed) -> Self {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in p.symbols.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        let mut by_addr: Vec<usize> = (0..p.symbols.len())
            .filter(|&i| !p.symbols[i].percpu)
            .collect();
        by_addr.sort_by_key(|&i| {
            let s = &p.symbols[i];
            (s.addr, s.kind, s.binding, std::cmp::Reverse(s.size))
        });
        KernelSymbols {
            origin,
            backing,
            sections: p.sections,
            symbols: p.symbols,
            by_name,
            by_addr,
            relocs: p.relocs,
            has_relocs: p.has_relocs,
            build_id: p.build_id,
        }
    }

    /// Where this table was loaded from (for messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Every symbol with this exact name (globals and all locals).
    pub fn all_named(&self, name: &str) -> impl Iterator<Item = &Symbol> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &self.symbols[i])
    }

    fn global_named(&self, name: &str) -> Option<&Symbol> {
        let mut defs: Vec<&Symbol> = self
            .all_named(name)
            .filter(|s| s.binding != Binding::Local)
            .collect();
        defs.sort_by_key(|s| s.binding);
        defs.first().copied()
    }

    fn not_found(&self, name: &str) -> SymbolError {
        let prefix = format!("{name}.");
        let mut variants: Vec<String> = self
            .by_name
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        variants.sort();
        variants.truncate(8);
        SymbolError::NotFound {
            name: name.to_string(),
            variants,
        }
    }

    /// The global (or weak) definition of `name`, else its only local.
    pub fn lookup(&self, name: &str) -> Result<&Symbol, SymbolError> {
        if let Some(s) = self.global_named(name) {
            return Ok(s);
        }
        let locals: Vec<&Symbol> = self.all_named(name).collect();
        match locals.as_slice() {
            [] => Err(self.not_found(name)),
            [one] => Ok(one),
            many => Err(SymbolError::Ambiguous {
                name: name.to_string(),
                files: many.iter().map(|s| file_label(s)).collect(),
            }),
        }
    }

    /// The local `name` of source file `file`, given as a base name
    /// (`cmdline.c`) or a path (`fs/proc/cmdline.c`). A global of that name
    /// is accepted when no local matches: vmlinux records no file for globals.
    pub fn lookup_in_file(&self, file: &str, name: &str) -> Result<&Symbol, SymbolError> {
        let locals: Vec<&Symbol> = self
            .all_named(name)
            .filter(|s| s.binding == Binding::Local)
            .collect();
        let matching: Vec<&Symbol> = locals
            .iter()
            .copied()
            .filter(|s| s.file.as_deref().is_some_and(|f| file_matches(f, file)))
            .collect();
        match matching.as_slice() {
            [one] => Ok(one),
            [] => {
                if let Some(g) = self.global_named(name) {
                    Ok(g)
                } else if locals.is_empty() {
                    Err(self.not_found(name))
                } else {
                    Err(SymbolError::NotInFile {
                        file: file.to_string(),
                        name: name.to_string(),
                        files: locals.iter().map(|s| file_label(s)).collect(),
                    })
                }
            }
            many => Err(SymbolError::AmbiguousInFile {
                file: file.to_string(),
                name: name.to_string(),
                addrs: many.iter().map(|s| s.addr).collect(),
            }),
        }
    }

    /// [`Self::lookup_in_file`] when a source file is given, else [`Self::lookup`]: how
    /// manifests name kernel symbols (`old` with an optional `old_file`).
    pub fn lookup_maybe_in(&self, file: Option<&str>, name: &str) -> Result<&Symbol, SymbolError> {
        match file {
            Some(f) => self.lookup_in_file(f, name),
            None => self.lookup(name),
        }
    }

    /// Resolves `name` or `path/file.c:name`.
    pub fn resolve_spec(&self, spec: &str) -> Result<&Symbol, SymbolError> {
        let spec = spec.trim();
        let bad = || SymbolError::BadSpec {
            spec: spec.to_string(),
        };
        match spec.rsplit_once(':') {
            Some((file, name)) => {
                if file.is_empty() || name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(bad());
                }
                self.lookup_in_file(file, name)
            }
            None if spec.is_empty() || spec.contains(char::is_whitespace) => Err(bad()),
            None => self.lookup(spec),
        }
    }

    /// The symbol containing link-time `addr` and the offset into it:
    /// the innermost sized symbol covering it, else the nearest size-0
    /// label at or below it (asm code), else `None` (padding, outside).
    pub fn symbol_at(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let end = self
            .by_addr
            .partition_point(|&i| self.symbols[i].addr <= addr);
        let near = self.by_addr[..end].iter().rev().take(256);
        if let Some(s) = near.map(|&i| &self.symbols[i]).find(|s| s.contains(addr)) {
            return Some((s, addr - s.addr));
        }
        let top = self.symbols[*self.by_addr[..end].last()?].addr;
        self.by_addr[..end]
            .iter()
            .rev()
            .map(|&i| &self.symbols[i])
            .take_while(|s| s.addr == top)
            .filter(|s| s.size == 0)
            .last()
            .map(|s| (s, addr - s.addr))
    }

    /// Link-time address and size of the loaded section `name` (e.g. `.rodata`).
    pub fn section_range(&self, name: &str) -> Option<(u64, u64)> {
        self.sections
            .iter()
            .find(|s| s.loaded && s.addr != 0 && s.name == name)
            .map(|s| (s.addr, s.size))
    }

    /// Whether link-time `addr` is in an allocated section of the image at its own
    /// address (`.bss` included; not a zero-based per-CPU offset).
    pub fn in_image(&self, addr: u64) -> bool {
        self.sections
            .iter()
            .any(|s| s.alloc && s.addr != 0 && addr >= s.addr && addr - s.addr < s.size)
    }

    /// Name of the section holding link-time `addr` (e.g. `.text`).
    pub fn section_name_at(&self, addr: u64) -> Option<&str> {
        self.sections
            .iter()
            .find(|s| s.loaded && s.addr != 0 && addr >= s.addr && addr - s.addr < s.size)
            .map(|s| s.name.as_str())
    }

    fn section_for(&self, addr: u64, len: u64) -> Result<&Section, SymbolError> {
        self.sections
            .iter()
            .find(|s| {
                s.loaded
                    && s.addr != 0
                    && addr >= s.addr
                    && addr
                        .checked_add(len)
                        .is_some_and(|end| end <= s.addr + s.size)
            })
            .ok_or(SymbolError::NoSection { addr, len })
    }

    /// vmlinux's bytes for link-time `[addr, addr+len)`, from one section.
    pub fn section_bytes(&self, addr: u64, len: usize) -> Result<Vec<u8>, SymbolError> {
        let s = self.section_for(addr, len as u64)?;
        let off = s.offset + (addr - s.addr);
        let mut buf = vec![0u8; len];
        match &self.backing {
            Backing::Bytes(data) => {
                let src = usize::try_from(off)
                    .ok()
                    .and_then(|o| data.get(o..o + len))
                    .ok_or(SymbolError::NoSection {
                        addr,
                        len: len as u64,
                    })?;
                buf.copy_from_slice(src);
            }
            Backing::File(f) => {
                f.read_exact_at(&mut buf, off)
                    .map_err(|source| SymbolError::Io {
                        path: PathBuf::from(&self.origin),
                        source,
                    })?
            }
        }
        Ok(buf)
    }

    /// Fields inside link-time `[addr, addr+len)` that the KASLR decompressor
    /// rewrote at boot. vmlinux is linked with `--emit-relocs`; the boot code
    /// adds the slide to every absolute (R_X86_64_64/32/32S) field, except
    /// those naming zero-based per-CPU symbols, and subtracts it from PC32
    /// fields naming per-CPU symbols (mirroring arch/x86/tools/relocs.c).
    /// Other PC-relative fields are unchanged since code and target move
    /// together. Fields straddling the range's ends are left out; use
    /// [`KernelSymbols::expected_bytes`], which accounts for them.
    pub fn abs_reloc_offsets(&self, addr: u64, len: usize) -> Result<Vec<RelocField>, SymbolError> {
        if !self.has_relocs {
            return Err(SymbolError::NoRelocs);
        }
        let end = addr.saturating_add(len as u64);
        let start = self.relocs.partition_point(|r| r.0 < addr);
        Ok(self.relocs[start..]
            .iter()
            .take_while(|r| r.0 < end)
            .filter(|r| r.0 + r.1.width() as u64 <= end)
            .map(|&(a, kind)| RelocField {
                offset: (a - addr) as usize,
                kind,
            })
            .collect())
    }

    /// Replaces the relocation fields with those of a `vmlinux.relocs` file
    /// (arch/x86/boot/compressed/ or the top of the build tree), for a
    /// vmlinux whose `.rela` sections were stripped. Its format, from
    /// relocs.c: u32 words `0, abs64.., 0, inverse32.., 0, abs32..`, each
    /// the low 32 bits of a link-time address.
    pub fn load_relocs_file(&mut self, path: impl AsRef<Path>) -> Result<(), SymbolError> {
        let path = path.as_ref();
        let bad = |why: &str| SymbolError::BadRelocsFile {
            path: path.to_owned(),
            why: why.to_string(),
        };
        let data = std::fs::read(path).map_err(|source| SymbolError::Io {
            path: path.to_owned(),
            source,
        })?;
        if data.len() % 4 != 0 || data.len() < 12 {
            return Err(bad("length is not a multiple of 4 or too short"));
        }
        let words = data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
        let kinds = [RelocKind::Abs64, RelocKind::InversePc32, RelocKind::Abs32];
        let mut relocs = Vec::new();
        let mut part = None::<usize>;
        for w in words {
            if w == 0 {
                part = Some(part.map_or(0, |p| p + 1));
                if part > Some(2) {
                    return Err(bad("more than three zero separators"));
                }
                continue;
            }
            let kind = kinds[part.ok_or_else(|| bad("does not start with a zero word"))?];
            relocs.push((w as i32 as i64 as u64, kind));
        }
        if part != Some(2) {
            return Err(bad(
                "fewer than three zero separators (is it a 32-bit kernel's?)",
            ));
        }
        relocs.sort_unstable_by_key(|r| r.0);
        self.relocs = relocs;
        self.has_relocs = true;
        Ok(())
    }

    /// What live memory at link-time `[addr, addr+len)` should hold under
    /// `slide`, before any runtime patching (alternatives, ftrace, jump
    /// labels, static calls rewrite code after boot and are not modelled).
    pub fn expected_bytes(
        &self,
        addr: u64,
        len: usize,
        slide: i64,
    ) -> Result<Vec<u8>, SymbolError> {
        let s = self.section_for(addr, len as u64)?;
        let lo = addr.saturating_sub(7).max(s.addr);
        let hi = (addr + len as u64).saturating_add(7).min(s.addr + s.size);
        let mut bytes = self.section_bytes(lo, (hi - lo) as usize)?;
        let fields = self.abs_reloc_offsets(lo, bytes.len())?;
        apply_slide(&mut bytes, &fields, slide);
        let from = (addr - lo) as usize;
        Ok(bytes[from..from + len].to_vec())
    }

    /// The GNU build id (NT_GNU_BUILD_ID descriptor).
    pub fn build_id(&self) -> Result<&[u8], SymbolError> {
        self.build_id
            .as_ref()
            .map(|b| b.0.as_slice())
            .ok_or(SymbolError::NoBuildId)
    }

    pub fn build_id_hex(&self) -> Result<String, SymbolError> {
        self.build_id().map(hex::encode)
    }

    /// Link-time address of the build-id descriptor; the kernel keeps its
    /// notes mapped, so the live copy is at this address plus the slide.
    pub fn notes_addr(&self) -> Result<u64, SymbolError> {
        self.build_id
            .as_ref()
            .map(|b| b.1)
            .ok_or(SymbolError::NoBuildId)
    }
}

fn file_label(s: &Symbol) -> String {
    s.file.clone().unwrap_or_else(|| "<unknown file>".into())
}

/// Whether a recorded file name (base name or path) names the same file as
/// the user's `want` (base name or path): equal, or one is a path ending in
/// `/` + the other.
fn file_matches(recorded: &str, want: &str) -> bool {
    let suffix = |long: &str, short: &str| {
        long.strip_suffix(short)
            .is_some_and(|head| head.ends_with('/'))
    };
    recorded == want || suffix(recorded, want) || suffix(want, recorded)
}
