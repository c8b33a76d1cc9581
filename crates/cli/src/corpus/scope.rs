//! Which changed files matter to the running guest's kernel.
//!
//! "In this kernel" means: the source of an object linked into vmlinux (the dbg vmlinux's
//! DWARF names every one), a source of a module the guest can load (its Kbuild Makefile,
//! evaluated by make with the kernel's own config), or a header one of those objects was
//! compiled with (the same DWARF lists them). Everything else is out of scope, with the
//! reason, and is not a refusal. One limit comes from DWARF: a header that contributes
//! only macros to an object is not listed for it, so such a header counts as unused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use lucos_diffobj::diff::KbuildObject;
use serde::{Deserialize, Serialize};

/// The changed files of an update, sorted by how they relate to this kernel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scope {
    /// Every changed file.
    pub all: usize,
    /// Changed `.c` files.
    pub c_files: usize,
    /// Changed C and assembly sources of vmlinux objects.
    pub builtin: Vec<String>,
    /// Changed sources of modules the guest can load, with the module.
    pub module: Vec<(String, String)>,
    /// Changed headers that vmlinux objects were compiled with, with how many objects.
    pub headers: Vec<(String, usize)>,
    /// Out of scope: reason -> files.
    pub out: BTreeMap<String, Vec<String>>,
}

impl Scope {
    /// Changed C files in this kernel (built in, or in a loadable module).
    pub fn c_in_kernel(&self) -> usize {
        self.builtin.iter().filter(|f| f.ends_with(".c")).count()
            + self
                .module
                .iter()
                .filter(|(f, _)| f.ends_with(".c"))
                .count()
    }
}

fn is_source(path: &str) -> bool {
    path.ends_with(".c") || path.ends_with(".S")
}

/// A changed header no object's DWARF lists. Either no object of this kernel includes it,
/// or it gives its includers only macros, which DWARF does not record: the units carry
/// such headers (they cost no recompiles), so that a source needing a new macro compiles.
pub const UNLISTED_HEADER: &str = "header no object's DWARF lists (unused, or macros only)";

/// Why a changed file that no object of this kernel uses is out of scope.
pub fn out_reason(path: &str) -> &'static str {
    let arch = path.strip_prefix("arch/").and_then(|r| r.split('/').next());
    if arch.is_some_and(|a| a != "x86") {
        "another architecture"
    } else if ["tools/", "scripts/", "usr/", "samples/"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        "host tool, sample or user-space code"
    } else if path.starts_with("Documentation/") || path.ends_with(".rst") || path.ends_with(".txt")
    {
        "documentation"
    } else if is_source(path) {
        "not built into this kernel or a module the guest can load"
    } else if path.ends_with(".h") {
        UNLISTED_HEADER
    } else {
        "build, config or data file"
    }
}

/// Sorts `changed` against the kernel's objects and the guest's loadable modules.
pub fn classify(
    changed: &[String],
    objects: &[KbuildObject],
    modules: &BTreeMap<String, String>,
) -> Scope {
    let sources: BTreeSet<&str> = objects.iter().map(|o| o.source.as_str()).collect();
    let mut users: BTreeMap<&str, usize> = BTreeMap::new();
    for o in objects {
        for d in &o.deps {
            *users.entry(d.as_str()).or_default() += 1;
        }
    }
    let mut scope = Scope {
        all: changed.len(),
        c_files: changed.iter().filter(|f| f.ends_with(".c")).count(),
        ..Scope::default()
    };
    for f in changed {
        if sources.contains(f.as_str()) {
            scope.builtin.push(f.clone());
        } else if let Some(m) = modules.get(f) {
            scope.module.push((f.clone(), m.clone()));
        } else if let Some(&n) = users.get(f.as_str()).filter(|_| f.ends_with(".h")) {
            scope.headers.push((f.clone(), n));
        } else {
            scope
                .out
                .entry(out_reason(f).to_owned())
                .or_default()
                .push(f.clone());
        }
    }
    scope
}

