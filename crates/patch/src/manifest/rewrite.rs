//! Objects of the running kernel written in place by the switch: read-only data whole,
//! writable data in the fields the update changes; and the bytes a bundle needs zero.

use serde::{Deserialize, Serialize};

use super::{check_source_path, check_symbol_name, hex_bytes, invalid, AbsField};
use crate::bundle::BundleError;

/// The largest read-only object a bundle may rewrite in place.
pub const MAX_REWRITE: usize = 1024;

/// The most read-only objects one bundle may rewrite (their records, with the original
/// bytes, must fit the registry with room for every revert).
pub const MAX_REWRITES: usize = 8;

/// One object rewritten in place (read-only data whole, writable data in its changed
/// `fields`): every vCPU is stopped during the switch, so no reader sees it half-written,
/// and every user (code and data that point to it) sees the new content without being
/// replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    pub old: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_file: Option<String>,
    /// The bundle's object holding the new content, linked like any read-only data.
    pub new: String,
    /// The live object as the original compile has it, relocated fields zero: the run-pre
    /// check, which also fixes the size.
    #[serde(with = "hex_bytes")]
    pub expect: Vec<u8>,
    /// Relocated fields of `expect`, not compared (their live values are addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<AbsField>,
    /// Writable data: only these byte ranges, whose initial value the update changes, are
    /// compared and written (their relocated bytes against the kernel image's); the rest
    /// holds live state. Empty: the whole object (read-only data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<Field>,
}

/// `len` bytes at `offset` of a rewritten object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub offset: u32,
    pub len: u32,
}

/// The largest writable object whose fields a bundle may rewrite (only the fields, at
/// most [`MAX_REWRITE`] bytes in all, are recorded).
pub const MAX_FIELDS_OBJECT: usize = 16384;

impl Rewrite {
    pub fn label(&self) -> String {
        match &self.old_file {
            Some(f) => format!("{}@{f}", self.old),
            None => self.old.clone(),
        }
    }

    /// Whether byte `i` of the object is in a relocated field (an address).
    fn relocated(&self, i: usize) -> bool {
        self.skip
            .iter()
            .any(|f| (f.offset as usize..f.offset as usize + usize::from(f.width)).contains(&i))
    }

    /// Whether `live` holds, in every field, the initial value this rewrite expects:
    /// `expect` where it is not relocated, the kernel image's bytes (`image`, slid) where
    /// it is. A relocated field with no image to compare is a mismatch.
    pub fn matches_fields(&self, live: &[u8], image: Option<&[u8]>) -> Result<(), usize> {
        let wanted = |i: usize| match self.relocated(i) {
            true => image.and_then(|b| b.get(i)),
            false => self.expect.get(i),
        };
        let bad = self
            .fields
            .iter()
            .flat_map(|f| f.offset as usize..(f.offset + f.len) as usize)
            .find(|&i| wanted(i).is_none() || live.get(i) != wanted(i));
        bad.map_or(Ok(()), Err)
    }

    /// Whether `live` is the object this rewrite expects.
    pub fn matches(&self, live: &[u8]) -> Result<(), usize> {
        let bad = (0..self.expect.len())
            .find(|&i| !self.relocated(i) && live.get(i) != Some(&self.expect[i]));
        bad.map_or(Ok(()), Err)
    }
}

/// Bytes at `addr` (link-time) that must be zero, in object `object`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zeroed {
    pub object: String,
    pub addr: u64,
    pub len: u32,
}

/// The most zero checks one bundle may carry (each is one small read before the pause).
pub const MAX_ZEROED: usize = 4096;

pub(super) fn validate_rewrite(i: usize, r: &Rewrite) -> Result<(), BundleError> {
    let f = |name: &str| format!("rewrites[{i}].{name}");
    check_symbol_name(&f("old"), &r.old)?;
    check_symbol_name(&f("new"), &r.new)?;
    if let Some(file) = &r.old_file {
        check_source_path(&f("old_file"), file)?;
    }
    let n = r.expect.len();
    let max = if r.fields.is_empty() {
        MAX_REWRITE
    } else {
        MAX_FIELDS_OBJECT
    };
    if n == 0 || n > max {
        return Err(invalid(
            f("expect"),
            format!("has {n} bytes; it must have 1..{max}"),
        ));
    }
    let written: usize = r.fields.iter().map(|x| x.len as usize).sum();
    if written > MAX_REWRITE
        || r.fields.len() > MAX_REWRITES
        || r.fields
            .iter()
            .any(|x| x.len == 0 || x.offset as usize + x.len as usize > n)
    {
        return Err(invalid(
            f("fields"),
            format!(
                "must be at most {MAX_REWRITES} non-empty ranges inside `expect`, of \
                 {MAX_REWRITE} bytes at most in all"
            ),
        ));
    }
    if r.skip.len() > n
        || r.skip
            .iter()
            .any(|s| !matches!(s.width, 4 | 8) || s.offset as usize + usize::from(s.width) > n)
    {
        return Err(invalid(
            f("skip"),
            "has a field that is not 4 or 8 bytes inside `expect`",
        ));
    }
    Ok(())
}
