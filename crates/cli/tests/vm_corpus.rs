//! `lucos corpus` end to end on one real unit of the 6.1.187 → 6.1.190 Debian update:
//! both source packages fetched and diffed, the unit built from the real diff, applied to
//! a booted Debian guest, smoke-tested, reverted; then a second run resumes from the
//! state file and repeats nothing.

use std::process::Command;

fn corpus(dir: &std::path::Path, extra: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_lucos"))
        .args(["corpus", "--to", "6.1.190-1", "--json", "--dir"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("running lucos corpus");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lucos corpus failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find("\n{").expect("a JSON summary") + 1;
    let json_end = stdout.rfind("\n}").expect("end of the JSON summary") + 2;
    let v = serde_json::from_str(&stdout[json_start..json_end]).expect("JSON summary");
    (stdout, v)
}

#[test]
fn a_real_stable_fix_is_built_applied_smoke_tested_and_reverted() {
    let dir = tempfile::tempdir().unwrap();
    // block/blk-cgroup.c: three functions change in this update, with no header needed.
    let (log, sum) = corpus(dir.path(), &["--only", "block/blk-cgroup.c"]);
    assert_eq!(sum["changed_files"], 1880, "{log}");
    assert!(sum["c_files_in_kernel"].as_u64().unwrap() > 100, "{sum}");
    let outcomes = sum["outcomes"].as_object().unwrap();
    assert_eq!(
        outcomes["applied, smoke passed, reverted"]["units"], 1,
        "{log}"
    );
    assert_eq!(outcomes.len(), 1, "only the selected unit ran: {log}");
    let functions = sum["functions"].as_u64().unwrap();
    assert!(functions >= 3, "{sum}");
    assert_eq!(sum["covered"].as_u64().unwrap(), functions, "{sum}");
    assert!(log.contains("live 1/1") && log.contains("passed"), "{log}");

    // Resumed: the same state, nothing built or applied again.
    let (log2, sum2) = corpus(dir.path(), &["--only", "block/blk-cgroup.c"]);
    assert!(log2.contains("resuming"), "{log2}");
    assert!(!log2.contains("build 1/") && !log2.contains("live 1/"), "{log2}");
    assert_eq!(sum2["covered"], sum["covered"]);
}
