//! Where the local signing key and the trust store live, and `lucos bundle sign`,
//! `verify` and `trust`.
//!
//! There is deliberately no flag to apply an unsigned or untrusted bundle: everything lucos
//! makes is signed by the local key, which is trusted when it is created, so development
//! never needs one, and a bypass one flag away would be the first thing a hostile bundle's
//! instructions asked for. A bundle from elsewhere is applied by trusting its maker's key
//! (or, having checked it, by signing it with `lucos bundle sign`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ed25519_dalek::SigningKey;
use lucos_patch::trust::{create_key, load_key, parse_public, public_line};
use lucos_patch::{signing, Bundle, TrustStore};

use crate::show::esc;

/// Name under which the local key's public half is trusted.
pub const LOCAL_NAME: &str = "local";

/// `$XDG_CONFIG_HOME/lucos`, else `~/.config/lucos`.
fn config_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").context(
            "neither XDG_CONFIG_HOME nor HOME is set, so there is no place for the signing \
             key; set LUCOS_SIGNING_KEY and LUCOS_TRUST_DIR",
        )?)
        .join(".config"),
    };
    Ok(base.join("lucos"))
}

/// The local signing key file: `$LUCOS_SIGNING_KEY`, else `<config>/signing.key`.
pub fn key_path() -> Result<PathBuf> {
    match std::env::var_os("LUCOS_SIGNING_KEY").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(config_dir()?.join("signing.key")),
    }
}

/// The trust store: `$LUCOS_TRUST_DIR`, else `<config>/trusted`.
pub fn trust_dir() -> Result<PathBuf> {
    match std::env::var_os("LUCOS_TRUST_DIR").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(config_dir()?.join("trusted")),
    }
}

pub fn trust_store() -> Result<TrustStore> {
    Ok(TrustStore::load(&trust_dir()?)?)
}

/// The local key, created on first use; a new key's public half is trusted as
/// [`LOCAL_NAME`], so that what this user builds, this user can apply.
pub fn local_key() -> Result<SigningKey> {
    let path = key_path()?;
    if path.exists() {
        return Ok(load_key(&path)?);
    }
    let key = create_key(&path)?;
    let mut store = trust_store()?;
    store.add(LOCAL_NAME, &key.verifying_key().to_bytes())?;
    eprintln!(
        "created signing key {} (owner-only); its public key is trusted as '{LOCAL_NAME}' in {}",
        path.display(),
        store.dir().display()
    );
    Ok(key)
}

/// `body` signed with the local key.
pub fn sign(body: &[u8]) -> Result<Vec<u8>> {
    Ok(signing::sign(body, &local_key()?))
}

/// Verifies a bundle file's signature against the trust store, then parses it.
pub fn open(bytes: &[u8], what: &Path) -> Result<Bundle> {
    let store = trust_store()?;
    Bundle::open(bytes, &store).with_context(|| format!("{} is refused", what.display()))
}

/// Signs freshly built bytes with the local key and opens them like a file from disk.
pub fn sign_and_open(body: &[u8], what: &Path) -> Result<Bundle> {
    open(&sign(body)?, what)
}

#[derive(Debug, Args)]
pub struct SignArgs {
    pub bundle: PathBuf,
    /// Where to write the signed bundle (default: replace the input).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TrustArgs {
    /// A public key to trust: a `.pub` file or 64 hex digits. Without it, lists the store.
    pub key: Option<String>,
    /// Name to trust the key under (the file NAME.pub in the store).
    #[arg(long)]
    pub name: Option<String>,
    /// Stop trusting the key of this name.
    #[arg(long, conflicts_with = "key")]
    pub remove: Option<String>,
}

pub fn sign_cmd(args: SignArgs) -> Result<()> {
    let bytes = crate::patchcmd::read_input(&args.bundle)?;
    // Only what is a bundle gets a signature: a typo'd path must not become "trusted".
    Bundle::parse(&bytes)
        .with_context(|| format!("{} is not a valid lucos bundle", args.bundle.display()))?;
    let signed = sign(&bytes)?;
    let out = args.output.unwrap_or(args.bundle);
    std::fs::write(&out, &signed).with_context(|| format!("writing {}", out.display()))?;
    let key = local_key()?.verifying_key().to_bytes();
    println!("signed {} with key {}", out.display(), hex::encode(key));
    Ok(())
}

pub fn verify_cmd(bundle: &Path) -> Result<()> {
    let bytes = crate::patchcmd::read_input(bundle)?;
    let b = open(&bytes, bundle)?;
    let s = b.signer().context("an opened bundle has a signer")?;
    println!(
        "{}: bundle '{}', signature good, signed by '{}' (key {})",
        bundle.display(),
        esc(&b.manifest().id),
        esc(&s.name),
        s.key_hex()
    );
    Ok(())
}

pub fn trust_cmd(args: TrustArgs) -> Result<()> {
    let mut store = trust_store()?;
    if let Some(name) = args.remove {
        store.remove(&name)?;
        println!("no longer trusting '{}'", esc(&name));
        return Ok(());
    }
    let Some(key) = args.key else {
        return list(&store);
    };
    let text = match std::fs::read_to_string(&key) {
        Ok(t) => t,
        Err(_) if !Path::new(&key).exists() => key.clone(),
        Err(e) => return Err(e).with_context(|| format!("reading {key}")),
    };
    let public = parse_public(&text)?;
    let Some(name) = args.name else {
        bail!("give the key a name: `lucos bundle trust {key} --name NAME`");
    };
    if let Some(old) = store.name_of(&public).filter(|n| *n != name) {
        bail!(
            "that key is already trusted as '{}'; remove it first (`lucos bundle trust --remove {}`)",
            esc(old),
            esc(old)
        );
    }
    store.add(&name, &public)?;
    println!(
        "trusting key {} as '{}' in {}",
        hex::encode(public),
        esc(&name),
        store.dir().display()
    );
    Ok(())
}

fn list(store: &TrustStore) -> Result<()> {
    println!("trust store {}:", store.dir().display());
    if store.keys().is_empty() {
        println!("  (empty)");
    }
    for (name, key) in store.keys() {
        println!("  {} {}", hex::encode(key), esc(name));
    }
    let path = key_path()?;
    if path.exists() {
        let key = load_key(&path)?.verifying_key().to_bytes();
        print!(
            "local signing key {}; give others this line to trust it:\n  {}",
            path.display(),
            public_line(&key, LOCAL_NAME)
        );
    } else {
        println!(
            "no local signing key yet ({}); `lucos build` or `lucos bundle sign` creates it",
            path.display()
        );
    }
    Ok(())
}
