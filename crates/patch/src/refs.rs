//! Pointers into a bundle's memory kept in guest data that lucos can see: every aligned
//! word of vmlinux's writable data and bss, of each CPU's per-CPU area, and of the data of
//! the bundles still mapped. What lives elsewhere (slab and vmalloc objects, page cache,
//! module data, registers of sleeping tasks beyond their return addresses) is not looked
//! at: docs/design.md ("Reclaim") says what that leaves undetected.

use serde::Serialize;

use lucos_introspect::paging;
use lucos_introspect::{GuestVirtAddr, KernelLayout, KernelSymbols, PhysMem};

use crate::registry::{BundleRecord, Registry};
use crate::RegionKind;

#[derive(Debug, thiserror::Error)]
pub enum RefsError {
    #[error("vmlinux has no symbol {0}, which bounds the data lucos scans for pointers")]
    NoSymbol(&'static str),
}

/// One word of guest data that points into a bundle's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pointer {
    /// Live address of the word.
    pub at: u64,
    pub value: u64,
    /// Where the word is: `vmlinux data`, `per-CPU area of CPU n`, `data of <id>`.
    pub place: String,
}

/// Live ranges of guest data to scan: `(start, end, place)`.
pub fn data_areas(
    syms: &KernelSymbols,
    layout: &KernelLayout,
    percpu_offsets: &[u64],
    reg: &Registry,
) -> Result<Vec<(u64, u64, String)>, RefsError> {
    let sym = |n: &'static str| {
        syms.lookup(n)
            .map(|s| s.addr)
            .map_err(|_| RefsError::NoSymbol(n))
    };
    let mut out = vec![
        (
            layout.live(sym("_sdata")?),
            layout.live(sym("_edata")?),
            "vmlinux data".to_owned(),
        ),
        (
            layout.live(sym("__bss_start")?),
            layout.live(sym("__bss_stop")?),
            "vmlinux bss".to_owned(),
        ),
    ];
    // Per-CPU symbols are offsets from each CPU's base.
    let (pcs, pce) = (sym("__per_cpu_start")?, sym("__per_cpu_end")?);
    for (cpu, &base) in percpu_offsets.iter().enumerate() {
        out.push((
            base.wrapping_add(pcs),
            base.wrapping_add(pce),
            format!("per-CPU area of CPU {cpu}"),
        ));
    }
    for b in reg.bundles.iter().filter(|b| !b.reclaimed) {
        for r in b.ranges.iter().filter(|r| r.kind == RegionKind::Data) {
            out.push((r.va, r.va + r.len, format!("data of {}", b.id)));
        }
    }
    Ok(out)
}

/// For each of `targets`, the words of `areas` whose value lies in its ranges, read in
/// one pass over the areas (they are megabytes, and this runs inside a pause); a target's
/// own data does not count for it (its pointers to itself die with it).
pub fn pointers_into(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    areas: &[(u64, u64, String)],
    targets: &[BundleRecord],
) -> Result<Vec<Vec<Pointer>>, RefsError> {
    let owns = |t: &BundleRecord, a: u64| t.ranges.iter().any(|r| r.contains(a));
    let mut out = vec![Vec::new(); targets.len()];
    let mut buf = Vec::new();
    for (start, end, place) in areas {
        let start = start.next_multiple_of(8);
        // The targets this area may point into: not the ones it belongs to.
        let wanted: Vec<usize> = (0..targets.len())
            .filter(|&t| !owns(&targets[t], start))
            .collect();
        if *end <= start || wanted.is_empty() {
            continue;
        }
        // Page by page: a page the kernel does not map (a reclaimed bundle's data) holds
        // no pointer the kernel can follow.
        let mut page = start;
        while page < *end {
            let next = ((page & !0xfff) + 0x1000).min(*end);
            buf.resize((next - page) as usize & !7, 0);
            if paging::read_virt(mem, cr3, GuestVirtAddr(page), &mut buf).is_ok() {
                for (i, w) in buf.chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                    for &t in wanted.iter().filter(|&&t| owns(&targets[t], v)) {
                        out[t].push(Pointer {
                            at: page + 8 * i as u64,
                            value: v,
                            place: place.clone(),
                        });
                    }
                }
            }
            page = next;
        }
    }
    Ok(out)
}
