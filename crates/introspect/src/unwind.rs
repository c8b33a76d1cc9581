//! The kernel's ORC unwinder (arch/x86/kernel/unwind_orc.c), run from outside over guest
//! memory, with the verdict of `arch_stack_walk_reliable` (arch/x86/kernel/stacktrace.c):
//! a stack is unreliable exactly when that function would return an error for it.
//!
//! A sleeping task starts from its `inactive_task_frame`, as `__unwind_start` does. A task
//! running on a paused vCPU (which the kernel itself refuses to unwind) starts from the
//! vCPU's registers as from an interrupt frame: the pause stops it between instructions,
//! and ORC covers every instruction.

use serde::Serialize;

use crate::btf::Btf;
use crate::machine::PhysMem;
use crate::orc::{self, Orc, OrcEntry};
use crate::regs::VcpuRegs;
use crate::tasks::Reader;

/// `THREAD_SIZE` and `IRQ_STACK_SIZE` of x86-64 without KASAN (Debian's configs).
pub const THREAD_SIZE: u64 = 16 << 10;
pub const IRQ_STACK_SIZE: u64 = 16 << 10;
/// More frames than a kernel stack holds.
const MAX_FRAMES: usize = 256;

/// `struct pt_regs` offsets the unwinder reads, from BTF.
#[derive(Debug, Clone, Copy)]
pub struct RegsLayout {
    size: u64,
    ip: u64,
    cs: u64,
    sp: u64,
    bp: u64,
    dx: u64,
    di: u64,
    r10: u64,
    r13: u64,
    frame_size: u64,
    frame_bp: u64,
    frame_ret: u64,
}

impl RegsLayout {
    pub fn from_btf(btf: &Btf) -> Result<Self, crate::btf::BtfError> {
        let p = |m: &str| btf.offset_of("pt_regs", m);
        Ok(RegsLayout {
            size: btf.struct_size("pt_regs")?,
            ip: p("ip")?,
            cs: p("cs")?,
            sp: p("sp")?,
            bp: p("bp")?,
            dx: p("dx")?,
            di: p("di")?,
            r10: p("r10")?,
            r13: p("r13")?,
            frame_size: btf.struct_size("inactive_task_frame")?,
            frame_bp: btf.offset_of("inactive_task_frame", "bp")?,
            frame_ret: btf.offset_of("inactive_task_frame", "ret_addr")?,
        })
    }
}

/// A stack the unwinder may read: the task's, and for a running task its CPU's IRQ stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackRange {
    pub kind: &'static str,
    pub begin: u64,
    pub end: u64,
}

/// Where the unwind starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Switched out: `thread.sp`.
    Saved { sp: u64 },
    /// Running on a paused vCPU.
    Live(VcpuRegs),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace {
    /// Kernel text addresses, innermost first (for a live task, its rip first).
    pub frames: Vec<u64>,
    /// `None` when `arch_stack_walk_reliable` would succeed, else why it would not.
    pub unreliable: Option<String>,
    /// The task was in user mode (no kernel frames).
    pub user: bool,
}

#[derive(Clone, Copy)]
enum Regs {
    None,
    Live,
    Full(u64),
    /// An IRET frame: only ip/cs/flags/sp/ss are valid.
    Partial(u64),
}

struct State<'a, P: PhysMem + ?Sized> {
    r: Reader<'a, P>,
    l: &'a RegsLayout,
    stacks: &'a [StackRange],
    live: Option<&'a VcpuRegs>,
    ip: u64,
    sp: u64,
    bp: u64,
    regs: Regs,
    prev_full: Option<u64>,
    signal: bool,
    cur: Option<usize>,
    visited: u32,
    done: bool,
    error: bool,
}

