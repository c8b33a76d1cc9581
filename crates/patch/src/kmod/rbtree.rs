//! Red-black tree insertion and erasure on the guest kernel's own `struct rb_node`s, the
//! way `lib/rbtree.c` does them (`rb_insert_color`, `rb_erase`, no augmentation).
//!
//! lucos links a bundle's `struct module` into the kernel's module latch tree
//! (`mod_tree`), whose two trees are ordinary rb-trees. It does so from outside, with every
//! vCPU stopped, so the tree must end in a state the kernel's own code accepts: a valid
//! red-black tree with the kernel's encoding (parent pointer and colour in one word,
//! `RB_RED` = 0, `RB_BLACK` = 1). The steps follow the kernel's, so the result is the tree
//! the kernel itself would have built.
//!
//! Nodes are guest virtual addresses; memory is behind [`NodeMem`] so that the algorithm is
//! tested against a model without a VM, and so that the engine can collect every write
//! before making any.

/// The sort key of a node (the latch tree's `base`), read through the memory.
pub type KeyFn<'k, M> = dyn FnMut(&mut M, u64) -> Result<u64, <M as NodeMem>::Error> + 'k;

/// Word access to rb-tree nodes and roots.
pub trait NodeMem {
    type Error;
    fn get(&mut self, va: u64) -> Result<u64, Self::Error>;
    fn set(&mut self, va: u64, value: u64) -> Result<(), Self::Error>;
}

const PARENT_COLOR: u64 = 0;
const RIGHT: u64 = 8;
const LEFT: u64 = 16;
const BLACK: u64 = 1;
/// `sizeof(struct rb_node)`.
pub const NODE_SIZE: u64 = 24;

/// One side of a node; `flip` gives the mirror image, so each case is written once.
#[derive(Clone, Copy)]
struct Side(u64);

impl Side {
    fn flip(self) -> Side {
        Side(if self.0 == LEFT { RIGHT } else { LEFT })
    }
}

struct Tree<'m, M: NodeMem> {
    mem: &'m mut M,
    /// Address of `struct rb_root` (its only field, `rb_node`).
    root: u64,
}

