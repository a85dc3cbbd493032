//! META: small records keyed by a byte (`0xa` holds network configuration), one file each.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Why a META operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Keys are one byte.
    #[error("META key {0:#x} is out of range: keys are 0x00 to 0xff")]
    KeyRange(u32),
    /// The record does not exist.
    #[error("META key {0:#x} is not set")]
    NotFound(u32),
    /// Values are limited in size like the guides' META partition.
    #[error("META value of {0} bytes is too large: the limit is 256 KiB")]
    TooLarge(usize),
    /// Disk I/O failed.
    #[error("META: {0}")]
    Io(#[from] std::io::Error),
}

/// The META store of a node.
#[derive(Debug, Clone)]
pub struct Meta {
    dir: PathBuf,
}

impl Meta {
    /// The store in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, key: u32) -> Result<PathBuf, MetaError> {
        if key > 0xff {
            return Err(MetaError::KeyRange(key));
        }
        Ok(self.dir.join(format!("{key:#04x}")))
    }

    /// Writes a record.
    pub fn write(&self, key: u32, value: &[u8]) -> Result<(), MetaError> {
        if value.len() > 256 * 1024 {
            return Err(MetaError::TooLarge(value.len()));
        }
        let path = self.path(key)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, value)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    /// Deletes a record.
    pub fn delete(&self, key: u32) -> Result<(), MetaError> {
        match std::fs::remove_file(self.path(key)?) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MetaError::NotFound(key)),
            other => Ok(other?),
        }
    }

    /// Every record.
    pub fn list(&self) -> Result<BTreeMap<u32, Vec<u8>>, MetaError> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_prefix("0x")
                && let Ok(key) = u32::from_str_radix(hex, 16)
            {
                out.insert(key, std::fs::read(entry.path())?);
            }
        }
        Ok(out)
    }
}

/// Parses `0xa`, `0x0a` or `10`.
pub fn parse_key(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(k) if k <= 0xff => Ok(k),
        _ => Err(format!(
            "invalid META key {text:?}: write a byte such as 0xa or 10"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::new(dir.path().to_owned());
        meta.write(0xa, b"net").unwrap();
        assert_eq!(
            meta.list().unwrap().get(&0xa).map(Vec::as_slice),
            Some(&b"net"[..])
        );
        meta.delete(0xa).unwrap();
        assert!(matches!(meta.delete(0xa), Err(MetaError::NotFound(0xa))));
        assert!(matches!(
            meta.write(0x100, b""),
            Err(MetaError::KeyRange(_))
        ));
        assert_eq!(parse_key("0xa").unwrap(), 10);
        assert_eq!(parse_key("10").unwrap(), 10);
        assert!(parse_key("0x100").is_err());
    }
}
