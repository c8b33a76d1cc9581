//! Bundles for functions of a module: the module's `.ko` from the kernel's own package
//! (the file the guest loads) tells where each function's fentry site is and what its
//! first bytes look like once loaded.
//!
//! Module code is relocated where the module loader puts it, so `expect` stops before the
//! first relocated field after the site; the engine finds the function in the live
//! module's symbol table at apply time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lucos_patch::{Replacement, ENDBR64, MAX_EXPECT, NOP5};
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SymbolKind};

use crate::error::BuildError;

/// A replacement spec naming a module function: `name [module]`, as `/proc/kallsyms`
/// writes it.
pub fn parse_spec(spec: &str) -> Option<(&str, &str)> {
    let (name, rest) = spec.trim().split_once(" [")?;
    let module = rest.strip_suffix(']')?;
    (!name.is_empty() && !module.is_empty()).then_some((name.trim(), module))
}

/// One module's object file.
pub struct ModuleObject {
    pub name: String,
    pub path: PathBuf,
    data: Vec<u8>,
}

fn bad(path: &Path, reason: impl Into<String>) -> BuildError {
    BuildError::BadSource {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// `<name>.ko` under `dir`, with `-` and `_` alike.
fn find_ko(dir: &Path, name: &str) -> Option<PathBuf> {
    let want = format!("{}.ko", name.replace('-', "_"));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().replace('-', "_") == want {
                return Some(p);
            }
        }
    }
    None
}

impl ModuleObject {
    /// The module `name` among the kernel's modules in `modules_dir`.
    pub fn find(modules_dir: &Path, name: &str) -> Result<Self, BuildError> {
        let path = find_ko(modules_dir, name).ok_or_else(|| {
            bad(
                modules_dir,
                format!("the kernel has no module `{name}` (no {name}.ko under it)"),
            )
        })?;
        let data = std::fs::read(&path).map_err(|source| BuildError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        object::File::parse(&*data).map_err(|source| BuildError::BadModule {
            path: path.clone(),
            what: "not a readable ELF file".into(),
            source,
        })?;
        Ok(ModuleObject {
            name: name.to_string(),
            path,
            data,
        })
    }

    fn file(&self) -> object::File<'_> {
        object::File::parse(&*self.data).expect("parsed in find")
    }

    /// Every symbol the module defines (its statics included): a bundle for it may use them.
    pub fn defined(&self) -> BTreeSet<String> {
        self.file()
            .symbols()
            .filter(|s| s.is_definition())
            .filter_map(|s| s.name().ok().map(str::to_string))
            .collect()
    }

    /// The manifest replacement redirecting function `old` of this module to `new`.
    pub fn replacement(&self, old: &str, new: &str) -> Result<Replacement, BuildError> {
        let f = self.file();
        let spec = format!("{old} [{}]", self.name);
        let sym = f
            .symbols()
            .find(|s| s.kind() == SymbolKind::Text && s.name() == Ok(old) && s.size() > 0)
            .ok_or_else(|| {
                bad(
                    &self.path,
                    format!("module {} has no function `{old}`", self.name),
                )
            })?;
        let sec = sym
            .section_index()
            .and_then(|i| f.section_by_index(i).ok())
            .ok_or_else(|| bad(&self.path, format!("`{old}` has no section")))?;
        if sec
            .name()
            .is_ok_and(|n| n.starts_with(".init") || n.starts_with(".exit"))
        {
            return Err(BuildError::InitCode {
                spec,
                section: sec.name().unwrap_or_default().to_string(),
            });
        }
        let data = sec.data().map_err(|source| BuildError::BadModule {
            path: self.path.clone(),
            what: format!("section {} of `{old}`", sec.name().unwrap_or("?")),
            source,
        })?;
        let (start, size) = (sym.address(), sym.size());
        let code = data
            .get(start as usize..(start + size) as usize)
            .ok_or_else(|| bad(&self.path, format!("`{old}` lies outside its section")))?;
        // Relocated fields inside the function, as offsets from its start.
        let mut fields: Vec<(u64, bool)> = sec
            .relocations()
            .filter(|(o, _)| (start..start + size).contains(o))
            .map(|(o, r)| {
                let fentry = match r.target() {
                    RelocationTarget::Symbol(i) => f
                        .symbol_by_index(i)
                        .is_ok_and(|s| s.name() == Ok("__fentry__")),
                    _ => false,
                };
                (o - start, fentry)
            })
            .collect();
        fields.sort();
        let site = if code.starts_with(&ENDBR64) { 4 } else { 0 };
        let calls_fentry = code.get(site) == Some(&0xe8)
            && fields
                .iter()
                .any(|&(o, fentry)| fentry && o == site as u64 + 1);
        if !calls_fentry {
            return Err(BuildError::NoFentrySite { spec });
        }
        let cut = fields
            .iter()
            .map(|&(o, _)| o as usize)
            .find(|&o| o >= site + NOP5.len())
            .unwrap_or(code.len());
        let mut expect = code[..cut.min(MAX_EXPECT).min(code.len())].to_vec();
        expect[site..site + NOP5.len()].copy_from_slice(&NOP5);
        Ok(Replacement {
            old: old.to_string(),
            old_file: None,
            module: Some(self.name.clone()),
            new: new.to_string(),
            site_offset: site as u32,
            no_fentry: false,
            expect,
            expect_abs: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ko_that_is_not_elf_keeps_the_readers_error() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("kernel/fs");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("binfmt_misc.ko"), b"not an object").unwrap();
        let e = ModuleObject::find(dir.path(), "binfmt-misc").err().unwrap();
        let BuildError::BadModule { path, .. } = &e else {
            panic!("expected BadModule, got {e:?}");
        };
        assert!(path.ends_with("kernel/fs/binfmt_misc.ko"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "{e}");
    }

    #[test]
    fn specs_name_module_functions_as_kallsyms_does() {
        assert_eq!(
            parse_spec("bm_status_read [binfmt_misc]"),
            Some(("bm_status_read", "binfmt_misc"))
        );
        assert_eq!(parse_spec("fs/proc/cmdline.c:cmdline_proc_show"), None);
        assert_eq!(parse_spec("x []"), None);
        assert_eq!(parse_spec(" [m]"), None);
    }
}
