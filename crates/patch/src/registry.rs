//! The registry of applied patches, kept inside the VM's patch memory so
//! any lucos process can attach later, and a crashed one loses nothing.
//!
//! Layout at the start of patch memory (never mapped into the guest):
//! a header page, then two slots. An update writes the inactive slot, then
//! flips `active` in the header, so a torn write leaves the old copy valid.

use serde::{Deserialize, Serialize};

use crate::memory::{PatchMemLayout, REGISTRY_SLOT_SIZE};
use crate::RegionKind;

mod header;
pub use header::{Header, HEADER_LEN};

pub const MAGIC: &[u8; 8] = b"LUCOSREG";
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the patch registry in patch memory is corrupt ({0}); lucos refuses to touch this guest's patches. Something other than lucos wrote patch memory; restart the VM to start from a clean state")]
    Corrupt(String),
    #[error("the patch registry in patch memory is corrupt (bad JSON: {source}); lucos refuses to touch this guest's patches. Something other than lucos wrote patch memory; restart the VM to start from a clean state")]
    BadJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("the patch registry has format {0}, this lucos understands {FORMAT}; use a matching lucos version")]
    Format(u32),
    #[error("the patch registry would need {need} bytes, a slot holds {REGISTRY_SLOT_SIZE}; revert and drop old bundles")]
    Full { need: usize },
    #[error("the patch registry has no room for this bundle's record and its revert: the applied bundles and this one would need up to {need} bytes, a slot holds {REGISTRY_SLOT_SIZE}. Revert an applied bundle first, or make this one smaller (fewer replacements, a shorter description)")]
    NoRoom { need: usize },
}

/// One redirected function entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// Old function as named in the manifest (`file:name` or `name`).
    pub function: String,
    /// Live virtual address of the function and of its 5-byte site.
    pub func_addr: u64,
    pub site_addr: u64,
    pub site_pa: u64,
    /// Bytes at the site before this bundle (NOP5, or an earlier bundle's jmp).
    #[serde(with = "site_bytes")]
    pub original: [u8; 5],
    /// The jmp this bundle wrote.
    #[serde(with = "site_bytes")]
    pub written: [u8; 5],
    pub new_addr: u64,
    pub new_symbol: String,
    /// The module the function is in, as it was loaded when patched; `None` for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleSite>,
}

/// A site's bytes as a hex string, as the registry has always stored them; a string that
/// is not 5 bytes makes the registry corrupt (lucos never guesses what to write).
mod site_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 5], s: S) -> Result<S::Ok, S::Error> {
        crate::manifest::hex_bytes::serialize(bytes, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 5], D::Error> {
        let v = crate::manifest::hex_bytes::deserialize(d)?;
        v.as_slice().try_into().map_err(|_| {
            serde::de::Error::custom(format!(
                "site bytes `{}` are {} bytes long, not 5",
                hex::encode(&v),
                v.len()
            ))
        })
    }
}

/// A loaded module by name and core base: a reload of the same module lands elsewhere, or
/// at least is a different load that lucos never patched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSite {
    pub name: String,
    pub base: u64,
}

/// A piece of patch memory owned by a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRecord {
    /// Offset into patch memory.
    pub offset: u64,
    pub len: u64,
    pub va: u64,
    pub kind: RegionKind,
}

