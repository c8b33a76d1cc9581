//! `lucos`: live-update a running Linux kernel from outside its VM.

use lucos::{guest, info, run};

use anyhow::Result;
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
    /// Start a VM and own it until Ctrl-C / SIGTERM.
    Run(run::RunArgs),
    /// List running VMs.
    List,
    /// Attach to a VM and print what lucos reads from outside.
    Info(info::InfoArgs),
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Build what is missing and print the artifact paths.
    Build {
        #[arg(long, default_value = guest::DEFAULT_VERSION)]
        version: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUCOS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Guest {
            cmd: GuestCmd::Build { version },
        } => {
            let g = guest::ensure(&version)?;
            println!("kernel:    {}", g.bzimage.display());
            println!("vmlinux:   {}", g.vmlinux.display());
            println!("initramfs: {}", g.initrd.display());
            println!("build tree: {}", g.kernel_dir.join("build").display());
            if let Some(s) = g.build_seconds {
                println!("kernel build took {s} s");
            }
            Ok(())
        }
        Cmd::Run(args) => run::run(args),
        Cmd::List => {
            for d in lucos_backend::VmDescriptor::list() {
                println!(
                    "{}\tpid {}\t{} vCPU\t{} MiB\t{}",
                    d.name,
                    d.qemu_pid,
                    d.vcpus,
                    d.ram.size >> 20,
                    d.accel
                );
            }
            Ok(())
        }
        Cmd::Info(args) => info::info(args),
    }
}
