//! Compiling bundle sources with the target kernel's own Kbuild.
//!
//! The sources are built as an external-module directory (`make -C <build> M=<tmp>`) but
//! listed as `obj-y`, i.e. as *built-in* kernel objects: they get exactly the flags the
//! vmlinux objects got (`-mcmodel=kernel`, `-pg -mfentry`, objtool in vmlinux mode) and no
//! `-DMODULE`, so `THIS_MODULE` is NULL as it is for code that lives in the kernel image.
//! Only the object target is built, so modpost never runs (it would reject references to
//! unexported and static kernel symbols, which bundles may make).
//!
//! Kbuild writes only into `M=`; the kernel tree is left untouched (verified by the tests).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::error::BuildError;

/// Name of the relocatable object several sources are linked into (`ld -r`).
const COMBINED: &str = "lucos-bundle";

/// Environment variables that would change what Kbuild builds or how (another
/// architecture, extra flags, an output directory, a parent make's jobserver).
const KBUILD_ENV: &[&str] = &[
    "ARCH",
    "SUBARCH",
    "CROSS_COMPILE",
    "LLVM",
    "LLVM_IAS",
    "CC",
    "LD",
    "KBUILD_OUTPUT",
    "KBUILD_EXTMOD",
    "KBUILD_EXTRA_SYMBOLS",
    "KBUILD_VERBOSE",
    "KBUILD_MODPOST_WARN",
    "KCFLAGS",
    "KCPPFLAGS",
    "KAFLAGS",
    "KRUSTFLAGS",
    "CFLAGS_MODULE",
    "AFLAGS_MODULE",
    "LDFLAGS_MODULE",
    "MAKEFLAGS",
    "MFLAGS",
    "GNUMAKEFLAGS",
    "MAKEFILES",
    "MAKELEVEL",
    "O",
    "M",
    "V",
    "W",
    "C",
    "CHECK",
];

/// Longest make output kept in an error (compiler errors cascade; the first ones matter).
const MAX_OUTPUT_LINES: usize = 300;

/// Files a configured and built Kbuild tree has; an external build needs all of them.
const TREE_FILES: &[&str] = &[
    "Makefile",
    "include/config/auto.conf",
    "include/generated/autoconf.h",
    "scripts/basic/fixdep",
];

/// Compiles `sources` (`.c` or `.S`) as built-in kernel code of the configured Kbuild tree
/// `build_dir` and returns the ELF relocatable object. Several sources are linked with
/// `ld -r` into one object. Headers next to a source can be included with `"..."`.
///
/// Compiler warnings are logged; on failure the error carries the compiler's diagnostics,
/// with the temporary paths replaced by the original ones. The temporary directory is
/// always removed.
pub fn compile(build_dir: &Path, sources: &[PathBuf]) -> Result<Vec<u8>, BuildError> {
    check_tree(build_dir)?;
    let sources = check_sources(sources)?;
    let tmp = tempfile::Builder::new()
        .prefix("lucos-kbuild-")
        .tempdir()
        .map_err(|source| BuildError::Io {
            action: "create a temporary directory in",
            path: std::env::temp_dir(),
            source,
        })?;
    let dir = tmp.path();
    if !make_safe(dir) {
        return Err(BuildError::BadSource {
            path: dir.to_owned(),
            reason: "the temporary directory's path has characters Make cannot handle; \
                     set TMPDIR to a plain path such as /tmp"
                .into(),
        });
    }
    for s in &sources {
        let to = dir.join(&s.file_name);
        fs::copy(&s.path, &to).map_err(|source| BuildError::Io {
            action: "copy the source to",
            path: to,
            source,
        })?;
    }
    let (kbuild, target) = kbuild_file(&sources);
    let kbuild_path = dir.join("Kbuild");
    fs::write(&kbuild_path, kbuild).map_err(|source| BuildError::Io {
        action: "write",
        path: kbuild_path,
        source,
    })?;

    let what = sources
        .iter()
        .map(|s| s.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let jobs = sources.len().min(
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    );
    let mut cmd = make_in(build_dir, jobs);
    cmd.arg(format!("M={}", dir.display())).arg(&target);
    debug!(?cmd, "running Kbuild");
    let started = Instant::now();
    let out = cmd.output().map_err(|source| BuildError::Spawn {
        program: "make".into(),
        source,
    })?;
    let output = tidy_output(&out.stderr, &out.stdout, dir, &sources);
    if !out.status.success() {
        return Err(BuildError::Compile {
            what,
            status: out.status.to_string(),
            output,
        });
    }
    if !output.is_empty() {
        warn!("Kbuild output while compiling {what}:\n{output}");
    }
    let obj_path = dir.join(&target);
    let object = match fs::read(&obj_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BuildError::NoObject {
                path: obj_path,
                output,
            })
        }
        Err(source) => {
            return Err(BuildError::Io {
                action: "read",
                path: obj_path,
                source,
            })
        }
    };
    info!(
        "compiled {what} with Kbuild in {:.2} s ({} bytes)",
        started.elapsed().as_secs_f64(),
        object.len()
    );
    Ok(object)
}

