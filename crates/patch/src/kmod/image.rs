//! The bytes of a bundle's kernel-facing region: its `struct module`, followed by the
//! tables the kernel searches (exception fixups, bug records, ORC), merged from all of the
//! bundle's objects and sorted the way the module loader sorts them, and a kallsyms symbol
//! table. Entries are position-relative, so they are re-encoded for where they end up.

use super::layout::KmodLayout;

/// `struct exception_table_entry`: instruction, fixup, handler type and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExEntry {
    pub insn: u64,
    pub fixup: u64,
    pub data: i32,
}

/// `struct bug_entry` (with `CONFIG_DEBUG_BUGVERBOSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BugEntry {
    pub addr: u64,
    /// The file name string, 0 if none.
    pub file: u64,
    pub line: u16,
    pub flags: u16,
}

/// One ORC entry: the address it starts at and the 6 bytes of `struct orc_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrcEntry {
    pub ip: u64,
    pub orc: [u8; 6],
}

impl OrcEntry {
    /// An "undefined" entry (`sp_reg` = `ORC_REG_UNDEFINED`, not `end`): objtool puts one
    /// after each section. `sp_reg` is the low nibble of byte 4; `end` is bit 2 of byte 5.
    fn is_terminator(&self) -> bool {
        self.orc[4] & 0xf == 0 && self.orc[5] & 0x4 == 0
    }
}

/// `struct jump_entry`: a static-branch site, where it jumps, its key and polarity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JumpSite {
    pub code: u64,
    pub target: u64,
    pub key: u64,
    /// The `branch` bit: the site jumps when the key is *disabled*.
    pub branch: bool,
}

/// For one static key the new code uses: where its entries start in the module's sorted
/// jump table, and two `struct static_key_mod` slots: the module's own, and a spare for the
/// key's original entries in case the key has no module users yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JumpKey {
    pub key: u64,
    pub entries: u64,
    pub ours: u64,
    pub spare: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KSym {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    /// The `nm`-style type letter shown in `/proc/kallsyms` (`t`, `T`, `d`, `r` ...).
    pub kind: u8,
}

/// A symbol the module exports: name, address, and whether only GPL modules may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KExport {
    pub name: String,
    pub addr: u64,
    pub gpl: bool,
    pub namespace: Option<String>,
}

/// Bytes an export's strings take in the module: its name and its namespace (if any),
/// each NUL-terminated.
pub fn export_strings(name: &str, namespace: Option<&str>) -> u64 {
    name.len() as u64 + 1 + namespace.map_or(0, |n| n.len() as u64 + 1)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub ex: Vec<ExEntry>,
    pub bugs: Vec<BugEntry>,
    pub orc: Vec<OrcEntry>,
    pub jumps: Vec<JumpSite>,
    pub symbols: Vec<KSym>,
    pub exports: Vec<KExport>,
}

impl Tables {
    /// The distinct keys, in the order of the sorted jump table.
    fn keys(&self) -> Vec<u64> {
        let mut k: Vec<u64> = self.jumps.iter().map(|j| j.key).collect();
        k.sort_unstable();
        k.dedup();
        k
    }
}

/// What the module covers: all of the bundle's regions, text first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Core {
    pub base: u64,
    pub size: u64,
    pub text_size: u64,
    pub ro_size: u64,
}

/// Offsets of the pieces inside the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pieces {
    ex: u64,
    bugs: u64,
    orc_ip: u64,
    orc: u64,
    jumps: u64,
    skm: u64,
    symtab: u64,
    strtab: u64,
    typetab: u64,
    /// `struct kernel_symbol` arrays (plain, then GPL-only) and their name strings.
    ksymtab: u64,
    ksymtab_gpl: u64,
    kstrtab: u64,
    end: u64,
}

/// `struct kernel_symbol` with `CONFIG_HAVE_ARCH_PREL32_RELOCATIONS` (x86-64): value,
/// name and namespace, each an `int` offset from the field itself.
const KERNEL_SYMBOL: u64 = 12;

