//! The guest: a kernel flavour and the initramfs, made by the scripts in
//! `guest/` and cached under ~/.cache/lucos. This module runs them with
//! progress bars.
//!
//! - `debian` (default): Debian's own cloud kernel, unmodified, with its
//!   debug vmlinux and the prepared source tree `lucos build` compiles in
//!   (`guest/debian.sh`).
//! - `tiny`: a small config of the same source that lucos compiles itself
//!   (`guest/kernel.sh`, about 5 minutes once); it boots in a second, which
//!   makes it handy while developing lucos, but it lacks most of what real
//!   fixes need (no CONFIG_BUG, jump labels, ORC or retpolines).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lucos_backend::descriptor::KernelInfo;

pub const DEFAULT_VERSION: &str = "6.1.187-1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Flavour {
    /// Debian's unmodified cloud kernel (linux-image-*-cloud-amd64).
    #[default]
    Debian,
    /// A tinyconfig-based build of Debian's linux-source, compiled by lucos.
    Tiny,
}

impl Flavour {
    fn script(self) -> &'static str {
        match self {
            Flavour::Debian => "debian.sh",
            Flavour::Tiny => "kernel.sh",
        }
    }
}

/// Which guest kernel: flavour and package version.
#[derive(Debug, Clone, clap::Args)]
pub struct GuestSel {
    /// Guest kernel flavour.
    #[arg(long, value_enum, default_value_t = Flavour::Debian)]
    pub flavour: Flavour,
    /// Guest kernel version (Debian package version).
    #[arg(long, default_value = DEFAULT_VERSION)]
    pub kernel_version: String,
}

impl Default for GuestSel {
    fn default() -> Self {
        GuestSel {
            flavour: Flavour::Debian,
            kernel_version: DEFAULT_VERSION.into(),
        }
    }
}

impl GuestSel {
    /// The guest, fetched or built if missing.
    pub fn ensure(&self) -> Result<Guest> {
        ensure(self.flavour, &self.kernel_version)
    }
}

/// Where the guest scripts are: `$LUCOS_GUEST_DIR`, else the source tree
/// this binary was built from.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("LUCOS_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest"))
}

/// A built guest: everything `lucos run` needs.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel_dir: PathBuf,
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// What the kernel script recorded (`meta.json`): timings, release.
    pub meta: serde_json::Value,
}

impl Guest {
    pub fn kernel_info(&self) -> Result<KernelInfo> {
        let build_id = lucos_introspect::KernelSymbols::read_build_id_hex(&self.vmlinux)
            .with_context(|| format!("reading the build id of {}", self.vmlinux.display()))?;
        Ok(KernelInfo {
            dir: self.kernel_dir.clone(),
            vmlinux: self.vmlinux.clone(),
            build_id,
        })
    }
}

fn script(name: &str) -> Result<PathBuf> {
    let p = guest_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found; set LUCOS_GUEST_DIR to the lucos source tree's guest/ directory",
            p.display()
        );
    }
    Ok(p)
}

fn print_path(name: &str, args: &[&str]) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(script(name)?)
        .args(args)
        .output()
        .with_context(|| format!("running {name}"))?;
    if !out.status.success() {
        bail!("{name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The guest if it is already built (no build started).
pub fn find(flavour: Flavour, version: &str) -> Result<Option<Guest>> {
    let kernel_dir = print_path(flavour.script(), &["--version", version, "--print-dir"])?;
    let initrd = print_path("initramfs.sh", &["--print-path"])?;
    if !kernel_dir.join("done").is_file() || !initrd.is_file() {
        return Ok(None);
    }
    let meta = std::fs::read_to_string(kernel_dir.join("meta.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .unwrap_or_default();
    let initrd = with_modules(&initrd, &kernel_dir)?;
    Ok(Some(Guest {
        bzimage: kernel_dir.join("bzImage"),
        vmlinux: kernel_dir.join("vmlinux"),
        kernel_dir,
        initrd,
        meta,
    }))
}

/// The initramfs with the kernel's module overlay (`modules.cpio.gz`, if the flavour has
/// one) appended: the kernel unpacks concatenated archives in order, so the guest gets
/// lucos's busybox userland plus `/lib/modules/<release>`. Made once, next to the base.
fn with_modules(base: &Path, kernel_dir: &Path) -> Result<PathBuf> {
    let overlay = kernel_dir.join("modules.cpio.gz");
    if !overlay.is_file() {
        return Ok(base.to_owned());
    }
    let dir_name = kernel_dir.file_name().unwrap_or_default().to_string_lossy();
    let combined = base.with_file_name(format!("initramfs+{dir_name}.cpio.gz"));
    if combined.is_file() {
        return Ok(combined);
    }
    let mut bytes = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    bytes
        .extend(std::fs::read(&overlay).with_context(|| format!("reading {}", overlay.display()))?);
    let tmp = combined.with_extension(format!("partial.{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &combined).with_context(|| format!("writing {}", combined.display()))?;
    Ok(combined)
}

/// Builds whatever is missing (a cache hit takes well under a second).
pub fn ensure(flavour: Flavour, version: &str) -> Result<Guest> {
    if let Some(g) = find(flavour, version)? {
        return Ok(g);
    }
    run_with_progress("kernel", flavour.script(), &["--version", version])?;
    run_with_progress("initramfs", "initramfs.sh", &[])?;
    find(flavour, version)?.context("guest build finished but its artifacts are missing")
}

/// Runs a guest script, turning its output into a spinner with a count of
/// compiled objects; the full log is kept for errors.
fn run_with_progress(label: &str, name: &str, args: &[&str]) -> Result<()> {
    let start = Instant::now();
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {msg}").expect("template"),
    );
    pb.set_prefix(label.to_owned());
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut child = Command::new("bash")
        .arg(script(name)?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let mut objects = 0u64;
    let mut stage = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        let t = line.trim();
        if let Some(s) = t.strip_prefix("stage: ") {
            stage = s.to_owned();
            pb.set_message(stage.clone());
            // No spinner without a terminal: a line per stage instead.
            if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!("{label}: {stage} ({:.1} s)", start.elapsed().as_secs_f64());
            }
        } else if t.starts_with("CC ")
            || t.starts_with("LD ")
            || t.starts_with("AR ")
            || t.starts_with("AS ")
        {
            objects += 1;
            pb.set_message(format!("{stage}: {objects} steps, {t}"));
        } else if !t.is_empty() {
            pb.println(format!("{label}: {t}"));
        }
    }
    let status = child.wait()?;
    let err = err_thread.join().unwrap_or_default();
    pb.finish_and_clear();
    if !status.success() {
        bail!("{label} build failed:\n{err}");
    }
    eprintln!("{label}: ready in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
