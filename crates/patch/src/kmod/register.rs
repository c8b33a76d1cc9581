//! Linking a bundle's `struct module` into the kernel's module bookkeeping, and out again,
//! with every vCPU stopped. The kernel's writers of these structures all hold
//! `module_mutex`; lucos only writes when nobody holds it, so no writer is half-way
//! through. Readers use RCU (the lists) and the latch protocol (the module tree): a reader
//! stopped in the middle of a lookup either finishes on the old or the new structure, both
//! complete, or sees the latch sequence move and retries. This is the same guarantee the
//! kernel's own `list_add_rcu` and `latch_tree_insert` give, obtained by doing the whole
//! update at one instant.
//!
//! Nothing is written here: each function returns the words to write, computed from the
//! live state, and the engine writes them (and can undo them) inside the pause.

use std::collections::HashMap;

use lucos_introspect::paging::{read_virt_u64, PagingError};
use lucos_introspect::{GuestVirtAddr, PhysMem};

use super::image::{JumpKey, JumpSite};
use super::layout::KmodLayout;
use super::rbtree::{self, NodeMem};

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("reading kernel memory at {va:#x}: {source}")]
    Read {
        va: u64,
        #[source]
        source: PagingError,
    },
    #[error("the kernel holds {lock} ({doing}); try again")]
    Busy {
        lock: &'static str,
        doing: &'static str,
    },
    #[error("the static-branch site at {code:#x} holds {found}, neither a jump nor a NOP of 2 or 5 bytes")]
    JumpSite { code: u64, found: String },
    #[error(
        "module {users} uses symbols this bundle exports; unload it first (rmmod), then revert"
    )]
    InUse { users: String },
}

/// Live addresses of the kernel objects lucos links into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchors {
    pub modules: u64,
    pub module_bug_list: u64,
    pub mod_tree: u64,
    pub module_mutex: u64,
    pub jump_label_mutex: u64,
}

/// A bundle's `struct module` and the memory it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub module: u64,
    pub base: u64,
    pub size: u64,
}

impl Span {
    /// Whether `addr` is in the module's memory (`within_module()`).
    fn holds(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }
}

/// One 64-bit store into guest kernel memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordWrite {
    pub va: u64,
    pub value: u64,
}

/// The module tree's address bounds (`mod_tree.addr_min`, `addr_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bounds {
    pub min: u64,
    pub max: u64,
}

/// Reads through the guest's page tables, and sees its own pending writes.
struct Overlay<'a, P: PhysMem + ?Sized> {
    mem: &'a P,
    cr3: u64,
    pending: HashMap<u64, u64>,
    order: Vec<u64>,
}

impl<P: PhysMem + ?Sized> NodeMem for Overlay<'_, P> {
    type Error = RegisterError;
    fn get(&mut self, va: u64) -> Result<u64, RegisterError> {
        if let Some(v) = self.pending.get(&va) {
            return Ok(*v);
        }
        read_virt_u64(self.mem, self.cr3, GuestVirtAddr(va))
            .map_err(|source| RegisterError::Read { va, source })
    }
    fn set(&mut self, va: u64, value: u64) -> Result<(), RegisterError> {
        if self.pending.insert(va, value).is_none() {
            self.order.push(va);
        }
        Ok(())
    }
}

impl<'a, P: PhysMem + ?Sized> Overlay<'a, P> {
    fn new(mem: &'a P, cr3: u64) -> Self {
        Overlay {
            mem,
            cr3,
            pending: HashMap::new(),
            order: Vec::new(),
        }
    }

    /// Only the stores that change something, in the order they were made.
    fn writes(mut self) -> Result<Vec<WordWrite>, RegisterError> {
        let mut out = Vec::new();
        for va in std::mem::take(&mut self.order) {
            let value = self.pending[&va];
            let now = read_virt_u64(self.mem, self.cr3, GuestVirtAddr(va))
                .map_err(|source| RegisterError::Read { va, source })?;
            if now != value {
                out.push(WordWrite { va, value });
            }
        }
        Ok(out)
    }

    fn check_unlocked(&mut self, l: &KmodLayout, a: &Anchors) -> Result<(), RegisterError> {
        let locks = [
            (
                a.module_mutex,
                "module_mutex",
                "a module is being loaded or unloaded",
            ),
            (
                a.jump_label_mutex,
                "jump_label_mutex",
                "a static key is being switched",
            ),
        ];
        for (at, lock, doing) in locks {
            if self.get(at + l.mutex_owner)? != 0 {
                return Err(RegisterError::Busy { lock, doing });
            }
        }
        Ok(())
    }