impl<M: NodeMem> Tree<'_, M> {
    fn child(&mut self, n: u64, s: Side) -> Result<u64, M::Error> {
        self.mem.get(n + s.0)
    }
    fn set_child(&mut self, n: u64, s: Side, c: u64) -> Result<(), M::Error> {
        self.mem.set(n + s.0, c)
    }
    fn pc(&mut self, n: u64) -> Result<u64, M::Error> {
        self.mem.get(n + PARENT_COLOR)
    }
    fn parent(&mut self, n: u64) -> Result<u64, M::Error> {
        Ok(self.pc(n)? & !3)
    }
    fn is_black(&mut self, n: u64) -> Result<bool, M::Error> {
        Ok(self.pc(n)? & BLACK != 0)
    }
    /// Red means a node that exists and is red (`NULL` children are black).
    fn is_red(&mut self, n: u64) -> Result<bool, M::Error> {
        Ok(n != 0 && !self.is_black(n)?)
    }
    fn set_parent_color(&mut self, n: u64, parent: u64, color: u64) -> Result<(), M::Error> {
        self.mem.set(n + PARENT_COLOR, parent | color)
    }
    fn set_parent(&mut self, n: u64, parent: u64) -> Result<(), M::Error> {
        let color = self.pc(n)? & 1;
        self.set_parent_color(n, parent, color)
    }
    fn set_black(&mut self, n: u64) -> Result<(), M::Error> {
        let pc = self.pc(n)?;
        self.mem.set(n + PARENT_COLOR, pc | BLACK)
    }
    fn change_child(&mut self, old: u64, new: u64, parent: u64) -> Result<(), M::Error> {
        if parent == 0 {
            return self.mem.set(self.root, new);
        }
        if self.child(parent, Side(LEFT))? == old {
            self.set_child(parent, Side(LEFT), new)
        } else {
            self.set_child(parent, Side(RIGHT), new)
        }
    }
    /// `__rb_rotate_set_parents`: `new` takes `old`'s place under `old`'s parent.
    fn rotate_set_parents(&mut self, old: u64, new: u64, color: u64) -> Result<(), M::Error> {
        let parent = self.parent(old)?;
        let pc = self.pc(old)?;
        self.mem.set(new + PARENT_COLOR, pc)?;
        self.set_parent_color(old, new, color)?;
        self.change_child(old, new, parent)
    }

    /// `__rb_insert`: `node` was just linked as a red leaf.
    fn insert_color(&mut self, mut node: u64) -> Result<(), M::Error> {
        let mut parent = self.parent(node)?;
        loop {
            if parent == 0 {
                return self.set_parent_color(node, 0, BLACK);
            }
            if self.is_black(parent)? {
                return Ok(());
            }
            let gparent = self.parent(parent)?;
            // `out` is the side of gparent that parent is not on (the uncle's side).
            let out = if self.child(gparent, Side(RIGHT))? != parent {
                Side(RIGHT)
            } else {
                Side(LEFT)
            };
            let inn = out.flip();
            let uncle = self.child(gparent, out)?;
            if self.is_red(uncle)? {
                // Case 1: colour flips, then continue from gparent.
                self.set_parent_color(uncle, gparent, BLACK)?;
                self.set_parent_color(parent, gparent, BLACK)?;
                node = gparent;
                parent = self.parent(node)?;
                self.set_parent_color(node, parent, 0)?;
                continue;
            }
            let mut tmp = self.child(parent, out)?;
            if node == tmp {
                // Case 2: rotate at parent towards the inside.
                tmp = self.child(node, inn)?;
                self.set_child(parent, out, tmp)?;
                self.set_child(node, inn, parent)?;
                if tmp != 0 {
                    self.set_parent_color(tmp, parent, BLACK)?;
                }
                self.set_parent_color(parent, node, 0)?;
                parent = node;
                tmp = self.child(node, out)?;
            }
            // Case 3: rotate at gparent.
            self.set_child(gparent, inn, tmp)?;
            self.set_child(parent, out, gparent)?;
            if tmp != 0 {
                self.set_parent_color(tmp, gparent, BLACK)?;
            }
            return self.rotate_set_parents(gparent, parent, 0);
        }
    }

    /// `__rb_erase_augmented` without callbacks; returns the node to rebalance from.
    fn erase_node(&mut self, node: u64) -> Result<u64, M::Error> {
        let child = self.child(node, Side(RIGHT))?;
        let left = self.child(node, Side(LEFT))?;
        let pc = self.pc(node)?;
        if left == 0 {
            let parent = pc & !3;
            self.change_child(node, child, parent)?;
            if child != 0 {
                self.mem.set(child + PARENT_COLOR, pc)?;
                return Ok(0);
            }
            return Ok(if pc & BLACK != 0 { parent } else { 0 });
        }
        if child == 0 {
            self.mem.set(left + PARENT_COLOR, pc)?;
            self.change_child(node, left, pc & !3)?;
            return Ok(0);
        }
        let mut successor = child;
        let mut parent;
        let child2;
        let mut tmp = self.child(child, Side(LEFT))?;
        if tmp == 0 {
            // Case 2: the successor is the right child.
            parent = successor;
            child2 = self.child(successor, Side(RIGHT))?;
        } else {
            // Case 3: the successor is leftmost in the right subtree.
            loop {
                parent = successor;
                successor = tmp;
                tmp = self.child(tmp, Side(LEFT))?;
                if tmp == 0 {
                    break;
                }
            }
            child2 = self.child(successor, Side(RIGHT))?;
            self.set_child(parent, Side(LEFT), child2)?;
            self.set_child(successor, Side(RIGHT), child)?;
            self.set_parent(child, successor)?;
        }
        self.set_child(successor, Side(LEFT), left)?;
        self.set_parent(left, successor)?;
        self.change_child(node, successor, pc & !3)?;
        let rebalance = if child2 != 0 {
            self.set_parent_color(child2, parent, BLACK)?;
            0
        } else if self.is_black(successor)? {
            parent
        } else {
            0
        };
        self.mem.set(successor + PARENT_COLOR, pc)?;
        Ok(rebalance)
    }

    /// `____rb_erase_color`: one black is missing on the paths through `parent`'s child
    /// `node` (NULL on the first round).
    fn erase_color(&mut self, mut parent: u64) -> Result<(), M::Error> {
        let mut node = 0u64;
        loop {
            // `s` is the side of parent the sibling is on.
            let s = if self.child(parent, Side(RIGHT))? != node {
                Side(RIGHT)
            } else {
                Side(LEFT)
            };
            let o = s.flip();
            let mut sibling = self.child(parent, s)?;
            if self.is_red(sibling)? {
                // Case 1: rotate at parent.
                let tmp1 = self.child(sibling, o)?;
                self.set_child(parent, s, tmp1)?;
                self.set_child(sibling, o, parent)?;
                self.set_parent_color(tmp1, parent, BLACK)?;
                self.rotate_set_parents(parent, sibling, 0)?;
                sibling = tmp1;
            }
            let mut tmp1 = self.child(sibling, s)?;
            if !self.is_red(tmp1)? {
                let tmp2 = self.child(sibling, o)?;
                if !self.is_red(tmp2)? {
                    // Case 2: sibling colour flip.
                    self.set_parent_color(sibling, parent, 0)?;
                    if self.is_red(parent)? {
                        self.set_black(parent)?;
                    } else {
                        node = parent;
                        parent = self.parent(node)?;
                        if parent != 0 {
                            continue;
                        }
                    }
                    return Ok(());
                }
                // Case 3: rotate at sibling.
                tmp1 = self.child(tmp2, s)?;
                self.set_child(sibling, o, tmp1)?;
                self.set_child(tmp2, s, sibling)?;
                self.set_child(parent, s, tmp2)?;
                if tmp1 != 0 {
                    self.set_parent_color(tmp1, sibling, BLACK)?;
                }
                tmp1 = sibling;
                sibling = tmp2;
            }
            // Case 4: rotate at parent, colour flips.
            let tmp2 = self.child(sibling, o)?;
            self.set_child(parent, s, tmp2)?;
            self.set_child(sibling, o, parent)?;
            self.set_parent_color(tmp1, sibling, BLACK)?;
            if tmp2 != 0 {
                self.set_parent(tmp2, parent)?;
            }
            return self.rotate_set_parents(parent, sibling, BLACK);
        }
    }
}

