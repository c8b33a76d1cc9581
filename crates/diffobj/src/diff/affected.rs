//! Which objects a diff makes the builder recompile.

use std::path::Path;

use super::cmdfile::KbuildObject;
use super::error::Refusal;
use super::patchfile::{ChangeKind, FileChange};

/// Drops from `affected` the objects that only `narrow` headers touch (see
/// `BuildOptions::narrow_headers`).
pub(super) fn narrow(
    affected: &mut Vec<&KbuildObject>,
    objects: &[KbuildObject],
    changes: &[FileChange],
    narrow: &[String],
) {
    if narrow.is_empty() {
        return;
    }
    let wide: Vec<FileChange> = changes
        .iter()
        .filter(|c| !narrow.contains(&c.path))
        .cloned()
        .collect();
    let (touched, _) = affected_objects(objects, &wide);
    affected.retain(|o| touched.iter().any(|t| t.object == o.object));
}

/// Objects to recompile, and refusals for changed files that cannot be handled.
pub(super) fn affected_objects<'a>(
    objects: &'a [KbuildObject],
    changes: &[FileChange],
) -> (Vec<&'a KbuildObject>, Vec<Refusal>) {
    let mut refusals = Vec::new();
    let mut out: Vec<&KbuildObject> = Vec::new();
    for c in changes {
        let p = c.path.as_str();
        let users: Vec<&KbuildObject> = objects
            .iter()
            .filter(|o| o.source == p || o.deps.iter().any(|d| d == p))
            .collect();
        let ext = Path::new(p)
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("");
        match ext {
            "S" | "s" => refusals.push(Refusal::Assembly {
                path: c.path.clone(),
            }),
            "c" if users.is_empty() && c.kind != ChangeKind::Added => {
                refusals.push(Refusal::File {
                    path: c.path.clone(),
                    reason: "is not compiled into vmlinux with this kernel's configuration (it is \
                         part of a module, or disabled in .config); lucos patches vmlinux only"
                        .into(),
                })
            }
            "c" | "h" => {}
            _ if p.starts_with("Documentation/") => {}
            _ if users.is_empty() => refusals.push(Refusal::File {
                path: c.path.clone(),
                reason: "is not a C source or header that vmlinux is built from; lucos build \
                         handles changes to .c and .h files (Kconfig, Makefile and linker \
                         script changes need a new kernel)"
                    .into(),
            }),
            _ => {}
        }
        for u in users {
            if !out.iter().any(|o| o.object == u.object) {
                out.push(u);
            }
        }
    }
    (out, refusals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(source: &str, deps: &[&str]) -> KbuildObject {
        KbuildObject::from_deps(source, deps)
    }

    fn change(path: &str) -> FileChange {
        FileChange {
            path: path.into(),
            kind: ChangeKind::Modified,
            lines: Default::default(),
        }
    }

    #[test]
    fn a_narrow_header_is_recompiled_only_where_another_change_touches() {
        let objects = [
            object("kernel/bpf/bpf_lsm.c", &["include/linux/bpf.h"]),
            object(
                "net/core/filter.c",
                &["include/linux/bpf.h", "include/net/x.h"],
            ),
            object("kernel/bpf/verifier.c", &["include/linux/bpf.h"]),
            object("fs/other.c", &["include/linux/fs.h"]),
        ];
        let changes = [
            change("kernel/bpf/bpf_lsm.c"),
            change("include/linux/bpf.h"),
            change("include/net/x.h"),
        ];
        let (mut affected, refusals) = affected_objects(&objects, &changes);
        assert!(refusals.is_empty());
        assert_eq!(affected.len(), 3);
        narrow(
            &mut affected,
            &objects,
            &changes,
            &["include/linux/bpf.h".into()],
        );
        let kept: Vec<&str> = affected.iter().map(|o| o.source.as_str()).collect();
        assert_eq!(kept, ["kernel/bpf/bpf_lsm.c", "net/core/filter.c"]);
    }
}
