//! Two-phase linker for bundle objects.
//!
//! [`plan`] is pure: it classifies sections, lays them out inside three regions (text,
//! rodata, data — each page-aligned with its own permissions), finds the fentry calls to
//! neutralise and lists the kernel symbols needed. The engine then allocates patch memory
//! of those sizes and calls [`link`] with the regions' guest addresses and a resolver for
//! kernel symbols, which yields the three images to write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use object::elf;

use crate::bundle::Bundle;
use crate::elf::{Object, Reloc, SymPlace};
use crate::layout::{
    DroppedSection, FentrySite, Linked, PlacedSection, RegionKind, RegionPlan, Regions,
    MAX_REGION_SIZE, PAGE_SIZE,
};
use crate::reloc::{self, reloc_name, Fail};
use crate::sections::{classify, refusal, Class};
use crate::site::{is_call_rel32, ENDBR64, NOP5};

mod error;

pub use error::{LinkError, ResolveError};

const FENTRY: &str = "__fentry__";

/// Everything the engine needs to allocate memory before linking.
#[derive(Debug, Clone)]
pub struct Plan {
    pub text: RegionPlan,
    pub rodata: RegionPlan,
    pub data: RegionPlan,
    pub dropped: Vec<DroppedSection>,
    /// Kernel symbols the resolver will be asked for, sorted (weak ones may be missing: 0).
    pub undefined: Vec<String>,
    pub fentry_sites: Vec<FentrySite>,
    /// Per ELF section index: where it is placed, if loaded.
    placement: Vec<Option<(RegionKind, u64)>>,
    /// Why each unloaded section is unloaded (for error messages).
    unloaded: Vec<&'static str>,
    /// (section, index in its relocations) pairs consumed by fentry NOP-ing.
    skip: HashSet<(usize, usize)>,
    digest: [u8; 32],
}

impl Plan {
    /// Where section `index` of the bundle's object is placed, if it is loaded.
    pub fn placement_of(&self, index: usize) -> Option<(RegionKind, u64)> {
        self.placement.get(index).copied().flatten()
    }

    pub fn region(&self, kind: RegionKind) -> &RegionPlan {
        match kind {
            RegionKind::Text => &self.text,
            RegionKind::Rodata => &self.rodata,
            RegionKind::Data => &self.data,
        }
    }
}

fn loaded_kind(class: Class) -> Option<RegionKind> {
    match class {
        Class::Text => Some(RegionKind::Text),
        Class::Rodata => Some(RegionKind::Rodata),
        Class::Data => Some(RegionKind::Data),
        _ => None,
    }
}

/// Where each section goes, before any relocation is looked at.
struct Layout {
    regions: [RegionPlan; 3],
    placement: Vec<Option<(RegionKind, u64)>>,
    unloaded: Vec<&'static str>,
    dropped: Vec<DroppedSection>,
}

/// What the relocations of the loaded sections need.
struct References {
    undefined: BTreeSet<String>,
    fentry_sites: Vec<FentrySite>,
    skip: HashSet<(usize, usize)>,
}

/// Classifies and lays out the bundle's sections. Pure; fails on anything unsupported.
pub fn plan(bundle: &Bundle) -> Result<Plan, LinkError> {
    let obj = &bundle.object;
    let Layout {
        regions,
        placement,
        unloaded,
        dropped,
    } = lay_out(obj)?;
    let References {
        undefined,
        fentry_sites,
        skip,
    } = references(obj, &placement, &unloaded)?;
    let [text, rodata, data] = regions;
    tracing::debug!(
        id = %bundle.manifest().id,
        text = text.size,
        rodata = rodata.size,
        data = data.size,
        undefined = undefined.len(),
        fentry = fentry_sites.len(),
        "planned bundle"
    );
    Ok(Plan {
        text,
        rodata,
        data,
        dropped,
        undefined: undefined.into_iter().collect(),
        fentry_sites,
        placement,
        unloaded,
        skip,
        digest: bundle.sha256(),
    })
}

