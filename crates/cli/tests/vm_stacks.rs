//! Stacks from outside: lucos's ORC unwind of a sleeping task, read with the guest paused,
//! matches what the guest's own unwinder prints in /proc/<pid>/stack.

mod common;

use std::time::Duration;

use common::*;
use lucos_patch::completion::{Completion, Phase};
use lucos_patch::{EngineError, Retry};

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

/// Starts `cmd` (a reader of the fifo, kept open on fd 3) in the background; its pid once
/// it sleeps in pipe_read.
fn reader_in_pipe_read(s: &Shared, cmd: &str) -> i32 {
    s.sh("[ -p /tmp/lucos-fifo ] || mkfifo /tmp/lucos-fifo; exec 3<>/tmp/lucos-fifo");
    let pid: i32 = s.sh(&format!("{cmd} & echo $!")).trim().parse().unwrap();
    for _ in 0..300 {
        if s.sh(&format!("cat /proc/{pid}/stack"))
            .contains("pipe_read")
        {
            return pid;
        }
    }
    panic!("`{cmd}` never slept in pipe_read");
}

fn completion_of(s: &mut Shared, id: &str) -> Completion {
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    let all = lucos::complete::completion(&mut s.a, &reg).unwrap();
    all.into_iter()
        .rev()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no completion for {id}"))
}

/// Scans, as `lucos wait` does, until `id` is complete.
fn until_complete(s: &mut Shared, id: &str) {
    let mut last = None;
    for _ in 0..200 {
        let c = completion_of(s, id);
        if c.complete {
            return;
        }
        last = Some(c);
    }
    panic!("never complete: {last:#?}");
}

fn held_by(c: &Completion, pid: i32) -> bool {
    c.holders
        .iter()
        .any(|h| h.pid == pid && h.addr.is_some() && h.what.contains("pipe_read"))
        || c.holders
            .iter()
            .any(|h| h.pid == pid && h.what.contains("patch code"))
}

fn last_record(s: &mut Shared, id: &str) -> lucos_patch::registry::BundleRecord {
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    reg.bundles
        .iter()
        .rev()
        .find(|b| b.id == id)
        .unwrap()
        .clone()
}

fn free_list(s: &mut Shared) -> Vec<(u64, u64)> {
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    reg.free
}

fn in_free(free: &[(u64, u64)], r: &lucos_patch::registry::RangeRecord) -> bool {
    free.iter()
        .any(|&(o, l)| r.offset >= o && r.offset + r.len <= o + l)
}

