//! Shared helpers for the tests that need the cached guest kernel build.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cached guest kernel directory. Without it the test is skipped on a
/// developer machine, but fails under CI (`CI` set), where scripts/test.sh
/// builds the guest first: a missing tree there is a bug, not a skip.
pub fn tree() -> Option<PathBuf> {
    let out = Command::new("bash")
        .arg(repo().join("guest/debian.sh"))
        .arg("--print-dir")
        .output()
        .expect("run guest/debian.sh --print-dir");
    assert!(out.status.success(), "guest/debian.sh --print-dir failed");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if dir.join("done").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no cached guest kernel at {} under CI",
        dir.display()
    );
    eprintln!(
        "SKIPPED: no cached guest kernel at {} (fetch it with guest/debian.sh)",
        dir.display()
    );
    None
}
