//! Type layouts from an object's DWARF, to catch a diff that changes a struct or union.
//!
//! New code compiled against a new layout would run on objects the running kernel laid out
//! the old way: a member added in the middle of `struct hid_device` shifts every later
//! member, and no changed *function* shows it. So every named struct and union that the
//! original object already knew is compared, by size and by each member's name and offset
//! (bit offset for bit-fields); any difference is refused until lucos can transfer data.
//! A type only the patched object has is new and cannot be in use yet.
//!
//! Two differences keep every byte where it was: a member wrapped in an anonymous union
//! with new aliases of the same size (`struct dst_entry`'s `dev` became `union { dev;
//! dev_rcu; }` in 6.1.190), and a pointer given new names over its bytes (`struct
//! devlink_port`'s `void *type_dev` became a union of `type_eth.netdev` and
//! `type_ib.ibdev`). Members of anonymous structs and unions are flattened into leaves
//! (name, bit offset, bit size, whether a pointer); when every leaf that is not in both
//! lies exactly over an old one's bytes, as an alias or as a pointer's new name, old and
//! new code read and write the same bytes the same way, and the change is not refused.

use std::collections::BTreeMap;

use super::dwarf::{type_bytes, Slice};

/// A struct or union as laid out: size and (member, bit offset) in declaration order,
/// and the members of anonymous structs and unions flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub size: u64,
    pub members: Vec<(String, u64)>,
    pub leaves: Vec<Leaf>,
}

/// A member reached by name (through anonymous structs and unions): bit offset and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub name: String,
    pub bits: u64,
    /// `None` when DWARF does not say (then nothing is proven about it).
    pub size_bits: Option<u64>,
    /// Whether it holds one pointer: a pointer type, or a struct or union whose only
    /// member does (through typedefs and qualifiers).
    pub pointer: bool,
}

/// Whether `new` keeps every byte's meaning: same size, and every leaf that is not in
/// both lies exactly over an old leaf's bytes. A new leaf there is an alias of an old one
/// that stays, as a union member is, or takes the name of one that went when both are
/// pointers (`void *type_dev` became `union { struct { struct net_device *netdev; }
/// type_eth; struct { struct ib_device *ibdev; } type_ib; }` in 6.1.190): either way old
/// and new code read and write the same bytes as the same kind of value. A name that moves
/// is no rename: it is refused.
fn same_bytes(old: &Layout, new: &Layout) -> bool {
    let known = |l: &Leaf| l.size_bits.is_some();
    let over = |a: &Leaf, b: &Leaf| a.bits == b.bits && a.size_bits == b.size_bits;
    let named = |ls: &[Leaf], name: &str| ls.iter().any(|l| l.name == name);
    let gone = |o: &Leaf| !new.leaves.contains(o);
    old.size == new.size
        && !old.leaves.is_empty()
        && old.leaves.iter().chain(&new.leaves).all(known)
        && old.leaves.iter().filter(|o| gone(o)).all(|o| {
            o.pointer
                && !named(&new.leaves, &o.name)
                && new.leaves.iter().any(|n| over(n, o) && n.pointer)
        })
        && new
            .leaves
            .iter()
            .filter(|n| !old.leaves.contains(n))
            .all(|n| {
                !named(&old.leaves, &n.name)
                    && old
                        .leaves
                        .iter()
                        .any(|o| over(o, n) && (!gone(o) || (o.pointer && n.pointer)))
            })
}

/// The byte ranges of the members `new` adds in padding holes, when that is all it does:
/// same size, every old leaf unchanged, and every new leaf in bytes no old leaf touches
/// (`bool might_sleep` after two bools of `struct bpf_func_proto` in 6.1.190). Old code
/// never reads or writes those bytes; new code reads them from old objects, right only
/// where they hold zero, which [`super::padding`] proves.
pub(crate) fn padding_only(old: &Layout, new: &Layout) -> Option<Vec<std::ops::Range<u64>>> {
    let bytes = |l: &Leaf| Some(l.bits / 8..(l.bits + l.size_bits?).div_ceil(8));
    let old_bytes: Vec<_> = old.leaves.iter().map(bytes).collect::<Option<_>>()?;
    let added: Vec<&Leaf> = new
        .leaves
        .iter()
        .filter(|n| !old.leaves.contains(n))
        .collect();
    let fits = old.size == new.size
        && !old.leaves.is_empty()
        && !added.is_empty()
        && old.leaves.iter().all(|o| new.leaves.contains(o));
    let mut holes = Vec::new();
    for n in added.into_iter().take(if fits { usize::MAX } else { 0 }) {
        let b = bytes(n)?;
        let clear = b.end <= new.size
            && old_bytes
                .iter()
                .all(|o| o.end <= b.start || b.end <= o.start);
        let named = old.leaves.iter().any(|o| o.name == n.name);
        if !clear || named {
            return None;
        }
        holes.push(b);
    }
    (fits && !holes.is_empty()).then_some(holes)
}