    /// Bytes at `va` (through the pending stores).
    fn bytes(&mut self, va: u64, n: usize) -> Result<Vec<u8>, RegisterError> {
        let mut out = Vec::with_capacity(n);
        for b in va..va + n as u64 {
            let w = self.get(b & !7)?;
            out.push((w >> (8 * (b & 7))) as u8);
        }
        Ok(out)
    }

    /// Stores bytes at `va`, as stores of the aligned words they fall in.
    fn set_bytes(&mut self, va: u64, bytes: &[u8]) -> Result<(), RegisterError> {
        for (i, &byte) in bytes.iter().enumerate() {
            let b = va + i as u64;
            let w = self.get(b & !7)?;
            let shift = 8 * (b & 7);
            self.set(b & !7, (w & !(0xff << shift)) | (u64::from(byte) << shift))?;
        }
        Ok(())
    }

    /// The `struct module` whose core memory holds `addr` (0 for vmlinux): the owner the
    /// kernel records for a key's own entries (`__module_address(key)`).
    fn owner_of(&mut self, l: &KmodLayout, a: &Anchors, addr: u64) -> Result<u64, RegisterError> {
        let all = self.modules(l, a)?;
        let owner = all
            .into_iter()
            .find(|&(_, base, size)| addr >= base && addr < base + size);
        Ok(owner.map_or(0, |(m, ..)| m))
    }

    /// Every module on the list: (`struct module`, core base, core size); bounded.
    fn modules(
        &mut self,
        l: &KmodLayout,
        a: &Anchors,
    ) -> Result<Vec<(u64, u64, u64)>, RegisterError> {
        let mut out = Vec::new();
        let mut node = self.get(a.modules)?;
        while node != a.modules && out.len() < MAX_MODULES {
            let m = node.wrapping_sub(l.list);
            let size = self.get(m + l.core_size)? & 0xffff_ffff;
            out.push((m, self.get(m + l.base)?, size));
            node = self.get(node)?;
        }
        Ok(out)
    }

    /// Puts a static-branch site in the state its key has now (`jump_label_type()`), in
    /// the instruction size objtool left it: the kernel's later updates expect exactly
    /// the jump or the NOP of that size there.
    fn set_site(&mut self, l: &KmodLayout, j: &JumpSite) -> Result<(), RegisterError> {
        let enabled = self.get(j.key + l.key_enabled)? as u32 as i32 > 0;
        let now = self.bytes(j.code, 5)?;
        let size = match now.as_slice() {
            [0x66, 0x90, ..] | [0xeb, ..] => 2,
            [0x0f, 0x1f, 0x44, 0x00, 0x00] | [0xe9, ..] => 5,
            _ => {
                return Err(RegisterError::JumpSite {
                    code: j.code,
                    found: hex::encode(&now),
                })
            }
        };
        let rel = j.target.wrapping_sub(j.code + size) as i64;
        let want: Vec<u8> = match (enabled != j.branch, size) {
            (true, 2) => vec![0xeb, rel as i8 as u8],
            (true, _) => [vec![0xe9], (rel as i32).to_le_bytes().to_vec()].concat(),
            (false, 2) => vec![0x66, 0x90],
            (false, _) => vec![0x0f, 0x1f, 0x44, 0x00, 0x00],
        };
        self.set_bytes(j.code, &want)
    }

    /// `jump_label_add_module()` for one key: the module's `static_key_mod` goes first on
    /// the key's list; a key with no module users yet first gets one for its own entries
    /// (in lucos's spare slot, where the kernel would kzalloc one).
    fn link_key(
        &mut self,
        l: &KmodLayout,
        a: &Anchors,
        span: &Span,
        k: &JumpKey,
    ) -> Result<(), RegisterError> {
        let at = k.key + l.key_type;
        let t = self.get(at)?;
        if span.holds(k.key) {
            // The module's own key (a new dynamic-debug descriptor's): it points at its
            // entries directly, as static_key_set_entries() does, with no list.
            return self.set(at, k.entries | (t & 1));
        }
        let module = span.module;
        let next = if t & 2 == 0 {
            let owner = self.owner_of(l, a, k.key)?;
            self.set(k.spare + l.skm_next, 0)?;
            self.set(k.spare + l.skm_entries, t & !3)?;
            self.set(k.spare + l.skm_mod, owner)?;
            k.spare
        } else {
            t & !3
        };
        self.set(k.ours + l.skm_next, next)?;
        self.set(k.ours + l.skm_entries, k.entries)?;
        self.set(k.ours + l.skm_mod, module)?;
        self.set(at, k.ours | (t & 1) | 2)
    }

