//! ORC unwind tables of the running kernel: vmlinux's (`.orc_unwind_ip`/`.orc_unwind`, from
//! the dbg vmlinux, whose build id lucos has checked against the guest) and each loaded
//! module's (`struct module`'s `arch.orc_unwind*`, from guest memory). lucos's bundles are
//! presented to the kernel as modules with their own ORC tables, so they are covered too.
//!
//! The lookup mirrors the kernel's `orc_find`: the rightmost entry at or below the address,
//! in the table of the image that contains it. The kernel's `orc_lookup` block index is
//! only an accelerator over the same sorted table, so a binary search gives the same entry.

use serde::Serialize;

use crate::btf::Btf;
use crate::kaslr::KernelLayout;
use crate::machine::PhysMem;
use crate::modules::LoadedModule;
use crate::symbols::KernelSymbols;
use crate::tasks::{Reader, TaskError};

/// More ORC entries than one image has: the table is corrupt.
const MAX_ORCS: u64 = 1 << 22;
const ENTRY: usize = 6;

pub const REG_UNDEFINED: u8 = 0;
pub const REG_PREV_SP: u8 = 1;
pub const REG_DX: u8 = 2;
pub const REG_DI: u8 = 3;
pub const REG_BP: u8 = 4;
pub const REG_SP: u8 = 5;
pub const REG_R10: u8 = 6;
pub const REG_R13: u8 = 7;
pub const REG_BP_INDIRECT: u8 = 8;
pub const REG_SP_INDIRECT: u8 = 9;
pub const TYPE_CALL: u8 = 0;
pub const TYPE_REGS: u8 = 1;
pub const TYPE_REGS_PARTIAL: u8 = 2;

/// `struct orc_entry` (6 bytes, little-endian bitfields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrcEntry {
    pub sp_offset: i16,
    pub bp_offset: i16,
    pub sp_reg: u8,
    pub bp_reg: u8,
    pub kind: u8,
    pub end: bool,
}

impl OrcEntry {
    pub fn decode(b: &[u8]) -> Self {
        let bits = u16::from_le_bytes([b[4], b[5]]);
        OrcEntry {
            sp_offset: i16::from_le_bytes([b[0], b[1]]),
            bp_offset: i16::from_le_bytes([b[2], b[3]]),
            sp_reg: (bits & 0xf) as u8,
            bp_reg: ((bits >> 4) & 0xf) as u8,
            kind: ((bits >> 8) & 3) as u8,
            end: (bits >> 10) & 1 == 1,
        }
    }

    /// The kernel's `null_orc_entry`, used for ip 0.
    pub const NULL: OrcEntry = OrcEntry {
        sp_offset: 8,
        bp_offset: 0,
        sp_reg: REG_SP,
        bp_reg: REG_UNDEFINED,
        kind: TYPE_CALL,
        end: false,
    };
    /// The kernel's `orc_fp_entry`: a frame-pointer guess for code without ORC data.
    pub const FP: OrcEntry = OrcEntry {
        sp_offset: 16,
        bp_offset: -16,
        sp_reg: REG_BP,
        bp_reg: REG_PREV_SP,
        kind: TYPE_CALL,
        end: false,
    };
}

/// The ORC table of one image, sorted by address.
#[derive(Debug, Clone)]
struct Table {
    name: String,
    /// Text ranges (live) the kernel looks this table up for.
    text: Vec<(u64, u64)>,
    ips: Vec<u64>,
    entries: Vec<OrcEntry>,
}

/// Decodes relative `int` ips (each relative to its own address `base + 4 i`).
fn decode(name: String, text: Vec<(u64, u64)>, base: u64, ip: &[u8], orc: &[u8]) -> Table {
    let ips = ip
        .chunks_exact(4)
        .enumerate()
        .map(|(i, w)| {
            let rel = i32::from_le_bytes(w.try_into().expect("4 bytes"));
            (base + 4 * i as u64).wrapping_add(rel as i64 as u64)
        })
        .collect();
    let entries = orc.chunks_exact(ENTRY).map(OrcEntry::decode).collect();
    Table {
        name,
        text,
        ips,
        entries,
    }
}

/// Where an address is, for the unwinder and for the reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Image {
    Vmlinux,
    Module(String),
}

/// ORC data of vmlinux and every loaded module.
#[derive(Debug, Clone)]
pub struct Orc {
    tables: Vec<Table>,
}