/// `make -C <build_dir> -s -j<jobs>` with none of the caller's variables that would change
/// what Kbuild builds or how.
pub(crate) fn make_in(build_dir: &Path, jobs: usize) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(build_dir)
        .arg("-s")
        .arg(format!("-j{}", jobs.max(1)))
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    for var in KBUILD_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A validated source: where it is and the name it gets in the build directory.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    file_name: String,
    stem: String,
}

fn check_tree(build_dir: &Path) -> Result<(), BuildError> {
    for f in TREE_FILES {
        if !build_dir.join(f).exists() {
            return Err(BuildError::Tree(crate::tree::TreeError {
                path: build_dir.to_owned(),
                reason: format!("its Kbuild tree has no {f} (is it configured and prepared?)"),
                source: None,
            }));
        }
    }
    Ok(())
}

fn check_sources(sources: &[PathBuf]) -> Result<Vec<Source>, BuildError> {
    let bad = |path: &Path, reason: &str| BuildError::BadSource {
        path: path.to_owned(),
        reason: reason.to_string(),
    };
    if sources.is_empty() {
        return Err(BuildError::NoSources);
    }
    let mut stems = BTreeSet::new();
    let mut out = Vec::with_capacity(sources.len());
    for p in sources {
        let path = fs::canonicalize(p).map_err(|source| BuildError::Io {
            action: "find the source",
            path: p.clone(),
            source,
        })?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad(p, "has no UTF-8 file name"))?
            .to_string();
        let Some((stem, ext)) = file_name.rsplit_once('.') else {
            return Err(bad(p, "has no extension; give a .c or .S file"));
        };
        if ext != "c" && ext != "S" {
            return Err(bad(p, "is not a .c or .S file"));
        }
        let stem_ok = !stem.is_empty()
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !stem_ok {
            return Err(bad(
                p,
                "has a name Kbuild cannot use as an object name; rename it to [A-Za-z0-9_-].c",
            ));
        }
        if sources.len() > 1 && stem == COMBINED {
            return Err(bad(
                p,
                &format!(
                    "is named {COMBINED}, which lucos uses for the combined object; rename it"
                ),
            ));
        }
        if !stems.insert(stem.to_string()) {
            return Err(bad(
                p,
                "has the same base name as another source; both would compile to one object",
            ));
        }
        if !path.parent().is_some_and(make_safe) {
            return Err(bad(
                p,
                "is in a directory whose path has characters Make cannot pass to the compiler \
                 (whitespace, quotes, $, #, \\); move it",
            ));
        }
        out.push(Source {
            stem: stem.to_string(),
            file_name,
            path,
        });
    }
    Ok(out)
}

/// Whether a path can appear unquoted in a Makefile and a shell command.
fn make_safe(p: &Path) -> bool {
    p.to_str().is_some_and(|s| {
        !s.is_empty()
            && !s
                .chars()
                .any(|c| c.is_whitespace() || "\"'$#\\;`*?[]()&|<>%:=".contains(c))
    })
}

/// The `Kbuild` file for the temporary directory and the target to build in it.
fn kbuild_file(sources: &[Source]) -> (String, String) {
    let objs: Vec<String> = sources.iter().map(|s| format!("{}.o", s.stem)).collect();
    let mut dirs: Vec<String> = sources
        .iter()
        .filter_map(|s| s.path.parent())
        .map(|d| format!("-I{}", d.display()))
        .collect();
    dirs.sort();
    dirs.dedup();
    let includes = dirs.join(" ");
    let mut k =
        String::from("# Generated by lucos: bundle sources built as built-in kernel code.\n");
    k += &format!("obj-y := {}\n", objs.join(" "));
    k += &format!("ccflags-y := {includes}\nasflags-y := {includes}\n");
    if let [only] = objs.as_slice() {
        return (k, only.clone());
    }
    let combined = format!("{COMBINED}.o");
    k += &format!(
        "targets += {combined}\nLDFLAGS_{combined} := -r\n\
         $(obj)/{combined}: $(addprefix $(obj)/,{}) FORCE\n\t$(call if_changed,ld)\n",
        objs.join(" ")
    );
    (k, combined)
}

