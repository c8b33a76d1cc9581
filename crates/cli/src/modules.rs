//! `lucos modules`: the guest's loaded modules, read from outside (no /proc/modules).

use anyhow::{Context, Result};
use clap::Args;
use lucos_introspect::{list_modules, read_virt, Btf, LoadedModule, ModuleOffsets};

use crate::info::{attach, with_pause, Attached};

#[derive(Debug, Args)]
pub struct ModulesArgs {
    pub vm: String,
    /// Also list each module's symbols.
    #[arg(long)]
    pub symbols: bool,
    #[arg(long)]
    pub json: bool,
}

/// The running kernel's own BTF (`__start_BTF`..`__stop_BTF` in its memory), so the
/// layouts are those of the kernel that runs, whatever file lucos was given.
pub fn live_btf(a: &Attached) -> Result<Btf> {
    let (start, stop) = (a.syms.lookup("__start_BTF"), a.syms.lookup("__stop_BTF"));
    let (Ok(start), Ok(stop)) = (start, stop) else {
        anyhow::bail!(
            "the kernel has no BTF (__start_BTF); lucos needs CONFIG_DEBUG_INFO_BTF to read \
             modules from outside"
        );
    };
    let len = stop
        .addr
        .checked_sub(start.addr)
        .context("__stop_BTF before __start_BTF")?;
    anyhow::ensure!(len < 64 << 20, "BTF of {len} bytes is implausible");
    let mut buf = vec![0u8; len as usize];
    read_virt(&a.vm, a.layout.cr3, a.layout.live(start.addr), &mut buf)
        .context("reading the kernel's BTF")?;
    Ok(Btf::parse(&buf)?)
}

/// Every loaded module, read with the VM paused so the list cannot change meanwhile.
pub fn loaded_modules(a: &mut Attached) -> Result<Vec<LoadedModule>> {
    let btf = live_btf(a)?;
    let off = ModuleOffsets::from_btf(&btf)?;
    let head = a
        .syms
        .lookup_in_file("kernel/module/main.c", "modules")
        .or_else(|_| a.syms.lookup("modules"))
        .context("vmlinux has no `modules` list head")?;
    let head = a.layout.live(head.addr);
    let cr3 = a.layout.cr3;
    with_pause(&mut a.vm, |vm| Ok(list_modules(vm, cr3, head, &off)?))
}

pub fn modules(args: ModulesArgs) -> Result<()> {
    let mut a = attach(&args.vm)?;
    let mods = loaded_modules(&mut a)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&mods)?);
        return Ok(());
    }
    println!(
        "{} module(s) loaded in '{}' (read from outside):",
        mods.len(),
        args.vm
    );
    for m in &mods {
        println!(
            "  {:<24} {:?}  core {:#x}..{:#x} (text {} bytes)  {} symbols",
            m.name,
            m.state,
            m.base,
            m.base + m.size,
            m.text_size,
            m.symbols.len()
        );
        if args.symbols {
            for s in &m.symbols {
                let kind = if s.is_func { 't' } else { 'd' };
                println!("      {:#x} {kind} {} ({} bytes)", s.addr, s.name, s.size);
            }
        }
    }
    Ok(())
}
