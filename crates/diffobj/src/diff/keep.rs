//! Members a diff removes from a struct, kept in the patched build so the layout stays.
//!
//! A fix that drops a member (6.1.190 drops `struct hist_field`'s `ref` when it reverts a
//! refcount) shifts every later member, and the running kernel's objects keep the old
//! layout: new code compiled against the new one would misread them. The new code does not
//! use the member (it compiled without it), so compiling it with the member still declared
//! gives the same behaviour at the old offsets, which is what the live objects have. The
//! declaration line is put back into the patched copy of the file, after the nearest line
//! the diff kept before it; the layout check of the rebuild then decides whether the type
//! is the same again, so a wrong guess here only costs a rebuild.

use std::path::Path;

use super::error::DiffError;
use super::patchfile::{ChangeKind, FileChange};

/// A removed member to put back: `type_name` (`struct tag`) and the member's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removed {
    pub type_name: String,
    pub member: String,
}

/// Puts each `removed` member's declaration back into the patched files under `patched`
/// (read from the originals under `original`). Returns what was kept, as
/// `struct tag.member (file:line)`; members whose declaration is not found are left out.
pub(crate) fn apply(
    original: &Path,
    patched: &Path,
    changes: &[FileChange],
    removed: &[Removed],
) -> Result<Vec<String>, DiffError> {
    let mut kept = Vec::new();
    if removed.is_empty() {
        return Ok(kept);
    }
    for c in changes.iter().filter(|c| c.kind == ChangeKind::Modified) {
        let (orig_path, new_path) = (original.join(&c.path), patched.join(&c.path));
        let Ok(old) = std::fs::read_to_string(&orig_path) else {
            continue;
        };
        let old: Vec<&str> = old.lines().collect();
        let found: Vec<(usize, &Removed)> = removed
            .iter()
            .filter_map(|r| Some((declaration(&old, c, r)?, r)))
            .collect();
        if found.is_empty() {
            continue;
        }
        let text = std::fs::read_to_string(&new_path).map_err(DiffError::io("read", &new_path))?;
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let mut inserts: Vec<(usize, usize)> =
            found.iter().map(|&(at, _)| (anchor(c, at), at)).collect();
        // Bottom first, so earlier positions stay valid; one anchor keeps the old order.
        inserts.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        for &(after, at) in &inserts {
            lines.insert(after.min(lines.len()), old[at].to_string());
        }
        let mut out = lines.join("\n");
        out.push('\n');
        std::fs::write(&new_path, out).map_err(DiffError::io("write", &new_path))?;
        for (at, r) in found {
            kept.push(format!(
                "{}.{} ({}:{})",
                r.type_name,
                r.member,
                c.path,
                at + 1
            ));
        }
    }
    Ok(kept)
}

/// The 0-based index of the line in `old` that declares `r`'s member directly inside the
/// definition of `r`'s type and that the diff removes: exactly one, or `None`.
fn declaration(old: &[&str], c: &FileChange, r: &Removed) -> Option<usize> {
    let mut hits = (0..old.len()).filter(|&i| {
        c.lines.map(i as u32 + 1).is_none()
            && declares(old[i], &r.member)
            && enclosing_type(old, i).is_some_and(|t| t == r.type_name)
    });
    let first = hits.next()?;
    hits.next().is_none().then_some(first)
}

/// How many lines of the patched file come before the kept line: those up to the patched
/// position of the nearest earlier line the diff kept.
fn anchor(c: &FileChange, at: usize) -> usize {
    (1..=at as u32)
        .rev()
        .find_map(|l| c.lines.map(l))
        .map_or(0, |p| p as usize)
}

/// The line without its comments, trimmed.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = rest[start + 2..]
            .find("*/")
            .map_or("", |e| &rest[start + 2 + e + 2..]);
    }
    out.push_str(rest);
    if let Some(i) = out.find("//") {
        out.truncate(i);
    }
    out.trim().to_string()
}