impl RangeRecord {
    /// Whether live address `va` lies in this range.
    pub fn contains(&self, va: u64) -> bool {
        va >= self.va && va < self.va + self.len
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleState {
    Applied,
    Reverted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub id: String,
    pub description: String,
    /// sha256 of the bundle file, hex.
    pub sha256: String,
    pub state: BundleState,
    pub applied_unix_ms: u64,
    pub reverted_unix_ms: Option<u64>,
    pub sites: Vec<SiteRecord>,
    pub ranges: Vec<RangeRecord>,
    pub apply_pause_us: u64,
    pub revert_pause_us: Option<u64>,
    /// The `struct module` through which the kernel knows this bundle's code, if the
    /// kernel has modules (see `crate::kmod`).
    #[serde(default)]
    pub module: Option<ModuleRecord>,
    /// Read-only objects rewritten in place, with what they held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrites: Vec<RewriteRecord>,
    /// The bundle's frame-local types (`Manifest::frame_types`): its revert must be
    /// consistent too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_types: Vec<String>,
    /// Its changed static prototypes (`Manifest::prototypes`): the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prototypes: Vec<String>,
    /// Set when a switch of this bundle failed and could not put every site back: each
    /// site listed may hold either its `original` or its `written` bytes. The record stays
    /// applied, so its pages stay allocated and `lucos revert` (which accepts either bytes
    /// at each site) can finish the job; a revert clears it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub half_applied: bool,
    /// A reverted bundle whose memory went back to `Registry::free` (nothing referenced it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reclaimed: bool,
}

impl BundleRecord {
    /// A record with nothing in it yet but its id and state; records are built from it
    /// with struct-update syntax.
    pub fn empty(id: &str, state: BundleState) -> Self {
        BundleRecord {
            id: id.into(),
            description: String::new(),
            sha256: String::new(),
            state,
            applied_unix_ms: 0,
            reverted_unix_ms: None,
            sites: Vec::new(),
            ranges: Vec::new(),
            apply_pause_us: 0,
            revert_pause_us: None,
            module: None,
            rewrites: Vec::new(),
            frame_types: Vec::new(),
            prototypes: Vec::new(),
            half_applied: false,
            reclaimed: false,
        }
    }
}

/// One object a bundle rewrote in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteRecord {
    pub object: String,
    pub va: u64,
    #[serde(with = "crate::manifest::hex_bytes")]
    pub original: Vec<u8>,
    #[serde(with = "crate::manifest::hex_bytes")]
    pub written: Vec<u8>,
}

/// A bundle's `struct module`: its address, its name and the memory it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub name: String,
    pub va: u64,
    pub base: u64,
    pub size: u64,
    /// Static keys the new code's jump-label sites are linked to.
    #[serde(default)]
    pub jump_keys: Vec<crate::kmod::image::JumpKey>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Registry {
    pub format: u32,
    /// Set by the first apply: where patch memory is mapped in the guest
    /// kernel's address space, and the (guest-physical address, value) of
    /// each page-directory entry lucos installed (all were zero before).
    pub va_base: Option<u64>,
    pub pd_entries: Vec<(u64, u64)>,
    /// Set when the mapping above is recorded, before any entry is written, and cleared by
    /// the commit of the apply that made it: while set, entries may be missing or written
    /// (a lucos killed in between), and the next apply writes them all again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub map_pending: bool,
    /// Guest-physical address of patch memory when it was mapped: the page
    /// tables point there, so it must not move (a guest reassigning PCI BARs).
    #[serde(default)]
    pub patch_gpa: Option<u64>,
    /// Next free offset in the allocatable area, past every range ever handed out.
    pub next_free: u64,
    /// Reclaimed ranges below `next_free`, (offset, length), sorted and merged: reverted
    /// bundles' memory that no stack, vCPU or detectable pointer referenced any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub free: Vec<(u64, u64)>,
    pub bundles: Vec<BundleRecord>,
    /// Bumped on every commit.
    pub generation: u64,
    /// Reverted records dropped from `bundles` to bound the registry's size
    /// (memory not reclaimed before stays allocated for good).
    #[serde(default)]
    pub reverted_dropped: u64,
    /// The module tree's address bounds before lucos first widened them, to narrow them
    /// back on revert.
    #[serde(default)]
    pub module_bounds: Option<crate::kmod::Bounds>,
}

/// Reverted records kept for `lucos status`; older ones are dropped.
pub const KEEP_REVERTED: usize = 32;

impl Registry {
    pub fn empty(layout: &PatchMemLayout) -> Self {
        Registry {
            format: FORMAT,
            next_free: layout.alloc_start,
            ..Default::default()
        }
    }

    pub fn applied(&self) -> impl Iterator<Item = &BundleRecord> {
        self.bundles
            .iter()
            .filter(|b| b.state == BundleState::Applied)
    }

