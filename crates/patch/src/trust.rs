//! Keys on disk: the local signing key and the trust store of public keys.
//!
//! The trust store is a directory of `NAME.pub` files, one public key each, so that keys are
//! added and removed with ordinary file tools as well as `lucos bundle trust`, and a
//! directory can be shared read-only (by configuration management, say).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use thiserror::Error;

/// First word of a public key file.
pub const PUBLIC_TAG: &str = "lucos-ed25519";
/// First word of a secret key file.
const SECRET_TAG: &str = "lucos-ed25519-secret";

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    BadTrustEntry {
        path: PathBuf,
        #[source]
        source: Box<KeyError>,
    },
    #[error(
        "{} can be read by other users (mode {mode:o}); a signing key must be private: \
         `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyReadable { path: PathBuf, mode: u32 },
    #[error("not a public key: {reason}; give a .pub file or the key's 64 hex digits")]
    BadPublicKey { reason: String },
    #[error(
        "trust store name `{name}` is not usable; use 1-64 characters of [A-Za-z0-9._-] \
         not starting with '.' or '-'"
    )]
    BadName { name: String },
    #[error("no key named `{name}` in the trust store {}", dir.display())]
    NoSuchKey { name: String, dir: PathBuf },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KeyError + 'a {
    move |source| KeyError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Parses a public key given as a key file's text or as bare hex.
pub fn parse_public(text: &str) -> Result<[u8; 32], KeyError> {
    let bad = |reason: &str| KeyError::BadPublicKey {
        reason: reason.to_owned(),
    };
    let mut words = text.split_whitespace();
    let first = words.next().ok_or_else(|| bad("it is empty"))?;
    let hex_key = if first == PUBLIC_TAG {
        words.next().ok_or_else(|| bad("no key after the tag"))?
    } else {
        first
    };
    let bytes = hex::decode(hex_key).map_err(|_| bad("the key is not hex"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| bad("an ed25519 key is 32 bytes (64 hex digits)"))?;
    VerifyingKey::from_bytes(&key).map_err(|_| bad("not a valid ed25519 point"))?;
    Ok(key)
}

/// The text of a public key file.
pub fn public_line(key: &[u8; 32], name: &str) -> String {
    format!("{PUBLIC_TAG} {} {name}\n", hex::encode(key))
}

fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName {
            name: name.to_owned(),
        })
    }
}

/// The public keys whose bundles may be applied.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
    keys: Vec<(String, [u8; 32])>,
}

impl TrustStore {
    /// Reads every `*.pub` file of `dir`; a missing directory is an empty store (the
    /// refusal then says how to add a key). A malformed key file is an error, not skipped:
    /// the operator meant to trust something.
    pub fn load(dir: &Path) -> Result<TrustStore, KeyError> {
        let mut keys = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TrustStore {
                    dir: dir.to_owned(),
                    keys,
                })
            }
            Err(e) => return Err(io("reading the trust store", dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io("reading the trust store", dir))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pub"))
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
            let key = parse_public(&text).map_err(|e| KeyError::BadTrustEntry {
                path: path.clone(),
                source: Box::new(e),
            })?;
            keys.push((name.to_owned(), key));
        }
        keys.sort();
        Ok(TrustStore {
            dir: dir.to_owned(),
            keys,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn keys(&self) -> &[(String, [u8; 32])] {
        &self.keys
    }

    /// The name a key is trusted under.
    pub fn name_of(&self, key: &[u8; 32]) -> Option<&str> {
        self.keys
            .iter()
            .find(|(_, k)| k == key)
            .map(|(n, _)| n.as_str())
    }

    /// Trusts `key` as `name` (writes `NAME.pub`, replacing a key of that name).
    pub fn add(&mut self, name: &str, key: &[u8; 32]) -> Result<(), KeyError> {
        check_name(name)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io("creating the trust store", &self.dir))?;
        let path = self.dir.join(format!("{name}.pub"));
        std::fs::write(&path, public_line(key, name)).map_err(io("writing", &path))?;
        self.keys.retain(|(n, _)| n != name);
        self.keys.push((name.to_owned(), *key));
        self.keys.sort();
        Ok(())
    }

    /// Stops trusting the key named `name`.
    pub fn remove(&mut self, name: &str) -> Result<(), KeyError> {
        check_name(name)?;
        let path = self.dir.join(format!("{name}.pub"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KeyError::NoSuchKey {
                name: name.to_owned(),
                dir: self.dir.clone(),
            }),
            r => r.map_err(io("removing", &path)),
        }?;
        self.keys.retain(|(n, _)| n != name);
        Ok(())
    }
}

/// Loads the secret key at `path`. A key others can read is refused: anyone who can read it
/// can sign bundles that this machine applies.
pub fn load_key(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = std::fs::metadata(path).map_err(io("reading the signing key", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::KeyReadable {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io("reading the signing key", path))?;
    let bad = |reason: &str| KeyError::BadFile {
        path: path.to_owned(),
        reason: format!("{reason}; this is not a lucos signing key"),
    };
    let mut words = text.split_whitespace();
    if words.next() != Some(SECRET_TAG) {
        return Err(bad("it does not start with `lucos-ed25519-secret`"));
    }
    let seed: [u8; 32] = words
        .next()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("the seed is not 64 hex digits"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A new key from the kernel's random source, written owner-only with `create_new`, so an
/// existing key is never overwritten and the file is never briefly readable by others.
pub fn create_key(path: &Path) -> Result<SigningKey, KeyError> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io("reading random bytes from", Path::new("/dev/urandom")))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io("creating the key directory", parent))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("creating the signing key", path))?;
    f.write_all(format!("{SECRET_TAG} {}\n", hex::encode(seed)).as_bytes())
        .map_err(io("writing the signing key", path))?;
    Ok(SigningKey::from_bytes(&seed))
}
