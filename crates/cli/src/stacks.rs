//! `lucos stacks`: every guest task's kernel backtrace, unwound from outside with the
//! kernel's ORC data (like sysrq-t, with no help from the guest).

use anyhow::{Context, Result};
use clap::Args;
use lucos_introspect::stacks::{Scan, Scanner};
use serde::Serialize;

use crate::info::{attach, with_pause, Attached};
use crate::show::{esc, json};

#[derive(Debug, Args)]
pub struct StacksArgs {
    pub vm: String,
    /// Only this pid.
    #[arg(long)]
    pub pid: Option<i32>,
    #[arg(long)]
    pub json: bool,
}

/// One frame, symbolized.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    pub addr: String,
    /// `function+0xoff/0xsize`, as /proc/<pid>/stack prints it.
    pub symbol: String,
    /// The module (or lucos bundle) holding it, none for vmlinux.
    pub module: Option<String>,
    /// In scheduler or lock text, which /proc/<pid>/stack leaves out.
    pub sched: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    pub state: char,
    pub vcpu: Option<usize>,
    pub stack: String,
    pub saved_sp: String,
    pub user: bool,
    pub reliable: bool,
    pub unreliable_reason: Option<String>,
    pub frames: Vec<Frame>,
}

/// Symbolizes a live address against vmlinux and the scanned modules.
pub fn symbolize(a: &Attached, scan: &Scan, ip: u64) -> Frame {
    let link = a.layout.link(ip);
    let in_range = |lo: &str, hi: &str| match (a.syms.lookup(lo), a.syms.lookup(hi)) {
        (Ok(l), Ok(h)) => link >= l.addr && link < h.addr,
        _ => false,
    };
    let sched = in_range("__sched_text_start", "__sched_text_end")
        || in_range("__lock_text_start", "__lock_text_end");
    // Modules first: lucos's patch memory may lie inside vmlinux's symbol ranges.
    let m = scan
        .modules
        .iter()
        .find(|m| ip >= m.base && ip < m.base + m.text_size);
    let (symbol, module) = match m {
        Some(m) => {
            let s = m
                .symbols
                .iter()
                .filter(|s| s.is_func && s.addr <= ip)
                .max_by_key(|s| s.addr);
            let name = match s {
                Some(s) => format!("{}+{:#x}/{:#x}", s.name, ip - s.addr, s.size),
                None => format!("{ip:#x}"),
            };
            (name, Some(m.name.clone()))
        }
        None => match a.syms.symbol_at(link) {
            Some((s, off)) => (format!("{}+{off:#x}/{:#x}", s.name, s.size), None),
            None => (format!("{ip:#x}"), None),
        },
    };
    Frame {
        addr: format!("{ip:#x}"),
        symbol,
        module,
        sched,
    }
}

/// One full scan with the VM paused.
pub fn scan(a: &mut Attached) -> Result<Scan> {
    let (syms, layout) = (&a.syms, &a.layout);
    with_pause(&mut a.vm, |vm| {
        let s = Scanner::new(vm, syms, layout).context("reading the kernel's unwind data")?;
        Ok(s.scan(vm, syms, layout)?)
    })
}

pub fn reports(a: &Attached, scan: &Scan, pid: Option<i32>) -> Vec<TaskReport> {
    scan.tasks
        .iter()
        .filter(|t| pid.is_none_or(|p| t.task.pid == p))
        .map(|t| TaskReport {
            pid: t.task.pid,
            tgid: t.task.tgid,
            comm: t.task.comm.clone(),
            state: t.task.state_letter(),
            vcpu: t.vcpu,
            stack: format!("{:#x}", t.task.stack),
            saved_sp: format!("{:#x}", t.task.saved_sp),
            user: t.trace.user,
            reliable: t.trace.unreliable.is_none(),
            unreliable_reason: t.trace.unreliable.clone(),
            frames: t
                .trace
                .frames
                .iter()
                .map(|&ip| symbolize(a, scan, ip))
                .collect(),
        })
        .collect()
}

pub fn stacks(args: StacksArgs) -> Result<()> {
    let mut a = attach(&args.vm)?;
    let s = scan(&mut a)?;
    let out = reports(&a, &s, args.pid);
    if let Some(p) = args.pid {
        if out.is_empty() {
            anyhow::bail!(
                "no task with pid {p} in '{}' (see `lucos stacks` for all)",
                args.vm
            );
        }
    }
    if args.json {
        println!("{}", json(serde_json::to_string_pretty(&out)?));
        return Ok(());
    }
    for t in &out {
        let on = t.vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default();
        let rel = match &t.unreliable_reason {
            None => "reliable".to_string(),
            Some(r) => format!("UNRELIABLE: {}", esc(r)),
        };
        println!(
            "{} {} {}{on} stack {} sp {} ({rel})",
            t.pid,
            esc(&t.comm),
            t.state,
            t.stack,
            t.saved_sp
        );
        for f in &t.frames {
            let m = f
                .module
                .as_ref()
                .map(|m| format!(" [{}]", esc(m)))
                .unwrap_or_default();
            println!("  [<{}>] {}{m}", f.addr, esc(&f.symbol));
        }
        if t.user {
            println!("  (user mode)");
        }
    }
    Ok(())
}
