//! A bundle as the running kernel sees it: a `struct module` in patch memory, linked into
//! the kernel's module list, module tree and bug list, so that the kernel's own lookups
//! (exception fixups, `WARN`/`BUG` records, ORC unwinding, kallsyms, `kernel_text_address`)
//! find the new code exactly as they find a loaded module's. See docs/design.md, "The
//! bundle as a module".

pub mod image;
pub mod layout;
pub mod rbtree;
pub mod register;

use lucos_introspect::btf::BtfError;
use lucos_introspect::kaslr::KernelLayout;
use lucos_introspect::modules::{live_btf, ModuleError};
use lucos_introspect::symbols::KernelSymbols;
use lucos_introspect::PhysMem;

use crate::elf::SymPlace;
use crate::{Bundle, Linked, Plan, RegionKind};
use image::{BugEntry, Counts, ExEntry, JumpSite, KExport, KSym, OrcEntry, Tables};
pub use layout::KmodLayout;
pub use register::{Anchors, Bounds, RegisterError};

/// Sections whose entries lucos hands to the kernel through the bundle's module.
pub const EXTABLE: &str = "__ex_table";
pub const BUG_TABLE: &str = "__bug_table";
pub const ORC_IP: &str = ".orc_unwind_ip";
pub const ORC: &str = ".orc_unwind";
pub const JUMP_TABLE: &str = "__jump_table";

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("this kernel cannot take the bundle as a module: {0}")]
    Unsupported(String),
    #[error("this kernel cannot take the bundle as a module: vmlinux has no `{name}` ({source})")]
    NoAnchor {
        name: &'static str,
        #[source]
        source: lucos_introspect::symbols::SymbolError,
    },
    #[error("the kernel's module structures: {0}")]
    Layout(#[from] BtfError),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("section {section} of the bundle is malformed: {reason}")]
    Table { section: String, reason: String },
}

/// What lucos needs to know about the running kernel to register bundles with it.
#[derive(Debug, Clone)]
pub struct KernelModules {
    pub layout: KmodLayout,
    pub anchors: Anchors,
}

/// The running kernel's module bookkeeping, or why there is none (a kernel built without
/// modules, or without BTF).
pub fn probe(
    mem: &(impl PhysMem + ?Sized),
    syms: &KernelSymbols,
    kl: &KernelLayout,
) -> Result<KernelModules, KmodError> {
    let find = |file: &str, name: &'static str| {
        syms.lookup_in_file(file, name)
            .or_else(|_| syms.lookup(name))
            .map(|s| kl.live(s.addr))
            .map_err(|source| KmodError::NoAnchor { name, source })
    };
    let anchors = Anchors {
        modules: find("kernel/module/main.c", "modules")?,
        module_bug_list: find("lib/bug.c", "module_bug_list")?,
        mod_tree: find("kernel/module/main.c", "mod_tree")?,
        module_mutex: find("kernel/module/main.c", "module_mutex")?,
        jump_label_mutex: find("kernel/jump_label.c", "jump_label_mutex")?,
    };
    let layout = KmodLayout::from_btf(&*live_btf(mem, syms, kl)?)?;
    Ok(KernelModules { layout, anchors })
}

/// Whether the bundle has entries (or exports) that only work once the kernel knows the
/// module.
pub fn needs_module(bundle: &Bundle) -> bool {
    has_table(bundle, &[EXTABLE, BUG_TABLE, JUMP_TABLE]) || !bundle.manifest().exports.is_empty()
}

/// Whether the kernel will rewrite the bundle's code itself: its static-branch sites,
/// which `text_poke()` reaches through the direct map of lucos's page tables.
pub fn pokes_code(bundle: &Bundle) -> bool {
    has_table(bundle, &[JUMP_TABLE])
}

fn has_table(bundle: &Bundle, names: &[&str]) -> bool {
    bundle
        .object
        .sections
        .iter()
        .any(|s| names.contains(&s.name.as_str()) && s.size > 0)
}

fn err(section: &str, reason: impl Into<String>) -> KmodError {
    KmodError::Table {
        section: section.to_string(),
        reason: reason.into(),
    }
}

