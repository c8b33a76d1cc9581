//! Reads which files a unified diff touches and how it moves their lines (the hunks
//! themselves are applied by `patch`).
//!
//! Hunk bodies are consumed by their line counts, so a removed line that happens to start
//! with `-- ` is never mistaken for a file header. The line map lets the comparison tell a
//! `__LINE__` that merely moved (old line N is now line M) from a changed constant.

use std::path::Path;

use super::error::DiffError;

/// What the diff does to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Modified,
    Added,
    Deleted,
}

/// One file of the diff, with its path relative to the tree root (after `-p1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    pub kind: ChangeKind,
    pub lines: LineMap,
}

/// Where each original line of a file ends up in the patched file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineMap {
    hunks: Vec<Hunk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hunk {
    /// First original line the hunk covers, and how many.
    old_start: u32,
    old_len: u32,
    new_start: u32,
    new_len: u32,
    /// (original, patched) numbers of the unchanged lines inside the hunk.
    context: Vec<(u32, u32)>,
}

impl LineMap {
    /// The patched line number of original line `line`, or `None` if the diff removed it.
    pub fn map(&self, line: u32) -> Option<u32> {
        let mut offset: i64 = 0;
        for h in &self.hunks {
            if line < h.old_start {
                break;
            }
            if line < h.old_start + h.old_len {
                return h.context.iter().find(|c| c.0 == line).map(|c| c.1);
            }
            offset = i64::from(h.new_start + h.new_len) - i64::from(h.old_start + h.old_len);
        }
        u32::try_from(i64::from(line) + offset).ok()
    }
}

/// Parses the file list of a unified (optionally git-style) diff.
pub fn parse(path: &Path, text: &str) -> Result<Vec<FileChange>, DiffError> {
    let err = |line: usize, reason: String| DiffError::DiffSyntax {
        path: path.to_owned(),
        line,
        reason,
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<FileChange> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with("GIT binary patch") || line.starts_with("Binary files ") {
            return Err(err(
                i + 1,
                "binary changes cannot be built into a patch".into(),
            ));
        }
        if line.starts_with("rename from ") || line.starts_with("copy from ") {
            return Err(err(
                i + 1,
                "renamed or copied files are not supported; make the change in place".into(),
            ));
        }
        let Some(old) = line.strip_prefix("--- ") else {
            i += 1;
            continue;
        };
        let Some(new) = lines.get(i + 1).and_then(|l| l.strip_prefix("+++ ")) else {
            i += 1;
            continue;
        };
        let old = header_path(old);
        let new = header_path(new);
        let (path, kind) = match (old, new) {
            (None, None) => return Err(err(i + 1, "both sides are /dev/null".into())),
            (None, Some(n)) => (n, ChangeKind::Added),
            (Some(o), None) => (o, ChangeKind::Deleted),
            (Some(_), Some(n)) => (n, ChangeKind::Modified),
        };
        let path = strip_component(&path).ok_or_else(|| {
            err(
                i + 1,
                format!("path `{path}` has no a/ or b/ prefix to strip (make the diff with `git diff` or `diff -u a/... b/...`)"),
            )
        })?;
        check_path(&path).map_err(|r| err(i + 1, r))?;
        i += 2;
        let mut map = LineMap::default();
        while let Some(h) = lines.get(i).and_then(|l| l.strip_prefix("@@ ")) {
            let [os, ol, ns, nl] =
                hunk_header(h).ok_or_else(|| err(i + 1, format!("bad hunk header `@@ {h}`")))?;
            // An empty side names the line before it.
            let (old_start, new_start) = (os + u32::from(ol == 0), ns + u32::from(nl == 0));
            let mut hunk = Hunk {
                old_start,
                old_len: ol,
                new_start,
                new_len: nl,
                context: Vec::new(),
            };
            let (mut old_n, mut new_n) = (ol, nl);
            let (mut at_old, mut at_new) = (old_start, new_start);
            i += 1;
            while old_n > 0 || new_n > 0 {
                let Some(l) = lines.get(i) else {
                    return Err(err(i, "the diff ends inside a hunk (truncated?)".into()));
                };
                match l.as_bytes().first() {
                    Some(b' ') | None => {
                        hunk.context.push((at_old, at_new));
                        (at_old, at_new) = (at_old + 1, at_new + 1);
                        old_n = old_n.saturating_sub(1);
                        new_n = new_n.saturating_sub(1);
                    }
                    Some(b'-') => {
                        at_old += 1;
                        old_n = old_n.saturating_sub(1);
                    }
                    Some(b'+') => {
                        at_new += 1;
                        new_n = new_n.saturating_sub(1);
                    }
                    Some(b'\\') => {}
                    _ => return Err(err(i + 1, format!("unexpected line in hunk: `{l}`"))),
                }
                i += 1;
            }
            while lines.get(i).is_some_and(|l| l.starts_with('\\')) {
                i += 1;
            }
            map.hunks.push(hunk);
        }
        map.hunks.sort_by_key(|h| h.old_start);
        if !out.iter().any(|c| c.path == path) {
            out.push(FileChange {
                path,
                kind,
                lines: map,
            });
        }
    }
    if out.is_empty() {
        return Err(DiffError::EmptyDiff {
            path: path.to_owned(),
        });
    }
    Ok(out)
}