    pub fn find_applied(&self, id: &str) -> Option<&BundleRecord> {
        self.applied().find(|b| b.id == id)
    }

    /// The applied bundle whose jmp currently sits at `site_addr` (the top
    /// of that site's stack), with its record.
    pub fn top_of_site(&self, site_addr: u64) -> Option<(&BundleRecord, &SiteRecord)> {
        self.applied()
            .filter_map(|b| {
                b.sites
                    .iter()
                    .find(|s| s.site_addr == site_addr)
                    .map(|s| (b, s))
            })
            .last()
    }

    /// What `site_addr` held before any applied bundle: the first one's original bytes.
    pub fn base_of_site(&self, site_addr: u64) -> Option<[u8; 5]> {
        self.applied()
            .find_map(|b| b.sites.iter().find(|s| s.site_addr == site_addr))
            .map(|s| s.original)
    }

    /// Takes `need` bytes: the lowest reclaimed range that fits (then `true`: the pages held
    /// code before and must be written coherently), else fresh memory at `next_free`.
    /// `None` when neither has room.
    pub fn alloc(&mut self, need: u64, size: u64) -> Option<(u64, bool)> {
        if let Some(i) = self.free.iter().position(|&(_, len)| len >= need) {
            let (off, len) = self.free[i];
            if len == need {
                self.free.remove(i);
            } else {
                self.free[i] = (off + need, len - need);
            }
            return Some((off, true));
        }
        let off = self.next_free;
        (size.checked_sub(off)? >= need).then(|| {
            self.next_free += need;
            (off, false)
        })
    }

    /// Bytes an allocation can get at most: the largest reclaimed range or the fresh rest.
    pub fn largest_free(&self, size: u64) -> u64 {
        let fresh = size.saturating_sub(self.next_free);
        self.free.iter().map(|&(_, l)| l).fold(fresh, u64::max)
    }