fn image(linked: &Linked, kind: RegionKind) -> &[u8] {
    match kind {
        RegionKind::Text => &linked.text,
        RegionKind::Rodata => &linked.rodata,
        RegionKind::Data => &linked.data,
    }
}

/// Each placed section called `name`: its address and linked bytes.
fn placed<'a>(
    bundle: &Bundle,
    plan: &Plan,
    linked: &'a Linked,
    name: &str,
) -> Vec<(u64, &'a [u8])> {
    let mut out = Vec::new();
    for (i, s) in bundle.object.sections.iter().enumerate() {
        if s.name != name {
            continue;
        }
        if let Some((kind, off)) = plan.placement_of(i) {
            let img = image(linked, kind);
            let end = (off + s.size).min(img.len() as u64);
            out.push((
                linked.regions.base(kind) + off,
                &img[off as usize..end as usize],
            ));
        }
    }
    out
}

/// A table section must hold whole entries of `size` bytes.
fn whole(section: &str, b: &[u8], size: usize) -> Result<(), KmodError> {
    if !b.len().is_multiple_of(size) {
        let n = b.len();
        return Err(err(
            section,
            format!("{n} bytes is not a whole number of entries"),
        ));
    }
    Ok(())
}

fn rel(bytes: &[u8], at: usize, va: u64) -> u64 {
    let d = i32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    va.wrapping_add(at as u64).wrapping_add(d as i64 as u64)
}

/// The kernel-facing tables of a linked bundle, decoded to absolute addresses; `kernel`
/// gives the live address of a kernel symbol a new export names.
pub fn tables(
    bundle: &Bundle,
    plan: &Plan,
    linked: &Linked,
    kernel: &dyn Fn(&str) -> Option<u64>,
) -> Result<Tables, KmodError> {
    let mut t = Tables::default();
    for (va, b) in placed(bundle, plan, linked, EXTABLE) {
        whole(EXTABLE, b, 12)?;
        for at in (0..b.len()).step_by(12) {
            t.ex.push(ExEntry {
                insn: rel(b, at, va),
                fixup: rel(b, at + 4, va),
                data: i32::from_le_bytes(b[at + 8..at + 12].try_into().expect("4 bytes")),
            });
        }
    }
    for (va, b) in placed(bundle, plan, linked, BUG_TABLE) {
        whole(BUG_TABLE, b, 12)?;
        for at in (0..b.len()).step_by(12) {
            let file = i32::from_le_bytes(b[at + 4..at + 8].try_into().expect("4 bytes"));
            t.bugs.push(BugEntry {
                addr: rel(b, at, va),
                file: if file == 0 { 0 } else { rel(b, at + 4, va) },
                line: u16::from_le_bytes([b[at + 8], b[at + 9]]),
                flags: u16::from_le_bytes([b[at + 10], b[at + 11]]),
            });
        }
    }
    let ips = placed(bundle, plan, linked, ORC_IP);
    let orcs = placed(bundle, plan, linked, ORC);
    if ips.len() != orcs.len() {
        return Err(err(
            ORC,
            format!("{} address tables for {} ORC tables", ips.len(), orcs.len()),
        ));
    }
    for ((va, ip), (_, orc)) in ips.iter().zip(&orcs) {
        if ip.len() % 4 != 0 || orc.len() != ip.len() / 4 * 6 {
            return Err(err(
                ORC,
                format!("{} address bytes for {} entry bytes", ip.len(), orc.len()),
            ));
        }
        for i in 0..ip.len() / 4 {
            t.orc.push(OrcEntry {
                ip: rel(ip, 4 * i, *va),
                orc: orc[6 * i..6 * i + 6].try_into().expect("6 bytes"),
            });
        }
    }
    for (va, b) in placed(bundle, plan, linked, JUMP_TABLE) {
        whole(JUMP_TABLE, b, 16)?;
        for at in (0..b.len()).step_by(16) {
            let disp = i64::from_le_bytes(b[at + 8..at + 16].try_into().expect("8 bytes"));
            let key = (va + at as u64 + 8).wrapping_add(disp as u64);
            t.jumps.push(JumpSite {
                code: rel(b, at, va),
                target: rel(b, at + 4, va),
                key: key & !3,
                branch: key & 1 != 0,
            });
        }
    }
    t.symbols = symbols(bundle, plan, linked);
    for e in &bundle.manifest().exports {
        let addr = match &e.symbol {
            Some(s) => t.symbols.iter().find(|k| &k.name == s).map(|k| k.addr),
            None => kernel(&e.name),
        };
        let addr = addr.ok_or_else(|| {
            let what = e.symbol.as_deref().unwrap_or("the running kernel's symbol");
            err(
                "exports",
                format!("`{}` names {what}, which is not there", e.name),
            )
        })?;
        t.exports.push(KExport {
            name: e.name.clone(),
            addr,
            gpl: e.gpl,
            namespace: e.namespace.clone(),
        });
    }
    Ok(t)
}

