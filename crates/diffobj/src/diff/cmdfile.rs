//! What Kbuild recorded about each object linked into vmlinux: its compile command and the
//! files it depends on (`.<obj>.o.cmd`, written by fixdep).
//!
//! Objects are enumerated from the thin archives the kernel links (`vmlinux.a`, and the
//! `lib.a` libraries whose members are linked when referenced), so host tools, the boot
//! stub and modules are never considered.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::dwarfdeps::DepsIndex;
use super::error::DiffError;
use crate::tree::{KernelTree, TreeKind};

/// Archives whose members may end up in vmlinux.
const ARCHIVES: &[&str] = &["vmlinux.a", "lib/lib.a", "arch/x86/lib/lib.a"];

/// One object of vmlinux as Kbuild built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbuildObject {
    /// Object path relative to the tree root, e.g. `fs/proc/cmdline.o`.
    pub object: String,
    /// Source path relative to the tree root, e.g. `fs/proc/cmdline.c`.
    pub source: String,
    /// The compile command (only the compiler invocation; what follows is cut off).
    pub command: String,
    /// The objtool run Kbuild did after the compile (its last word is the object), if any.
    pub objtool: Option<String>,
    /// Files the compile read, relative to the tree root (absolute for system headers).
    pub deps: Vec<String>,
}