    /// `jump_label_del_module()` for one key, without kfree: the module's entry leaves the
    /// list, and a list left with one entry is folded back into the key. If lucos made the
    /// key's own entry (the spare) and other modules have joined since, the kernel would
    /// one day kfree that spare: then the module's entry stays as an empty tombstone (no
    /// entries, so the kernel skips it) and keeps the list from folding.
    fn unlink_key(
        &mut self,
        l: &KmodLayout,
        span: &Span,
        k: &JumpKey,
    ) -> Result<(), RegisterError> {
        let at = k.key + l.key_type;
        let t = self.get(at)?;
        if span.holds(k.key) || t & 2 == 0 {
            return Ok(());
        }
        let (mut prev, mut cur) = (at, t & !3);
        let (mut found, mut spare_listed, mut len) = (None, false, 0);
        while cur != 0 && len < MAX_MODULES {
            if cur == k.ours {
                found = Some(prev);
            }
            spare_listed |= cur == k.spare;
            len += 1;
            prev = cur + l.skm_next;
            cur = self.get(prev)?;
        }
        let Some(prev) = found else {
            return Ok(());
        };
        if spare_listed && len > 2 {
            return self.set(k.ours + l.skm_entries, 0);
        }
        let next = self.get(k.ours + l.skm_next)?;
        if prev == at {
            self.set(at, next | (t & 3))?;
        } else {
            self.set(prev, next)?;
        }
        let head = self.get(at)? & !3;
        if head != 0 && self.get(head + l.skm_next)? == 0 {
            let entries = self.get(head + l.skm_entries)?;
            self.set(at, entries | (t & 1))?;
        }
        Ok(())
    }

    /// `list_add_rcu(node, head)`.
    fn list_add(&mut self, node: u64, head: u64) -> Result<(), RegisterError> {
        let first = self.get(head)?;
        self.set(node, first)?;
        self.set(node + 8, head)?;
        self.set(first + 8, node)?;
        self.set(head, node)
    }

    /// `list_del_rcu(node)` if `node` is on a list (its neighbours point at it); the node
    /// keeps its `next`, so a reader stopped on it goes on along the list.
    fn list_del(&mut self, node: u64) -> Result<bool, RegisterError> {
        let (next, prev) = (self.get(node)?, self.get(node + 8)?);
        if next == node || self.get(next + 8)? != node || self.get(prev)? != node {
            return Ok(false);
        }
        self.set(prev, next)?;
        self.set(next + 8, prev)?;
        self.set(node + 8, node)?;
        Ok(true)
    }

    /// Moves the latch sequence on by two: readers that started before retry.
    fn bump_latch(&mut self, l: &KmodLayout, a: &Anchors) -> Result<(), RegisterError> {
        let at = a.mod_tree + l.tree_seq;
        let w = self.get(at)?;
        let seq = (w as u32).wrapping_add(2);
        self.set(at, (w & !0xffff_ffff) | u64::from(seq))
    }
}