/// Classifies the sections and places the loaded ones in the three regions.
fn lay_out(obj: &Object<'_>) -> Result<Layout, LinkError> {
    let n = obj.sections.len();
    let mut placement = vec![None; n];
    let mut unloaded = vec!["not an allocated section"; n];
    let mut dropped = Vec::new();
    let mut regions = [
        RegionPlan {
            kind: RegionKind::Text,
            size: 0,
            sections: Vec::new(),
        },
        RegionPlan {
            kind: RegionKind::Rodata,
            size: 0,
            sections: Vec::new(),
        },
        RegionPlan {
            kind: RegionKind::Data,
            size: 0,
            sections: Vec::new(),
        },
    ];

    for (i, s) in obj.sections.iter().enumerate().skip(1) {
        if s.is_reloc_section() {
            continue;
        }
        let class = classify(&s.name, s.sh_type, s.flags);
        let kind = match class {
            Class::Refuse(why) => {
                return Err(LinkError::UnsupportedSection {
                    section: s.name.clone(),
                    reason: refusal(why),
                })
            }
            Class::Drop(why) => {
                dropped.push(DroppedSection {
                    name: s.name.clone(),
                    reason: why,
                });
                unloaded[i] = why;
                continue;
            }
            _ => match loaded_kind(class) {
                Some(k) => k,
                None => continue,
            },
        };
        if !s.align.is_power_of_two() || s.align > PAGE_SIZE {
            return Err(LinkError::UnsupportedSection {
                section: s.name.clone(),
                reason: format!(
                    "alignment {} is not a power of two up to the page size {PAGE_SIZE}",
                    s.align
                ),
            });
        }
        let region = &mut regions[kind as usize];
        let too_large = || LinkError::RegionTooLarge {
            region: kind.name(),
            size: u64::MAX,
        };
        let offset = region
            .size
            .checked_next_multiple_of(s.align)
            .ok_or_else(too_large)?;
        let end = offset.checked_add(s.size).ok_or_else(too_large)?;
        if end > MAX_REGION_SIZE {
            return Err(LinkError::RegionTooLarge {
                region: kind.name(),
                size: end,
            });
        }
        region.size = end;
        region.sections.push(PlacedSection {
            name: s.name.clone(),
            offset,
            size: s.size,
            index: i,
        });
        placement[i] = Some((kind, offset));
    }
    Ok(Layout {
        regions,
        placement,
        unloaded,
        dropped,
    })
}

/// Checks the relocations of loaded sections; finds the fentry calls and the kernel
/// symbols they need.
fn references(
    obj: &Object<'_>,
    placement: &[Option<(RegionKind, u64)>],
    unloaded: &[&'static str],
) -> Result<References, LinkError> {
    let mut undefined = BTreeSet::new();
    let mut fentry_sites = Vec::new();
    let mut skip = HashSet::new();
    for (si, sec) in obj.sections.iter().enumerate() {
        if placement[si].is_none() {
            continue;
        }
        if let Some(rel) = sec.rel_section {
            return Err(LinkError::UnsupportedSection {
                section: obj.sections[rel].name.clone(),
                reason: "SHT_REL relocations (implicit addends); x86-64 kernel objects use \
                         SHT_RELA — rebuild with the kernel toolchain"
                    .into(),
            });
        }
        for (k, r) in sec.relocs.iter().enumerate() {
            let width = reloc::width(r.r_type).ok_or_else(|| LinkError::UnsupportedRelocation {
                section: sec.name.clone(),
                offset: r.offset,
                r_type: reloc_name(r.r_type),
            })?;
            let in_bounds = r
                .offset
                .checked_add(width as u64)
                .is_some_and(|end| end <= sec.size && !sec.is_nobits());
            if !in_bounds {
                return Err(LinkError::RelocationOutOfBounds {
                    section: sec.name.clone(),
                    offset: r.offset,
                });
            }
            if r.r_type == elf::R_X86_64_NONE {
                continue;
            }
            let sym = &obj.symbols[r.sym];
            match sym.place {
                SymPlace::Undefined if sym.name == FENTRY => {
                    fentry_sites.push(fentry_site(obj, si, r)?);
                    skip.insert((si, k));
                }
                SymPlace::Undefined if r.sym != 0 => {
                    undefined.insert(sym.name.clone());
                }
                SymPlace::Common => {
                    return Err(LinkError::CommonSymbol {
                        name: sym.name.clone(),
                    })
                }
                SymPlace::Section(t) if placement[t].is_none() => {
                    return Err(LinkError::RelocationToUnloaded {
                        section: sec.name.clone(),
                        offset: r.offset,
                        symbol: sym.name.clone(),
                        target: obj.sections[t].name.clone(),
                        reason: unloaded[t].to_string(),
                    })
                }
                _ => {}
            }
        }
    }
    Ok(References {
        undefined,
        fentry_sites,
        skip,
    })
}

/// Checks that a relocation against `__fentry__` is the `call __fentry__` at a function's
/// entry (after an optional endbr64), which the linker turns into the NOP5.
fn fentry_site(obj: &Object<'_>, sec_idx: usize, r: &Reloc) -> Result<FentrySite, LinkError> {
    let sec = &obj.sections[sec_idx];
    let err = |reason: String| LinkError::BadFentryCall {
        section: sec.name.clone(),
        offset: r.offset,
        reason,
    };
    if !sec.is_exec() {
        return Err(err(
            "__fentry__ is referenced from a non-code section".into()
        ));
    }
    if r.r_type != elf::R_X86_64_PLT32 && r.r_type != elf::R_X86_64_PC32 {
        return Err(err(format!(
            "{} against __fentry__; only the PLT32/PC32 of `call __fentry__` is expected",
            reloc_name(r.r_type)
        )));
    }
    let call = match r.offset.checked_sub(1) {
        Some(c) if r.addend == -4 => c as usize,
        _ => return Err(err("not the rel32 field of a call instruction".into())),
    };
    // In bounds: the planner checked offset + 4 <= size.
    if !is_call_rel32(&sec.data[call..call + 5]) {
        return Err(err(
            "the bytes there do not decode as one `call rel32`".into()
        ));
    }
    let at_entry = |value: u64| {
        let v = value as usize;
        value == call as u64
            || (value.checked_add(4) == Some(call as u64)
                && sec.data.get(v..v + 4) == Some(&ENDBR64[..]))
    };
    let func = obj.symbols.iter().find(|s| {
        s.kind == elf::STT_FUNC && s.place == SymPlace::Section(sec_idx) && at_entry(s.value)
    });
    match func {
        Some(f) => Ok(FentrySite {
            function: f.name.clone(),
            section: sec.name.clone(),
            offset: call as u64,
            index: sec_idx,
        }),
        None => Err(err(
            "`call __fentry__` is not at a function entry (nor right after its endbr64)".into(),
        )),
    }
}

fn overflow_hint(r_type: u32) -> &'static str {
    match r_type {
        elf::R_X86_64_32 => "the address must be below 4 GiB, which kernel addresses never are; build with -mcmodel=kernel",
        elf::R_X86_64_32S => "the address must be in the top 2 GiB of the address space; place patch memory in the kernel/module area and build with -mcmodel=kernel",
        _ => "the target is more than ±2 GiB from the reference; patch memory must be within ±2 GiB of kernel text",
    }
}