/// Inserts `node` into the tree at `root`, ordered by `key` (as the latch tree's `less`:
/// a node whose key is not less than an existing one's goes to its right).
pub fn insert<M: NodeMem>(
    mem: &mut M,
    root: u64,
    node: u64,
    key: &mut KeyFn<'_, M>,
) -> Result<(), M::Error> {
    let k = key(mem, node)?;
    let mut parent = 0;
    let mut link = root;
    loop {
        let at = mem.get(link)?;
        if at == 0 {
            break;
        }
        parent = at;
        link = if k < key(mem, at)? {
            at + LEFT
        } else {
            at + RIGHT
        };
    }
    // rb_link_node: a red leaf.
    mem.set(node + PARENT_COLOR, parent)?;
    mem.set(node + LEFT, 0)?;
    mem.set(node + RIGHT, 0)?;
    mem.set(link, node)?;
    Tree { mem, root }.insert_color(node)
}

/// Removes `node`, which must be in the tree at `root`.
pub fn erase<M: NodeMem>(mem: &mut M, root: u64, node: u64) -> Result<(), M::Error> {
    let mut t = Tree { mem, root };
    let rebalance = t.erase_node(node)?;
    if rebalance != 0 {
        t.erase_color(rebalance)?;
    }
    Ok(())
}

/// Whether `node` is in the tree at `root`: found by walking down with its key, as a
/// lookup would (so a stale pointer elsewhere cannot fool it).
pub fn contains<M: NodeMem>(
    mem: &mut M,
    root: u64,
    node: u64,
    key: &mut KeyFn<'_, M>,
) -> Result<bool, M::Error> {
    let k = key(mem, node)?;
    let mut at = mem.get(root)?;
    let mut steps = 0;
    while at != 0 && steps < 128 {
        if at == node {
            return Ok(true);
        }
        at = if k < key(mem, at)? {
            mem.get(at + LEFT)?
        } else {
            mem.get(at + RIGHT)?
        };
        steps += 1;
    }
    Ok(false)
}

#[cfg(test)]
mod tests;
