//! `lucos bench --against-livepatch`: the same change loaded as the guest's own
//! livepatch module (kernel `samples/livepatch` pattern, built by
//! `guest/livepatch.sh` against Debian's headers), timed inside the guest by
//! `lpbench`, next to lucos's apply and the cost of a call of the patched function.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lucos_backend::Console;

/// Where the overlay puts the module inside the guest.
pub const GUEST_KO: &str = "/lib/lucos/livepatch.ko";
const T: Duration = Duration::from_secs(300);

/// The module built by `guest/livepatch.sh` (its last stdout line is the path).
pub fn build_module() -> Result<PathBuf> {
    build_with(&["livepatch.sh"])
}

/// Module `name` of directory `guest/<dir>`, built by `guest/module.sh` against Debian's
/// headers with the extra make arguments `make`.
pub fn build_guest_module(dir: &str, name: &str, make: &[&str]) -> Result<PathBuf> {
    let src = crate::guest::guest_dir().join(dir);
    let src = src.to_string_lossy();
    let args: Vec<&str> = ["module.sh", &src, name]
        .into_iter()
        .chain(make.iter().copied())
        .collect();
    build_with(&args)
}

/// Runs guest script `args[0]` with the rest as arguments; its last stdout line is a path.
fn build_with(args: &[&str]) -> Result<PathBuf> {
    let script = crate::guest::guest_dir().join(args[0]);
    let out = Command::new("bash")
        .arg(&script)
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(s.lines().last().unwrap_or_default().trim()))
}

/// `initrd` with an overlay holding `ko` at [`GUEST_KO`] appended.
pub fn initrd_with(initrd: &Path, ko: &Path) -> Result<PathBuf> {
    initrd_with_files(initrd, &[(ko, GUEST_KO)])
}

/// `initrd` with an overlay appended that holds each (host file, absolute guest path).
pub fn initrd_with_files(initrd: &Path, files: &[(&Path, &str)]) -> Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lucos-overlay-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (host, guest) in files {
        let to = dir.join("root").join(guest.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("an absolute guest path"))?;
        std::fs::copy(host, &to).with_context(|| format!("copying {}", host.display()))?;
    }
    let st = Command::new("sh")
        .arg("-c")
        .arg(
            "cd root && find . | cpio -o -H newc --owner=0:0 2>/dev/null | gzip -n > ../overlay.gz",
        )
        .current_dir(&dir)
        .status()
        .context("running cpio")?;
    if !st.success() {
        bail!("packing the initrd overlay failed (are cpio and gzip installed?)");
    }
    let mut bytes =
        std::fs::read(initrd).with_context(|| format!("reading {}", initrd.display()))?;
    bytes.extend(std::fs::read(dir.join("overlay.gz"))?);
    let out = dir.join("initrd.cpio.gz");
    std::fs::write(&out, bytes)?;
    Ok(out)
}

/// Runs an `lpbench` subcommand in the guest and returns the value of `key=`.
fn lpbench(console: &Console, args: &str, key: &str) -> Result<u64> {
    let out = console.run(&format!("lpbench {args}"), T)?;
    if out.status != 0 {
        bail!("lpbench {args} failed in the guest: {}", out.output.trim());
    }
    let pat = format!("{key}=");
    out.output
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&pat)?.parse().ok())
        .with_context(|| format!("lpbench {args} printed no {key}: {}", out.output.trim()))
}

/// Nanoseconds per read of `path`, minimum over rounds.
pub fn read_ns(console: &Console, path: &str) -> Result<u64> {
    lpbench(console, &format!("read {path} {READS} {ROUNDS}"), "read_ns")
}

/// Microseconds from `finit_module` to the end of the livepatch transition.
pub fn load(console: &Console, name: &str) -> Result<u64> {
    lpbench(console, &format!("load {GUEST_KO} {name}"), "transition_us")
}

/// The module name of `guest/livepatch/livepatch-cmdline.c`, as sysfs shows it.
pub const LIVEPATCH_NAME: &str = "livepatch_cmdline";

