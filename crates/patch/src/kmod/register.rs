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
use lucos_introspect::PhysMem;

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
    #[error("the kernel holds {lock} (a module is being loaded or unloaded); try again")]
    Busy { lock: &'static str },
}

/// Live addresses of the kernel objects lucos links into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchors {
    pub modules: u64,
    pub module_bug_list: u64,
    pub mod_tree: u64,
    pub module_mutex: u64,
}

/// A bundle's `struct module` and the memory it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub module: u64,
    pub base: u64,
    pub size: u64,
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
        read_virt_u64(self.mem, self.cr3, va).map_err(|source| RegisterError::Read { va, source })
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
            let now = read_virt_u64(self.mem, self.cr3, va)
                .map_err(|source| RegisterError::Read { va, source })?;
            if now != value {
                out.push(WordWrite { va, value });
            }
        }
        Ok(out)
    }

    fn check_unlocked(&mut self, l: &KmodLayout, a: &Anchors) -> Result<(), RegisterError> {
        if self.get(a.module_mutex + l.mutex_owner)? != 0 {
            return Err(RegisterError::Busy {
                lock: "module_mutex",
            });
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
    span: Span,
) -> Result<Vec<WordWrite>, RegisterError> {
    let module = span.module;
    let mut o = Overlay::new(mem, cr3);
    o.check_unlocked(l, a)?;
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

/// Stores that unlink `module` from whatever it is still linked into (so a second call,
/// or a call after a failed link, finds nothing to do), and narrow the tree's bounds back
/// to `before` widened by every module still linked (`others`: each one's layouts as
/// `(base, size)`).
pub fn unlink<P: PhysMem + ?Sized>(
    mem: &P,
    cr3: u64,
    l: &KmodLayout,
    a: &Anchors,
    span: Span,
    before: Bounds,
    others: &[(u64, u64)],
) -> Result<Vec<WordWrite>, RegisterError> {
    let module = span.module;
    let mut o = Overlay::new(mem, cr3);
    o.check_unlocked(l, a)?;
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
    let mut o = Overlay::new(mem, cr3);
    let mut out = Vec::new();
    let mut node = o.get(a.modules)?;
    while node != a.modules && out.len() < MAX_MODULES {
        let m = node.wrapping_sub(l.list);
        if m != skip {
            let size = o.get(m + l.core_size)? & 0xffff_ffff;
            out.push((o.get(m + l.base)?, size));
        }
        node = o.get(node)?;
    }
    Ok(out)
}
