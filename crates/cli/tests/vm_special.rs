//! New code that the running kernel treats as its own: a bundle's exception fixups, WARN
//! records, ORC unwind data and symbols reach the kernel through the bundle's `struct
//! module`, and the guest reacts to faults, warnings and backtraces in new code as it does
//! for built-in code. Each test makes the new code take its special path in the guest,
//! checks the guest's reaction, reverts, and checks from outside that the kernel's module
//! bookkeeping is exactly as before.

mod common;

use common::*;
use lucos::patchcmd::{apply_bundle, revert_bundle};
use lucos_patch::kmod;

/// The kernel words bundles are linked through, read from outside.
fn kernel_words(s: &mut Shared) -> Vec<(&'static str, u64)> {
    use lucos_introspect::Machine;
    let a = &mut s.a;
    a.vm.pause().unwrap();
    let k = kmod::probe(&a.vm, &a.syms, &a.layout).unwrap();
    let words = kmod::kernel_words(&a.vm, a.layout.cr3, &k);
    a.vm.resume().unwrap();
    words.unwrap()
}

/// Applies `b`, runs `during` with the guest, reverts, and checks the kernel's module
/// bookkeeping and the guest's module list are as before.
fn with_bundle<T>(
    s: &mut Shared,
    b: &lucos_patch::Bundle,
    during: impl FnOnce(&Shared, &str) -> T,
) -> T {
    let before = kernel_words(s);
    let mods_before = s.sh("cat /proc/modules");
    let r = apply_bundle(&mut s.a, b).unwrap();
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    let name = reg
        .find_applied(&r.id)
        .and_then(|rec| rec.module.clone())
        .expect("the bundle is a module")
        .name;
    let lsmod = s.sh("cat /proc/modules");
    assert!(lsmod.contains(&format!("{name} ")), "{lsmod}");
    assert_ne!(kernel_words(s), before);
    let out = during(s, &name);
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    assert_eq!(
        kernel_words(s),
        before,
        "revert left the module bookkeeping changed"
    );
    assert_eq!(s.sh("cat /proc/modules"), mods_before);
    out
}

/// No oops, BUG or unexpected warning since `mark` was printed to the kernel log.
fn dmesg_since(s: &Shared, mark: &str) -> String {
    let all = s.sh("dmesg");
    let at = all
        .rfind(mark)
        .unwrap_or_else(|| panic!("no {mark} in dmesg"));
    all[at..].to_string()
}

fn mark(s: &Shared, tag: &str) -> String {
    let m = format!("lucos-test-mark-{tag}-{}", std::process::id());
    s.sh(&format!("echo {m} > /dev/kmsg"));
    m
}

fn assert_no_oops(log: &str) {
    for bad in ["Oops", "BUG:", "general protection", "Call Trace"] {
        assert!(!log.contains(bad), "the guest reported {bad}:\n{log}");
    }
}

/// Line (in the patched file) of the first added line containing `needle`.
fn added_line(patch: &str, needle: &str) -> u32 {
    let text =
        std::fs::read_to_string(lucos::guest::guest_dir().join("patches").join(patch)).unwrap();
    let mut line = 0;
    for l in text.lines() {
        if let Some(h) = l.strip_prefix("@@ ") {
            let plus = h.split_whitespace().nth(1).unwrap();
            line = plus
                .trim_start_matches('+')
                .split(',')
                .next()
                .unwrap()
                .parse::<u32>()
                .unwrap();
            continue;
        }
        if l.starts_with("---") || l.starts_with("+++") || line == 0 {
            continue;
        }
        if l.starts_with('+') && l.contains(needle) {
            return line;
        }
        if !l.starts_with('-') {
            line += 1;
        }
    }
    panic!("{needle} not added by {patch}")
}

#[test]
fn a_fault_in_a_kbuild_bundle_takes_its_fixup() {
    let mut s = shared();
    let b = bundle("nofault");
    let m = mark(&s, "nofault");
    let out = with_bundle(&mut s, &b, |s, _| s.sh("cat /proc/cmdline"));
    assert!(out.starts_with("lucos-nofault fixed-up "), "{out}");
    assert_no_oops(&dmesg_since(&s, &m));
}

#[test]
fn a_user_write_fault_in_new_code_returns_efault() {
    let mut s = shared();
    let b = diff_bundle("11-getdents-user-fault.patch");
    let m = mark(&s, "getdents");
    let (ls, fault) = with_bundle(&mut s, &b, |s, _| {
        // Ordinary buffers still work through the new filldir64 (user access with
        // STAC/CLAC alternatives applied for this CPU) ...
        let ls = s.sh("ls /proc/self/ | sort | head -3");
        // ... and a fault in it is fixed up through its exception table.
        (ls, s.sh("ufault getdents /"))
    });
    assert!(ls.contains("attr"), "{ls}");
    assert_eq!(fault.trim(), "ufault getdents ret=-1 errno=14");
    let log = dmesg_since(&s, &m);
    assert!(
        log.contains("lucos-sample: getdents64 into a bad buffer"),
        "{log}"
    );
    assert_no_oops(&log);
}