fn check_regions(plan: &Plan, bases: &Regions) -> Result<(), LinkError> {
    let mut spans = Vec::new();
    for r in [&plan.text, &plan.rodata, &plan.data] {
        if r.size == 0 {
            continue;
        }
        let base = bases.base(r.kind);
        let name = r.kind.name();
        if base & (PAGE_SIZE - 1) != 0 {
            return Err(LinkError::BadRegions {
                reason: format!("{name} base {base:#x} is not page-aligned"),
            });
        }
        let end = base
            .checked_add(r.page_size())
            .ok_or_else(|| LinkError::BadRegions {
                reason: format!("{name} region at {base:#x} wraps around the address space"),
            })?;
        spans.push((base, end, name));
    }
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.0 < b.1 && b.0 < a.1 {
                return Err(LinkError::BadRegions {
                    reason: format!("{} and {} regions overlap", a.2, b.2),
                });
            }
        }
    }
    Ok(())
}

/// Lays the bundle out at `bases`, neutralises fentry calls and applies all relocations,
/// resolving undefined symbols with `resolver` (called at most once per name).
pub fn link(
    bundle: &Bundle,
    plan: &Plan,
    bases: Regions,
    resolver: &dyn Fn(&str) -> Result<u64, ResolveError>,
) -> Result<Linked, LinkError> {
    if plan.digest != bundle.sha256() {
        return Err(LinkError::PlanMismatch);
    }
    check_regions(plan, &bases)?;
    let obj = &bundle.object;
    let mut images = [
        vec![0u8; plan.text.size as usize],
        vec![0u8; plan.rodata.size as usize],
        vec![0u8; plan.data.size as usize],
    ];
    let addr = |kind: RegionKind, off: u64| bases.base(kind).wrapping_add(off);
    for region in [&plan.text, &plan.rodata, &plan.data] {
        let image = &mut images[region.kind as usize];
        for s in &region.sections {
            let data = &obj.sections[s.index].data;
            let off = s.offset as usize;
            image[off..off + data.len()].copy_from_slice(data);
        }
    }
    for site in &plan.fentry_sites {
        if let Some((kind, base)) = plan.placement[site.index] {
            let at = (base + site.offset) as usize;
            images[kind as usize][at..at + 5].copy_from_slice(&NOP5);
        }
    }

    let mut resolved: BTreeMap<String, u64> = BTreeMap::new();
    for (si, sec) in obj.sections.iter().enumerate() {
        let Some((kind, sec_off)) = plan.placement[si] else {
            continue;
        };
        let sec_name = &sec.name;
        for (k, r) in sec.relocs.iter().enumerate() {
            if plan.skip.contains(&(si, k)) || r.r_type == elf::R_X86_64_NONE {
                continue;
            }
            let sym = &obj.symbols[r.sym];
            let s = match sym.place {
                SymPlace::Undefined if r.sym == 0 => 0,
                SymPlace::Undefined => match resolved.get(&sym.name) {
                    Some(&v) => v,
                    None => {
                        let v = match resolver(&sym.name) {
                            Ok(v) => v,
                            // Like the module loader: an unresolved weak reference is 0.
                            Err(_) if sym.is_weak() => 0,
                            Err(source) => {
                                return Err(LinkError::UnresolvedSymbol {
                                    name: sym.name.clone(),
                                    source,
                                })
                            }
                        };
                        resolved.insert(sym.name.clone(), v);
                        v
                    }
                },
                SymPlace::Absolute => sym.value,
                SymPlace::Section(t) => match plan.placement[t] {
                    Some((tk, toff)) => addr(tk, toff).wrapping_add(sym.value),
                    None => {
                        return Err(LinkError::RelocationToUnloaded {
                            section: sec_name.clone(),
                            offset: r.offset,
                            symbol: sym.name.clone(),
                            target: obj.sections[t].name.clone(),
                            reason: plan.unloaded[t].to_string(),
                        })
                    }
                },
                SymPlace::Common => {
                    return Err(LinkError::CommonSymbol {
                        name: sym.name.clone(),
                    })
                }
            };
            let p = addr(kind, sec_off).wrapping_add(r.offset);
            let at = (sec_off + r.offset) as usize;
            reloc::apply(&mut images[kind as usize], at, r.r_type, s, r.addend, p).map_err(
                |f| match f {
                    Fail::Overflow(value) => LinkError::RelocationOverflow {
                        section: sec_name.clone(),
                        offset: r.offset,
                        symbol: sym.name.clone(),
                        r_type: reloc_name(r.r_type),
                        value,
                        hint: overflow_hint(r.r_type),
                    },
                    Fail::NotZero => LinkError::RelocationTargetNotZero {
                        section: sec_name.clone(),
                        offset: r.offset,
                        r_type: reloc_name(r.r_type),
                    },
                    Fail::Unsupported => LinkError::UnsupportedRelocation {
                        section: sec_name.clone(),
                        offset: r.offset,
                        r_type: reloc_name(r.r_type),
                    },
                },
            )?;
        }
    }

    let [text, rodata, data] = images;
    Ok(Linked {
        regions: bases,
        text,
        rodata,
        data,
        symbols: placed_symbols(obj, plan, &bases),
        resolved,
    })
}

/// Addresses of defined functions and objects; globals win over locals of the same name.
fn placed_symbols(obj: &Object<'_>, plan: &Plan, bases: &Regions) -> HashMap<String, u64> {
    let mut best: HashMap<&str, (u64, bool, bool)> = HashMap::new(); // (addr, global, ambiguous)
    for s in &obj.symbols {
        if s.kind != elf::STT_FUNC && s.kind != elf::STT_OBJECT {
            continue;
        }
        let SymPlace::Section(t) = s.place else {
            continue;
        };
        let Some((kind, off)) = plan.placement[t] else {
            continue;
        };
        let a = bases.base(kind).wrapping_add(off).wrapping_add(s.value);
        let global = s.bind != elf::STB_LOCAL;
        match best.get_mut(s.name.as_str()) {
            None => {
                best.insert(&s.name, (a, global, false));
            }
            Some(e) if global && !e.1 => *e = (a, true, false),
            Some(e) if global == e.1 => e.2 = true,
            Some(_) => {}
        }
    }
    best.into_iter()
        .filter(|(_, (_, _, ambiguous))| !ambiguous)
        .map(|(n, (a, _, _))| (n.to_string(), a))
        .collect()
}
