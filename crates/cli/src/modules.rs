//! `lucos modules`: the guest's loaded modules, read from outside (no /proc/modules).

use anyhow::Result;
use clap::Args;
use lucos_introspect::LoadedModule;

use crate::info::{attach, with_pause, Attached};
use crate::show::{esc, json};

#[derive(Debug, Args)]
pub struct ModulesArgs {
    pub vm: String,
    /// Also list each module's symbols.
    #[arg(long)]
    pub symbols: bool,
    #[arg(long)]
    pub json: bool,
}

/// Every loaded module, read with the VM paused so the list cannot change meanwhile.
pub fn loaded_modules(a: &mut Attached) -> Result<Vec<LoadedModule>> {
    let (syms, layout) = (&a.syms, &a.layout);
    with_pause(&mut a.vm, |vm| {
        Ok(lucos_introspect::modules::loaded(vm, syms, layout)?)
    })
}

pub fn modules(args: ModulesArgs) -> Result<()> {
    let mut a = attach(&args.vm)?;
    let mods = loaded_modules(&mut a)?;
    if args.json {
        println!("{}", json(serde_json::to_string_pretty(&mods)?));
        return Ok(());
    }
    println!(
        "{} module(s) loaded in '{}' (read from outside):",
        mods.len(),
        esc(&args.vm)
    );
    for m in &mods {
        println!(
            "  {:<24} {:?}  core {:#x}..{:#x} (text {} bytes)  {} symbols",
            esc(&m.name),
            m.state,
            m.base,
            m.base + m.size,
            m.text_size,
            m.symbols.len()
        );
        if args.symbols {
            for s in &m.symbols {
                let kind = if s.is_func { 't' } else { 'd' };
                println!(
                    "      {:#x} {kind} {} ({} bytes)",
                    s.addr,
                    esc(&s.name),
                    s.size
                );
            }
        }
    }
    Ok(())
}