#[test]
fn a_warning_in_new_code_names_its_file_line_and_module_and_unwinds() {
    let mut s = shared();
    let patch = "12-warn-in-new-code.patch";
    let b = diff_bundle(patch);
    let line = added_line(patch, "WARN_ON_ONCE");
    let m = mark(&s, "warn");
    let (name, up) = with_bundle(&mut s, &b, |s, name| {
        (name.to_string(), s.sh("cat /proc/uptime; cat /proc/uptime"))
    });
    // The guest went on: both reads printed an uptime.
    assert_eq!(up.lines().count(), 2, "{up}");
    let log = dmesg_since(&s, &m);
    let want = format!("at fs/proc/uptime.c:{line} uptime_proc_show+0x");
    assert!(
        log.contains("WARNING: CPU:") && log.contains(&want),
        "no `{want}` in:\n{log}"
    );
    assert_eq!(
        log.matches("WARNING:").count(),
        1,
        "WARN_ON_ONCE fired twice:\n{log}"
    );
    assert!(log.contains(&format!("[{name}]")), "{log}");
    // `RIP: ...uptime_proc_show+0xOFF/0xSIZE`: the bundle's only function has its own
    // size, not the distance to the end of its text page (0x1000).
    let (off, size) = offset_and_size(&log, "uptime_proc_show+0x");
    assert!(off < size && size < 0x1000, "{off:#x}/{size:#x} in:\n{log}");
    // The unwinder went through the new code, with its ORC data, into its callers.
    let trace = &log[log.find("Call Trace:").expect("a call trace")..];
    // (busybox cat reads with sendfile(2).)
    for caller in ["seq_read_iter", "do_syscall_64", "entry_SYSCALL_64"] {
        assert!(trace.contains(caller), "{caller} missing from:\n{trace}");
    }
}

/// `(OFF, SIZE)` of the first `<prefix>OFF/0xSIZE` in `log`.
fn offset_and_size(log: &str, prefix: &str) -> (u64, u64) {
    let at = log.find(prefix).expect("a symbolised address") + prefix.len();
    let word: String = log[at..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '/' || *c == 'x')
        .collect();
    let (off, size) = word.split_once("/0x").expect("OFF/0xSIZE");
    let hex = |s: &str| u64::from_str_radix(s, 16).expect("hex");
    (hex(off), hex(size))
}

#[test]
fn a_task_asleep_in_new_code_has_a_complete_stack() {
    let mut s = shared();
    let b = diff_bundle("13-pipe-read-sleeper.patch");
    let stack = with_bundle(&mut s, &b, |s, name| {
        // The shell keeps the fifo open for writing, so the reader blocks in read(2).
        s.sh("rm -f /tmp/lucos-fifo && mkfifo /tmp/lucos-fifo && exec 3<>/tmp/lucos-fifo");
        let pid = s
            .sh("cat /tmp/lucos-fifo > /dev/null & echo $!")
            .trim()
            .to_string();
        // Wait (bounded) until the reader is asleep in pipe_read.
        let mut stack = String::new();
        for _ in 0..300 {
            stack = s.sh(&format!("cat /proc/{pid}/stack"));
            if stack.contains("pipe_read") {
                break;
            }
        }
        s.sh(&format!("kill {pid}; wait {pid}; exec 3>&-; true"));
        assert!(stack.contains(&format!("[{name}]")), "{stack}");
        stack
    });
    let at = stack.find("pipe_read").expect("pipe_read on the stack");
    for caller in ["vfs_read", "ksys_read", "do_syscall_64"] {
        assert!(
            stack[at..].contains(caller),
            "{caller} missing below pipe_read:\n{stack}"
        );
    }
}

#[test]
fn a_static_branch_in_new_code_starts_live_and_follows_its_key() {
    let mut s = shared();
    let b = diff_bundle("14-static-key-follows-sysctl.patch");
    let stats = |s: &Shared| {
        let out = s.sh("cat /proc/self/sched");
        (
            out.lines().next().unwrap_or("").ends_with(" lucos"),
            out.contains("wait_start"),
        )
    };
    // The key is on before the apply: the new code's site (compiled off) must start on.
    s.sh("echo 1 > /proc/sys/kernel/sched_schedstats");
    let seen = with_bundle(&mut s, &b, |s, _| {
        let on = stats(s);
        s.sh("echo 0 > /proc/sys/kernel/sched_schedstats");
        let off = stats(s);
        s.sh("echo 1 > /proc/sys/kernel/sched_schedstats");
        let on_again = stats(s);
        s.sh("echo 0 > /proc/sys/kernel/sched_schedstats");
        (on, off, on_again)
    });
    assert_eq!(seen, ((true, true), (true, false), (true, true)));
    // After the revert the key still works for the kernel's own sites.
    s.sh("echo 1 > /proc/sys/kernel/sched_schedstats");
    assert!(s.sh("cat /proc/self/sched").contains("wait_start"));
    s.sh("echo 0 > /proc/sys/kernel/sched_schedstats");
    let log = s.sh("dmesg");
    assert_no_oops(&log);
}