/// stderr then stdout, with temporary paths shown as the user's paths, capped in length.
fn tidy_output(stderr: &[u8], stdout: &[u8], tmp: &Path, sources: &[Source]) -> String {
    let mut text = String::from_utf8_lossy(stderr).into_owned();
    let stdout = String::from_utf8_lossy(stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text += &stdout;
    }
    let tmp = tmp.display().to_string();
    for s in sources {
        text = text.replace(
            &format!("{tmp}/{}", s.file_name),
            &s.path.display().to_string(),
        );
    }
    let lines: Vec<&str> = text.trim_end().lines().collect();
    if lines.len() <= MAX_OUTPUT_LINES {
        return lines.join("\n");
    }
    let mut kept = lines[..MAX_OUTPUT_LINES].join("\n");
    kept += &format!("\n[... {} more lines]", lines.len() - MAX_OUTPUT_LINES);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(stem: &str) -> Source {
        Source {
            path: PathBuf::from(format!("/src/b/{stem}.c")),
            file_name: format!("{stem}.c"),
            stem: stem.into(),
        }
    }

    #[test]
    fn one_source_is_built_directly() {
        let (k, target) = kbuild_file(&[src("cmdline")]);
        assert_eq!(target, "cmdline.o");
        assert!(k.contains("obj-y := cmdline.o\n"));
        assert!(k.contains("ccflags-y := -I/src/b\n"));
        assert!(!k.contains("LDFLAGS"));
    }

    #[test]
    fn several_sources_are_linked_with_ld_r() {
        let (k, target) = kbuild_file(&[src("a"), src("b-c")]);
        assert_eq!(target, "lucos-bundle.o");
        assert!(k.contains("obj-y := a.o b-c.o\n"));
        assert!(k.contains("LDFLAGS_lucos-bundle.o := -r\n"));
        assert!(k.contains("$(obj)/lucos-bundle.o: $(addprefix $(obj)/,a.o b-c.o) FORCE\n"));
        assert!(k.contains("-I/src/b\n"), "one -I per directory: {k}");
    }

    #[test]
    fn output_maps_temporary_paths_back() {
        let s = src("x");
        let out = tidy_output(
            b"/tmp/lucos-kbuild-1/x.c:3:1: error: expected ';'\n",
            b"",
            Path::new("/tmp/lucos-kbuild-1"),
            &[s],
        );
        assert_eq!(out, "/src/b/x.c:3:1: error: expected ';'");
    }

    #[test]
    fn long_output_is_capped() {
        let many = "e\n".repeat(MAX_OUTPUT_LINES + 5);
        let out = tidy_output(many.as_bytes(), b"", Path::new("/t"), &[]);
        assert!(out.ends_with("[... 5 more lines]"));
    }

    #[test]
    fn paths_with_make_metacharacters_are_refused() {
        assert!(make_safe(Path::new("/tmp/lucos-kbuild-x1")));
        assert!(!make_safe(Path::new("/tmp/my dir")));
        assert!(!make_safe(Path::new("/tmp/a$b")));
        assert!(!make_safe(Path::new("/tmp/a:b")));
    }

    #[test]
    fn bad_source_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let weird = dir.path().join("a.txt");
        fs::write(&weird, "").unwrap();
        let e = check_sources(&[weird]).unwrap_err();
        assert!(e.to_string().contains("not a .c or .S"), "{e}");
        let dotted = dir.path().join("a.b.c");
        fs::write(&dotted, "").unwrap();
        let e = check_sources(&[dotted]).unwrap_err();
        assert!(e.to_string().contains("rename it"), "{e}");
        let a = dir.path().join("x.c");
        let b = dir.path().join("x.S");
        fs::write(&a, "").unwrap();
        fs::write(&b, "").unwrap();
        let e = check_sources(&[a, b]).unwrap_err();
        assert!(e.to_string().contains("same base name"), "{e}");
        let e = check_sources(&[dir.path().join("missing.c")]).unwrap_err();
        assert!(e.to_string().contains("find the source"), "{e}");
    }
}
