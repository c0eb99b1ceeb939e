//! A BitTorrent v1 info-hash: the swarm names torrents by it, the tracker answers for it, the
//! monitor hears of it, the seal signs it. Shown and serialized as 40 lower-case hex digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A 20-byte BitTorrent v1 info-hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InfoHash(pub [u8; 20]);

impl fmt::Display for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not 40 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an info-hash (want 40 hex digits): {0:?}")]
pub struct BadInfoHash(pub String);

impl FromStr for InfoHash {
    type Err = BadInfoHash;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 20];
        hex::decode_to_slice(s, &mut b).map_err(|_| BadInfoHash(s.to_owned()))?;
        Ok(InfoHash(b))
    }
}

impl Serialize for InfoHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InfoHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_hashes_read_and_write_as_40_hex_digits() {
        let mut b = [0u8; 20];
        b[0] = 0xab;
        b[19] = 0x01;
        let ih = InfoHash(b);
        let hex = format!("ab{}01", "00".repeat(18));
        assert_eq!(ih.to_string(), hex);
        assert_eq!(format!("{ih:?}"), hex);
        assert_eq!(serde_json::to_string(&ih).unwrap(), format!("\"{hex}\""));
        assert_eq!(serde_json::from_str::<InfoHash>(&format!("\"{hex}\"")).unwrap(), ih);
        assert_eq!(hex.to_uppercase().parse::<InfoHash>().unwrap(), ih, "upper case is read too");
        for bad in ["", "ab", &"0".repeat(39), &"0".repeat(42), &"zz".repeat(20)] {
            assert!(bad.parse::<InfoHash>().is_err(), "{bad:?}");
            assert!(serde_json::from_str::<InfoHash>(&format!("\"{bad}\"")).is_err(), "{bad:?}");
        }
    }
}
