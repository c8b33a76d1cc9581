//! `lucos`: live-update a running Linux kernel from outside its VM.

use lucos::show::{esc, esc_lines, json};
use lucos::{buildcmd, demo, guest, info, patchcmd, run};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lucos",
    version,
    about = "Live-update a running Linux kernel from outside its VM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or find in the cache) the test guest kernel and initramfs.
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
    },
    /// Boot the guest, read it from outside, live-patch it, revert, stop.
    Demo(demo::DemoArgs),
    /// Start a VM and own it until Ctrl-C / SIGTERM.
    Run(run::RunArgs),
    /// List running VMs.
    List,
    /// Attach to a VM and print what lucos reads from outside.
    Info(info::InfoArgs),
    /// List the guest's loaded modules, read from outside (BTF layouts, no agent).
    Modules(lucos::modules::ModulesArgs),
    /// Every guest task's kernel backtrace, unwound from outside with ORC.
    Stacks(lucos::stacks::StacksArgs),
    /// Apply a patch bundle to a running VM.
    Apply(patchcmd::ApplyArgs),
    /// Revert an applied bundle (newest first per function).
    Revert(patchcmd::RevertArgs),
    /// Show the bundles recorded in the VM's patch registry, and whether each update is
    /// complete (no task runs or returns into the code it took out of use).
    Status(patchcmd::StatusArgs),
    /// Block until a bundle's update is complete (see `status`), with a timeout.
    Wait(lucos::complete::WaitArgs),
    /// Free the patch memory of reverted bundles that nothing references any more.
    Reclaim(lucos::complete::ReclaimArgs),
    /// Benchmark: pause-time percentiles over N apply/revert cycles.
    Bench(patchcmd::BenchArgs),
    /// Soak: many apply/revert cycles on a private guest under a syscall loop per vCPU,
    /// checking for oops, taint and lost operations; prints pause percentiles.
    Soak(lucos::soak::SoakArgs),
    /// Describe a QEMU that lucos did not start, so lucos can attach to it.
    Adopt(AdoptArgs),
    /// Drop the descriptor of an adopted VM (the VM keeps running).
    Forget { vm: String },
    /// Clear patch records left by an earlier boot of the guest or by an interrupted first
    /// apply, and every page-table entry lucos wrote for them.
    Reset { vm: String },
    /// Stop all vCPUs of a VM.
    Pause { vm: String },
    /// Resume a paused VM (e.g. after a lucos process was killed mid-apply).
    Resume { vm: String },
    /// (Internal) the pause guard lucos starts for each VM it attaches to.
    #[command(hide = true)]
    PauseGuard {
        vm: String,
        #[arg(long)]
        parent: u32,
        #[arg(long)]
        deadline_ms: u64,
    },
    /// Turn a kernel source diff into a bundle.
    Build(buildcmd::BuildArgs),
    /// Benchmark `lucos build`: cold vs warm comparison-object cache.
    BuildBench(buildcmd::BuildBenchArgs),
    /// A whole Debian kernel update, unit by unit: built, applied live, smoke-tested,
    /// reverted; prints the coverage (resumable).
    Corpus(lucos::corpus::CorpusArgs),
    /// Make, pack or inspect bundles.
    Bundle {
        #[command(subcommand)]
        cmd: BundleCmd,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Build a bundle from a spec file (C sources compiled with Kbuild
    /// against the guest build tree).
    Make {
        spec: std::path::PathBuf,
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// Cached guest kernel directory (default: the selected guest's).
        #[arg(long)]
        tree: Option<std::path::PathBuf>,
        #[command(flatten)]
        guest: guest::GuestSel,
    },
    /// Add (or replace) the manifest of an object file.
    Pack {
        object: std::path::PathBuf,
        manifest: std::path::PathBuf,
        #[arg(short, long)]
        output: std::path::PathBuf,
    },
    /// Print a bundle's manifest and load plan (the signature is not checked; see verify).
    Show { bundle: std::path::PathBuf },
    /// Sign a bundle with the local key (created on first use).
    Sign(lucos::signing::SignArgs),
    /// Check a bundle's signature against the trust store.
    Verify { bundle: std::path::PathBuf },
    /// Trust a public key (`trust KEY --name NAME`), stop trusting one (`--remove NAME`),
    /// or list the trust store and the local key.
    Trust(lucos::signing::TrustArgs),
}

#[derive(clap::Args)]
struct AdoptArgs {
    /// Name to attach by.
    #[arg(long)]
    name: String,
    /// QMP unix socket (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long)]
    qmp: std::path::PathBuf,
    /// gdbstub unix socket (`-chardev socket,id=g,path=PATH,server=on,wait=off -gdb chardev:g`).
    #[arg(long)]
    gdb: std::path::PathBuf,
    /// mem-path of the guest RAM memory-backend-file (share=on).
    #[arg(long)]
    ram: std::path::PathBuf,
    /// mem-path of the patch memory backend behind an ivshmem-plain device.
    #[arg(long)]
    patch: std::path::PathBuf,
    /// qdev id of the ivshmem-plain device.
    #[arg(long, default_value = "lucos-patch")]
    patch_device: String,
    /// Serial console socket, if any.
    #[arg(long)]
    serial: Option<std::path::PathBuf>,
    /// Cached build of the kernel the guest runs.
    #[arg(long)]
    kernel_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    guest: guest::GuestSel,
}

fn adopt(args: AdoptArgs) -> Result<()> {
    let kernel_dir = match args.kernel_dir {
        Some(d) => d,
        None => args.guest.ensure()?.kernel_dir,
    };
    let vmlinux = kernel_dir.join("vmlinux");
    let build_id = lucos_introspect::KernelSymbols::read_build_id_hex(&vmlinux)
        .with_context(|| format!("reading the build id of {}", vmlinux.display()))?;
    let kernel = lucos_backend::descriptor::KernelInfo {
        dir: kernel_dir,
        vmlinux,
        build_id,
    };
    let desc = lucos_backend::adopt::adopt(&lucos_backend::adopt::Foreign {
        name: args.name.clone(),
        qmp: args.qmp,
        gdb: args.gdb,
        ram: args.ram,
        patch: args.patch,
        patch_device: Some(args.patch_device),
        serial: args.serial,
        kernel,
    })?;
    // Prove it: attach, find KASLR, check the live build id.
    if let Err(e) = lucos_backend::Vm::attach_desc(desc.clone())
        .map_err(anyhow::Error::from)
        .and_then(info::attach_vm)
    {
        let _ = std::fs::remove_dir_all(&desc.dir);
        return Err(e.context(format!("adopting '{}' (descriptor removed)", args.name)));
    }
    println!(
        "adopted QEMU pid {} as '{}' ({} vCPUs, {}); try `lucos info {}`",
        desc.qemu_pid,
        esc(&desc.name),
        desc.vcpus,
        esc(&desc.accel),
        esc(&desc.name)
    );
    Ok(())
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Build what is missing and print the artifact paths.
    Build {
        #[command(flatten)]
        guest: guest::GuestSel,
    },
}

/// Like Unix tools, lucos stops quietly, with success, when the reader of its output goes
/// away (`lucos status vm | head -1`): the command's work is done by the time it prints.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Errors are printed like anyhow's own `main` does, but escaped: they can
/// quote bundle ids, symbol names or guest text.
fn main() -> std::process::ExitCode {
    match lucos_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", esc_lines(&format!("{e:?}")));
            std::process::ExitCode::FAILURE
        }
    }
}