const ELF64_SYM: u64 = 24;
const TAINT_LIVEPATCH: u64 = 15;
/// `MODULE_REF_BASE` plus the one reference lucos holds, so the guest cannot unload it.
const REFCNT: u32 = 2;

fn pieces(l: &KmodLayout, t: &Tables) -> Pieces {
    let a = |x: u64| x.next_multiple_of(8);
    let ex = a(l.size);
    let bugs = ex + 12 * t.ex.len() as u64;
    let orc_ip = a(bugs + 12 * t.bugs.len() as u64);
    let orc = orc_ip + 4 * t.orc.len() as u64;
    let jumps = a(orc + 6 * t.orc.len() as u64);
    let skm = jumps + 16 * t.jumps.len() as u64;
    let symtab = a(skm + 2 * l.skm_size * t.keys().len() as u64);
    let nsyms = t.symbols.len() as u64 + 1;
    let strtab = symtab + ELF64_SYM * nsyms;
    let strings: u64 = 1 + t
        .symbols
        .iter()
        .map(|s| s.name.len() as u64 + 1)
        .sum::<u64>();
    let typetab = strtab + strings;
    let gpl = t.exports.iter().filter(|e| e.gpl).count() as u64;
    let ksymtab = a(typetab + nsyms);
    let ksymtab_gpl = ksymtab + KERNEL_SYMBOL * (t.exports.len() as u64 - gpl);
    let kstrtab = ksymtab_gpl + KERNEL_SYMBOL * gpl;
    let kstrings: u64 = t
        .exports
        .iter()
        .map(|e| export_strings(&e.name, e.namespace.as_deref()))
        .sum();
    Pieces {
        ex,
        bugs,
        orc_ip,
        orc,
        jumps,
        skm,
        symtab,
        strtab,
        typetab,
        ksymtab,
        ksymtab_gpl,
        kstrtab,
        end: kstrtab + kstrings,
    }
}

/// Upper bound of [`region_size`] from counts alone (before linking, names unknown).
pub fn region_size_bound(l: &KmodLayout, c: Counts) -> u64 {
    l.size
        + 64
        + 12 * c.ex
        + 12 * c.bugs
        + 10 * c.orcs
        + (16 + 2 * l.skm_size) * c.jumps
        + (ELF64_SYM + 2) * (c.syms + 1)
        + c.names
        + 1
        + 8
        + (KERNEL_SYMBOL + 1) * c.exports
        + c.export_names
}

/// Entry counts of a bundle's tables, known before linking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ex: u64,
    pub bugs: u64,
    pub orcs: u64,
    pub jumps: u64,
    pub syms: u64,
    pub names: u64,
    pub exports: u64,
    pub export_names: u64,
}

