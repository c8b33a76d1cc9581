//! The header page at the start of patch memory: which of the two registry slots is
//! current, with its length and checksum, so that a torn slot write leaves the other valid.

use super::{Registry, RegistryError, FORMAT, MAGIC};

/// The header page: which slot is current and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub active: u32,
    pub generation: u64,
    pub len: [u32; 2],
    pub crc: [u32; 2],
}

pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8;

impl Header {
    /// `None` for never-initialised (all-zero) patch memory.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Option<Header>, RegistryError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if &b[..8] != MAGIC {
            return Err(RegistryError::Corrupt("bad magic".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let format = u32_at(8);
        if format != FORMAT {
            return Err(RegistryError::Format(format));
        }
        let active = u32_at(12);
        if active > 1 {
            return Err(RegistryError::Corrupt(format!("active slot {active}")));
        }
        Ok(Some(Header {
            active,
            generation: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            len: [u32_at(24), u32_at(28)],
            crc: [u32_at(32), u32_at(36)],
        }))
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&self.active.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..28].copy_from_slice(&self.len[0].to_le_bytes());
        b[28..32].copy_from_slice(&self.len[1].to_le_bytes());
        b[32..36].copy_from_slice(&self.crc[0].to_le_bytes());
        b[36..40].copy_from_slice(&self.crc[1].to_le_bytes());
        b
    }

    /// Decodes the active slot's registry, checking length and checksum.
    pub fn registry(&self, slot_bytes: &[u8]) -> Result<Registry, RegistryError> {
        let len = self.len[self.active as usize] as usize;
        let json = slot_bytes
            .get(..len)
            .ok_or_else(|| RegistryError::Corrupt(format!("slot length {len} too large")))?;
        if crc32fast::hash(json) != self.crc[self.active as usize] {
            return Err(RegistryError::Corrupt("checksum mismatch".into()));
        }
        let reg: Registry =
            serde_json::from_slice(json).map_err(|source| RegistryError::BadJson { source })?;
        if reg.format != FORMAT {
            return Err(RegistryError::Format(reg.format));
        }
        Ok(reg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_with_a_good_checksum_but_bad_json_keeps_the_parser_error() {
        let json = br#"{"format": 1, "generation": "#;
        let h = Header {
            active: 0,
            generation: 1,
            len: [json.len() as u32, 0],
            crc: [crc32fast::hash(json), 0],
        };
        let e = h.registry(json).unwrap_err();
        let RegistryError::BadJson { source } = &e else {
            panic!("expected BadJson, got {e:?}");
        };
        assert!(source.is_eof(), "{source}");
        assert!(e.to_string().contains("bad JSON"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
