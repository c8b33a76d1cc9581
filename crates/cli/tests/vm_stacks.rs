//! Stacks from outside: lucos's ORC unwind of a sleeping task, read with the guest paused,
//! matches what the guest's own unwinder prints in /proc/<pid>/stack.

mod common;

use common::*;

/// Link-time addresses of /proc/<pid>/stack lines (`[<0>] pipe_read+0x3a/0x4a0`), from
/// the guest's symbol and offset (kallsyms may name a label inside a function).
fn proc_addrs(stack: &str) -> Vec<u64> {
    stack
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, f)| f.trim()))
        .map(|f| {
            let (name, rest) = f.split_once('+').expect("symbol+offset");
            let off = rest.split('/').next().unwrap().trim_start_matches("0x");
            symbols().lookup(name).expect("a vmlinux symbol").addr
                + u64::from_str_radix(off, 16).unwrap()
        })
        .collect()
}

#[test]
fn a_sleeping_readers_stack_matches_proc_stack() {
    let mut s = shared();
    s.sh("rm -f /tmp/lucos-fifo && mkfifo /tmp/lucos-fifo && exec 3<>/tmp/lucos-fifo");
    let pid: i32 = s
        .sh("cat /tmp/lucos-fifo > /dev/null & echo $!")
        .trim()
        .parse()
        .unwrap();
    let mut proc_stack = String::new();
    for _ in 0..300 {
        proc_stack = s.sh(&format!("cat /proc/{pid}/stack"));
        if proc_stack.contains("pipe_read") {
            break;
        }
    }
    let scan = lucos::stacks::scan(&mut s.a).unwrap();
    let reports = lucos::stacks::reports(&s.a, &scan, None);
    s.sh(&format!("kill {pid}; wait {pid}; exec 3>&-; true"));
    let me = reports
        .iter()
        .find(|t| t.pid == pid)
        .expect("the reader among the tasks");
    let ours: Vec<u64> = me
        .frames
        .iter()
        .filter(|f| !f.sched)
        .map(|f| {
            s.a.layout
                .link(u64::from_str_radix(&f.addr[2..], 16).unwrap())
        })
        .collect();
    assert_eq!(ours, proc_addrs(&proc_stack), "{proc_stack}\n{me:#?}");
    assert!(me.reliable && me.user, "{me:#?}");
    assert!(me.frames.iter().any(|f| f.symbol.starts_with("pipe_read+")));
    // Every task was found and unwound; kernel threads and sleepers are reliable.
    assert!(reports.iter().any(|t| t.pid == 1));
    assert!(reports.iter().any(|t| t.pid == 0), "the idle tasks");
    let bad: Vec<_> = reports
        .iter()
        .filter(|t| t.vcpu.is_none() && !t.reliable)
        .map(|t| (t.pid, t.comm.clone(), t.unreliable_reason.clone()))
        .collect();
    assert!(bad.is_empty(), "unreliable sleeping tasks: {bad:?}");
}

/// Starts a reader asleep in pipe_read; returns its pid and /proc/<pid>/stack.
fn sleeping_reader(s: &Shared) -> (i32, String) {
    s.sh("rm -f /tmp/lucos-fifo && mkfifo /tmp/lucos-fifo && exec 3<>/tmp/lucos-fifo");
    let pid: i32 = s
        .sh("cat /tmp/lucos-fifo > /dev/null & echo $!")
        .trim()
        .parse()
        .unwrap();
    let mut stack = String::new();
    for _ in 0..300 {
        stack = s.sh(&format!("cat /proc/{pid}/stack"));
        if stack.contains("pipe_read") {
            break;
        }
    }
    (pid, stack)
}

#[test]
fn a_reader_asleep_in_new_code_unwinds_through_the_bundles_orc() {
    let mut s = shared();
    let b = diff_bundle("13-pipe-read-sleeper.patch");
    let r = lucos::patchcmd::apply_bundle(&mut s.a, &b).unwrap();
    let name = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap()
        .find_applied(&r.id)
        .and_then(|rec| rec.module.clone())
        .expect("the bundle is a module")
        .name;
    let (pid, proc_stack) = sleeping_reader(&s);
    let scan = lucos::stacks::scan(&mut s.a);
    s.sh(&format!("kill {pid}; wait {pid}; exec 3>&-; true"));
    lucos::patchcmd::revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    let scan = scan.unwrap();
    let reports = lucos::stacks::reports(&s.a, &scan, Some(pid));
    let me = &reports[0];
    assert!(proc_stack.contains(&format!("[{name}]")), "{proc_stack}");
    let new = me
        .frames
        .iter()
        .position(|f| f.symbol.starts_with("pipe_read+"))
        .unwrap_or_else(|| panic!("{me:#?}"));
    assert_eq!(me.frames[new].module.as_deref(), Some(name.as_str()));
    // Its callers were found through the bundle's own ORC entries.
    let callers: Vec<&str> = me.frames[new + 1..]
        .iter()
        .map(|f| f.symbol.as_str())
        .collect();
    assert!(callers[0].starts_with("vfs_read+"), "{me:#?}");
    assert!(me.reliable && me.user, "{me:#?}");
}