/// Whether `line` declares exactly `member` (one declarator: `type member;`, an array,
/// a bit-field or a function pointer) and nothing else.
fn declares(line: &str, member: &str) -> bool {
    let code = code_of(line);
    let Some(body) = code.strip_suffix(';') else {
        return false;
    };
    let statement = body.starts_with("return ") || body.starts_with("goto ");
    if statement
        || body.contains(',') && !body.contains('(')
        || body.contains('{')
        || body.contains('=')
    {
        return false;
    }
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    body.match_indices(member).any(|(i, _)| {
        let before = body[..i].chars().next_back();
        let after = body[i + member.len()..].trim_start().chars().next();
        before.is_some_and(|b| !ident(b))
            && after.is_none_or(|a| matches!(a, '[' | ':' | ')'))
            && !body[..i].trim().is_empty()
    })
}

/// The `struct tag` or `union tag` whose body directly holds line `at` of `old`, when that
/// body opens with a named header (`struct tag {`, on its line or the one before).
fn enclosing_type(old: &[&str], at: usize) -> Option<String> {
    let mut depth = 0usize;
    for i in (0..at).rev() {
        let code = code_of(old[i]);
        for (j, ch) in code.char_indices().rev() {
            match ch {
                '}' => depth += 1,
                '{' if depth > 0 => depth -= 1,
                '{' => {
                    let head = code[..j].trim();
                    let head = if head.is_empty() && i > 0 {
                        code_of(old[i - 1])
                    } else {
                        head.to_string()
                    };
                    return named_aggregate(&head);
                }
                _ => {}
            }
        }
    }
    None
}

/// `struct tag` or `union tag` at the end of a definition's header, if it names one.
fn named_aggregate(head: &str) -> Option<String> {
    let words: Vec<&str> = head.split_whitespace().collect();
    match words[..] {
        [.., kind @ ("struct" | "union"), tag] => Some(format!("{kind} {tag}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "struct hist_field {\n\tstruct ftrace_event_field\t*field;\n\
        \tunsigned long\t\t\tflags;\n\tunsigned int\t\t\tref; /* count */\n\
        \tunsigned int\t\t\tsize;\n\tunion {\n\t\tint ref;\n\t};\n};\n\
        struct other {\n\tint ref;\n};\n";
    const NEW: &str = "struct hist_field {\n\tstruct ftrace_event_field\t*field;\n\
        \tunsigned long\t\t\tflags;\n\tunsigned int\t\t\tsize;\n\tunion {\n\t\tint ref;\n\t};\n};\n\
        struct other {\n\tint ref;\n};\n";
    const DIFF: &str = "--- a/k/h.c\n+++ b/k/h.c\n@@ -2,4 +2,3 @@\n \tstruct ftrace_event_field\t*field;\n \
        \tunsigned long\t\t\tflags;\n-\tunsigned int\t\t\tref; /* count */\n \tunsigned int\t\t\tsize;\n";

    #[test]
    fn a_removed_member_is_put_back_where_it_was() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for (d, t) in [(a.path(), OLD), (b.path(), NEW)] {
            std::fs::create_dir_all(d.join("k")).unwrap();
            std::fs::write(d.join("k/h.c"), t).unwrap();
        }
        let diff = DIFF;
        let changes = super::super::patchfile::parse(Path::new("x.patch"), diff).unwrap();
        let removed = [Removed {
            type_name: "struct hist_field".into(),
            member: "ref".into(),
        }];
        let kept = apply(a.path(), b.path(), &changes, &removed).unwrap();
        assert_eq!(kept, ["struct hist_field.ref (k/h.c:4)"]);
        assert_eq!(
            std::fs::read_to_string(b.path().join("k/h.c")).unwrap(),
            OLD
        );
        // Not in the type the refusal names: nothing is kept.
        let other = [Removed {
            type_name: "struct third".into(),
            member: "ref".into(),
        }];
        std::fs::write(b.path().join("k/h.c"), NEW).unwrap();
        assert!(apply(a.path(), b.path(), &changes, &other)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn declarations_are_told_from_uses() {
        assert!(declares("\tunsigned int ref;", "ref"));
        assert!(declares("\tchar name[16]; /* x */", "name"));
        assert!(declares("\tunsigned ref:1;", "ref"));
        assert!(declares("\tvoid (*ref)(int a, int b);", "ref"));
        assert!(!declares("\tref = 1;", "ref"));
        assert!(!declares("\treturn ref;", "ref"));
        assert!(!declares("\tint a, ref;", "ref"));
        assert!(!declares("\tint pref;", "ref"));
        assert!(!declares("\tint ref = 1;", "ref"));
    }
}