/// The top-level members `new` drops from `old` when that is all it does: every member it
/// keeps is in the old order and none is new. Then the patched code can be compiled with
/// the dropped members kept, unused ([`super::keep`]), and reads live objects right.
pub(crate) fn only_removed(old: &Layout, new: &Layout) -> Option<Vec<String>> {
    let mut kept = new.members.iter().map(|m| &m.0).peekable();
    let mut removed = Vec::new();
    for (name, _) in &old.members {
        if kept.peek() == Some(&name) {
            kept.next();
        } else {
            removed.push(name.clone());
        }
    }
    let anonymous = removed.iter().any(|r| r == "(anonymous)");
    (kept.next().is_none() && !removed.is_empty() && !anonymous).then_some(removed)
}

/// The first difference between two layouts of one type, for the refusal; `None` also
/// when the new layout keeps every byte's meaning (see the module docs).
pub(crate) fn first_difference(old: &Layout, new: &Layout) -> Option<String> {
    if old.members != new.members && same_bytes(old, new) {
        tracing::info!(?old.leaves, ?new.leaves, "layout differs only by names of the same bytes");
        return None;
    }
    for (i, n) in new.members.iter().enumerate() {
        match old.members.get(i) {
            Some(o) if o == n => {}
            Some(o) if o.0 == n.0 => {
                return Some(format!(
                    "member `{}` moves from byte {} to {}",
                    n.0,
                    o.1 / 8,
                    n.1 / 8
                ))
            }
            Some(o) => return Some(format!("member `{}` takes the place of `{}`", n.0, o.0)),
            None => return Some(format!("member `{}` is added at the end", n.0)),
        }
    }
    if old.members.len() > new.members.len() {
        return Some(format!(
            "member `{}` is removed",
            old.members[new.members.len()].0
        ));
    }
    (old.size != new.size)
        .then(|| format!("its size changes from {} to {} bytes", old.size, new.size))
}

/// Adds the named structs and unions `unit` defines to `found`; a name defined twice
/// differently (function-local types) becomes `None`.
pub(crate) fn collect(
    dwarf: &gimli::Dwarf<Slice<'_>>,
    unit: &gimli::Unit<Slice<'_>>,
    found: &mut BTreeMap<String, Option<Layout>>,
) -> Result<(), gimli::Error> {
    let name_of = |e: &gimli::DebuggingInformationEntry<Slice<'_>>| -> Option<String> {
        let v = e.attr_value(gimli::DW_AT_name)?;
        dwarf
            .attr_string(unit, v)
            .ok()
            .map(|s| s.to_string_lossy().into_owned())
    };
    let mut entries = unit.entries();
    // The type being read: (name, its depth, layout so far).
    let mut current: Option<(String, isize, Layout)> = None;
    while let Some(e) = entries.next_dfs()? {
        let depth = e.depth();
        if let Some((_, d, _)) = &current {
            if depth <= *d {
                let (name, _, layout) = current.take().expect("checked");
                record(found, name, layout);
            }
        }
        match (&mut current, e.tag()) {
            (Some((_, d, layout)), gimli::DW_TAG_member) if depth == *d + 1 => {
                let bits = member_offset(e);
                let name = name_of(e);
                match &name {
                    Some(n) => layout.leaves.push(Leaf {
                        name: n.clone(),
                        bits,
                        size_bits: member_bits(unit, e),
                        pointer: holds_pointer(unit, e, 0),
                    }),
                    None => anonymous_leaves(unit, e, bits, &name_of, &mut layout.leaves, 0)?,
                }
                layout
                    .members
                    .push((name.unwrap_or_else(|| "(anonymous)".into()), bits));
            }
            (None, gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type) => {
                if e.has_attr(gimli::DW_AT_declaration) {
                    continue;
                }
                let (Some(name), Some(size)) = (
                    name_of(e),
                    e.attr_value(gimli::DW_AT_byte_size)
                        .and_then(|v| v.udata_value()),
                ) else {
                    continue;
                };
                let kind = if e.tag() == gimli::DW_TAG_union_type {
                    "union"
                } else {
                    "struct"
                };
                current = Some((
                    format!("{kind} {name}"),
                    depth,
                    Layout {
                        size,
                        members: Vec::new(),
                        leaves: Vec::new(),
                    },
                ));
            }
            _ => {}
        }
    }
    if let Some((name, _, layout)) = current {
        record(found, name, layout);
    }
    Ok(())
}

