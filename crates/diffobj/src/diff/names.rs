//! Symbol names as the compiler mangles them, and the names' stable parts.
//!
//! GCC numbers function-local statics (`calls.3`), clones (`foo.isra.0`,
//! `foo.constprop.1`, `foo.part.0`) and `__COUNTER__`-based identifiers; the numbers shift
//! when unrelated code is added, so correlation compares names with the numbers removed.

/// `name` without its `.<digits>` components and `__UNIQUE_ID_` counters:
/// `foo.constprop.0.isra.0` -> `foo.constprop.isra`, `calls.12` -> `calls`.
pub fn canonical(name: &str) -> String {
    // String-merge section names look numbered but are not (`.rodata.str1.1`).
    if name.contains(".str1.") || name.contains(".cst") {
        return name.to_string();
    }
    let mut out = String::with_capacity(name.len());
    for (i, part) in name.split('.').enumerate() {
        if i > 0 && !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if i > 0 {
            out.push('.');
        }
        out.push_str(part);
    }
    if let Some(rest) = out.strip_prefix("__UNIQUE_ID_") {
        let (head, tail) = rest.split_once('.').map_or((rest, ""), |(h, t)| (h, t));
        let trimmed = head.trim_end_matches(|c: char| c.is_ascii_digit());
        let mut s = format!("__UNIQUE_ID_{trimmed}");
        if !tail.is_empty() {
            s.push('.');
            s.push_str(tail);
        }
        return s;
    }
    out
}

/// Whether the name carries a compiler-added number (so exact names are not stable).
pub fn is_numbered(name: &str) -> bool {
    canonical(name) != name
}

/// Compiler- or macro-generated statics that are never matched with the running kernel's:
/// a replaced function gets its own fresh copy (a WARN_ONCE flag, a ratelimit state, a
/// `__func__` string, a switch table, a netlink extack message ...). Matching them by name
/// would be unreliable and sharing them buys nothing.
pub fn is_special_static(name: &str, section: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "__key.",
        "__warned.",
        "__already_done.",
        "__print_once.",
        "__func__.",
        "__FUNCTION__.",
        "_rs.",
        "CSWTCH.",
        "_entry.",
        "_entry_ptr.",
        // `NL_SET_ERR_MSG`'s `static const char __msg[]`: a string only ever read through
        // `extack->_msg`. A new message renumbers the others, so matching by number paired
        // strings of other sizes (net/sched/act_api.c in 6.1.190), and vmlinux cannot tell
        // apart two files' `__msg.0` of one base name (net/{core,ipv4}/fib_rules.c).
        "__msg.",
    ];
    section == ".data.once"
        || section == ".data..once"
        || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The parent of a split-off cold part: `foo.cold` / `foo.cold.12` -> `foo`.
pub fn cold_parent(name: &str) -> Option<&str> {
    let base = match name.rsplit_once('.') {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => name,
    };
    base.strip_suffix(".cold")
}

/// Compiler-added name of a function-scope static (`name.N`), as opposed to a file-scope
/// static or global, whose name is the source name.
pub fn is_static_local(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((b, n)) => !b.is_empty() && !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(canonical("foo.constprop.0.isra.0"), "foo.constprop.isra");
        assert_eq!(canonical("calls.12"), "calls");
        assert_eq!(canonical("foo.part.3"), "foo.part");
        assert_eq!(canonical("foo.cold"), "foo.cold");
        assert_eq!(canonical(".rodata.str1.1"), ".rodata.str1.1");
        assert_eq!(
            canonical(".rodata.foo.constprop.0.str1.8"),
            ".rodata.foo.constprop.0.str1.8"
        );
        assert_eq!(
            canonical("__UNIQUE_ID___addressable_x412.3"),
            "__UNIQUE_ID___addressable_x"
        );
        assert_eq!(canonical("v1.2"), "v1");
    }

    #[test]
    fn parents_and_specials() {
        assert_eq!(cold_parent("foo.cold"), Some("foo"));
        assert_eq!(cold_parent("foo.isra.0.cold.7"), Some("foo.isra.0"));
        assert_eq!(cold_parent("foo"), None);
        assert!(is_special_static("__warned.2", ".data.once"));
        assert!(is_special_static("__func__.0", ".rodata.__func__.0"));
        assert!(!is_special_static("calls.1", ".bss.calls.1"));
        assert!(is_static_local("calls.1"));
        assert!(!is_static_local("calls"));
    }
}
