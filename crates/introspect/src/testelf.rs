//! Test support: builds small ELF executables with the system gcc, linked
//! like vmlinux (`--emit-relocs`, `--build-id`, static, not PIE).

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles `sources` (relative path, contents; `.c` or `.S`) in a temp dir
/// and links them, at `text_segment` if given. Returns the ELF bytes.
pub fn build(sources: &[(&str, &str)], text_segment: Option<u64>) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut objects = Vec::new();
    for (i, (name, text)) in sources.iter().enumerate() {
        let src = dir.path().join(name);
        std::fs::create_dir_all(src.parent().expect("parent")).expect("mkdir");
        std::fs::write(&src, text).expect("write source");
        let obj = format!("o{i}.o");
        run(Command::new("gcc")
            .current_dir(dir.path())
            .args([
                "-O1",
                "-fno-pic",
                "-fno-inline",
                "-fno-asynchronous-unwind-tables",
            ])
            .args(["-c", name, "-o", &obj]));
        objects.push(obj);
    }
    let mut link = Command::new("gcc");
    link.current_dir(dir.path())
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--emit-relocs"])
        .args(["-Wl,--build-id=sha1", "-Wl,-e,0", "-o", "out"])
        .args(&objects);
    if let Some(addr) = text_segment {
        link.arg(format!("-Wl,-Ttext-segment={addr:#x}"));
    }
    run(&mut link);
    std::fs::read(dir.path().join("out")).expect("read output")
}

/// Writes `bytes` to `dir/name` and returns the path (for `load` tests).
pub fn write_to(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write elf");
    p
}