/// Bench bundles beside the one benchmarked, all replacing `cmdline_proc_show`:
/// `cmdline-same` keeps the original body (what the redirection alone costs) and
/// `cmdline-lp` has the livepatch module's body (lucos and livepatch on the same new code).
pub const SAME_BODY: [&str; 2] = ["cmdline-same", "cmdline-lp"];

/// ns per read of /proc/cmdline: unpatched, then through each lucos bundle.
#[derive(Debug)]
pub struct CallCosts {
    pub unpatched: u64,
    pub lucos: Vec<(String, u64)>,
}

impl CallCosts {
    fn of(&self, id: &str) -> u64 {
        self.lucos
            .iter()
            .find(|(i, _)| i == id)
            .map_or(0, |(_, ns)| *ns)
    }
}

/// Reads per timed round, and rounds (the minimum is taken) of one `read_ns`.
const READS: u32 = 4000;
const ROUNDS: u32 = 7;
/// Interleaved repetitions of the whole comparison: the difference measured is one `jmp`
/// in a call of about 1.5 us, so the minimum must be taken over many runs.
const INTERLEAVED: u32 = 10;

/// Unpatched and lucos-patched reads interleaved (INTERLEAVED rounds of: unpatched, then each
/// bundle applied, read, reverted), minimum of each: these machines are noisy, and a
/// minimum over interleaved runs is the least disturbed figure of each.
pub fn call_costs(
    a: &mut crate::info::Attached,
    console: &Console,
    bundles: &[&lucos_patch::Bundle],
) -> Result<CallCosts> {
    let mut c = CallCosts {
        unpatched: u64::MAX,
        lucos: bundles
            .iter()
            .map(|b| (b.manifest().id.clone(), u64::MAX))
            .collect(),
    };
    for _ in 0..INTERLEAVED {
        c.unpatched = c.unpatched.min(read_ns(console, "/proc/cmdline")?);
        for (b, slot) in bundles.iter().zip(c.lucos.iter_mut()) {
            crate::patchcmd::apply_bundle(a, b)?;
            let ns = read_ns(console, "/proc/cmdline");
            crate::patchcmd::revert_bundle(a, &b.manifest().id)?;
            slot.1 = slot.1.min(ns?);
        }
    }
    Ok(c)
}

fn pct(x: u64, base: u64) -> f64 {
    (x as f64 / base.max(1) as f64 - 1.0) * 100.0
}

/// Loads the livepatch module, times its read, and prints the comparison with lucos.
pub fn print_against(
    console: &Console,
    c: &CallCosts,
    bench_id: &str,
    apply_us: u64,
) -> Result<()> {
    let lp_us = load(console, LIVEPATCH_NAME)?;
    let lp_ns = read_ns(console, "/proc/cmdline")?;
    println!("livepatch load to transition end: {lp_us} us");
    println!(
        "apply ratio: livepatch / lucos apply total p50 = {:.1}x (target >= 100x)",
        lp_us as f64 / apply_us.max(1) as f64
    );
    let un = c.unpatched;
    let (same, lpb) = (c.of(SAME_BODY[0]), c.of(SAME_BODY[1]));
    println!(
        "read of /proc/cmdline (min of rounds): unpatched {un} ns; lucos '{bench_id}' {} ns ({:+.1}%)",
        c.of(bench_id),
        pct(c.of(bench_id), un)
    );
    println!(
        "  same body as unpatched: lucos {same} ns ({:+.1}%, target within 1%: the redirection alone)",
        pct(same, un)
    );
    println!(
        "  same body as the livepatch module: lucos {lpb} ns ({:+.1}%), livepatch {lp_ns} ns ({:+.1}%); \
         livepatch / lucos = {:.3}x",
        pct(lpb, un),
        pct(lp_ns, un),
        lp_ns as f64 / lpb.max(1) as f64
    );
    Ok(())
}
