//! Bundle signatures: an ed25519 signature in a fixed trailer after the ELF object
//! (docs/bundle-format.md, "Signature").
//!
//! The trailer is at the end of the file so that it is found and checked over the raw bytes
//! before anything of the object is parsed: a bundle changed after signing is refused for
//! its signature, never for whatever the change broke (or, worse, did not break). ELF
//! readers locate everything by offset, so binutils still read a signed bundle.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::trust::TrustStore;

/// Last 8 bytes of a signed bundle.
pub const SIG_MAGIC: [u8; 8] = *b"LUCOSIG1";
/// Signature (64) + public key (32) + magic (8).
pub const TRAILER_LEN: usize = 64 + 32 + 8;
/// Prefix of the signed message, so that a bundle signature can never be mistaken for (or
/// replayed as) a signature over anything else made with the same key.
const DOMAIN: &[u8; 16] = b"lucos-bundle-v1\0";

#[derive(Debug, Error)]
pub enum SignatureError {
    #[error(
        "the bundle is not signed; sign it with `lucos bundle sign FILE` (your local key), or \
         ask its maker for a signed one"
    )]
    Unsigned,
    #[error(
        "the bundle's signature does not match its contents: it was changed after it was \
         signed, or corrupted; do not apply it, rebuild it or fetch it again from its maker"
    )]
    BadSignature,
    #[error(
        "the bundle is signed by key {key}, which is not in the trust store {store}; if you \
         trust the bundle's maker, add the key with `lucos bundle trust {key} --name NAME`"
    )]
    Untrusted { key: String, store: String },
}

/// Who signed a verified bundle: the key and the name it has in the trust store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    pub key: [u8; 32],
    pub name: String,
}

impl Signer {
    pub fn key_hex(&self) -> String {
        hex::encode(self.key)
    }
}

/// The signature trailer of a file, if it has one, without checking it.
struct Trailer<'a> {
    body: &'a [u8],
    signature: [u8; 64],
    key: [u8; 32],
}

fn trailer(file: &[u8]) -> Option<Trailer<'_>> {
    let split = file.len().checked_sub(TRAILER_LEN)?;
    let (body, t) = file.split_at(split);
    if t[96..] != SIG_MAGIC {
        return None;
    }
    Some(Trailer {
        body,
        signature: t[..64].try_into().ok()?,
        key: t[64..96].try_into().ok()?,
    })
}

/// The file without its signature trailer (the whole file when it has none).
pub fn strip(file: &[u8]) -> &[u8] {
    trailer(file).map_or(file, |t| t.body)
}

/// The public key a file claims to be signed with, unchecked (for messages and `verify`).
pub fn claimed_key(file: &[u8]) -> Option<[u8; 32]> {
    trailer(file).map(|t| t.key)
}

fn message(key: &[u8; 32], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 32 + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(key);
    m.extend_from_slice(&Sha256::digest(body));
    m
}

/// Returns `file` signed with `key`; an existing signature is replaced.
pub fn sign(file: &[u8], key: &SigningKey) -> Vec<u8> {
    let body = strip(file);
    let public = key.verifying_key().to_bytes();
    let signature = key.sign(&message(&public, body));
    let mut out = Vec::with_capacity(body.len() + TRAILER_LEN);
    out.extend_from_slice(body);
    out.extend_from_slice(&signature.to_bytes());
    out.extend_from_slice(&public);
    out.extend_from_slice(&SIG_MAGIC);
    out
}

/// Checks the signature over the raw bytes and that its key is trusted; returns the
/// signed object (the file without its trailer) and the signer.
///
/// The signature is checked before the key is looked up, so a changed byte is always
/// reported as such, whoever claims to have signed.
pub fn verify<'a>(
    file: &'a [u8],
    trust: &TrustStore,
) -> Result<(&'a [u8], Signer), SignatureError> {
    let t = trailer(file).ok_or(SignatureError::Unsigned)?;
    let key = VerifyingKey::from_bytes(&t.key).map_err(|_| SignatureError::BadSignature)?;
    key.verify_strict(
        &message(&t.key, t.body),
        &Signature::from_bytes(&t.signature),
    )
    .map_err(|_| SignatureError::BadSignature)?;
    let name = trust
        .name_of(&t.key)
        .ok_or_else(|| SignatureError::Untrusted {
            key: hex::encode(t.key),
            store: trust.dir().display().to_string(),
        })?;
    Ok((
        t.body,
        Signer {
            key: t.key,
            name: name.to_owned(),
        },
    ))
}