impl KbuildObject {
    /// An object known only by its source and what it depends on, without a command (as
    /// [`objects`] gives for prepared trees): what dependency questions need.
    pub fn from_deps(source: &str, deps: &[&str]) -> KbuildObject {
        KbuildObject {
            object: source.replace(".c", ".o"),
            source: source.into(),
            command: String::new(),
            objtool: None,
            deps: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    pub fn is_assembly(&self) -> bool {
        self.source.ends_with(".S")
    }
}

/// Every vmlinux object of `tree` with the files it depends on. The command is known only
/// for built trees; [`with_commands`] fills it in for the ones a build needs.
pub fn objects(tree: &KernelTree) -> Result<Vec<KbuildObject>, DiffError> {
    match tree.kind {
        TreeKind::Built => scan(&tree.root),
        TreeKind::Prepared => {
            let id = lucos_introspect::KernelSymbols::read_build_id_hex(&tree.vmlinux)?;
            let idx =
                DepsIndex::load_or_build(&tree.vmlinux, &id, &tree.index_file("deps-index.json"))?;
            Ok(idx
                .units
                .into_iter()
                .map(|u| KbuildObject {
                    object: format!("{}.o", u.source.trim_end_matches(".c")),
                    source: u.source,
                    command: String::new(),
                    objtool: None,
                    deps: u.files,
                })
                .collect())
        }
    }
}

/// `objects` with Kbuild's command line for each. In a prepared tree an object's command
/// is only known once Kbuild has built it there: build the missing ones with `make <obj>`
/// (its `.cmd` file is the cache), then read the commands and exact dependencies that
/// fixdep recorded.
pub fn with_commands(
    tree: &KernelTree,
    objects: &[&KbuildObject],
    jobs: usize,
) -> Result<Vec<KbuildObject>, DiffError> {
    if tree.kind == TreeKind::Built {
        return Ok(objects.iter().map(|o| (*o).clone()).collect());
    }
    let missing: Vec<&str> = objects
        .iter()
        .filter(|o| cmd_file_path(&tree.root, &o.object).is_none_or(|p| !p.is_file()))
        .map(|o| o.object.as_str())
        .collect();
    if !missing.is_empty() {
        super::compile::make_targets(&tree.root, &missing, jobs)?;
    }
    let mut out = Vec::with_capacity(objects.len());
    for o in objects {
        let path = cmd_file_path(&tree.root, &o.object).ok_or_else(|| DiffError::CmdFile {
            path: tree.root.join(&o.object),
            reason: "not an object path".into(),
        })?;
        let text = fs::read_to_string(&path).map_err(DiffError::io("read", &path))?;
        let parsed = parse_cmd(&o.object, &text)
            .map_err(|reason| DiffError::CmdFile {
                path: path.clone(),
                reason,
            })?
            .ok_or_else(|| DiffError::CmdFile {
                path: path.clone(),
                reason: "it records no compile of a C source".into(),
            })?;
        out.push(parsed);
    }
    Ok(out)
}

/// Every object of vmlinux with its recorded command.
pub fn scan(root: &Path) -> Result<Vec<KbuildObject>, DiffError> {
    let mut members = BTreeSet::new();
    for a in ARCHIVES {
        let path = root.join(a);
        match fs::read(&path) {
            Ok(bytes) => {
                let dir = Path::new(a).parent().unwrap_or(Path::new(""));
                for m in thin_members(&bytes).map_err(|reason| DiffError::Tree {
                    path: path.clone(),
                    reason,
                })? {
                    members.insert(member_path(root, dir, &m));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && *a != "vmlinux.a" => {}
            Err(e) => {
                return Err(DiffError::Tree {
                    path: root.to_owned(),
                    reason: format!("cannot read {a} ({e}); is the kernel built?"),
                })
            }
        }
    }
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        let Some(cmd_path) = cmd_file_path(root, &m) else {
            continue;
        };
        let text = match fs::read_to_string(&cmd_path) {
            Ok(t) => t,
            // Objects built by custom rules without a .cmd file cannot depend on C changes.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(DiffError::io("read", &cmd_path)(e)),
        };
        if let Some(obj) = parse_cmd(&m, &text).map_err(|reason| DiffError::CmdFile {
            path: cmd_path.clone(),
            reason,
        })? {
            out.push(obj);
        }
    }
    tracing::debug!(objects = out.len(), "scanned Kbuild command files");
    Ok(out)
}

/// Thin archive member paths are relative to the archive's directory; older binutils
/// wrote them relative to the top. Use whichever exists.
fn member_path(root: &Path, dir: &Path, name: &str) -> String {
    let rel = dir.join(name);
    if !dir.as_os_str().is_empty() && root.join(&rel).exists() {
        return normalize(&rel.to_string_lossy());
    }
    normalize(name)
}

fn cmd_file_path(root: &Path, object: &str) -> Option<PathBuf> {
    let p = Path::new(object);
    let name = p.file_name()?.to_str()?;
    Some(root.join(p.parent()?).join(format!(".{name}.cmd")))
}

/// Removes `./` components so paths compare equal to the diff's.
pub fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let s = parts.join("/");
    if p.starts_with('/') {
        format!("/{s}")
    } else {
        s
    }
}

/// Names of the members of a GNU thin archive (`!<thin>\n`).
fn thin_members(bytes: &[u8]) -> Result<Vec<String>, String> {
    let body = bytes
        .strip_prefix(b"!<thin>\n")
        .ok_or("not a thin archive (expected !<thin>)")?;
    let mut off = 0usize;
    let mut long_names: &[u8] = &[];
    let mut out = Vec::new();
    while off + 60 <= body.len() {
        let h = &body[off..off + 60];
        let name = String::from_utf8_lossy(&h[0..16]).trim_end().to_string();
        let size: usize = String::from_utf8_lossy(&h[48..58])
            .trim()
            .parse()
            .map_err(|_| format!("bad member size at offset {off}"))?;
        off += 60;
        match name.as_str() {
            "/" | "/SYM64/" => off += size,
            "//" => {
                long_names = body.get(off..off + size).ok_or("truncated name table")?;
                off += size;
            }
            n => {
                // GNU ar may end the field with '/' after the padding ("/4937    /").
                let n = n.trim_end_matches('/').trim_end();
                let member = if let Some(idx) = n.strip_prefix('/') {
                    let at: usize = idx.parse().map_err(|_| format!("bad long name `{n}`"))?;
                    let rest = long_names.get(at..).ok_or("long name out of range")?;
                    let end = rest
                        .windows(2)
                        .position(|w| w == b"/\n")
                        .ok_or("unterminated long name")?;
                    String::from_utf8_lossy(&rest[..end]).into_owned()
                } else {
                    n.to_string()
                };
                out.push(member);
                // Thin archives store no member data.
            }
        }
        off += off & 1;
    }
    Ok(out)
}

/// Parses one `.cmd` file; `None` when it does not describe a compiled source file.
pub fn parse_cmd(object: &str, text: &str) -> Result<Option<KbuildObject>, String> {
    let mut command = None;
    let mut objtool = None;
    let mut source = None;
    let mut deps = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("cmd_") {
            if let Some((_, c)) = rest.split_once(" := ") {
                command = Some(first_command(c).trim().to_string());
                objtool = later_commands(c)
                    .into_iter()
                    .find(|x| {
                        x.split_whitespace()
                            .next()
                            .is_some_and(|w| w.ends_with("objtool/objtool"))
                    })
                    .map(|x| x.trim().to_string());
            }
        } else if let Some(rest) = line.strip_prefix("source_") {
            if let Some((_, s)) = rest.split_once(" := ") {
                source = Some(normalize(s.trim()));
            }
        } else if line.starts_with("deps_") {
            for dep in lines.by_ref() {
                let cont = dep.ends_with('\\');
                let d = dep.trim_end_matches('\\').trim();
                if !d.is_empty() && !d.starts_with("$(wildcard") {
                    deps.push(normalize(d));
                }
                if !cont {
                    break;
                }
            }
        }
    }
    let (Some(command), Some(source)) = (command, source) else {
        return Ok(None);
    };
    if !(source.ends_with(".c") || source.ends_with(".S")) {
        return Ok(None);
    }
    if !command.contains(" -c ") {
        return Err(format!("the command for {object} is not a compile (`-c`)"));
    }
    Ok(Some(KbuildObject {
        object: normalize(object),
        source,
        command,
        objtool,
        deps,
    }))
}

/// The parts of a shell command line after the first unquoted `;`, split at each `;`.
fn later_commands(c: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = &c[first_command(c).len()..];
    while let Some(r) = rest.strip_prefix(';') {
        let one = first_command(r);
        out.push(one);
        rest = &r[one.len()..];
    }
    out
}

/// The part of a shell command line before the first unquoted `;`.
fn first_command(c: &str) -> &str {
    let (mut single, mut double) = (false, false);
    for (i, ch) in c.char_indices() {
        match ch {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            ';' if !single && !double => return &c[..i],
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cmd_file() {
        let text = "cmd_fs/proc/cmdline.o := gcc -Wp,-MMD,fs/proc/.cmdline.o.d -DX='\"a;b\"' -c -o fs/proc/cmdline.o fs/proc/cmdline.c   ; ./tools/objtool/objtool --uaccess fs/proc/cmdline.o\n\n\
source_fs/proc/cmdline.o := fs/proc/cmdline.c\n\n\
deps_fs/proc/cmdline.o := \\\n  include/linux/compiler-version.h \\\n    $(wildcard include/config/CC_VERSION_TEXT) \\\n  ./include/linux/fs.h \\\n  /usr/lib/gcc/stdarg.h \\\n\n\
fs/proc/cmdline.o: $(deps_fs/proc/cmdline.o)\n";
        let o = parse_cmd("fs/proc/cmdline.o", text).unwrap().unwrap();
        assert_eq!(o.source, "fs/proc/cmdline.c");
        assert!(o.command.ends_with("fs/proc/cmdline.c"));
        assert!(o.command.contains("'\"a;b\"'"));
        assert_eq!(
            o.deps,
            vec![
                "include/linux/compiler-version.h",
                "include/linux/fs.h",
                "/usr/lib/gcc/stdarg.h"
            ]
        );
    }

    #[test]
    fn normalizes() {
        assert_eq!(normalize("./a/./b.h"), "a/b.h");
        assert_eq!(normalize("/usr/x.h"), "/usr/x.h");
    }
}