type Entry<'a> = gimli::DebuggingInformationEntry<Slice<'a>>;

/// Whether member `e` holds one pointer (see [`Leaf::pointer`]).
fn holds_pointer(unit: &gimli::Unit<Slice<'_>>, e: &Entry<'_>, depth: u32) -> bool {
    if depth > 16 || e.has_attr(gimli::DW_AT_bit_size) {
        return false;
    }
    let Some(gimli::AttributeValue::UnitRef(off)) = e.attr_value(gimli::DW_AT_type) else {
        return false;
    };
    let Ok(t) = unit.entry(off) else {
        return false;
    };
    match t.tag() {
        gimli::DW_TAG_pointer_type => true,
        gimli::DW_TAG_typedef
        | gimli::DW_TAG_const_type
        | gimli::DW_TAG_volatile_type
        | gimli::DW_TAG_atomic_type => holds_pointer(unit, &t, depth + 1),
        gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type => {
            only_member(unit, off).is_some_and(|m| holds_pointer(unit, &m, depth + 1))
        }
        _ => false,
    }
}

/// The one member of the struct or union at `off`, if it has exactly one.
fn only_member<'a>(unit: &gimli::Unit<Slice<'a>>, off: gimli::UnitOffset) -> Option<Entry<'a>> {
    let mut tree = unit.entries_tree(Some(off)).ok()?;
    let root = tree.root().ok()?;
    let mut children = root.children();
    let mut found = None;
    while let Some(c) = children.next().ok()? {
        if c.entry().tag() == gimli::DW_TAG_member {
            if found.is_some() {
                return None;
            }
            found = Some(c.entry().clone());
        }
    }
    found
}

/// The bit offset of a member within its struct.
fn member_offset(e: &Entry<'_>) -> u64 {
    match e.attr_value(gimli::DW_AT_data_bit_offset) {
        Some(v) => v.udata_value().unwrap_or(0),
        None => {
            e.attr_value(gimli::DW_AT_data_member_location)
                .and_then(|v| v.udata_value())
                .unwrap_or(0)
                * 8
        }
    }
}

/// A member's size in bits: its bit-field width, or its type's byte size.
fn member_bits(unit: &gimli::Unit<Slice<'_>>, e: &Entry<'_>) -> Option<u64> {
    if let Some(v) = e.attr_value(gimli::DW_AT_bit_size) {
        return v.udata_value();
    }
    type_bytes(unit, e, 0).map(|b| b * 8)
}

