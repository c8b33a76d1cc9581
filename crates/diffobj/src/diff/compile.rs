//! Compiling the comparison objects with Kbuild's own command lines.
//!
//! The command is the one Kbuild ran, with three edits: the dependency-file option is
//! dropped (it would write into the tree), the output goes to a temporary path, and
//! `-ffunction-sections -fdata-sections` are added so each function and variable gets its
//! own section. Kbuild's objtool pass runs after the compiler, as in the kernel's own build:
//! it writes the ORC unwind data the bundle hands to the kernel and puts static-branch
//! sites in their final form; the new code's `call __fentry__` are turned into NOPs by the
//! lucos linker, so no mcount pass is needed.
//!
//! Original objects are cached, keyed by the command line and the contents of the source
//! and every dependency, so a second build against the same kernel skips them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::cmdfile::KbuildObject;
use super::error::DiffError;

/// Flags added to every comparison compile.
pub const EXTRA_FLAGS: &[&str] = &["-ffunction-sections", "-fdata-sections"];

/// Which side of the diff an object is compiled from (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Original,
    Patched,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Original => "original",
            Side::Patched => "patched",
        }
    }
}

/// Splits a shell command into words, keeping each word's quoting as written.
fn words(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut single, mut double) = (false, false);
    for ch in cmd.chars() {
        match ch {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            c if c.is_whitespace() && !single && !double => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The edited command line writing `out`. `remap` replaces an absolute tree prefix (rare in
/// in-tree builds) with the overlay's, so the patched compile never reads unpatched files.
pub fn command_line(obj: &KbuildObject, out: &Path, remap: Option<(&str, &str)>) -> String {
    let mut result: Vec<String> = Vec::new();
    let mut it = words(&obj.command).into_iter();
    while let Some(w) = it.next() {
        if w.starts_with("-Wp,-MMD,") || w.starts_with("-Wp,-MD,") {
            continue;
        }
        if w == "-o" {
            it.next();
            result.push("-o".into());
            result.push(format!("'{}'", out.display()));
            continue;
        }
        match remap {
            Some((from, to)) if w.contains(from) => result.push(w.replace(from, to)),
            _ => result.push(w),
        }
    }
    result.extend(EXTRA_FLAGS.iter().map(|s| s.to_string()));
    result.join(" ")
}

/// Runs one compile in `cwd`, then Kbuild's objtool pass on the result (from the tree
/// `root`, where objtool was built).
pub fn run(
    obj: &KbuildObject,
    side: Side,
    (root, cwd): (&Path, &Path),
    out: &Path,
    remap: Option<(&str, &str)>,
) -> Result<(), DiffError> {
    let cmd = command_line(obj, out, remap);
    tracing::debug!(object = %obj.object, side = side.name(), %cmd, "compiling");
    check(&sh(&cmd, cwd)?, side.name(), &obj.object)?;
    let Some(objtool) = &obj.objtool else {
        return Ok(());
    };
    // objtool writes what the kernel's own build has: ORC unwind data for the new code,
    // and static-branch sites in their final (NOP) form.
    let mut w = words(objtool);
    w.pop();
    w.push(format!("'{}'", out.display()));
    check(&sh(&w.join(" "), root)?, side.name(), &obj.object)
}

/// Runs a Kbuild command line with the shell, in `cwd`, in the C locale.
fn sh(cmd: &str, cwd: &Path) -> Result<std::process::Output, DiffError> {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| DiffError::Tool {
            tool: "sh",
            package: "dash",
            source,
        })
}

/// A failed compile as an error naming `object`, with the compiler's diagnostics.
fn check(
    output: &std::process::Output,
    which: &'static str,
    object: &str,
) -> Result<(), DiffError> {
    if output.status.success() {
        return Ok(());
    }
    Err(DiffError::Compile {
        which,
        object: object.to_string(),
        status: output
            .status
            .code()
            .map_or("signal".to_string(), |c| c.to_string()),
        stderr: String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_string(),
    })
}

/// Builds `targets` (object paths) in the kernel tree `root` with Kbuild, so that their
/// `.cmd` files record the exact commands. The tree is locked meanwhile: two lucos builds
/// must not run Kbuild in it at once.
pub fn make_targets(root: &Path, targets: &[&str], jobs: usize) -> Result<(), DiffError> {
    let lock_path = root.join(".lucos-make.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(DiffError::io("open", &lock_path))?;
    lock.lock().map_err(DiffError::io("lock", &lock_path))?;
    tracing::info!(
        objects = targets.len(),
        "building original objects in the kernel tree"
    );
    let output = crate::kbuild::make_in(root, jobs)
        .args(targets)
        .output()
        .map_err(|source| DiffError::Tool {
            tool: "make",
            package: "make",
            source,
        })?;
    check(&output, "original", &targets.join(" "))
}

/// Cache key of an original object: its command and everything it read.
pub fn cache_key(tree: &Path, obj: &KbuildObject) -> Result<String, DiffError> {
    let mut h = Sha256::new();
    h.update(b"lucos-diffobj-v1\0");
    h.update(command_line(obj, Path::new("OUT"), None).as_bytes());
    h.update(b"\0");
    h.update(obj.objtool.as_deref().unwrap_or("").as_bytes());
    h.update(b"\0");
    let mut files: Vec<&str> = vec![obj.source.as_str()];
    files.extend(obj.deps.iter().map(String::as_str));
    for f in files {
        let path = if f.starts_with('/') {
            PathBuf::from(f)
        } else {
            tree.join(f)
        };
        h.update(f.as_bytes());
        h.update(b"\0");
        match fs::read(&path) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.update(b"missing"),
            Err(e) => return Err(DiffError::io("read", path)(e)),
        }
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// The cache file for `obj` with `key` under `dir`.
pub fn cache_path(dir: &Path, obj: &KbuildObject, key: &str) -> PathBuf {
    let flat = obj.object.replace('/', "_");
    dir.join(format!("{flat}.{key}.o"))
}

/// Stores `built` in the cache atomically; failures only cost the next build time.
pub fn store(built: &Path, cached: &Path) {
    let Some(dir) = cached.parent() else { return };
    let result = fs::create_dir_all(dir).and_then(|_| {
        let name = cached.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".tmp-{}-{name}", std::process::id()));
        fs::copy(built, &tmp)?;
        fs::rename(&tmp, cached)
    });
    if let Err(e) = result {
        tracing::warn!(path = %cached.display(), error = %e, "cannot cache the original object");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_command() {
        let obj = KbuildObject {
            object: "fs/a.o".into(),
            source: "fs/a.c".into(),
            command:
                "gcc -Wp,-MMD,fs/.a.o.d -nostdinc -DKBUILD_MODFILE='\"fs/a b\"' -c -o fs/a.o fs/a.c"
                    .into(),
            objtool: None,
            deps: vec![],
        };
        let c = command_line(&obj, Path::new("/tmp/x.o"), None);
        assert_eq!(
            c,
            "gcc -nostdinc -DKBUILD_MODFILE='\"fs/a b\"' -c -o '/tmp/x.o' fs/a.c \
             -ffunction-sections -fdata-sections"
        );
    }
}