/// A return of the live code at `va`: `Ok(bytes)` for `ret; int3...`, `Err(target)` for
/// a `jmp`, read from outside.
fn live_return(s: &Shared, va: u64) -> Result<[u8; 5], u64> {
    let mut b = [0u8; 5];
    lucos_introspect::paging::read_virt(
        &s.a.vm,
        s.a.layout.cr3,
        lucos_introspect::GuestVirtAddr(va),
        &mut b,
    )
    .unwrap();
    match lucos_patch::jmp_target(va, &b) {
        Some(target) => Err(target),
        None => Ok(b),
    }
}

#[test]
fn new_codes_returns_read_like_the_kernels_own() {
    let mut s = shared();
    // The kernel's own first return site, as apply_returns() left it at boot. (Under the
    // ITS return thunk the form depends on the address; the TCG CPU has no ITS.)
    let syms = &s.a.syms;
    let table = syms
        .lookup("__return_sites")
        .expect("vmlinux has .return_sites");
    let rel = i32::from_le_bytes(
        syms.section_bytes(table.addr, 4)
            .unwrap()
            .try_into()
            .unwrap(),
    );
    let kernel_site = table.addr.wrapping_add(rel as i64 as u64);
    assert_eq!(
        syms.section_bytes(kernel_site, 1).unwrap()[0],
        0xe9,
        "vmlinux: jmp thunk"
    );
    let kernel = live_return(&s, s.a.layout.live(kernel_site));
    let thunk =
        s.a.layout
            .live(syms.lookup("__x86_return_thunk").unwrap().addr);

    let b = bundle("uname");
    let plan = lucos_patch::plan(&b).unwrap();
    let sites = lucos_patch::return_sites(&b, &plan);
    assert!(!sites.is_empty(), "the uname bundle has returns");
    let r = apply_bundle(&mut s.a, &b).unwrap();
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    let rec = reg.find_applied(&r.id).unwrap();
    let text = rec
        .ranges
        .iter()
        .find(|r| r.kind == lucos_patch::RegionKind::Text)
        .unwrap()
        .va;
    let new: Vec<_> = sites
        .iter()
        .map(|off| live_return(&s, text + off))
        .collect();
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    for (off, got) in sites.iter().zip(new) {
        assert_eq!(
            got, kernel,
            "return at text+{off:#x} (kernel's own: {kernel:x?})"
        );
        assert_ne!(
            got,
            Err(thunk),
            "text+{off:#x} still jumps to __x86_return_thunk"
        );
    }
}

/// A new `pr_debug()` call site: the bundle's own descriptor is not registered with
/// dynamic debug, so the site stays off, even when the user turns on every site of its
/// file, and the control file does not list it. Its static key lives in the bundle's
/// module and is linked the way the kernel links a module's own keys; the revert leaves
/// the kernel's bookkeeping exactly as before.
#[test]
fn a_new_debug_call_site_stays_off_and_unlisted() {
    let mut s = shared();
    let b = diff_bundle("19-new-debug-call-site.patch");
    let listed = |s: &Shared| s.sh("grep -c 'lucos: loadavg' /proc/dynamic_debug/control || true");
    assert_eq!(listed(&s).trim(), "0");
    let mark = mark(&s, "debug-site");
    let before = kernel_words(&mut s);
    let r = apply_bundle(&mut s.a, &b).unwrap();
    let reg = lucos::patchcmd::session(&mut s.a)
        .unwrap()
        .registry()
        .unwrap();
    let module = reg.find_applied(&r.id).and_then(|rec| rec.module.clone());
    let module = module.expect("the bundle is a module");
    // As jump_label_add_module() leaves a module's own key: pointing at its entries.
    let own: Vec<_> = module
        .jump_keys
        .iter()
        .filter(|k| k.key >= module.base && k.key < module.base + module.size)
        .collect();
    assert_eq!(own.len(), 1, "{:?}", module.jump_keys);
    let layout = kmod::probe(&s.a.vm, &s.a.syms, &s.a.layout).unwrap().layout;
    let type_at = own[0].key + layout.key_type;
    let mut word = [0u8; 8];
    lucos_introspect::paging::read_virt(
        &s.a.vm,
        s.a.layout.cr3,
        lucos_introspect::GuestVirtAddr(type_at),
        &mut word,
    )
    .unwrap();
    assert_eq!(u64::from_le_bytes(word), own[0].entries);
    s.sh("echo 'file fs/proc/loadavg.c +p' > /proc/dynamic_debug/control || true");
    let (loadavg, control) = (s.sh("cat /proc/loadavg"), listed(&s));
    revert_bundle(&mut s.a, &b.manifest().id).unwrap();
    assert_eq!(
        kernel_words(&mut s),
        before,
        "revert left the bookkeeping changed"
    );
    assert!(loadavg.trim_end().ends_with(" lucos"), "{loadavg}");
    assert_eq!(control.trim(), "0", "the new site is listed");
    let log = dmesg_since(&s, &mark);
    assert!(
        !log.contains("lucos: loadavg read"),
        "the new site printed:\n{log}"
    );
    assert_no_oops(&log);
    assert!(!s.sh("cat /proc/loadavg").contains("lucos"));
}