/// The `.ko` files (relative to `lib/modules/<release>/kernel/`) in the guest's module
/// archive: the modules a guest of this kernel can load.
pub fn loadable_modules(archive: &Path) -> Result<Vec<String>> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -t --quiet",
            archive.display()
        ))
        .output()
        .context("listing the guest's module archive (gzip, cpio)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| Some(l.split_once("/kernel/")?.1.to_owned()))
        .filter(|l| l.ends_with(".ko"))
        .collect())
}

/// The source files of module `ko` (e.g. `fs/isofs/isofs.ko`): its Kbuild Makefile's
/// `<name>-objs`/`-y` lists, evaluated by make with the tree's config, or `<name>.c`.
pub fn module_sources(tree: &Path, ko: &str) -> Result<Vec<String>> {
    let (dir, file) = ko.rsplit_once('/').unwrap_or(("", ko));
    let name = file.trim_end_matches(".ko");
    let probe = format!(
        "include include/config/auto.conf\nsrctree := .\nobj := {dir}\nsrc := {dir}\n\
         include scripts/Kbuild.include\ninclude {dir}/Makefile\n\
         lucos-print:\n\t@echo $({name}-objs) $({name}-y) $({name}-m)\n"
    );
    let out = Command::new("make")
        .args(["-s", "--no-print-directory", "-f", "-", "lucos-print"])
        .current_dir(tree)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("piped").write_all(probe.as_bytes())?;
            c.wait_with_output()
        })
        .context("running make to read a module's Makefile")?;
    let members: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|o| o.ends_with(".o"))
        .map(|o| o.trim_end_matches(".o").to_owned())
        .collect();
    let members = if members.is_empty() {
        vec![name.to_owned()]
    } else {
        members
    };
    let mut files = Vec::new();
    for m in members {
        for ext in [".c", ".S"] {
            let f = if dir.is_empty() {
                format!("{m}{ext}")
            } else {
                format!("{dir}/{m}{ext}")
            };
            if tree.join(&f).is_file() {
                files.push(f);
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(source: &str, deps: &[&str]) -> KbuildObject {
        KbuildObject::from_deps(source, deps)
    }

    #[test]
    fn files_are_sorted_by_their_relation_to_the_kernel() {
        let objects = [
            obj(
                "fs/pipe.c",
                &["include/linux/pipe_fs_i.h", "include/linux/fs.h"],
            ),
            obj("fs/read_write.c", &["include/linux/fs.h"]),
        ];
        let modules = BTreeMap::from([("fs/isofs/inode.c".to_string(), "isofs".to_string())]);
        let changed: Vec<String> = [
            "fs/pipe.c",
            "fs/isofs/inode.c",
            "include/linux/fs.h",
            "include/linux/unused.h",
            "drivers/gpu/x.c",
            "arch/arm64/kernel/y.c",
            "tools/perf/z.c",
            "Documentation/a.rst",
            "fs/Kconfig",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = classify(&changed, &objects, &modules);
        assert_eq!((s.all, s.c_files, s.c_in_kernel()), (9, 5, 2));
        assert_eq!(s.builtin, vec!["fs/pipe.c"]);
        assert_eq!(s.module, vec![("fs/isofs/inode.c".into(), "isofs".into())]);
        assert_eq!(s.headers, vec![("include/linux/fs.h".into(), 2)]);
        let out = |r: &str| s.out.get(r).cloned().unwrap_or_default();
        assert_eq!(out("another architecture"), vec!["arch/arm64/kernel/y.c"]);
        assert_eq!(
            out("host tool, sample or user-space code"),
            vec!["tools/perf/z.c"]
        );
        assert_eq!(out(UNLISTED_HEADER), vec!["include/linux/unused.h"]);
        assert_eq!(
            out("not built into this kernel or a module the guest can load"),
            vec!["drivers/gpu/x.c"]
        );
        assert_eq!(out("documentation"), vec!["Documentation/a.rst"]);
        assert_eq!(out("build, config or data file"), vec!["fs/Kconfig"]);
    }
}
