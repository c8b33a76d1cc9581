//! Units of an update: the sets of changed files built into one bundle each.
//!
//! A stable update is a pile of upstream fixes, and a fix often spans a C file and the
//! headers it changes (a new struct member, a new inline helper); a C file built alone
//! against the old headers would not compile. Debian's source packages do not say which
//! change belongs to which fix, so a unit is a changed source file together with every
//! changed header it depends on: those its object was compiled with (DWARF) and those it
//! includes directly, and the changed kernel headers no object's DWARF lists (which may
//! contribute only macros, and cost no recompiles). A source is first built alone (most
//! fixes are one file); when it does not compile alone, with the candidates its compile
//! errors name (`needs`), and with all of them only when the errors stop naming one.
//! Every changed header is also a unit of its own, for which the builder recompiles every
//! object that uses it. The whole update is one more unit: what a user
//! would install. How many objects one unit may recompile is bounded at build time (see
//! `outcome::Budget`).

use std::collections::BTreeSet;
use std::path::Path;

use lucos_diffobj::diff::KbuildObject;
use serde::{Deserialize, Serialize};

use super::scope::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// A changed vmlinux source with the changed headers it needs.
    Source,
    /// A changed header that no changed source depends on.
    Header,
    /// A changed source of a module the guest can load.
    Module,
    /// Every in-scope change of the update at once.
    Whole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// Bundle id: short, unique, valid as a manifest id and a module name.
    pub id: String,
    pub kind: UnitKind,
    /// The changed file the unit is about (empty for the whole update).
    pub main: String,
    /// Every file whose diff the unit carries, `main` first.
    pub files: Vec<String>,
    /// Changed headers a source unit may need, added when it does not compile alone.
    #[serde(default)]
    pub candidates: Vec<String>,
}

/// `#include` targets of `source` that are among `headers`: `"x.h"` beside the file, and
/// `<x.h>` under the kernel's include directories.
fn direct_includes(tree: &Path, source: &str, headers: &BTreeSet<&str>) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(tree.join(source)) else {
        return Vec::new();
    };
    let dir = source.rsplit_once('/').map_or("", |(d, _)| d);
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("include") else {
            continue;
        };
        let rest = rest.trim();
        let (quoted, name) = match rest.chars().next() {
            Some('"') => (true, rest[1..].split('"').next().unwrap_or("")),
            Some('<') => (false, rest[1..].split('>').next().unwrap_or("")),
            _ => continue,
        };
        let mut candidates = vec![
            format!("include/{name}"),
            format!("arch/x86/include/{name}"),
            format!("include/uapi/{name}"),
            format!("arch/x86/include/uapi/{name}"),
        ];
        if quoted {
            let local = if dir.is_empty() {
                name.to_owned()
            } else {
                format!("{dir}/{name}")
            };
            candidates.insert(0, local);
        }
        if let Some(c) = candidates
            .into_iter()
            .find(|c| headers.contains(c.as_str()))
        {
            out.push(c);
        }
    }
    out
}

/// A manifest id for unit number `n` about `path`: `u007-fs-pipe.c`, at most 48 bytes, so
/// that `lucos_<id>` fits the kernel's module name.
fn unit_id(n: usize, path: &str) -> String {
    let clean: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut id = format!("u{n:03}-{clean}");
    if id.len() > 48 {
        // Keep the end of the path: the file name says most.
        let tail = &clean[clean.len() - (48 - 5)..];
        id = format!("u{n:03}-{}", tail.trim_start_matches(['-', '.']));
    }
    id
}