/// Issue 10, parts 3-5: completion, reclaim and consistent mode, with a reader asleep in
/// the `pipe_read` that the bundle replaces.
#[test]
fn sleepers_hold_updates_back_and_reclaimed_memory_is_reused() {
    let mut s = shared();
    let b = diff_bundle("13-pipe-read-sleeper.patch");
    let id = b.manifest().id.clone();
    let retry = |tries| Retry {
        tries,
        backoff: Duration::from_millis(10),
    };

    // A reader asleep in the old pipe_read: a consistent apply gives up, changing nothing.
    let pid = reader_in_pipe_read(&s, "cat /tmp/lucos-fifo > /dev/null");
    let err =
        lucos::patchcmd::apply_checked(&mut s.a, &b, retry(3), lucos::complete::Guard::Consistent)
            .unwrap_err();
    match err.downcast_ref::<EngineError>() {
        Some(EngineError::NotQuiescent { tries, holders, .. }) => {
            assert_eq!(*tries, 3);
            assert!(holders.starts_with(&format!("{pid} ")), "{holders}");
        }
        _ => panic!("{err:#}"),
    }
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    assert_eq!(reg.applied().count(), 0, "{reg:#?}");

    // Applied anyway: not complete while the reader sleeps in the old code.
    lucos::patchcmd::apply_bundle(&mut s.a, &b).unwrap();
    let c = completion_of(&mut s, &id);
    assert!(
        !c.complete && c.phase == Phase::Apply && held_by(&c, pid),
        "{c:#?}"
    );
    // It wakes, and its next read sleeps in the new pipe_read: complete.
    s.sh("echo x >&3");
    until_complete(&mut s, &id);

    // Reverted while it sleeps in the new code: the revert is not complete, the memory kept.
    lucos::patchcmd::revert_bundle(&mut s.a, &id).unwrap();
    let c = completion_of(&mut s, &id);
    assert!(
        !c.complete && c.phase == Phase::Revert && held_by(&c, pid),
        "{c:#?}"
    );
    let out = lucos::complete::reclaim_bundles(&mut s.a, std::slice::from_ref(&id)).unwrap();
    // (An earlier test's record of the same bundle may be reclaimed meanwhile: the newest
    // record, this one, is the last.)
    let last = out.last().unwrap();
    assert!(
        last.freed.is_none() && last.holders.iter().any(|h| h.pid == pid),
        "{out:#?}"
    );
    s.sh("echo x >&3");
    until_complete(&mut s, &id);
    s.sh(&format!("kill {pid}; wait {pid}; true"));
    let old = last_record(&mut s, &id);
    let out = lucos::complete::reclaim_bundles(&mut s.a, std::slice::from_ref(&id)).unwrap();
    let size: u64 = old.ranges.iter().map(|r| r.len).sum();
    assert_eq!(out.last().unwrap().freed, Some(size), "{out:#?}");
    assert!(last_record(&mut s, &id).reclaimed);
    assert!(lucos::complete::reclaim_bundles(&mut s.a, std::slice::from_ref(&id)).is_err());

    // A later apply reuses the pages, and its code is what runs there, under load.
    s.sh("sysloop --forever >/dev/null & sysloop --forever >/dev/null & true");
    let cmd = diff_bundle("01-cmdline-prefix.patch");
    let free = free_list(&mut s);
    assert!(
        old.ranges.iter().all(|r| in_free(&free, r)),
        "{free:?} {old:#?}"
    );
    let r = lucos::patchcmd::apply_bundle(&mut s.a, &cmd).unwrap();
    assert!(
        r.ranges.iter().all(|r| in_free(&free, r)),
        "{free:?} {r:#?}"
    );
    assert!(s.sh("cat /proc/cmdline").starts_with("lucos-patched "));
    assert_eq!(
        s.sh("dd if=/dev/zero bs=4096 count=256 2>/dev/null | wc -c")
            .trim(),
        "1048576"
    );
    lucos::patchcmd::revert_bundle(&mut s.a, &cmd.manifest().id).unwrap();
    until_complete(&mut s, &cmd.manifest().id);
    // Under load a running task's stack may be unreliable at one scan (conservatively
    // "not known clean"): reclaim again until it goes through.
    let mut out = Vec::new();
    for _ in 0..50 {
        out.extend(lucos::complete::reclaim_bundles(&mut s.a, &[]).unwrap());
        if last_record(&mut s, &cmd.manifest().id).reclaimed {
            break;
        }
    }
    assert!(
        last_record(&mut s, &cmd.manifest().id).reclaimed,
        "{out:#?}"
    );

    // Consistent mode waits for a reader in pipe_read and switches once it has left (it
    // reads one byte, written 3 s later by the guest, then sleeps elsewhere). Jobs are
    // ended by `kill; wait` in one command: busybox's interactive shell exits when a
    // background job ends while it idles at the prompt.
    let free = free_list(&mut s);
    let bg = |s: &Shared, cmd: &str| -> i32 {
        s.sh(&format!("sh -c '{cmd}; exec sleep 1000' & echo $!"))
            .trim()
            .parse()
            .unwrap()
    };
    let reader = bg(&s, "head -c 1 /tmp/lucos-fifo >/dev/null");
    let mut head = 0;
    for _ in 0..300 {
        if let Ok(p) = s.sh("pidof head || true").trim().parse::<i32>() {
            if s.sh(&format!("cat /proc/{p}/stack")).contains("pipe_read") {
                head = p;
                break;
            }
        }
    }
    assert!(head > 0, "head never slept in pipe_read");
    let writer = bg(&s, "sleep 3; echo y > /tmp/lucos-fifo");
    let (r, c) = lucos::patchcmd::apply_checked(
        &mut s.a,
        &b,
        retry(400),
        lucos::complete::Guard::Consistent,
    )
    .unwrap();
    assert!(
        c.tries > 1,
        "the reader was in pipe_read at the first try: {c:?}"
    );
    assert!(
        s.sh(&format!("[ -e /proc/{head} ] && echo in || echo out"))
            .contains("out"),
        "switched while the reader was in the old pipe_read"
    );
    s.sh(&format!(
        "kill {reader} {writer}; wait {reader} {writer}; true"
    ));
    assert!(
        r.ranges.iter().all(|r| in_free(&free, r)),
        "reused again: {free:?} {r:#?}"
    );
    assert!(completion_of(&mut s, &id).complete);
    assert_eq!(
        s.sh("dd if=/dev/zero bs=4096 count=256 2>/dev/null | wc -c")
            .trim(),
        "1048576"
    );
    s.sh("for p in $(pidof sysloop); do kill $p; wait $p; done; exec 3>&-; true");
    eprintln!("consistent apply: {c:?}, switch pause {:?}", r.pause);
}