/// The leaves of the anonymous struct or union member `e` at bit offset `base`.
fn anonymous_leaves(
    unit: &gimli::Unit<Slice<'_>>,
    e: &Entry<'_>,
    base: u64,
    name_of: &dyn Fn(&Entry<'_>) -> Option<String>,
    out: &mut Vec<Leaf>,
    depth: u32,
) -> Result<(), gimli::Error> {
    let Some(gimli::AttributeValue::UnitRef(off)) = e.attr_value(gimli::DW_AT_type) else {
        return Ok(());
    };
    if depth > 8 {
        return Ok(());
    }
    let mut tree = unit.entries_tree(Some(off))?;
    let root = tree.root()?;
    let mut children = root.children();
    while let Some(c) = children.next()? {
        let m = c.entry();
        if m.tag() != gimli::DW_TAG_member {
            continue;
        }
        let bits = base + member_offset(m);
        match name_of(m) {
            Some(name) => out.push(Leaf {
                name,
                bits,
                size_bits: member_bits(unit, m),
                pointer: holds_pointer(unit, m, 0),
            }),
            None => anonymous_leaves(unit, m, bits, name_of, out, depth + 1)?,
        }
    }
    Ok(())
}

/// The types [`collect`] found defined once.
pub(crate) fn known(found: BTreeMap<String, Option<Layout>>) -> BTreeMap<String, Layout> {
    found
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

/// A type defined twice differently (function-local types of one name) is ambiguous and
/// left out; `None` marks it.
fn record(found: &mut BTreeMap<String, Option<Layout>>, name: String, layout: Layout) {
    match found.get(&name) {
        None => {
            found.insert(name, Some(layout));
        }
        Some(Some(l)) if *l == layout => {}
        Some(_) => {
            found.insert(name, None);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn layout(members: &[(&str, u64)], size: u64) -> Layout {
        Layout {
            size,
            members: members.iter().map(|(n, b)| (n.to_string(), *b)).collect(),
            leaves: Vec::new(),
        }
    }

    #[test]
    fn only_removed_members_are_told_from_other_changes() {
        let old = layout(&[("a", 0), ("ref", 32), ("b", 64), ("c", 96)], 16);
        let gone = layout(&[("a", 0), ("b", 32), ("c", 64)], 12);
        assert_eq!(only_removed(&old, &gone), Some(vec!["ref".to_string()]));
        let two = layout(&[("a", 0), ("c", 32)], 8);
        assert_eq!(
            only_removed(&old, &two),
            Some(vec!["ref".to_string(), "b".to_string()])
        );
        // A new member, a reorder, or nothing removed: not only removals.
        let added = layout(&[("a", 0), ("b", 32), ("c", 64), ("d", 96)], 16);
        assert_eq!(only_removed(&old, &added), None);
        let reordered = layout(&[("a", 0), ("c", 32), ("b", 64)], 12);
        assert_eq!(only_removed(&old, &reordered), None);
        let grown = layout(&[("a", 0), ("ref", 32), ("b", 64), ("c", 128)], 24);
        assert_eq!(only_removed(&old, &grown), None);
        let anon = layout(&[("a", 0), ("(anonymous)", 32), ("b", 64)], 12);
        assert_eq!(
            only_removed(&anon, &layout(&[("a", 0), ("b", 32)], 8)),
            None
        );
    }

    fn l(size: u64, m: &[(&str, u64)]) -> Layout {
        Layout {
            size,
            members: m.iter().map(|(n, o)| (n.to_string(), *o)).collect(),
            leaves: m
                .iter()
                .map(|(n, o)| Leaf {
                    name: n.to_string(),
                    bits: *o,
                    size_bits: Some(64),
                    pointer: false,
                })
                .collect(),
        }
    }

    #[test]
    fn aliases_of_old_members_are_no_difference() {
        let old = l(16, &[("a", 0), ("dev", 64)]);
        let mut new = l(16, &[("a", 0), ("(anonymous)", 64)]);
        new.leaves = old.leaves.clone();
        let alias = |name: &str, size| Leaf {
            name: name.into(),
            bits: 64,
            size_bits: size,
            pointer: false,
        };
        new.leaves.push(alias("dev_rcu", Some(64)));
        assert_eq!(first_difference(&old, &new), None);
        // Not an alias: another size, an unknown size, or an old member gone.
        for bad in [Some(32), None] {
            let mut n = new.clone();
            n.leaves[2] = alias("half", bad);
            assert!(first_difference(&old, &n).is_some(), "{bad:?}");
        }
        let mut gone = new.clone();
        gone.leaves.remove(1);
        assert!(first_difference(&old, &gone).is_some());
    }

    #[test]
    fn a_pointer_given_new_names_is_no_difference() {
        let ptr = |l: &mut Layout, name: &str| {
            let leaf = l.leaves.iter_mut().find(|x| x.name == name).unwrap();
            leaf.pointer = true;
        };
        let mut old = l(24, &[("a", 0), ("type_dev", 64), ("b", 128)]);
        ptr(&mut old, "type_dev");
        let mut new = l(24, &[("a", 0), ("type_eth", 64), ("b", 128)]);
        new.members[1].0 = "(anonymous)".into();
        new.leaves.insert(2, new.leaves[1].clone());
        new.leaves[2].name = "type_ib".into();
        ptr(&mut new, "type_eth");
        ptr(&mut new, "type_ib");
        assert_eq!(first_difference(&old, &new), None);
        // Not a rename: a new name that is no pointer, an old name that moves elsewhere,
        // or a non-pointer given a new name.
        let mut int = new.clone();
        int.leaves[2].pointer = false;
        assert!(first_difference(&old, &int).is_some());
        let mut moved = new.clone();
        moved.leaves[3].name = "type_dev".into();
        assert!(first_difference(&old, &moved).is_some());
        let mut not_ptr = old.clone();
        not_ptr.leaves[1].pointer = false;
        assert!(first_difference(&not_ptr, &new).is_some());
        // Two pointers that trade places are no rename either.
        let mut two = l(16, &[("x", 0), ("y", 64)]);
        ptr(&mut two, "x");
        ptr(&mut two, "y");
        let mut swapped = l(16, &[("y", 0), ("x", 64)]);
        ptr(&mut swapped, "x");
        ptr(&mut swapped, "y");
        assert!(first_difference(&two, &swapped).is_some());
    }

    #[test]
    fn members_added_in_padding_are_told_by_their_bytes() {
        // func@0 (8), gpl_only@8 (1), pkt_access@9 (1), hole, ret_type@12 (4).
        let leaf = |name: &str, byte: u64, size: u64| Leaf {
            name: name.into(),
            bits: byte * 8,
            size_bits: Some(size * 8),
            pointer: false,
        };
        let lay = |leaves: Vec<Leaf>| Layout {
            size: 16,
            members: leaves.iter().map(|l| (l.name.clone(), l.bits)).collect(),
            leaves,
        };
        let base = || {
            vec![
                leaf("func", 0, 8),
                leaf("gpl_only", 8, 1),
                leaf("pkt", 9, 1),
            ]
        };
        let old = lay([base(), vec![leaf("ret", 12, 4)]].concat());
        let new = lay([base(), vec![leaf("sleep", 10, 1), leaf("ret", 12, 4)]].concat());
        assert_eq!(
            padding_only(&old, &new),
            Some(vec![std::ops::Range { start: 10, end: 11 }])
        );
        assert!(
            first_difference(&old, &new).is_some(),
            "it is still a difference"
        );
        // Over an old member's bytes, past the end, or with an old member moved: no.
        let over = lay([base(), vec![leaf("sleep", 9, 2), leaf("ret", 12, 4)]].concat());
        assert_eq!(padding_only(&old, &over), None);
        let past = lay([base(), vec![leaf("ret", 12, 4), leaf("sleep", 16, 1)]].concat());
        assert_eq!(padding_only(&old, &past), None);
        let moved = lay([base(), vec![leaf("sleep", 10, 1), leaf("ret", 11, 4)]].concat());
        assert_eq!(padding_only(&old, &moved), None);
        assert_eq!(padding_only(&old, &old), None);
    }

    #[test]
    fn differences_name_the_member() {
        let old = l(16, &[("a", 0), ("b", 64)]);
        assert_eq!(first_difference(&old, &old), None);
        let mid = l(24, &[("a", 0), ("x", 64), ("b", 128)]);
        assert_eq!(
            first_difference(&old, &mid).unwrap(),
            "member `x` takes the place of `b`"
        );
        let end = l(24, &[("a", 0), ("b", 64), ("c", 128)]);
        assert_eq!(
            first_difference(&old, &end).unwrap(),
            "member `c` is added at the end"
        );
        let moved = l(24, &[("a", 0), ("b", 128)]);
        assert_eq!(
            first_difference(&old, &moved).unwrap(),
            "member `b` moves from byte 8 to 16"
        );
        let grown = l(32, &[("a", 0), ("b", 64)]);
        assert!(first_difference(&old, &grown).unwrap().contains("16 to 32"));
    }
}