fn put(buf: &mut [u8], at: u64, bytes: &[u8]) {
    buf[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

fn rel32(target: u64, at: u64) -> [u8; 4] {
    (target.wrapping_sub(at) as i64 as i32).to_le_bytes()
}

/// The module name the kernel shows (`[lucos_<id>]` in backtraces, `lsmod`).
pub fn module_name(id: &str, max: u64) -> String {
    let clean: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let mut name = format!("lucos_{clean}");
    name.truncate(max.saturating_sub(1) as usize);
    name
}

/// Builds the region at virtual address `va`, and says where each static key's entries
/// and `static_key_mod` slots are. Tables are sorted here.
pub fn build(
    l: &KmodLayout,
    va: u64,
    name: &str,
    build_id: &[u8],
    core: Core,
    t: &Tables,
) -> (Vec<u8>, Vec<JumpKey>) {
    let p = pieces(l, t);
    let mut b = vec![0u8; p.end as usize];
    let m = va;
    put(&mut b, l.state, &0u32.to_le_bytes());
    for list in [l.list, l.source_list, l.target_list, l.bug_list] {
        put(&mut b, list, &(m + list).to_le_bytes());
        put(&mut b, list + 8, &(m + list).to_le_bytes());
    }
    let n = name.as_bytes();
    put(&mut b, l.name, &n[..n.len().min(l.name_len as usize - 1)]);
    put(&mut b, l.refcnt, &REFCNT.to_le_bytes());
    put(&mut b, l.taints, &(1u64 << TAINT_LIVEPATCH).to_le_bytes());
    put(&mut b, l.base, &core.base.to_le_bytes());
    put(&mut b, l.core_size, &(core.size as u32).to_le_bytes());
    put(&mut b, l.text_size, &(core.text_size as u32).to_le_bytes());
    put(&mut b, l.ro_size, &(core.ro_size as u32).to_le_bytes());
    put(
        &mut b,
        l.ro_after_init_size,
        &(core.ro_size as u32).to_le_bytes(),
    );
    put(&mut b, l.mtn_mod, &m.to_le_bytes());
    if let Some(off) = l.build_id {
        put(&mut b, off, &build_id[..build_id.len().min(20)]);
    }

    let mut ex = t.ex.clone();
    ex.sort_by_key(|e| e.insn);
    for (i, e) in ex.iter().enumerate() {
        let at = p.ex + 12 * i as u64;
        put(&mut b, at, &rel32(e.insn, va + at));
        put(&mut b, at + 4, &rel32(e.fixup, va + at + 4));
        put(&mut b, at + 8, &e.data.to_le_bytes());
    }
    for (i, e) in t.bugs.iter().enumerate() {
        let at = p.bugs + 12 * i as u64;
        put(&mut b, at, &rel32(e.addr, va + at));
        let file = if e.file == 0 {
            [0; 4]
        } else {
            rel32(e.file, va + at + 4)
        };
        put(&mut b, at + 4, &file);
        put(&mut b, at + 8, &e.line.to_le_bytes());
        put(&mut b, at + 10, &e.flags.to_le_bytes());
    }
    let mut orc = t.orc.clone();
    // As the kernel's orc_sort_cmp: at equal addresses the terminator goes first, so the
    // real entry of the function starting there wins the search.
    orc.sort_by_key(|e| (e.ip, !e.is_terminator()));
    for (i, e) in orc.iter().enumerate() {
        let at = p.orc_ip + 4 * i as u64;
        put(&mut b, at, &rel32(e.ip, va + at));
        put(&mut b, p.orc + 6 * i as u64, &e.orc);
    }
    write_kallsyms(&mut b, l, &p, va, t);
    write_exports(&mut b, l, &p, va, t);
    let keys = write_jumps(&mut b, l, &p, va, t);

    let mut ptr = |field: u64, piece: u64, count: usize, count_field: u64| {
        put(
            &mut b,
            field,
            &(if count > 0 { va + piece } else { 0 }).to_le_bytes(),
        );
        put(&mut b, count_field, &(count as u32).to_le_bytes());
    };
    ptr(l.extable, p.ex, ex.len(), l.num_exentries);
    ptr(l.bug_table, p.bugs, t.bugs.len(), l.num_bugs);
    ptr(l.orc_unwind_ip, p.orc_ip, orc.len(), l.num_orcs);
    put(
        &mut b,
        l.orc_unwind,
        &(if orc.is_empty() { 0 } else { va + p.orc }).to_le_bytes(),
    );
    (b, keys)
}

/// The jump table, sorted by key then address as `jump_label_sort_entries()` sorts it.
fn write_jumps(b: &mut [u8], l: &KmodLayout, p: &Pieces, va: u64, t: &Tables) -> Vec<JumpKey> {
    let mut jumps = t.jumps.clone();
    jumps.sort_by_key(|j| (j.key, j.code));
    let mut keys: Vec<JumpKey> = Vec::new();
    for (i, j) in jumps.iter().enumerate() {
        let at = p.jumps + 16 * i as u64;
        put(b, at, &rel32(j.code, va + at));
        put(b, at + 4, &rel32(j.target, va + at + 4));
        let key = (j.key | u64::from(j.branch)).wrapping_sub(va + at + 8);
        put(b, at + 8, &key.to_le_bytes());
        if keys.last().is_none_or(|k| k.key != j.key) {
            let slot = p.skm + 2 * l.skm_size * keys.len() as u64;
            keys.push(JumpKey {
                key: j.key,
                entries: va + at,
                ours: va + slot,
                spare: va + slot + l.skm_size,
            });
        }
    }
    let table = if jumps.is_empty() { 0 } else { va + p.jumps };
    put(b, l.jump_entries, &table.to_le_bytes());
    put(b, l.num_jump_entries, &(jumps.len() as u32).to_le_bytes());
    keys
}

/// The export tables, sorted by name as `find_exported_symbol_in_section()`'s binary
/// search needs, a namespace offset of 0 for none, and no CRCs (`crcs` stays NULL, which
/// `check_version()` accepts).
fn write_exports(b: &mut [u8], l: &KmodLayout, p: &Pieces, va: u64, t: &Tables) {
    let mut str_at = p.kstrtab;
    for (gpl, table, field, count_field) in [
        (false, p.ksymtab, l.syms, l.num_syms),
        (true, p.ksymtab_gpl, l.gpl_syms, l.num_gpl_syms),
    ] {
        let mut list: Vec<&KExport> = t.exports.iter().filter(|e| e.gpl == gpl).collect();
        list.sort_by(|x, y| x.name.as_bytes().cmp(y.name.as_bytes()));
        for (i, e) in list.iter().enumerate() {
            let at = table + KERNEL_SYMBOL * i as u64;
            put(b, at, &rel32(e.addr, va + at));
            put(b, at + 4, &rel32(va + str_at, va + at + 4));
            put(b, str_at, e.name.as_bytes());
            str_at += e.name.len() as u64 + 1;
            if let Some(ns) = &e.namespace {
                put(b, at + 8, &rel32(va + str_at, va + at + 8));
                put(b, str_at, ns.as_bytes());
                str_at += ns.len() as u64 + 1;
            }
        }
        let ptr = if list.is_empty() { 0 } else { va + table };
        put(b, field, &ptr.to_le_bytes());
        put(b, count_field, &(list.len() as u32).to_le_bytes());
    }
}

/// `core_kallsyms`, which `kallsyms` points at: symbol 0 is the null symbol.
fn write_kallsyms(b: &mut [u8], l: &KmodLayout, p: &Pieces, va: u64, t: &Tables) {
    let mut str_at = 1u64;
    for (i, s) in t.symbols.iter().enumerate() {
        let at = p.symtab + ELF64_SYM * (i as u64 + 1);
        let func = s.kind.eq_ignore_ascii_case(&b't');
        let global = s.kind.is_ascii_uppercase();
        let info = (if global { 1u8 } else { 0 }) << 4 | if func { 2 } else { 1 };
        put(b, at, &(str_at as u32).to_le_bytes());
        put(b, at + 4, &[info, 0]);
        // Any defined section index: the kernel only tests for SHN_UNDEF.
        put(b, at + 6, &1u16.to_le_bytes());
        put(b, at + 8, &s.addr.to_le_bytes());
        put(b, at + 16, &s.size.to_le_bytes());
        put(b, p.strtab + str_at, s.name.as_bytes());
        str_at += s.name.len() as u64 + 1;
        put(b, p.typetab + i as u64 + 1, &[s.kind]);
    }
    let ks = l.core_kallsyms;
    put(b, l.kallsyms, &(va + ks).to_le_bytes());
    put(b, ks + l.ks_symtab, &(va + p.symtab).to_le_bytes());
    put(
        b,
        ks + l.ks_num_symtab,
        &(t.symbols.len() as u32 + 1).to_le_bytes(),
    );
    put(b, ks + l.ks_strtab, &(va + p.strtab).to_le_bytes());
    put(b, ks + l.ks_typetab, &(va + p.typetab).to_le_bytes());
}