fn tree_key<P: PhysMem + ?Sized>(
    l: &KmodLayout,
    idx: u64,
) -> impl FnMut(&mut Overlay<'_, P>, u64) -> Result<u64, RegisterError> + '_ {
    move |m, node| m.get(l.key_addr(node, idx))
}

/// Stores that link the module of `span` (already written, with its `core_layout`) into
/// the module list, the module tree and the bug list, and widen the tree's bounds to cover
/// it.
pub fn link<P: PhysMem + ?Sized>(
    mem: &P,
    cr3: u64,
    l: &KmodLayout,
    a: &Anchors,
    (span, keys, jumps): (Span, &[JumpKey], &[JumpSite]),
) -> Result<Vec<WordWrite>, RegisterError> {
    let module = span.module;
    let mut o = Overlay::new(mem, cr3);
    o.check_unlocked(l, a)?;
    for j in jumps {
        o.set_site(l, j)?;
    }
    for k in keys {
        o.link_key(l, a, &span, k)?;
    }
    o.list_add(module + l.list, a.modules)?;
    o.list_add(module + l.bug_list, a.module_bug_list)?;
    o.bump_latch(l, a)?;
    for idx in 0..2 {
        let root = a.mod_tree + l.tree_roots + 8 * idx;
        rbtree::insert(&mut o, root, l.node(module, idx), &mut tree_key(l, idx))?;
    }
    let (min_at, max_at) = (a.mod_tree + l.tree_addr_min, a.mod_tree + l.tree_addr_max);
    let (lo, hi) = (span.base, span.base + span.size);
    if lo < o.get(min_at)? {
        o.set(min_at, lo)?;
    }
    if hi > o.get(max_at)? {
        o.set(max_at, hi)?;
    }
    o.writes()
}

/// The bounds now, to keep as "before lucos" the first time a module is linked.
pub fn bounds<P: PhysMem + ?Sized>(
    mem: &P,
    cr3: u64,
    l: &KmodLayout,
    a: &Anchors,
) -> Result<Bounds, RegisterError> {
    let mut o = Overlay::new(mem, cr3);
    Ok(Bounds {
        min: o.get(a.mod_tree + l.tree_addr_min)?,
        max: o.get(a.mod_tree + l.tree_addr_max)?,
    })
}

/// The modules that use module `module`'s exports (its `source_list` of `struct
/// module_use`, which `ref_module()` fills when a loading module links against one).
fn users<P: PhysMem + ?Sized>(
    o: &mut Overlay<'_, P>,
    l: &KmodLayout,
    module: u64,
) -> Result<Vec<String>, RegisterError> {
    let head = module + l.source_list;
    let mut out = Vec::new();
    let mut next = o.get(head)?;
    // Bounded: a damaged list must not hold the pause forever.
    while next != head && out.len() < 64 {
        let user = o.get(next - l.use_source_list + l.use_source)?;
        let mut name = Vec::new();
        for w in 0..l.name_len.div_ceil(8).min(8) {
            name.extend(o.get(user + l.name + 8 * w)?.to_le_bytes());
            if name.contains(&0) {
                break;
            }
        }
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push(String::from_utf8_lossy(&name[..end]).into_owned());
        next = o.get(next)?;
    }
    Ok(out)
}

/// Stores that unlink `module` from whatever it is still linked into (so a second call,
/// or a call after a failed link, finds nothing to do), and narrow the tree's bounds back
/// to `before` widened by every module still linked (`others`: each one's layouts as
/// `(base, size)`).
pub fn unlink<P: PhysMem + ?Sized>(
    mem: &P,
    cr3: u64,
    l: &KmodLayout,
    a: &Anchors,
    (span, keys): (Span, &[JumpKey]),
    before: Bounds,
    others: &[(u64, u64)],
) -> Result<Vec<WordWrite>, RegisterError> {
    let module = span.module;
    let mut o = Overlay::new(mem, cr3);
    o.check_unlocked(l, a)?;
    let users = users(&mut o, l, module)?;
    if !users.is_empty() {
        return Err(RegisterError::InUse {
            users: users.join(", "),
        });
    }
    for k in keys {
        o.unlink_key(l, &span, k)?;
    }
    o.list_del(module + l.list)?;
    o.list_del(module + l.bug_list)?;
    let mut bumped = false;
    for idx in 0..2 {
        let root = a.mod_tree + l.tree_roots + 8 * idx;
        let node = l.node(module, idx);
        if rbtree::contains(&mut o, root, node, &mut tree_key(l, idx))? {
            if !bumped {
                o.bump_latch(l, a)?;
                bumped = true;
            }
            rbtree::erase(&mut o, root, node)?;
        }
    }
    let (min_at, max_at) = (a.mod_tree + l.tree_addr_min, a.mod_tree + l.tree_addr_max);
    let live = others.iter().filter(|(_, size)| *size > 0);
    let want_min = live.clone().map(|(b, _)| *b).fold(before.min, u64::min);
    let want_max = live.map(|(b, s)| b + s).fold(before.max, u64::max);
    // Only undo lucos's own widening: a bound that is not ours any more was moved by the
    // kernel since, and stays.
    if o.get(min_at)? == span.base {
        o.set(min_at, want_min)?;
    }
    if o.get(max_at)? == span.base + span.size {
        o.set(max_at, want_max)?;
    }
    o.writes()
}

/// More modules than any kernel loads: a longer list is corrupt or changing under us.
const MAX_MODULES: usize = 4096;

/// `(base, size)` of the core layout of every module on the list except `skip`.
pub fn other_modules<P: PhysMem + ?Sized>(
    mem: &P,
    cr3: u64,
    l: &KmodLayout,
    a: &Anchors,
    skip: u64,
) -> Result<Vec<(u64, u64)>, RegisterError> {
    let all = Overlay::new(mem, cr3).modules(l, a)?;
    Ok(all
        .into_iter()
        .filter(|&(m, ..)| m != skip)
        .map(|(_, base, size)| (base, size))
        .collect())
}