impl Orc {
    /// vmlinux's tables from the dbg vmlinux (live addresses through `layout`).
    pub fn vmlinux(syms: &KernelSymbols, layout: &KernelLayout) -> Result<Self, TaskError> {
        let s = |n: &'static str| {
            syms.lookup(n)
                .map(|s| s.addr)
                .map_err(|_| TaskError::NoSymbol(n))
        };
        let (ip0, ip1, orc0) = (
            s("__start_orc_unwind_ip")?,
            s("__stop_orc_unwind_ip")?,
            s("__start_orc_unwind")?,
        );
        let n = (ip1 - ip0) / 4;
        let read = |addr, len| {
            syms.section_bytes(addr, len)
                .map_err(|_| TaskError::NoSymbol("a readable .orc_unwind"))
        };
        let ip = read(ip0, (n * 4) as usize)?;
        let orc = read(orc0, n as usize * ENTRY)?;
        let text = vec![
            (layout.live(s("_stext")?), layout.live(s("_etext")?)),
            (layout.live(s("_sinittext")?), layout.live(s("_einittext")?)),
        ];
        Ok(Orc {
            tables: vec![decode("vmlinux".into(), text, layout.live(ip0), &ip, &orc)],
        })
    }

    /// Adds each module's tables, read from its `struct module` in guest memory.
    pub fn add_modules(
        &mut self,
        mem: &(impl PhysMem + ?Sized),
        cr3: u64,
        btf: &Btf,
        mods: &[LoadedModule],
    ) -> Result<(), TaskError> {
        let r = Reader { mem, cr3 };
        let num = btf.offset_of("module", "arch.num_orcs")?;
        let ipo = btf.offset_of("module", "arch.orc_unwind_ip")?;
        let orco = btf.offset_of("module", "arch.orc_unwind")?;
        for m in mods {
            let n = u64::from(r.u32(m.module + num)?);
            let text = vec![(m.base, m.base + m.text_size)];
            let (mut ip, mut orc) = (vec![0u8; (n.min(MAX_ORCS) * 4) as usize], Vec::new());
            let ip_va = r.u64(m.module + ipo)?;
            if n > 0 && n < MAX_ORCS {
                r.bytes(ip_va, &mut ip)?;
                orc = vec![0u8; n as usize * ENTRY];
                r.bytes(r.u64(m.module + orco)?, &mut orc)?;
            } else {
                ip.clear();
            }
            self.tables
                .push(decode(m.name.clone(), text, ip_va, &ip, &orc));
        }
        Ok(())
    }

    fn table_for(&self, ip: u64) -> Option<&Table> {
        self.tables
            .iter()
            .find(|t| t.text.iter().any(|&(a, b)| ip >= a && ip < b))
    }

    /// The image whose text holds `ip` (the kernel's `__kernel_text_address`, without
    /// ftrace trampolines, kprobe slots and BPF, which lucos cannot see).
    pub fn image_of(&self, ip: u64) -> Option<Image> {
        self.table_for(ip).map(|t| {
            if t.name == "vmlinux" && std::ptr::eq(t, &self.tables[0]) {
                Image::Vmlinux
            } else {
                Image::Module(t.name.clone())
            }
        })
    }

    /// The kernel's `orc_find`: `None` when no table covers `ip`.
    pub fn find(&self, ip: u64) -> Option<OrcEntry> {
        if ip == 0 {
            return Some(OrcEntry::NULL);
        }
        let t = self.table_for(ip)?;
        let idx = t.ips.partition_point(|&a| a <= ip);
        if idx == 0 {
            // The kernel's search falls back to the table's first entry.
            return t.entries.first().copied();
        }
        t.entries.get(idx - 1).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_and_lookups_take_the_rightmost_entry_below() {
        // sp_offset 8, bp_offset -16, sp_reg SP, bp_reg PREV_SP, type REGS, end.
        let bits: u16 = 5 | (1 << 4) | (1 << 8) | (1 << 10);
        let mut raw = Vec::new();
        raw.extend(8i16.to_le_bytes());
        raw.extend((-16i16).to_le_bytes());
        raw.extend(bits.to_le_bytes());
        let e = OrcEntry::decode(&raw);
        assert_eq!(
            e,
            OrcEntry {
                sp_offset: 8,
                bp_offset: -16,
                sp_reg: REG_SP,
                bp_reg: REG_PREV_SP,
                kind: TYPE_REGS,
                end: true
            }
        );
        // Two entries at 0x1000 and 0x1010, relative to table slots at 0x100 and 0x104.
        let ip: Vec<u8> = [0x1000i32 - 0x100, 0x1010 - 0x104]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut orc = OrcEntry::decode(&raw);
        orc.sp_offset = 24;
        let mut orcs = raw.clone();
        orcs.extend(24i16.to_le_bytes());
        orcs.extend(raw[2..].iter());
        let t = decode("m".into(), vec![(0x1000, 0x1100)], 0x100, &ip, &orcs);
        let o = Orc { tables: vec![t] };
        assert_eq!(o.find(0x100f).unwrap().sp_offset, 8);
        assert_eq!(o.find(0x1010).unwrap(), orc);
        assert_eq!(o.find(0x10ff).unwrap().sp_offset, 24);
        assert_eq!(o.find(0x1100), None);
        assert_eq!(o.find(0), Some(OrcEntry::NULL));
        assert_eq!(o.image_of(0x1000), Some(Image::Module("m".into())));
    }
}
