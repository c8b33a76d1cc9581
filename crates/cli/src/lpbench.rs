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
    let script = crate::guest::guest_dir().join("livepatch.sh");
    let out = Command::new("bash")
        .arg(&script)
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
    let dir = std::env::temp_dir().join(format!("lucos-lpbench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("root/lib/lucos"))?;
    std::fs::copy(ko, dir.join("root").join(&GUEST_KO[1..]))
        .with_context(|| format!("copying {}", ko.display()))?;
    let st = Command::new("sh")
        .arg("-c")
        .arg(
            "cd root && find . | cpio -o -H newc --owner=0:0 2>/dev/null | gzip -n > ../overlay.gz",
        )
        .current_dir(&dir)
        .status()
        .context("running cpio")?;
    if !st.success() {
        bail!("packing the livepatch overlay failed (are cpio and gzip installed?)");
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
    lpbench(console, &format!("read {path} 2000 5"), "read_ns")
}

/// Microseconds from `finit_module` to the end of the livepatch transition.
pub fn load(console: &Console, name: &str) -> Result<u64> {
    lpbench(console, &format!("load {GUEST_KO} {name}"), "transition_us")
}
