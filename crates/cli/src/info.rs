//! `lucos info`: what lucos reads from a running guest, from outside.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use lucos_backend::Vm;
use lucos_introspect::{
    detect_layout, read_virt, verify_build_id, GuestVirtAddr, KernelLayout, KernelSymbols, Machine,
    VcpuRegs,
};
use serde::Serialize;

use crate::show::{esc, json};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// VM name (see `lucos list`).
    pub vm: String,
    #[arg(long)]
    pub json: bool,
}

/// An attached VM with its kernel symbols and live layout.
pub struct Attached {
    pub vm: Vm,
    pub syms: KernelSymbols,
    pub layout: KernelLayout,
}

pub fn attach(name: &str) -> Result<Attached> {
    // Checked before it is quoted in the context below.
    lucos_backend::descriptor::validate_name(name)?;
    let vm = Vm::attach(name).with_context(|| format!("attaching to VM '{name}'"))?;
    attach_vm(vm)
}

/// Loads symbols and measures the KASLR layout (a short pause: the IDT
/// must be read from a stopped vCPU).
pub fn attach_vm(mut vm: Vm) -> Result<Attached> {
    let syms = KernelSymbols::load(&vm.desc.kernel.vmlinux)
        .with_context(|| format!("loading symbols from {}", vm.desc.kernel.vmlinux.display()))?;
    let layout = with_pause(&mut vm, |vm| {
        let layout = detect_layout(vm, 0, &syms)?;
        verify_build_id(vm, layout.cr3, &syms, &layout)?;
        Ok(layout)
    })?;
    Ok(Attached { vm, syms, layout })
}

/// Runs `f` with the VM paused, resuming it afterwards even on error
/// (unless it was paused before).
pub fn with_pause<T>(vm: &mut Vm, f: impl FnOnce(&mut Vm) -> Result<T>) -> Result<T> {
    let was_paused = vm.is_paused()?;
    if !was_paused {
        vm.pause()?;
    }
    let out = f(vm);
    if !was_paused {
        vm.resume().context("resuming the VM")?;
    }
    out
}

#[derive(Serialize)]
pub struct VcpuFacts {
    pub index: usize,
    pub rip: String,
    pub where_: String,
    pub cpl: u8,
    pub cr0: String,
    pub cr3: String,
    pub cr4: String,
    pub efer: String,
}

#[derive(Serialize)]
pub struct Facts {
    pub vm: String,
    pub vcpus: Vec<VcpuFacts>,
    pub kaslr_slide: String,
    pub text: String,
    pub phys_text: String,
    pub build_id: String,
    pub linux_banner: String,
    pub patch_memory: String,
    pub pause_us: u64,
}

fn symbolize(a: &Attached, rip: u64) -> String {
    match a.syms.symbol_at(a.layout.link(rip)) {
        Some((s, off)) => format!("{}+{off:#x}", s.name),
        None => "(not kernel text: user mode or patch memory)".into(),
    }
}

/// Reads the facts shown by `lucos info` and the demo.
pub fn facts(a: &mut Attached) -> Result<Facts> {
    let t = Instant::now();
    let regs: Vec<VcpuRegs> = with_pause(&mut a.vm, |vm| {
        (0..vm.vcpu_count())
            .map(|i| vm.vcpu_regs(i).map_err(Into::into))
            .collect()
    })?;
    let pause_us = t.elapsed().as_micros() as u64;
    let vcpus = regs
        .iter()
        .enumerate()
        .map(|(index, r)| VcpuFacts {
            index,
            rip: format!("{:#x}", r.rip),
            where_: symbolize(a, r.rip),
            cpl: r.cpl(),
            cr0: format!("{:#x}", r.cr0),
            cr3: format!("{:#x}", r.cr3),
            cr4: format!("{:#x}", r.cr4),
            efer: format!("{:#x}", r.efer),
        })
        .collect();
    let banner = read_kernel_string(a, "linux_banner", 256)?;
    let window = a.vm.patch_window()?;
    Ok(Facts {
        vm: a.vm.desc.name.clone(),
        vcpus,
        kaslr_slide: format!("{:#x}", a.layout.slide),
        text: format!("{:#x}..{:#x}", a.layout.text_start, a.layout.text_end),
        phys_text: format!("{:#x}", a.layout.phys_text),
        build_id: a.syms.build_id_hex()?,
        linux_banner: banner.trim_end().to_owned(),
        patch_memory: format!(
            "{} MiB at guest-physical {:#x}",
            window.size >> 20,
            window.gpa
        ),
        pause_us,
    })
}

/// Reads a NUL-terminated string variable of the live kernel.
pub fn read_kernel_string(a: &Attached, symbol: &str, max: usize) -> Result<String> {
    let sym = a.syms.lookup(symbol)?;
    let mut buf = vec![0u8; max];
    read_virt(
        &a.vm,
        a.layout.cr3,
        GuestVirtAddr(a.layout.live(sym.addr)),
        &mut buf,
    )
    .with_context(|| format!("reading {symbol}"))?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

pub fn print_facts(f: &Facts) {
    println!("lucos read from outside VM '{}':", esc(&f.vm));
    for v in &f.vcpus {
        println!(
            "  vCPU {}: rip {} ({}), cpl {}, cr0 {}, cr3 {}, cr4 {}, efer {}",
            v.index,
            v.rip,
            esc(&v.where_),
            v.cpl,
            v.cr0,
            v.cr3,
            v.cr4,
            v.efer
        );
    }
    println!("  KASLR slide     {} (from the IDT gates)", f.kaslr_slide);
    println!("  kernel text     {}", f.text);
    println!("  _text physical  {}", f.phys_text);
    println!("  build id        {} (live == vmlinux)", f.build_id);
    println!("  linux_banner    {}", esc(&f.linux_banner));
    println!("  patch memory    {}", f.patch_memory);
    println!("  register pause  {} us", f.pause_us);
}

pub fn info(args: InfoArgs) -> Result<()> {
    let mut a = attach(&args.vm)?;
    let f = facts(&mut a)?;
    if args.json {
        println!("{}", json(serde_json::to_string_pretty(&f)?));
    } else {
        print_facts(&f);
    }
    Ok(())
}