/// The path of a `---`/`+++` header, or `None` for `/dev/null`.
fn header_path(rest: &str) -> Option<String> {
    // diff -u appends "\t<timestamp>"; git quotes unusual names, which we do not support.
    let p = rest.split('\t').next().unwrap_or(rest).trim_end();
    if p == "/dev/null" {
        None
    } else {
        Some(p.to_string())
    }
}

fn strip_component(p: &str) -> Option<String> {
    let (_, rest) = p.split_once('/')?;
    let rest = rest.trim_start_matches("./");
    (!rest.is_empty()).then(|| rest.to_string())
}

fn check_path(p: &str) -> Result<(), String> {
    if p.starts_with('/') || p.split('/').any(|c| c == ".." || c.is_empty()) {
        return Err(format!(
            "path `{p}` leaves the source tree or is not normalised"
        ));
    }
    if p.starts_with('"') || p.contains(char::is_whitespace) {
        return Err(format!("path `{p}` is quoted or contains spaces"));
    }
    Ok(())
}

/// [old start, old count, new start, new count] from `-a,b +c,d @@ ...`.
fn hunk_header(h: &str) -> Option<[u32; 4]> {
    let mut parts = h.split_whitespace();
    let old = parts.next()?.strip_prefix('-')?;
    let new = parts.next()?.strip_prefix('+')?;
    let range = |s: &str| -> Option<(u32, u32)> {
        match s.split_once(',') {
            Some((a, n)) => Some((a.parse().ok()?, n.parse().ok()?)),
            None => Some((s.parse().ok()?, 1)),
        }
    };
    let (os, ol) = range(old)?;
    let (ns, nl) = range(new)?;
    Some([os, ol, ns, nl])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_kinds() {
        let d = "diff --git a/fs/x.c b/fs/x.c\nindex 1..2 100644\n--- a/fs/x.c\n+++ b/fs/x.c\n\
                 @@ -1,3 +1,3 @@\n a\n--- not a header\n+b\n c\n\
                 --- /dev/null\t2024-01-01\n+++ b/fs/new.h\t2024-01-01\n@@ -0,0 +1 @@\n+x\n";
        let c = parse(Path::new("t"), d).unwrap();
        let got: Vec<(&str, ChangeKind)> = c.iter().map(|c| (c.path.as_str(), c.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("fs/x.c", ChangeKind::Modified),
                ("fs/new.h", ChangeKind::Added)
            ]
        );
    }

    #[test]
    fn line_map() {
        // Line 5 removed, two lines added after line 10.
        let d = "--- a/x.c\n+++ b/x.c\n@@ -3,5 +3,4 @@\n a\n b\n-c\n d\n e\n\
                 @@ -10,0 +10,2 @@\n+n1\n+n2\n";
        let c = parse(Path::new("t"), d).unwrap();
        let m = &c[0].lines;
        assert_eq!(m.map(1), Some(1));
        assert_eq!(m.map(4), Some(4));
        assert_eq!(m.map(5), None);
        assert_eq!(m.map(6), Some(5));
        assert_eq!(m.map(10), Some(9));
        assert_eq!(m.map(11), Some(12));
        assert_eq!(m.map(100), Some(101));
    }

    #[test]
    fn refuses_escaping_paths() {
        let d = "--- a/../etc/passwd\n+++ b/../etc/passwd\n@@ -1 +1 @@\n-a\n+b\n";
        assert!(parse(Path::new("t"), d).is_err());
        assert!(matches!(
            parse(Path::new("t"), "hello\n"),
            Err(DiffError::EmptyDiff { .. })
        ));
    }
}
