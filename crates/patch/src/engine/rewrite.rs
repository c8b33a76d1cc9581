//! Read-only objects of the running kernel rewritten in place (see
//! [`crate::manifest::Rewrite`]).
//!
//! An ops table whose function pointer now points to a new function cannot be given to
//! its users as a new copy when something else points to it (another table, a registered
//! driver) or when other files use it. Every vCPU is stopped during the switch, so the
//! object can be rewritten where it is, atomically with the jmps: a reader sees the old
//! table or the new one, never a mix. A pointer a vCPU loaded before the pause still runs
//! old code, which stays in place, as with any redirected function.
//!
//! The words are written through guest-physical memory (read-only pages are read-only
//! only to the guest) and undone like the other kernel words of a switch if it fails.

use lucos_introspect::{paging, GuestVirtAddr, LoadedModule, Machine};

use super::{EngineError, Session};
use crate::registry::{BundleRecord, RewriteRecord};
use crate::{Linked, Manifest};

/// An aligned kernel word and the value a switch writes there.
pub(super) type WordWrite = (u64, u64);

impl<M: Machine + ?Sized> Session<'_, M> {
    /// The records and word writes of a bundle's rewrites, checked against the live
    /// objects: everything that can refuse happens here, before the pause.
    pub(super) fn rewrites(
        &self,
        man: &Manifest,
        modules: &[LoadedModule],
        linked: &Linked,
    ) -> Result<(Vec<RewriteRecord>, Vec<WordWrite>), EngineError> {
        let mut records = Vec::new();
        let mut words = Vec::new();
        for rw in &man.rewrites {
            let object = rw.label();
            let va = match &rw.old_file {
                Some(f) => self
                    .syms
                    .lookup_in_file(f, &rw.old)
                    .map(|s| self.layout.live(s.addr))
                    .map_err(crate::ResolveError::from),
                None => self.resolve(man, modules, &rw.old),
            }
            .map_err(|source| EngineError::RewriteSymbol {
                object: object.clone(),
                source,
            })?;
            let mut live = vec![0u8; rw.expect.len()];
            paging::read_virt(&*self.m, self.layout.cr3, GuestVirtAddr(va), &mut live)?;
            let new = linked_bytes(linked, &rw.new, live.len())
                .ok_or_else(|| EngineError::MissingNew(rw.new.clone()))?;
            // Read-only data is compared and written whole. Writable data only in its
            // fields, whose relocated bytes are checked against the image's own under
            // this boot's slide (they are addresses, and live state could have replaced
            // them); each field is its own record, so a revert restores just it.
            let whole = [crate::Field {
                offset: 0,
                len: live.len() as u32,
            }];
            let fields: &[crate::Field] = if rw.fields.is_empty() {
                rw.matches(&live)
                    .map_err(|offset| EngineError::RewriteMismatch {
                        object: object.clone(),
                        addr: va,
                        offset,
                    })?;
                &whole
            } else {
                let image = self
                    .syms
                    .expected_bytes(self.layout.link(va), live.len(), self.layout.slide)
                    .ok();
                rw.matches_fields(&live, image.as_deref())
                    .map_err(|offset| EngineError::FieldChanged {
                        object: object.clone(),
                        addr: va,
                        offset,
                    })?;
                &rw.fields
            };
            for f in fields {
                let at = f.offset as usize..(f.offset + f.len) as usize;
                let field_va = va + u64::from(f.offset);
                words.extend(self.word_writes(field_va, &new[at.clone()])?);
                records.push(RewriteRecord {
                    object: match rw.fields.is_empty() {
                        true => object.clone(),
                        false => format!("{object}+{:#x}", f.offset),
                    },
                    va: field_va,
                    original: live[at.clone()].to_vec(),
                    written: new[at].to_vec(),
                });
            }
        }
        Ok((records, words))
    }

    /// Refuses unless every byte range of `man.zeroed` holds zero in the running kernel
    /// (new code reads a member added in padding there: see the manifest).
    pub(super) fn check_zeroed(&self, man: &Manifest) -> Result<(), EngineError> {
        for z in &man.zeroed {
            let va = self.layout.live(z.addr);
            let mut live = vec![0u8; z.len as usize];
            paging::read_virt(&*self.m, self.layout.cr3, GuestVirtAddr(va), &mut live)?;
            if live.iter().any(|&b| b != 0) {
                return Err(EngineError::NotZeroed {
                    object: z.object.clone(),
                    addr: va,
                    found: live,
                });
            }
        }
        Ok(())
    }

    /// The word writes that put back what `rec`'s rewrites replaced, refusing if an
    /// object no longer holds what lucos wrote.
    pub(super) fn unrewrites(&self, rec: &BundleRecord) -> Result<Vec<WordWrite>, EngineError> {
        let mut words = Vec::new();
        for r in &rec.rewrites {
            let mut live = vec![0u8; r.written.len()];
            paging::read_virt(&*self.m, self.layout.cr3, GuestVirtAddr(r.va), &mut live)?;
            if live != r.written {
                return Err(EngineError::RewriteChanged {
                    id: rec.id.clone(),
                    object: r.object.clone(),
                    addr: r.va,
                });
            }
            words.extend(self.word_writes(r.va, &r.original)?);
        }
        Ok(words)
    }

    /// `bytes` at `va` as aligned 8-byte words, keeping the live bytes around the object
    /// in the first and last word (an aligned word never crosses a page).
    fn word_writes(&self, va: u64, bytes: &[u8]) -> Result<Vec<WordWrite>, EngineError> {
        let end = va + bytes.len() as u64;
        let mut out = Vec::new();
        let mut w = va & !7;
        while w < end {
            let mut word = [0u8; 8];
            paging::read_virt(&*self.m, self.layout.cr3, GuestVirtAddr(w), &mut word)?;
            for (i, b) in word.iter_mut().enumerate() {
                let at = w + i as u64;
                if at >= va && at < end {
                    *b = bytes[(at - va) as usize];
                }
            }
            out.push((w, u64::from_le_bytes(word)));
            w += 8;
        }
        Ok(out)
    }
}

/// `len` linked bytes of the bundle's object `name`, from whichever region holds it.
fn linked_bytes(linked: &Linked, name: &str, len: usize) -> Option<Vec<u8>> {
    let va = *linked.symbols.get(name)?;
    let r = &linked.regions;
    let regions = [
        (r.text, &linked.text),
        (r.rodata, &linked.rodata),
        (r.data, &linked.data),
    ];
    regions.iter().find_map(|(base, image)| {
        let off = usize::try_from(va.checked_sub(*base)?).ok()?;
        image.get(off..off + len).map(<[u8]>::to_vec)
    })
}
