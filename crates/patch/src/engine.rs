//! Apply and revert: the only code that changes a running guest.
//!
//! Every check that can refuse a bundle runs before the first write, so a
//! refused bundle leaves guest memory byte-identical. Staging (code, data,
//! page tables) happens while the guest runs, in memory nothing reaches yet;
//! only the site switch (one `jmp rel32` per function) and the registry
//! commit happen with the VM paused. Any failure after staging undoes what
//! was written, and a VM paused by lucos is always resumed.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lucos_introspect::{GuestPhysAddr, KernelLayout, KernelSymbols, LoadedModule, Machine};

use crate::kmod;
use crate::memory::{self, PatchMem, PatchMemLayout};
use crate::registry::{BundleRecord, BundleState, ModuleSite, RangeRecord, Registry, SiteRecord};
use crate::{jmp_rel32, link, plan, Bundle, Manifest, RegionKind, Regions};
use kernel::KernelEdit;

mod commit;
mod consistent;
mod cpu;
mod error;
mod inspect;
mod kernel;
mod module;
mod reclaim;
mod reset;
mod rewrite;
mod stage;
mod switch;

pub use consistent::{Consistency, Gate, GateScope, GateSite, Retry};
pub use error::EngineError;
pub use reclaim::Reclaimed;
pub use reset::{reset_registry, ResetReport};
pub use stage::page_offset_base;

/// A guest as the engine sees it: machine, symbols, live layout, patch memory.
pub struct Session<'a, M: Machine + ?Sized> {
    m: &'a mut M,
    syms: &'a KernelSymbols,
    layout: KernelLayout,
    pm: PatchMem,
    gate: Option<(
        consistent::Gate<'a, M>,
        consistent::Retry,
        consistent::GateScope,
    )>,
    consistency: Option<consistent::Consistency>,
}

/// What an apply did and how long the guest was stopped.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    pub id: String,
    pub sites: Vec<SiteRecord>,
    pub ranges: Vec<RangeRecord>,
    /// `Some(va)` when this apply mapped patch memory for the first time.
    pub mapped_at: Option<u64>,
    /// From the pause request to the resume acknowledgement.
    pub pause: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone)]
pub struct RevertReport {
    pub id: String,
    pub sites: Vec<SiteRecord>,
    pub pause: Duration,
    pub total: Duration,
}

/// One target function, inspected and found patchable.
#[derive(Debug, Clone)]
struct Site {
    function: String,
    func_addr: u64,
    site_addr: u64,
    site_pa: GuestPhysAddr,
    current: [u8; 5],
    module: Option<ModuleSite>,
    /// The site is a function's entry whose 5 bytes are not one instruction: no vCPU and
    /// no stack frame may be inside them at the switch (see [`crate::entry`]).
    window: bool,
}

/// A failed switch, and whether every site and kernel word is back to its old bytes (only
/// then may staged code be taken away; otherwise a half-applied record keeps it).
struct SwitchFailure {
    error: EngineError,
    sites_restored: bool,
}

/// The regions of an apply that have bytes, with their images: text, rodata, data and
/// the bundle's module region.
fn staged_ranges(
    va_base: u64,
    offs: [u64; 4],
    sizes: [u64; 4],
    images: [&[u8]; 4],
) -> Vec<(RangeRecord, &[u8])> {
    let kinds = [
        RegionKind::Text,
        RegionKind::Rodata,
        RegionKind::Data,
        RegionKind::Data,
    ];
    (0..4)
        .filter(|&i| sizes[i] > 0)
        .map(|i| {
            let r = RangeRecord {
                offset: offs[i],
                len: sizes[i],
                va: va_base + offs[i],
                kind: kinds[i],
            };
            (r, images[i])
        })
        .collect()
}

/// The record and the `jmp` of each site, to the linked new functions.
fn site_records(
    sites: &[Site],
    man: &Manifest,
    linked: &crate::Linked,
) -> Result<(Vec<SiteRecord>, Vec<[u8; 5]>), EngineError> {
    let mut records = Vec::new();
    let mut jmps = Vec::new();
    for (site, rep) in sites.iter().zip(&man.replacements) {
        let target = linked
            .new_fn_addr(&rep.new)
            .ok_or_else(|| EngineError::MissingNew(rep.new.clone()))?;
        let jmp = jmp_rel32(site.site_addr, target)?;
        jmps.push(jmp);
        records.push(SiteRecord {
            function: site.function.clone(),
            func_addr: site.func_addr,
            site_addr: site.site_addr,
            site_pa: site.site_pa.raw(),
            original: site.current,
            written: jmp,
            new_addr: target,
            new_symbol: rep.new.clone(),
            module: site.module.clone(),
        });
    }
    Ok((records, jmps))
}

