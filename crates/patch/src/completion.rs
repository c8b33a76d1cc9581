//! Completion: whether any task still runs, or will return into, code an update took out
//! of use — the old functions an applied bundle replaced, or a reverted bundle's own code.
//!
//! Only a paused guest's stacks are looked at (see [`lucos_introspect::stacks`]): a return
//! address or a vCPU's rip inside such code means "not complete". A stack the unwinder
//! could not follow to its end is not known clean, so it also holds the update back.

use serde::Serialize;

use lucos_introspect::stacks::Scan;
use lucos_introspect::{KernelLayout, KernelSymbols, LoadedModule};

use crate::registry::{BundleRecord, BundleState, ModuleSite, Registry};
use crate::RegionKind;

/// Code an update leaves behind: `[start, end)` live addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeRange {
    pub start: u64,
    pub end: u64,
    /// The old function's name, or `patch code of <id>`.
    pub what: String,
}

impl CodeRange {
    pub fn contains(&self, a: u64) -> bool {
        a >= self.start && a < self.end
    }
}

/// Which way the bundle last changed the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Apply,
    Revert,
}

/// A task that holds an update back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: i32,
    pub comm: String,
    pub vcpu: Option<usize>,
    /// The return address (or rip) inside old code, none when the stack is unreliable.
    pub addr: Option<u64>,
    /// The range it is in, or why the stack could not be followed.
    pub what: String,
}

/// One bundle's completion at the instant of a scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Completion {
    pub id: String,
    pub phase: Phase,
    pub complete: bool,
    /// Tasks with old code on their stack, then tasks whose stack is not known clean.
    pub holders: Vec<Holder>,
}

/// The live range of the function at live `func_addr`: in vmlinux from its symbol table,
/// in a module from the module's symbols. `None` when no sized symbol covers it.
pub fn function_range(
    syms: &KernelSymbols,
    layout: &KernelLayout,
    modules: &[LoadedModule],
    func_addr: u64,
    module: Option<&ModuleSite>,
    name: &str,
) -> Option<CodeRange> {
    let (start, size) = match module {
        None => {
            let (s, off) = syms.symbol_at(layout.link(func_addr))?;
            (func_addr - off, s.size)
        }
        Some(ms) => {
            let m = modules
                .iter()
                .find(|m| m.name == ms.name && m.base == ms.base)?;
            let s = m
                .symbols
                .iter()
                .find(|s| s.is_func && s.addr <= func_addr && func_addr < s.addr + s.size)?;
            (s.addr, s.size)
        }
    };
    (size > 0).then(|| CodeRange {
        start,
        end: start + size,
        what: name.to_owned(),
    })
}

/// A bundle's code in patch memory.
pub fn patch_code(b: &BundleRecord) -> Vec<CodeRange> {
    b.ranges
        .iter()
        .filter(|r| r.kind == RegionKind::Text)
        .map(|r| CodeRange {
            start: r.va,
            end: r.va + r.len,
            what: format!("patch code of {}", b.id),
        })
        .collect()
}

/// What a site ran before a bundle switched it: the old function, and when `original` is
/// an earlier bundle's `jmp`, that bundle's whole code (its new function is in there).
pub fn replaced_code(
    reg: &Registry,
    ctx: (&KernelSymbols, &KernelLayout, &[LoadedModule]),
    site: (&str, u64, u64, Option<&ModuleSite>),
    original: &[u8; 5],
) -> Vec<CodeRange> {
    let (syms, layout, modules) = ctx;
    let (name, func_addr, site_addr, module) = site;
    let mut out: Vec<CodeRange> = function_range(syms, layout, modules, func_addr, module, name)
        .into_iter()
        .collect();
    if out.is_empty() {
        // Unsized (asm) function: at least the site itself and what follows it.
        out.push(CodeRange {
            start: func_addr,
            end: site_addr + 5,
            what: name.to_owned(),
        });
    }
    if let Some(target) = crate::jmp_target(site_addr, original) {
        if let Some(prev) = reg
            .bundles
            .iter()
            .find(|b| b.ranges.iter().any(|r| r.contains(target)))
        {
            out.extend(patch_code(prev));
        }
    }
    out
}

/// The code each bundle in the registry left behind, and which way it went; reverted
/// bundles whose memory was reclaimed have none left to check.
pub fn watches(
    reg: &Registry,
    syms: &KernelSymbols,
    layout: &KernelLayout,
    modules: &[LoadedModule],
) -> Vec<(String, Phase, Vec<CodeRange>)> {
    reg.bundles
        .iter()
        .filter(|b| !b.reclaimed)
        .map(|b| match b.state {
            BundleState::Applied => {
                let ranges = b
                    .sites
                    .iter()
                    .flat_map(|s| {
                        replaced_code(
                            reg,
                            (syms, layout, modules),
                            (&s.function, s.func_addr, s.site_addr, s.module.as_ref()),
                            &s.original,
                        )
                    })
                    .collect();
                (b.id.clone(), Phase::Apply, ranges)
            }
            BundleState::Reverted => (b.id.clone(), Phase::Revert, patch_code(b)),
        })
        .collect()
}