    /// Gives a range back, merging it with its neighbours.
    pub fn release(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let i = self.free.partition_point(|&(o, _)| o < offset);
        self.free.insert(i, (offset, len));
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.free.len());
        for &(o, l) in &self.free {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => merged.push((o, l)),
            }
        }
        self.free = merged;
    }

    /// Drops the oldest reverted records beyond [`KEEP_REVERTED`]. Applied
    /// records are never dropped: they are needed to revert.
    pub fn prune(&mut self) {
        let reverted = self
            .bundles
            .iter()
            .filter(|b| b.state == BundleState::Reverted)
            .count();
        let mut excess = reverted.saturating_sub(KEEP_REVERTED);
        self.reverted_dropped += excess as u64;
        self.bundles.retain(|b| {
            if excess > 0 && b.state == BundleState::Reverted {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Notes a mapping about to be written (see `map_pending`): its base and entries.
    pub fn note_mapping(&mut self, va_base: u64, patch_gpa: u64, entries: &[(u64, u64)]) {
        for e in entries {
            if !self.pd_entries.contains(e) {
                self.pd_entries.push(*e);
            }
        }
        self.va_base.get_or_insert(va_base);
        self.patch_gpa = Some(patch_gpa);
        self.map_pending = true;
    }

    /// Length of this registry's JSON once every bundle in it is reverted and reclaimed and
    /// every number in it is at its widest: no revert, reclaim or pause record can take it
    /// past this, since those only change states and numbers and add one free entry per
    /// range at most (and pruning only removes records).
    pub fn worst_case_len(&self) -> usize {
        let mut w = self.clone();
        w.generation = u64::MAX;
        w.reverted_dropped = u64::MAX;
        // Reclaiming may split every range into a free entry of its own.
        let ranges: usize = w.bundles.iter().map(|b| b.ranges.len()).sum();
        w.free = vec![(u64::MAX, u64::MAX); w.free.len() + ranges];
        for b in &mut w.bundles {
            b.state = BundleState::Reverted;
            b.reclaimed = true;
            b.applied_unix_ms = u64::MAX;
            b.reverted_unix_ms = Some(u64::MAX);
            b.apply_pause_us = u64::MAX;
            b.revert_pause_us = Some(u64::MAX);
            b.half_applied = true;
        }
        serde_json::to_vec(&w).expect("registry serializes").len()
    }

    /// Makes room for `record` such that every applied bundle, `record` included, can
    /// still be reverted: drops the oldest reverted records (history only) until the worst
    /// case fits a slot. Refuses when the applied records alone do not leave that room.
    pub fn reserve(&mut self, record: &BundleRecord) -> Result<(), RegistryError> {
        self.bundles.push(record.clone());
        let mut need = self.worst_case_len();
        while need > REGISTRY_SLOT_SIZE {
            let Some(old) = self
                .bundles
                .iter()
                .position(|b| b.state == BundleState::Reverted)
            else {
                self.bundles.pop();
                return Err(RegistryError::NoRoom { need });
            };
            self.bundles.remove(old);
            self.reverted_dropped += 1;
            need = self.worst_case_len();
        }
        self.bundles.pop();
        Ok(())
    }

    /// Bytes of the header page and of the slot to write for this registry.
    pub fn encode(&self, header: &Header) -> Result<(Header, Vec<u8>), RegistryError> {
        let json = serde_json::to_vec(self).expect("registry serializes");
        if json.len() > REGISTRY_SLOT_SIZE {
            return Err(RegistryError::Full { need: json.len() });
        }
        let slot = 1 - header.active.min(1);
        let mut h = header.clone();
        h.active = slot;
        h.generation = self.generation;
        h.len[slot as usize] = json.len() as u32;
        h.crc[slot as usize] = crc32fast::hash(&json);
        Ok((h, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let h = Header {
            active: 1,
            generation: 7,
            len: [3, 4],
            crc: [5, 6],
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), Some(h));
        assert_eq!(Header::decode(&[0; HEADER_LEN]).unwrap(), None);
        let mut bad = Header::default().encode();
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad),
            Err(RegistryError::Corrupt(_))
        ));
        let mut bad = Header::default().encode();
        bad[8] = 9;
        assert!(matches!(
            Header::decode(&bad),
            Err(RegistryError::Format(9))
        ));
    }

    #[test]
    fn prune_keeps_applied_and_recent_reverted() {
        let layout = PatchMemLayout::new(8 << 20).unwrap();
        let mut reg = Registry::empty(&layout);
        let rec = |id: String, state| BundleRecord::empty(&id, state);
        reg.bundles.push(rec("base".into(), BundleState::Applied));
        for i in 0..KEEP_REVERTED + 5 {
            reg.bundles
                .push(rec(format!("r{i}"), BundleState::Reverted));
        }
        reg.prune();
        assert_eq!(reg.bundles.len(), KEEP_REVERTED + 1);
        assert_eq!(reg.bundles[0].id, "base");
        assert_eq!(
            reg.bundles[1].id, "r5",
            "the oldest reverted records go first"
        );
        assert_eq!(reg.reverted_dropped, 5);
    }

    /// The largest record a valid manifest can give: every name and the description at
    /// their limits (see `crate::manifest`).
    fn maximal(id: String) -> BundleRecord {
        use crate::manifest::{MAX_DESCRIPTION, MAX_PATH, MAX_REPLACEMENTS, MAX_SYMBOL};
        let site = SiteRecord {
            function: format!(
                "{}@{} [{}]",
                "f".repeat(MAX_SYMBOL),
                "p".repeat(MAX_PATH),
                "m".repeat(55)
            ),
            func_addr: u64::MAX,
            site_addr: u64::MAX,
            site_pa: u64::MAX,
            original: [0xe9; 5],
            written: [0xe9; 5],
            new_addr: u64::MAX,
            new_symbol: "n".repeat(MAX_SYMBOL),
            module: Some(ModuleSite {
                name: "m".repeat(55),
                base: u64::MAX,
            }),
        };
        // Rewrites are bounded too (MAX_REWRITES of MAX_REWRITE bytes); an apply whose
        // record does not leave room is refused by `reserve` like any other.
        BundleRecord {
            description: "\u{1b}".repeat(MAX_DESCRIPTION), // escaped: 6 bytes each in JSON
            sha256: "0".repeat(64),
            sites: vec![site; MAX_REPLACEMENTS],
            ..BundleRecord::empty(&id, BundleState::Applied)
        }
    }

    /// A registry reserves room for reverts: apply maximal records until it refuses one,
    /// then revert every one of them: each revert fits, whatever the numbers it records.
    #[test]
    fn every_reserved_record_can_be_reverted() {
        let layout = PatchMemLayout::new(8 << 20).unwrap();
        let mut reg = Registry::empty(&layout);
        let mut header = Header::default();
        let mut applied = 0;
        loop {
            let rec = maximal(format!("b{applied}"));
            match reg.reserve(&rec) {
                Ok(()) => {}
                Err(RegistryError::NoRoom { need }) => {
                    assert!(need > REGISTRY_SLOT_SIZE);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            reg.bundles.push(rec);
            reg.generation += 1;
            header = reg.encode(&header).expect("an apply fits").0;
            applied += 1;
        }
        eprintln!("{applied} maximal bundles fit one registry slot");
        assert!(applied >= 4, "only {applied} maximal bundles fit");
        for i in (0..applied).rev() {
            let b = reg
                .bundles
                .iter_mut()
                .find(|b| b.id == format!("b{i}"))
                .unwrap();
            b.state = BundleState::Reverted;
            b.reverted_unix_ms = Some(u64::MAX);
            b.revert_pause_us = Some(u64::MAX);
            b.apply_pause_us = u64::MAX;
            reg.generation = u64::MAX;
            reg.prune();
            header = reg.encode(&header).expect("every revert fits").0;
        }
        // History is dropped to make room: maximal bundles keep applying after reverts.
        for i in 0..3 * applied {
            let rec = maximal(format!("c{i}"));
            reg.reserve(&rec).expect("reverted records make room");
            reg.bundles.push(rec.clone());
            reg.encode(&header).expect("fits");
            let b = reg.bundles.last_mut().unwrap();
            b.state = BundleState::Reverted;
        }
    }

    #[test]
    fn reclaimed_ranges_are_reused_first_and_merge() {
        let layout = PatchMemLayout::new(8 << 20).unwrap();
        let mut reg = Registry::empty(&layout);
        let start = reg.next_free;
        assert_eq!(reg.alloc(0x3000, 8 << 20), Some((start, false)));
        assert_eq!(reg.alloc(0x2000, 8 << 20), Some((start + 0x3000, false)));
        reg.release(start + 0x3000, 0x2000);
        reg.release(start, 0x3000);
        assert_eq!(reg.free, vec![(start, 0x5000)], "neighbours merge");
        assert_eq!(reg.alloc(0x1000, 8 << 20), Some((start, true)), "reused");
        assert_eq!(reg.free, vec![(start + 0x1000, 0x4000)]);
        assert_eq!(reg.alloc(0x4000, 8 << 20), Some((start + 0x1000, true)));
        assert!(reg.free.is_empty());
        assert_eq!(reg.alloc(8 << 20, 8 << 20), None, "full");
        assert_eq!(reg.largest_free(8 << 20), (8 << 20) - reg.next_free);
    }

    #[test]
    fn encode_alternates_slots_and_detects_corruption() {
        let layout = PatchMemLayout::new(8 << 20).unwrap();
        let mut reg = Registry::empty(&layout);
        reg.generation = 1;
        let (h1, json1) = reg.encode(&Header::default()).unwrap();
        assert_eq!(h1.active, 1);
        assert_eq!(h1.registry(&json1).unwrap(), reg);
        reg.generation = 2;
        let (h2, json2) = reg.encode(&h1).unwrap();
        assert_eq!(h2.active, 0);
        // The previous slot's metadata is kept intact.
        assert_eq!((h2.len[1], h2.crc[1]), (h1.len[1], h1.crc[1]));
        let mut torn = json2.clone();
        torn[3] ^= 0xff;
        assert!(matches!(h2.registry(&torn), Err(RegistryError::Corrupt(_))));
    }
}