/// The units of `scope`. `tree` is the original source tree (for `#include` lines).
pub fn units(scope: &Scope, objects: &[KbuildObject], tree: &Path) -> Vec<Unit> {
    let headers: BTreeSet<&str> = scope.headers.iter().map(|(h, _)| h.as_str()).collect();
    // Kernel headers DWARF does not see used: possibly macros only (see scope).
    let unlisted: Vec<String> = scope
        .out
        .values()
        .flatten()
        .filter(|h| super::scope::out_reason(h) == super::scope::UNLISTED_HEADER)
        .filter(|h| h.starts_with("include/") || h.starts_with("arch/x86/include/"))
        // A header the update adds is needed only by what includes it, which DWARF sees.
        .filter(|h| tree.join(h).is_file())
        .cloned()
        .collect();
    let mut out = Vec::new();
    for source in &scope.builtin {
        let mut deps: BTreeSet<String> = objects
            .iter()
            .filter(|o| &o.source == source)
            .flat_map(|o| o.deps.iter())
            .filter(|d| headers.contains(d.as_str()))
            .cloned()
            .collect();
        deps.extend(direct_includes(tree, source, &headers));
        // What those headers include among the changed ones: a header's new version may
        // need its neighbour's (net/ip.h's new code calls dst_dev() from net/dst.h).
        let mut todo: Vec<String> = deps.iter().cloned().collect();
        while let Some(h) = todo.pop() {
            for inc in direct_includes(tree, &h, &headers) {
                if deps.insert(inc.clone()) {
                    todo.push(inc);
                }
            }
        }
        deps.extend(unlisted.iter().cloned());
        out.push(Unit {
            id: unit_id(out.len() + 1, source),
            kind: UnitKind::Source,
            main: source.clone(),
            files: vec![source.clone()],
            candidates: deps.into_iter().collect(),
        });
    }
    for (header, _) in &scope.headers {
        out.push(Unit {
            id: unit_id(out.len() + 1, header),
            kind: UnitKind::Header,
            main: header.clone(),
            files: vec![header.clone()],
            candidates: Vec::new(),
        });
    }
    for (source, _) in &scope.module {
        out.push(Unit {
            id: unit_id(out.len() + 1, source),
            kind: UnitKind::Module,
            main: source.clone(),
            files: vec![source.clone()],
            candidates: Vec::new(),
        });
    }
    let mut all: Vec<String> = scope.builtin.clone();
    all.extend(scope.headers.iter().map(|(h, _)| h.clone()));
    all.extend(unlisted);
    out.push(Unit {
        id: "whole-update".into(),
        kind: UnitKind::Whole,
        main: String::new(),
        files: all,
        candidates: Vec::new(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_takes_the_changed_headers_it_needs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("fs")).unwrap();
        std::fs::write(
            t.path().join("fs/pipe.c"),
            "#include <linux/macros.h>\n#include \"internal.h\"\n#include <linux/other.h>\n",
        )
        .unwrap();
        // A changed header that includes another changed one brings it along.
        std::fs::create_dir_all(t.path().join("include/linux")).unwrap();
        std::fs::write(
            t.path().join("include/linux/macros.h"),
            "#include <linux/net.h>\n",
        )
        .unwrap();
        let objects = [KbuildObject {
            object: "fs/pipe.o".into(),
            source: "fs/pipe.c".into(),
            command: String::new(),
            objtool: None,
            deps: vec!["include/linux/fs.h".into(), "include/linux/sched.h".into()],
        }];
        let scope = Scope {
            builtin: vec!["fs/pipe.c".into()],
            headers: vec![
                ("include/linux/fs.h".into(), 1),
                ("include/linux/macros.h".into(), 1),
                ("fs/internal.h".into(), 1),
                ("include/linux/net.h".into(), 3),
            ],
            module: vec![("fs/isofs/inode.c".into(), "isofs".into())],
            ..Scope::default()
        };
        let u = units(&scope, &objects, t.path());
        let kinds: Vec<UnitKind> = u.iter().map(|u| u.kind).collect();
        use UnitKind::*;
        assert_eq!(
            kinds,
            [Source, Header, Header, Header, Header, Module, Whole]
        );
        assert_eq!(u[0].files, ["fs/pipe.c"]);
        assert_eq!(
            u[0].candidates,
            [
                "fs/internal.h",
                "include/linux/fs.h",
                "include/linux/macros.h",
                "include/linux/net.h"
            ]
        );
        assert_eq!(u[4].files, ["include/linux/net.h"]);
        assert_eq!(
            u[6].files.len(),
            5,
            "every vmlinux change: {:?}",
            u[6].files
        );
        assert!(u.iter().all(|u| u.id.len() <= 48), "{u:?}");
        assert_eq!(u[0].id, "u001-fs-pipe.c");
    }

    #[test]
    fn long_paths_keep_their_file_name_in_the_id() {
        let id = unit_id(
            12,
            "drivers/net/ethernet/mellanox/mlx5/core/en_accel/ipsec_rxtx.c",
        );
        assert!(
            id.len() <= 48 && id.starts_with("u012-") && id.ends_with("ipsec-rxtx.c"),
            "{id}"
        );
    }
}