/// Tasks of `scan` (and vCPUs by `rips`) that hold `ranges` back.
pub fn holders(ranges: &[CodeRange], scan: &Scan, rips: &[u64]) -> Vec<Holder> {
    let mut out = Vec::new();
    let mut unknown = Vec::new();
    for t in &scan.tasks {
        let hit = t
            .trace
            .frames
            .iter()
            .chain(t.vcpu.and_then(|v| rips.get(v)))
            .find_map(|&a| ranges.iter().find(|r| r.contains(a)).map(|r| (a, r)));
        let h = |addr, what: String| Holder {
            pid: t.task.pid,
            comm: t.task.comm.clone(),
            vcpu: t.vcpu,
            addr,
            what,
        };
        match (hit, &t.trace.unreliable) {
            (Some((a, r)), _) => out.push(h(Some(a), r.what.clone())),
            (None, Some(why)) if !ranges.is_empty() => {
                unknown.push(h(None, format!("stack not known clean: {why}")))
            }
            _ => {}
        }
    }
    // A vCPU whose current task was not found still counts by its rip.
    for (v, &rip) in rips.iter().enumerate() {
        let seen = scan.tasks.iter().any(|t| t.vcpu == Some(v));
        if let (false, Some(r)) = (seen, ranges.iter().find(|r| r.contains(rip))) {
            out.push(Holder {
                pid: -1,
                comm: String::new(),
                vcpu: Some(v),
                addr: Some(rip),
                what: r.what.clone(),
            });
        }
    }
    out.extend(unknown);
    out
}

/// Every bundle's completion at the instant of `scan`.
pub fn completion(
    reg: &Registry,
    syms: &KernelSymbols,
    layout: &KernelLayout,
    scan: &Scan,
) -> Vec<Completion> {
    watches(reg, syms, layout, &scan.modules)
        .into_iter()
        .map(|(id, phase, ranges)| {
            let holders = holders(&ranges, scan, &scan.rips);
            Completion {
                id,
                phase,
                complete: holders.is_empty(),
                holders,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lucos_introspect::stacks::TaskStack;
    use lucos_introspect::tasks::Task;
    use lucos_introspect::unwind::Trace;

    fn task(pid: i32, vcpu: Option<usize>, frames: &[u64], unreliable: Option<&str>) -> TaskStack {
        TaskStack {
            task: Task {
                addr: 0x1000 * pid as u64,
                pid,
                tgid: pid,
                comm: format!("t{pid}"),
                state: 1,
                stack: 0,
                saved_sp: 0,
                on_cpu: vcpu.is_some(),
                cpu: 0,
            },
            vcpu,
            trace: Trace {
                frames: frames.to_vec(),
                unreliable: unreliable.map(str::to_owned),
                user: false,
            },
        }
    }

    fn scan(tasks: Vec<TaskStack>) -> Scan {
        Scan {
            tasks,
            cpus: Vec::new(),
            modules: Vec::new(),
            rips: Vec::new(),
        }
    }

    #[test]
    fn a_return_address_or_rip_in_old_code_holds_it_back() {
        let old = [CodeRange {
            start: 0x100,
            end: 0x200,
            what: "pipe_read".into(),
        }];
        let s = scan(vec![
            task(1, None, &[0x50, 0x1ff, 0x300], None),
            task(2, None, &[0x200, 0x90], None),
            task(3, Some(0), &[0x400], None),
        ]);
        let h = holders(&old, &s, &[0x400]);
        assert_eq!(h.len(), 1);
        assert_eq!((h[0].pid, h[0].addr), (1, Some(0x1ff)), "end is exclusive");
        let h = holders(&old, &s, &[0x150]);
        assert_eq!(h.iter().map(|h| h.pid).collect::<Vec<_>>(), [1, 3]);
        // A vCPU whose task is unknown still counts.
        let h = holders(&old, &scan(vec![]), &[0x150]);
        assert_eq!((h[0].vcpu, h[0].addr), (Some(0), Some(0x150)));
    }

    #[test]
    fn an_unreliable_stack_is_not_known_clean() {
        let old = [CodeRange {
            start: 0x100,
            end: 0x200,
            what: "f".into(),
        }];
        let s = scan(vec![task(7, None, &[0x50], Some("no ORC entry"))]);
        let h = holders(&old, &s, &[]);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].addr, None);
        assert!(h[0].what.contains("no ORC entry"), "{:?}", h[0]);
        assert!(holders(&[], &s, &[]).is_empty(), "nothing to wait for");
    }
}