/// The bundle's functions and objects, for kallsyms.
fn symbols(bundle: &Bundle, plan: &Plan, linked: &Linked) -> Vec<KSym> {
    use object::elf::{STB_LOCAL, STT_FUNC, STT_OBJECT};
    let mut out = Vec::new();
    for s in &bundle.object.symbols {
        if (s.kind != STT_FUNC && s.kind != STT_OBJECT) || s.name.is_empty() {
            continue;
        }
        let SymPlace::Section(sec) = s.place else {
            continue;
        };
        let Some((kind, off)) = plan.placement_of(sec) else {
            continue;
        };
        let letter = match kind {
            RegionKind::Text => b't',
            RegionKind::Rodata => b'r',
            RegionKind::Data => b'd',
        };
        out.push(KSym {
            name: s.name.chars().take(255).collect(),
            addr: linked.regions.base(kind) + off + s.value,
            size: s.size,
            kind: if s.bind == STB_LOCAL {
                letter
            } else {
                letter.to_ascii_uppercase()
            },
        });
    }
    out
}

/// Counts for sizing the region before linking.
pub fn counts(bundle: &Bundle) -> Counts {
    let size = |n: &str, e: u64| -> u64 {
        let s = bundle.object.sections.iter().filter(|s| s.name == n);
        s.map(|s| s.size / e).sum()
    };
    let syms = bundle.object.symbols.iter().filter(|s| !s.name.is_empty());
    let (n, names) = syms.fold((0, 0), |(n, b), s| {
        (n + 1, b + s.name.len().min(255) as u64 + 1)
    });
    let exports = &bundle.manifest().exports;
    Counts {
        exports: exports.len() as u64,
        export_names: exports
            .iter()
            .map(|e| image::export_strings(&e.name, e.namespace.as_deref()))
            .sum(),
        ex: size(EXTABLE, 12),
        bugs: size(BUG_TABLE, 12),
        orcs: size(ORC_IP, 4),
        jumps: size(JUMP_TABLE, 16),
        syms: n,
        names,
    }
}

/// The kernel words a bundle's module is linked through (list heads, tree roots, bounds),
/// by name: what a revert must leave as it found them.
pub fn kernel_words(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    k: &KernelModules,
) -> Result<Vec<(&'static str, u64)>, KmodError> {
    let (l, a) = (&k.layout, &k.anchors);
    let words = [
        ("modules.next", a.modules),
        ("modules.prev", a.modules + 8),
        ("module_bug_list.next", a.module_bug_list),
        ("module_bug_list.prev", a.module_bug_list + 8),
        ("mod_tree.tree[0]", a.mod_tree + l.tree_roots),
        ("mod_tree.tree[1]", a.mod_tree + l.tree_roots + 8),
        ("mod_tree.addr_min", a.mod_tree + l.tree_addr_min),
        ("mod_tree.addr_max", a.mod_tree + l.tree_addr_max),
    ];
    words
        .into_iter()
        .map(|(n, va)| {
            lucos_introspect::paging::read_virt_u64(mem, cr3, lucos_introspect::GuestVirtAddr(va))
                .map(|v| (n, v))
                .map_err(|source| RegisterError::Read { va, source }.into())
        })
        .collect()
}
