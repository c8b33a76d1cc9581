//! The engine's side of [`crate::kmod`]: building a bundle's `struct module` region at
//! apply time, and linking or unlinking it inside the switch's pause.

use lucos_introspect::{paging, GuestPhysAddr, GuestVirtAddr, Machine};

use super::{EngineError, Session};
use crate::kmod::image::{self, Core, JumpSite};
use crate::kmod::{self, register, Bounds, KernelModules};
use crate::registry::{ModuleRecord, Registry};
use crate::{Bundle, Linked, Plan};

/// What a switch does to the kernel's module bookkeeping, besides the sites.
pub(super) enum KernelEdit<'k> {
    None,
    /// With the new code's static-branch sites, set to their keys' states in the pause.
    Link(&'k KernelModules, ModuleRecord, Vec<JumpSite>),
    Unlink(&'k KernelModules, ModuleRecord),
}

/// Kernel words changed inside a pause: (guest-physical address, old bytes).
pub(super) type KernelUndo = Vec<(GuestPhysAddr, [u8; 8])>;

impl<M: Machine + ?Sized> Session<'_, M> {
    /// The running kernel's module bookkeeping, if a bundle is to use it. A bundle whose
    /// code needs it (exception fixups, bug records) is refused on a kernel without;
    /// others are applied without a module (no symbols or unwind data in the kernel).
    pub(super) fn kernel_modules(
        &self,
        bundle: &Bundle,
    ) -> Result<Option<KernelModules>, EngineError> {
        match kmod::probe(&*self.m, self.syms, &self.layout) {
            Ok(k) => Ok(Some(k)),
            Err(e) if !kmod::needs_module(bundle) => {
                tracing::info!(error = %e, "applying without a kernel module record");
                Ok(None)
            }
            Err(e) => Err(EngineError::Kmod(e)),
        }
    }

    /// The module region of an apply, at `offs[3]` (`sizes[3]` bytes reserved); the
    /// module covers all four regions.
    pub(super) fn module_region(
        &self,
        km: &KernelModules,
        reg: &Registry,
        bundle: &Bundle,
        plan: &Plan,
        linked: &Linked,
        (va_base, offs, sizes): (u64, [u64; 4], [u64; 4]),
    ) -> Result<(Vec<u8>, ModuleRecord, Vec<JumpSite>), EngineError> {
        let core = Core {
            base: va_base + offs[0],
            size: sizes.iter().sum(),
            // Exact, not page-rounded: the kernel sizes a module's last text symbol up to
            // `base + text_size`, so backtraces would show `f+0x30/0x1000`.
            text_size: plan.text.size,
            ro_size: sizes[0] + sizes[1],
        };
        let va = va_base + offs[3];
        // A kernel symbol an export names resolves as the bundle's own references do (no
        // loaded module's: a module's symbols are its own to export).
        let kernel = |name: &str| self.resolve(bundle.manifest(), &[], name).ok();
        let tables = kmod::tables(bundle, plan, linked, &kernel)?;
        let name = unique_name(reg, &bundle.manifest().id, km.layout.name_len);
        let (bytes, jump_keys) =
            image::build(&km.layout, va, &name, &bundle.sha256(), core, &tables);
        // The bound from counts covers the real size; a miss would be a lucos bug.
        if bytes.len() as u64 > sizes[3] {
            return Err(crate::memory::MemoryError::Full {
                need: bytes.len() as u64,
                free: sizes[3],
            }
            .into());
        }
        let rec = ModuleRecord {
            name,
            va,
            base: core.base,
            size: core.size,
            jump_keys,
        };
        Ok((bytes, rec, tables.jumps))
    }

    /// Inside the pause: makes the kernel words `edit` needs, recording the old ones.
    pub(super) fn edit_kernel(
        &mut self,
        edit: &KernelEdit<'_>,
        before: Option<Bounds>,
        undo: &mut KernelUndo,
    ) -> Result<(), EngineError> {
        let cr3 = self.layout.cr3;
        let writes = match edit {
            KernelEdit::None => return Ok(()),
            KernelEdit::Link(km, rec, jumps) => register::link(
                &*self.m,
                cr3,
                &km.layout,
                &km.anchors,
                (span(rec), &rec.jump_keys, jumps),
            )
            .map_err(kmod::KmodError::from)?,
            KernelEdit::Unlink(km, rec) => {
                let others =
                    register::other_modules(&*self.m, cr3, &km.layout, &km.anchors, rec.va)
                        .map_err(kmod::KmodError::from)?;
                let before = before.ok_or_else(no_bounds)?;
                register::unlink(
                    &*self.m,
                    cr3,
                    &km.layout,
                    &km.anchors,
                    (span(rec), &rec.jump_keys),
                    before,
                    &others,
                )
                .map_err(kmod::KmodError::from)?
            }
        };
        let words: Vec<(u64, u64)> = writes.iter().map(|w| (w.va, w.value)).collect();
        self.write_words(&words, undo)
    }

    /// Inside the pause: writes kernel words computed before it, recording the old ones.
    pub(super) fn write_words(
        &mut self,
        words: &[(u64, u64)],
        undo: &mut KernelUndo,
    ) -> Result<(), EngineError> {
        let mut writes = Vec::with_capacity(words.len());
        for &(va, value) in words {
            let pa = paging::translate(&*self.m, self.layout.cr3, GuestVirtAddr(va))?.pa;
            writes.push((pa, value.to_le_bytes()));
        }
        // Old words read before any is written, so a word written twice is undone to its
        // value before the pause; the writes themselves go in order, journalled at once.
        for &(pa, _) in &writes {
            let mut old = [0u8; 8];
            self.m.read_phys(pa, &mut old)?;
            undo.push((pa, old));
        }
        let all: Vec<(GuestPhysAddr, &[u8])> = writes.iter().map(|(pa, b)| (*pa, &b[..])).collect();
        self.m.write_phys_data_all(&all)?;
        Ok(())
    }

    /// Puts back the kernel words of a failed switch, newest first; whether all went back.
    pub(super) fn undo_kernel(&mut self, undo: KernelUndo) -> bool {
        let mut all = true;
        for (pa, old) in undo.into_iter().rev() {
            if let Err(e) = self.m.write_phys_data(pa, &old) {
                tracing::error!(pa = pa.raw(), error = %e, "restoring a kernel word failed");
                all = false;
            }
        }
        all
    }
}

