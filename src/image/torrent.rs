//! .torrent files (BEP 3) for archives: single-file info dictionary, SHA-1 piece hashes, private
//! flag (BEP 27) and the appliance's tracker as the only announce URL (bencoded with
//! serde_bencode). No creation date or client name: the same archive gives the same file and the
//! same info-hash. The appliance's seed serves exactly these torrents.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha1::{Digest, Sha1};

use super::error::ImageError;

const MIB: u64 = 1 << 20;

/// Piece length for a LAN swarm: about 1024 pieces (the smallest power of two that gets there),
/// within 256 KiB..=16 MiB. Many pieces give nodes that start together different pieces to trade
/// (a 64 MiB archive in 4 MiB pieces would have only 16); 16 MiB keeps a multi-GB image's piece
/// list and per-piece hashing cost small.
pub fn piece_length(size: u64) -> u64 {
    (size / 1024).next_power_of_two().clamp(256 << 10, 16 * MIB)
}

/// A generated torrent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Torrent {
    /// The whole .torrent file.
    pub bytes: Vec<u8>,
    /// SHA-1 of the bencoded info dictionary (hex), the swarm's identity.
    pub info_hash: String,
    /// Piece length used.
    pub piece_length: u64,
}

/// Checks `url` is `http://<host>:<port>/announce`.
///
/// # Errors
/// [`ImageError::BadAnnounce`].
pub fn check_announce(url: &str) -> Result<(), ImageError> {
    let ok = url
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix("/announce"))
        .and_then(|hp| hp.rsplit_once(':'))
        .is_some_and(|(h, p)| !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok { Ok(()) } else { Err(ImageError::BadAnnounce { url: url.to_owned() }) }
}

/// Builds the .torrent of the file at `path`, named `name` in the torrent.
///
/// # Errors
/// [`ImageError::BadAnnounce`], [`ImageError::ReadTree`] when the archive cannot be read.
pub fn make(path: &Path, name: &str, announce: &str) -> Result<Torrent, ImageError> {
    check_announce(announce)?;
    let mut f = File::open(path).map_err(ImageError::read_tree(path))?;
    let size = f.metadata().map_err(ImageError::read_tree(path))?.len();
    let plen = piece_length(size);
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; plen as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).map_err(ImageError::read_tree(path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        pieces.extend_from_slice(&Sha1::digest(&buf[..filled]));
        if filled < buf.len() {
            break;
        }
    }
    Ok(build(name, announce, size, plen, &pieces))
}

/// The single-file info dictionary (BEP 3), private (BEP 27). Field order is key order, as
/// bencode requires.
#[derive(Serialize)]
struct Info<'a> {
    length: u64,
    #[serde(with = "serde_bytes")]
    name: &'a [u8],
    #[serde(rename = "piece length")]
    piece_length: u64,
    #[serde(with = "serde_bytes")]
    pieces: &'a [u8],
    private: u8,
}

/// The metainfo: `announce` for old clients, `announce-list` (BEP 12) for the rest, `info` last
/// (key order), no creation date or client name.
#[derive(Serialize)]
struct Meta<'a> {
    announce: &'a str,
    #[serde(rename = "announce-list")]
    announce_list: [[&'a str; 1]; 1],
    info: Info<'a>,
}

fn build(name: &str, announce: &str, size: u64, plen: u64, pieces: &[u8]) -> Torrent {
    let info = Info { length: size, name: name.as_bytes(), piece_length: plen, pieces, private: 1 };
    // Integers and byte strings always encode.
    let info_bytes = serde_bencode::to_bytes(&info).expect("bencoding the info dictionary");
    let info_hash = hex::encode(Sha1::digest(&info_bytes));
    let meta = Meta { announce, announce_list: [[announce]], info };
    let bytes = serde_bencode::to_bytes(&meta).expect("bencoding the metainfo");
    Torrent { bytes, info_hash, piece_length: plen }
}

/// The info-hash (hex) of a .torrent this module wrote (`info` is its last key).
pub fn info_hash_of(torrent: &[u8]) -> Option<String> {
    let at = torrent.windows(6).position(|w| w == b"4:info")? + 6;
    let info = torrent.get(at..torrent.len().checked_sub(1)?)?;
    Some(hex::encode(Sha1::digest(info)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_lengths_aim_at_a_thousand_pieces() {
        assert_eq!(piece_length(0), 256 << 10);
        assert_eq!(piece_length(32 * MIB), 256 << 10);
        assert_eq!(piece_length(64 * MIB), 256 << 10);
        assert_eq!(piece_length(1 << 30), MIB);
        assert_eq!(piece_length(3 << 30), 4 * MIB);
        assert_eq!(piece_length(100 << 30), 16 * MIB);
    }

    #[test]
    fn bencode_is_sorted_and_exact() {
        let t = build("x.tar.zst", "http://10.0.0.1:80/announce", 5, 4 * MIB, &[0xaa; 20]);
        let expect_info =
            [&b"d6:lengthi5e4:name9:x.tar.zst12:piece lengthi4194304e6:pieces20:"[..], &[0xaa; 20], b"7:privatei1ee"]
                .concat();
        let expect = [
            &b"d8:announce27:http://10.0.0.1:80/announce13:announce-listll27:http://10.0.0.1:80/announceee4:info"[..],
            &expect_info,
            b"e",
        ]
        .concat();
        assert_eq!(t.bytes, expect);
        assert_eq!(t.info_hash, hex::encode(Sha1::digest(&expect_info)));
    }

    #[test]
    fn announce_urls() {
        assert!(check_announce("http://10.0.0.1:6969/announce").is_ok());
        for bad in [
            "",
            "https://a:1/announce",
            "http://a/announce",
            "http://:1/announce",
            "http://a:x/announce",
            "http://a:1/scrape",
        ] {
            assert!(check_announce(bad).is_err(), "{bad}");
        }
    }
}