fn lucos_main() -> Result<()> {
    quiet_on_closed_stdout();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUCOS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cmd = Cli::parse().cmd;
    // The guard itself attaches unguarded.
    if !matches!(cmd, Cmd::PauseGuard { .. }) {
        lucos_backend::guard::enable(
            std::env::current_exe().context("locating the lucos binary for the pause guard")?,
            lucos_backend::guard::deadline_from_env(),
        );
    }
    match cmd {
        Cmd::PauseGuard {
            vm,
            parent,
            deadline_ms,
        } => {
            let d = std::time::Duration::from_millis(deadline_ms);
            lucos_backend::guard::run(&vm, parent, d)?;
            Ok(())
        }
        Cmd::Guest {
            cmd: GuestCmd::Build { guest },
        } => {
            let g = guest.ensure()?;
            println!("kernel:    {}", g.bzimage.display());
            println!("vmlinux:   {}", g.vmlinux.display());
            println!("initramfs: {}", g.initrd.display());
            println!("build tree: {}", g.kernel_dir.join("build").display());
            if let Some(r) = g.meta["release"].as_str() {
                println!("release:   {r}");
            }
            Ok(())
        }
        Cmd::Run(args) => run::run(args),
        Cmd::Demo(args) => demo::demo(args),
        Cmd::Adopt(args) => adopt(args),
        Cmd::Forget { vm } => {
            let desc = lucos_backend::VmDescriptor::load(&vm)?;
            let dir = lucos_backend::rundir::existing_vm_dir(&vm)?
                .with_context(|| format!("VM '{vm}' has no directory any more"))?;
            if desc.ram.path.starts_with(&desc.dir) {
                anyhow::bail!(
                    "'{vm}' was started by `lucos run`, which owns it: stop it there (Ctrl-C)"
                );
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            println!("forgot '{vm}'; its QEMU keeps running");
            Ok(())
        }
        Cmd::Reset { vm } => {
            let mut a = info::attach(&vm)?;
            let w = a.vm.patch_window()?;
            let pob = lucos_patch::page_offset_base(&a.vm, &a.syms, &a.layout)?;
            let r = lucos_patch::reset_registry(&mut a.vm, (a.layout.cr3, pob), w.gpa, w.size)?;
            println!(
                "cleared {} stale record(s) and {} page-table entr{} into patch memory",
                r.records,
                r.entries,
                if r.entries == 1 { "y" } else { "ies" }
            );
            Ok(())
        }
        Cmd::Pause { vm } => {
            let mut vm = lucos_backend::Vm::attach(&vm)?;
            lucos_introspect::Machine::pause(&mut vm)?;
            vm.keep_paused()?;
            println!("paused");
            Ok(())
        }
        Cmd::Resume { vm } => {
            let mut vm = lucos_backend::Vm::attach(&vm)?;
            lucos_introspect::Machine::resume(&mut vm)?;
            println!("running");
            Ok(())
        }
        Cmd::Build(args) => buildcmd::build(args),
        Cmd::BuildBench(args) => buildcmd::bench(args),
        Cmd::Corpus(args) => lucos::corpus::corpus(args),
        Cmd::List => {
            for d in lucos_backend::VmDescriptor::list()? {
                println!(
                    "{}\tpid {}\t{} vCPU\t{} MiB\t{}",
                    esc(&d.name),
                    d.qemu_pid,
                    d.vcpus,
                    d.ram.size >> 20,
                    esc(&d.accel)
                );
            }
            Ok(())
        }
        Cmd::Info(args) => info::info(args),
        Cmd::Modules(args) => lucos::modules::modules(args),
        Cmd::Stacks(args) => lucos::stacks::stacks(args),
        Cmd::Apply(args) => patchcmd::apply(args),
        Cmd::Revert(args) => patchcmd::revert(args),
        Cmd::Status(args) => patchcmd::status(args),
        Cmd::Wait(args) => lucos::complete::wait(args),
        Cmd::Reclaim(args) => lucos::complete::reclaim(args),
        Cmd::Bench(args) => patchcmd::bench(args),
        Cmd::Soak(args) => lucos::soak::soak(args),
        Cmd::Bundle { cmd } => bundle(cmd),
    }
}

/// `lucos bundle ...`: making, packing, inspecting and signing bundle files.
fn bundle(cmd: BundleCmd) -> Result<()> {
    match cmd {
        BundleCmd::Make {
            spec,
            output,
            tree,
            guest,
        } => {
            let tree = match tree {
                Some(t) => t,
                None => guest.ensure()?.kernel_dir,
            };
            let syms = lucos_diffobj::load_symbols(&tree)?;
            let bytes = lucos_diffobj::make_from_spec_file(&tree, &spec, &syms)
                .with_context(|| format!("building {}", spec.display()))?;
            let bytes = lucos::signing::sign(&bytes)?;
            std::fs::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} ({} bytes)", output.display(), bytes.len());
            Ok(())
        }
        BundleCmd::Pack {
            object,
            manifest,
            output,
        } => {
            let obj = patchcmd::read_input(&object)?;
            let text = patchcmd::read_input(&manifest)?;
            let m = lucos_patch::Manifest::from_json(&text)?;
            let packed = lucos::signing::sign(&lucos_patch::pack(&obj, &m)?)?;
            std::fs::write(&output, packed)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {}", output.display());
            Ok(())
        }
        BundleCmd::Show { bundle } => {
            let b = patchcmd::load_bundle(&bundle)?;
            println!(
                "{}",
                json(String::from_utf8_lossy(&b.manifest().to_json()?).into_owned())
            );
            let plan = lucos_patch::plan(&b)?;
            for r in [&plan.text, &plan.rodata, &plan.data] {
                println!(
                    "{}: {} bytes in {} sections",
                    r.kind.name(),
                    r.size,
                    r.sections.len()
                );
            }
            for d in &plan.dropped {
                println!("dropped {}: {}", esc(&d.name), esc(d.reason));
            }
            println!("needs from the kernel: {}", esc(&plan.undefined.join(", ")));
            match lucos_patch::signing::claimed_key(&patchcmd::read_input(&bundle)?) {
                Some(k) => println!(
                    "signed with key {} (not checked here: `lucos bundle verify`)",
                    hex::encode(k)
                ),
                None => println!("not signed"),
            }
            Ok(())
        }
        BundleCmd::Sign(args) => lucos::signing::sign_cmd(args),
        BundleCmd::Verify { bundle } => lucos::signing::verify_cmd(&bundle),
        BundleCmd::Trust(args) => lucos::signing::trust_cmd(args),
    }
}