/// The module name for bundle `id`, made unique among applied bundles: two ids that
/// differ only in punctuation would otherwise give two modules one name.
fn unique_name(reg: &Registry, id: &str, max: u64) -> String {
    let stem = image::module_name(id, max);
    let taken = |n: &str| {
        reg.applied()
            .any(|b| b.module.as_ref().is_some_and(|m| m.name == n))
    };
    let mut name = stem.clone();
    let mut n = 2;
    while taken(&name) {
        name = format!("{}_{n}", &stem[..stem.len().min(max as usize - 8)]);
        n += 1;
    }
    name
}

/// A bundle's module was linked, but the registry lacks the bounds to narrow back to:
/// lucos records them with the first module, so the registry was altered.
pub(super) fn no_bounds() -> crate::registry::RegistryError {
    crate::registry::RegistryError::Corrupt(
        "a bundle has a module record but the registry has no module bounds".into(),
    )
}

fn span(rec: &ModuleRecord) -> register::Span {
    register::Span {
        module: rec.va,
        base: rec.base,
        size: rec.size,
    }
}

/// Pages for a bundle's module region (sized from the bundle before linking).
pub(super) fn region_pages(l: &kmod::KmodLayout, bundle: &Bundle) -> u64 {
    image::region_size_bound(l, kmod::counts(bundle)).next_multiple_of(crate::memory::PAGE)
}