impl<P: PhysMem + ?Sized> State<'_, P> {
    /// The kernel's `stack_access_ok`: on the current stack, or on another allowed one
    /// not visited before.
    fn access_ok(&mut self, addr: u64, len: u64) -> bool {
        let on = |s: &StackRange| addr >= s.begin && addr.saturating_add(len) <= s.end;
        if let Some(c) = self.cur {
            if on(&self.stacks[c]) {
                return true;
            }
        }
        match self.stacks.iter().position(on) {
            Some(i) if self.visited & (1 << i) == 0 => {
                self.visited |= 1 << i;
                self.cur = Some(i);
                true
            }
            _ => false,
        }
    }

    fn deref(&mut self, addr: u64) -> Option<u64> {
        if !self.access_ok(addr, 8) {
            return None;
        }
        self.r.u64(addr).ok()
    }

    /// The kernel's `get_reg` over the entry registers.
    fn get_reg(&self, off: u64, live_idx: usize) -> Option<u64> {
        let full = match self.regs {
            Regs::Live => return self.live.map(|r| r.gpr[live_idx]),
            Regs::Full(a) => a,
            Regs::Partial(_) => self.prev_full?,
            Regs::None => return None,
        };
        self.r.u64(full + off).ok()
    }

    fn user_regs(&self) -> Option<bool> {
        match self.regs {
            Regs::None => None,
            Regs::Live => self.live.map(|r| r.cpl() == 3),
            Regs::Full(a) | Regs::Partial(a) => Some(
                self.r
                    .u64(a + self.l.cs)
                    .map(|cs| cs & 3 == 3)
                    .unwrap_or(false),
            ),
        }
    }

    fn the_end(&mut self, error: bool) -> bool {
        self.error |= error;
        self.done = true;
        false
    }

    /// The kernel's `unwind_next_frame`.
    fn next(&mut self, orc: &Orc) -> bool {
        if self.done {
            return false;
        }
        if self.user_regs() == Some(true) {
            return self.the_end(false);
        }
        let (prev_sp, prev_stack) = (self.sp, self.cur);
        let e = match orc.find(if self.signal { self.ip } else { self.ip - 1 }) {
            Some(e) => e,
            None => {
                self.error = true;
                OrcEntry::FP
            }
        };
        if e.sp_reg == orc::REG_UNDEFINED {
            return self.the_end(!e.end);
        }
        let l = *self.l;
        let mut sp = match e.sp_reg {
            orc::REG_SP => self.sp.wrapping_add(e.sp_offset as i64 as u64),
            orc::REG_BP | orc::REG_BP_INDIRECT => self.bp.wrapping_add(e.sp_offset as i64 as u64),
            orc::REG_SP_INDIRECT => self.sp,
            orc::REG_R10 => match self.get_reg(l.r10, 10) {
                Some(v) => v,
                None => return self.the_end(true),
            },
            orc::REG_R13 => match self.get_reg(l.r13, 13) {
                Some(v) => v,
                None => return self.the_end(true),
            },
            orc::REG_DI => match self.get_reg(l.di, 5) {
                Some(v) => v,
                None => return self.the_end(true),
            },
            orc::REG_DX => match self.get_reg(l.dx, 3) {
                Some(v) => v,
                None => return self.the_end(true),
            },
            _ => return self.the_end(true),
        };
        if matches!(e.sp_reg, orc::REG_SP_INDIRECT | orc::REG_BP_INDIRECT) {
            sp = match self.deref(sp) {
                Some(v) => v,
                None => return self.the_end(true),
            };
            if e.sp_reg == orc::REG_SP_INDIRECT {
                sp = sp.wrapping_add(e.sp_offset as i64 as u64);
            }
        }
        match e.kind {
            orc::TYPE_CALL => {
                let Some(ip) = self.deref(sp.wrapping_sub(8)) else {
                    return self.the_end(true);
                };
                (self.ip, self.sp, self.regs, self.prev_full) = (ip, sp, Regs::None, None);
                self.signal = false;
            }
            orc::TYPE_REGS => {
                if !self.access_ok(sp, l.size) {
                    return self.the_end(true);
                }
                let (Ok(ip), Ok(nsp)) = (self.r.u64(sp + l.ip), self.r.u64(sp + l.sp)) else {
                    return self.the_end(true);
                };
                (self.ip, self.sp, self.regs, self.prev_full) = (ip, nsp, Regs::Full(sp), None);
                self.signal = true;
            }
            orc::TYPE_REGS_PARTIAL => {
                let base = sp.wrapping_sub(l.ip);
                if !self.access_ok(sp, l.size - l.ip) {
                    return self.the_end(true);
                }
                let (Ok(ip), Ok(nsp)) = (self.r.u64(base + l.ip), self.r.u64(base + l.sp)) else {
                    return self.the_end(true);
                };
                if let Regs::Full(a) = self.regs {
                    self.prev_full = Some(a);
                }
                (self.ip, self.sp, self.regs) = (ip, nsp, Regs::Partial(base));
                self.signal = true;
            }
            _ => return self.the_end(true),
        }
        match e.bp_reg {
            orc::REG_UNDEFINED => {
                if let Some(v) = self.get_reg(l.bp, 6) {
                    self.bp = v;
                }
            }
            orc::REG_PREV_SP => match self.deref(sp.wrapping_add(e.bp_offset as i64 as u64)) {
                Some(v) => self.bp = v,
                None => return self.the_end(true),
            },
            orc::REG_BP => match self.deref(self.bp.wrapping_add(e.bp_offset as i64 as u64)) {
                Some(v) => self.bp = v,
                None => return self.the_end(true),
            },
            _ => return self.the_end(true),
        }
        let same = prev_stack.is_some() && self.cur == prev_stack;
        let on = self.cur.is_some_and(|c| {
            let s = &self.stacks[c];
            self.sp >= s.begin && self.sp + 8 <= s.end
        });
        if same && on && self.sp <= prev_sp {
            return self.the_end(true);
        }
        true
    }
}

