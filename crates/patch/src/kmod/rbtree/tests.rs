//! The guest rb-tree operations against a model: after any sequence of inserts and
//! erases, the nodes reachable from the root are exactly the model's keys in order, every
//! parent pointer is right, and the red-black rules hold (so the kernel's own code can go
//! on using the tree).

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;

#[derive(Default)]
struct Mem(HashMap<u64, u64>);

impl NodeMem for Mem {
    type Error = String;
    fn get(&mut self, va: u64) -> Result<u64, String> {
        Ok(*self.0.get(&va).unwrap_or(&0))
    }
    fn set(&mut self, va: u64, value: u64) -> Result<(), String> {
        if !va.is_multiple_of(8) {
            return Err(format!("unaligned {va:#x}"));
        }
        self.0.insert(va, value);
        Ok(())
    }
}

const ROOT: u64 = 0x100;

fn node_of(k: u16) -> u64 {
    0x10_0000 + u64::from(k) * 0x40
}

fn key(m: &mut Mem, n: u64) -> Result<u64, String> {
    m.get(n + 24)
}

/// Checks the tree and returns its keys in order.
fn check(m: &mut Mem) -> Vec<u64> {
    fn walk(m: &mut Mem, n: u64, parent: u64, out: &mut Vec<u64>) -> u32 {
        if n == 0 {
            return 1;
        }
        let pc = m.get(n).unwrap();
        assert_eq!(pc & !3, parent, "parent pointer of {n:#x}");
        let black = pc & 1 == 1;
        let (l, r) = (m.get(n + LEFT).unwrap(), m.get(n + RIGHT).unwrap());
        if !black {
            for c in [l, r] {
                assert!(
                    c == 0 || m.get(c).unwrap() & 1 == 1,
                    "red {n:#x} has a red child"
                );
            }
        }
        let hl = walk(m, l, n, out);
        out.push(key(m, n).unwrap());
        let hr = walk(m, r, n, out);
        assert_eq!(hl, hr, "black heights under {n:#x}");
        hl + u32::from(black)
    }
    let root = m.get(ROOT).unwrap();
    if root != 0 {
        assert_eq!(m.get(root).unwrap() & 1, 1, "the root is black");
    }
    let mut out = Vec::new();
    walk(m, root, 0, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn insert_and_erase_keep_a_valid_red_black_tree(ops in prop::collection::vec((any::<bool>(), 0u16..64), 1..200)) {
        let mut m = Mem::default();
        let mut model = BTreeSet::new();
        for (ins, k) in ops {
            let n = node_of(k);
            if ins && !model.contains(&k) {
                m.set(n + 24, u64::from(k) * 0x1000).unwrap();
                insert(&mut m, ROOT, n, &mut key).unwrap();
                model.insert(k);
            } else if !ins && model.contains(&k) {
                prop_assert!(contains(&mut m, ROOT, n, &mut key).unwrap());
                erase(&mut m, ROOT, n).unwrap();
                model.remove(&k);
                prop_assert!(!contains(&mut m, ROOT, n, &mut key).unwrap());
            }
            let keys = check(&mut m);
            let want: Vec<u64> = model.iter().map(|&k| u64::from(k) * 0x1000).collect();
            prop_assert_eq!(keys, want);
        }
    }
}

#[test]
fn a_node_not_in_the_tree_is_not_found_even_with_an_equal_key() {
    let mut m = Mem::default();
    for k in [5u16, 3, 8] {
        m.set(node_of(k) + 24, u64::from(k)).unwrap();
        insert(&mut m, ROOT, node_of(k), &mut key).unwrap();
    }
    let stranger = 0x9000;
    m.set(stranger + 24, 3).unwrap();
    assert!(!contains(&mut m, ROOT, stranger, &mut key).unwrap());
    assert!(contains(&mut m, ROOT, node_of(3), &mut key).unwrap());
}