/// Bytes written while staging, for rollback.
#[derive(Default)]
struct Undo {
    writes: Vec<(GuestPhysAddr, Vec<u8>)>,
}

/// Where an apply's regions go: the mapping's base, the page-directory entries a first
/// mapping adds, each region's offset and size in patch memory, and whether the range was
/// freed by a reclaim (and must be written through the coherent path).
struct Allocation {
    va_base: u64,
    new_pd: Vec<(GuestPhysAddr, u64)>,
    offs: [u64; 4],
    sizes: [u64; 4],
    reused: bool,
}

/// The registry record of a bundle being applied.
fn applied_record(
    bundle: &Bundle,
    sites: &[SiteRecord],
    ranges: &[RangeRecord],
    module: &Option<crate::registry::ModuleRecord>,
    rewrites: Vec<crate::registry::RewriteRecord>,
) -> BundleRecord {
    let man = bundle.manifest();
    BundleRecord {
        id: man.id.clone(),
        description: man.description.clone(),
        sha256: hex::encode(bundle.sha256()),
        state: BundleState::Applied,
        applied_unix_ms: now_ms(),
        reverted_unix_ms: None,
        sites: sites.to_vec(),
        ranges: ranges.to_vec(),
        apply_pause_us: 0,
        revert_pause_us: None,
        module: module.clone(),
        rewrites,
        frame_types: man.frame_types.clone(),
        prototypes: man.prototypes.clone(),
        half_applied: false,
        reclaimed: false,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<'a, M: Machine + ?Sized> Session<'a, M> {
    /// `layout` comes from [`lucos_introspect::detect_layout`] (build id
    /// already verified); `patch_gpa`/`patch_size` locate patch memory.
    pub fn new(
        m: &'a mut M,
        syms: &'a KernelSymbols,
        layout: KernelLayout,
        patch_gpa: u64,
        patch_size: u64,
    ) -> Result<Self, EngineError> {
        let mut s = Session {
            m,
            syms,
            layout,
            pm: PatchMem {
                layout: PatchMemLayout::new(patch_size)?,
                gpa: patch_gpa,
                va_base: None,
            },
            gate: None,
            consistency: None,
        };
        let reg = s.registry()?;
        if let Some(mapped) = reg.patch_gpa.filter(|&g| g != patch_gpa) {
            return Err(EngineError::PatchMemoryMoved {
                mapped,
                now: patch_gpa,
            });
        }
        // Patch memory can outlive the kernel that mapped it (a guest
        // reboot, a reused memory file): then the kernel no longer has
        // lucos's page-directory entries, and every record is stale.
        // (A pending mapping may lack entries: a lucos killed while writing them.)
        for &(pa, value) in &reg.pd_entries {
            // Registry records keep bare numbers.
            let now = s.m.read_u64(GuestPhysAddr(pa))?;
            if now != value && !(reg.map_pending && now == 0) {
                return Err(EngineError::StaleRegistry { pa, value });
            }
        }
        s.pm.va_base = reg.va_base;
        Ok(s)
    }

    /// Resolves an undefined bundle symbol in the running kernel: in the modules the bundle
    /// patches first (their own statics), then in vmlinux.
    fn resolve(
        &self,
        man: &Manifest,
        modules: &[LoadedModule],
        name: &str,
    ) -> Result<u64, crate::ResolveError> {
        if let Some(found) = Self::resolve_in_modules(man, modules, name) {
            return found;
        }
        let sym = match (man.aliases.get(name), man.resolve.get(name)) {
            (Some(a), _) => self.syms.lookup_maybe_in(a.file.as_deref(), &a.symbol),
            (None, Some(file)) => self.syms.lookup_in_file(file, name),
            (None, None) => self.syms.lookup(name),
        }?;
        // Per-CPU symbols are offsets from %gs and do not move with KASLR.
        Ok(if sym.percpu {
            sym.addr
        } else {
            self.layout.live(sym.addr)
        })
    }

    /// Room for the bundle's regions (the lowest free range that fits, else new pages) and
    /// the mapping they are reached through.
    fn allocate(
        &self,
        reg: &mut Registry,
        bundle: &Bundle,
        plan: &crate::Plan,
        kmods: Option<&kmod::KernelModules>,
    ) -> Result<Allocation, EngineError> {
        let sizes = [
            plan.text.page_size(),
            plan.rodata.page_size(),
            plan.data.page_size(),
            kmods.map_or(0, |k| kernel::region_pages(&k.layout, bundle)),
        ];
        let need: u64 = sizes.iter().sum();
        let (va_base, new_pd) = self.mapping(reg, kmod::pokes_code(bundle))?;
        let Some((at, reused)) = reg.alloc(need, self.pm.layout.size) else {
            let free = reg.largest_free(self.pm.layout.size);
            return Err(memory::MemoryError::Full { need, free }.into());
        };
        let offs = [
            at,
            at + sizes[0],
            at + sizes[0] + sizes[1],
            at + sizes[0] + sizes[1] + sizes[2],
        ];
        Ok(Allocation {
            va_base,
            new_pd,
            offs,
            sizes,
            reused,
        })
    }

    /// Applies a bundle. See the module docs for the order of events.
    pub fn apply(&mut self, bundle: &Bundle) -> Result<ApplyReport, EngineError> {
        let start = Instant::now();
        let man = bundle.manifest();
        if bundle.signer().is_none() {
            return Err(EngineError::Unverified(man.id.clone()));
        }
        let (header, mut reg) = self.read_header()?;
        if reg.find_applied(&man.id).is_some() {
            return Err(EngineError::AlreadyApplied(man.id.clone()));
        }
        let modules = self.modules_for(man)?;
        let sites = self.targets(&reg, man, &modules)?;
        if let (None, Some(s)) = (&self.gate, sites.iter().find(|s| s.window)) {
            return Err(EngineError::EntryNeedsStackCheck {
                function: s.function.clone(),
            });
        }
        self.check_needs_consistency(&man.id, &man.frame_types, &man.prototypes)?;

        let plan = plan(bundle)?;
        let kmods = self.kernel_modules(bundle)?;
        let Allocation {
            va_base,
            new_pd,
            offs,
            sizes,
            reused,
        } = self.allocate(&mut reg, bundle, &plan, kmods.as_ref())?;
        let bases = Regions {
            text: va_base + offs[0],
            rodata: va_base + offs[1],
            data: va_base + offs[2],
        };
        let mut linked = link(bundle, &plan, bases, &|name| {
            self.resolve(man, &modules, name)
        })?;
        self.fit_to_cpu(bundle, &plan, &mut linked)?;
        let module = match &kmods {
            Some(k) => {
                Some(self.module_region(k, &reg, bundle, &plan, &linked, (va_base, offs, sizes))?)
            }
            None => None,
        };
        let (records, jmps) = site_records(&sites, man, &linked)?;
        let (rewrites, data_words) = self.rewrites(man, &modules, &linked)?;
        self.check_zeroed(man)?;
        let no_module = Vec::new();
        let images: [&[u8]; 4] = [
            &linked.text,
            &linked.rodata,
            &linked.data,
            module.as_ref().map_or(&no_module, |m| &m.0),
        ];
        let staged = staged_ranges(va_base, offs, sizes, images);
        let ranges: Vec<RangeRecord> = staged.iter().map(|(r, _)| *r).collect();
        let module_record = module.as_ref().map(|m| m.1.clone());
        let jump_sites = module.as_ref().map(|m| m.2.clone()).unwrap_or_default();
        if module_record.is_some() && reg.module_bounds.is_none() {
            let k = kmods.as_ref().expect("a module record has a kernel");
            reg.module_bounds = Some(
                kmod::register::bounds(&*self.m, self.layout.cr3, &k.layout, &k.anchors)
                    .map_err(kmod::KmodError::from)?,
            );
        }

        let record = applied_record(bundle, &records, &ranges, &module_record, rewrites);
        let first = reg.va_base.is_none() || reg.map_pending;
        if !new_pd.is_empty() {
            let recorded: Vec<(u64, u64)> = new_pd.iter().map(|&(pa, v)| (pa.raw(), v)).collect();
            reg.note_mapping(va_base, self.pm.gpa, &recorded);
        }
        reg.reserve(&record)?;

        // Nothing has been written yet: everything above may refuse.
        let mut undo = Undo::default();
        let header = match self.record_and_stage(
            &header,
            &mut reg,
            (&new_pd, first, reused),
            &staged,
            &mut undo,
        ) {
            Ok(h) => h,
            Err(e) => {
                self.rollback(undo);
                return Err(e);
            }
        };
        reg.map_pending = false;
        let switch: Vec<(&Site, [u8; 5])> = sites.iter().zip(jmps).collect();
        let edit = match (&kmods, &module_record) {
            (Some(k), Some(m)) => KernelEdit::Link(k, m.clone(), jump_sites),
            _ => KernelEdit::None,
        };
        let pause = match self.switch(
            &switch,
            (&man.id, &header),
            &mut reg,
            true,
            (&edit, &data_words),
            |reg| {
                reg.bundles.push(record);
            },
        ) {
            Ok(p) => p,
            Err(f) => {
                if f.sites_restored {
                    self.rollback(undo);
                }
                return Err(f.error);
            }
        };
        self.record_pause(&man.id, BundleState::Applied, pause);
        self.pm.va_base = Some(va_base);
        Ok(ApplyReport {
            id: man.id.clone(),
            sites: records,
            ranges,
            mapped_at: (!new_pd.is_empty()).then_some(va_base),
            pause,
            total: start.elapsed(),
        })
    }

    /// Reverts an applied bundle: the newest on each of its sites only.
    pub fn revert(&mut self, id: &str) -> Result<RevertReport, EngineError> {
        let start = Instant::now();
        let (header, mut reg) = self.read_header()?;
        let Some(rec) = reg.find_applied(id).cloned() else {
            return Err(EngineError::NotApplied {
                id: id.to_owned(),
                applied: reg.applied().map(|b| b.id.clone()).collect(),
            });
        };
        for s in &rec.sites {
            if let Some((top, _)) = reg.top_of_site(s.site_addr) {
                if top.id != id {
                    return Err(EngineError::RevertOrder {
                        id: id.to_owned(),
                        function: s.function.clone(),
                        newer: top.id.clone(),
                    });
                }
            }
        }
        self.check_needs_consistency(id, &rec.frame_types, &rec.prototypes)?;
        // Revert switches each site from this bundle's jmp back to what it replaced, except
        // in a module unloaded since: its code is gone and the memory may be another's.
        let gone = self.gone_sites(&rec.sites)?;
        for (s, _) in rec.sites.iter().zip(&gone).filter(|(_, g)| **g) {
            tracing::warn!(function = %s.function, "its module was unloaded; nothing to restore");
        }
        let live: Vec<&SiteRecord> = rec
            .sites
            .iter()
            .zip(&gone)
            .filter(|(_, g)| !**g)
            .map(|(s, _)| s)
            .collect();
        let sites: Vec<Site> = live
            .iter()
            .map(|s| Site {
                function: s.function.clone(),
                func_addr: s.func_addr,
                site_addr: s.site_addr,
                site_pa: GuestPhysAddr(s.site_pa),
                current: s.written,
                module: s.module.clone(),
                // The site holds this bundle's jmp: one instruction.
                window: false,
            })
            .collect();
        let originals = live.iter().map(|s| s.original);
        let switch: Vec<(&Site, [u8; 5])> = sites.iter().zip(originals).collect();
        if rec.module.is_some() && reg.module_bounds.is_none() {
            return Err(kernel::no_bounds().into());
        }
        let kmods = match &rec.module {
            Some(_) => Some(kmod::probe(&*self.m, self.syms, &self.layout)?),
            None => None,
        };
        let edit = match (&kmods, &rec.module) {
            (Some(k), Some(m)) => KernelEdit::Unlink(k, m.clone()),
            _ => KernelEdit::None,
        };
        let data_words = self.unrewrites(&rec)?;
        let pause = self
            .switch(
                &switch,
                (id, &header),
                &mut reg,
                false,
                (&edit, &data_words),
                |reg| {
                    if let Some(b) = reg
                        .bundles
                        .iter_mut()
                        .rev()
                        .find(|b| b.id == id && b.state == BundleState::Applied)
                    {
                        b.state = BundleState::Reverted;
                        b.reverted_unix_ms = Some(now_ms());
                        b.half_applied = false;
                    }
                },
            )
            .map_err(|f| f.error)?;
        self.record_pause(id, BundleState::Reverted, pause);
        Ok(RevertReport {
            id: id.to_owned(),
            sites: rec.sites,
            pause,
            total: start.elapsed(),
        })
    }
}