/// Unwinds one task's kernel stack.
pub fn unwind(
    mem: &(impl PhysMem + ?Sized),
    cr3: u64,
    l: &RegsLayout,
    orc: &Orc,
    ret_from_fork: u64,
    stacks: &[StackRange],
    start: &Start,
) -> Trace {
    let r = Reader { mem, cr3 };
    let mut s = State {
        r,
        l,
        stacks,
        live: None,
        ip: 0,
        sp: 0,
        bp: 0,
        regs: Regs::None,
        prev_full: None,
        signal: false,
        cur: None,
        visited: 0,
        done: false,
        error: false,
    };
    let mut frames = Vec::new();
    match start {
        Start::Live(regs) => {
            if regs.cpl() == 3 {
                return Trace {
                    frames,
                    unreliable: None,
                    user: true,
                };
            }
            s.live = Some(regs);
            (s.ip, s.sp, s.bp, s.regs, s.signal) =
                (regs.rip, regs.rsp(), regs.gpr[6], Regs::Live, true);
        }
        Start::Saved { sp } => {
            let frame = *sp;
            s.sp = frame + l.frame_size;
            match (s.r.u64(frame + l.frame_bp), s.r.u64(frame + l.frame_ret)) {
                (Ok(bp), Ok(ip)) => (s.bp, s.ip) = (bp, ip),
                _ => s.error = true,
            }
            s.signal = s.ip == ret_from_fork;
        }
    }
    if !s.access_ok(s.sp, 8) {
        s.error = true;
    }
    let mut unreliable = None;
    let mut user = false;
    while !s.done && !s.error && frames.len() < MAX_FRAMES {
        if let Some(u) = s.user_regs() {
            if u {
                user = true;
                break;
            }
        }
        if orc.image_of(s.ip).is_none() {
            unreliable = Some(format!("{:#x} is not kernel text", s.ip));
            break;
        }
        frames.push(s.ip);
        s.next(orc);
    }
    if unreliable.is_none() && s.error {
        unreliable = Some(format!(
            "the unwind failed after {:#x} (no ORC data, or a frame off the stack)",
            frames.last().copied().unwrap_or(s.ip)
        ));
    }
    if frames.len() >= MAX_FRAMES && unreliable.is_none() {
        unreliable = Some(format!("more than {MAX_FRAMES} frames"));
    }
    Trace {
        frames,
        unreliable,
        user,
    }
}
