//! .torrent files (BEP 3) for archives: single-file info dictionary, SHA-1 piece hashes, private
//! flag (BEP 27) and the appliance's tracker as the only announce URL. No creation date or
//! client name: the same archive gives the same file and the same info-hash.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha1::{Digest, Sha1};

use super::error::ImageError;

const MIB: u64 = 1 << 20;

/// Piece length for a LAN swarm: 4 MiB up to 4 GiB, 8 MiB up to 16 GiB, 16 MiB above, so a
/// big image has at most ~1000-2000 pieces and a small one still has many.
pub fn piece_length(size: u64) -> u64 {
    if size <= 4 << 30 {
        4 * MIB
    } else if size <= 16 << 30 {
        8 * MIB
    } else {
        16 * MIB
    }
}

/// A bencoded value; dictionaries are kept sorted by key as BEP 3 requires.
enum Benc<'a> {
    Int(i64),
    Bytes(&'a [u8]),
    Dict(Vec<(&'a [u8], Benc<'a>)>),
}

impl Benc<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Benc::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Benc::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Benc::Dict(items) => {
                let mut items: Vec<&(&[u8], Benc<'_>)> = items.iter().collect();
                items.sort_by(|a, b| a.0.cmp(b.0));
                out.push(b'd');
                for (k, v) in items {
                    Benc::Bytes(k).encode(out);
                    v.encode(out);
                }
                out.push(b'e');
            }
        }
    }
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

fn build(name: &str, announce: &str, size: u64, plen: u64, pieces: &[u8]) -> Torrent {
    let info = Benc::Dict(vec![
        (b"length", Benc::Int(size as i64)),
        (b"name", Benc::Bytes(name.as_bytes())),
        (b"piece length", Benc::Int(plen as i64)),
        (b"pieces", Benc::Bytes(pieces)),
        (b"private", Benc::Int(1)),
    ]);
    let mut info_bytes = Vec::new();
    info.encode(&mut info_bytes);
    let info_hash = hex::encode(Sha1::digest(&info_bytes));
    let mut bytes = Vec::new();
    bytes.push(b'd');
    Benc::Bytes(b"announce").encode(&mut bytes);
    Benc::Bytes(announce.as_bytes()).encode(&mut bytes);
    Benc::Bytes(b"info").encode(&mut bytes);
    bytes.extend_from_slice(&info_bytes);
    bytes.push(b'e');
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
    fn piece_lengths_for_a_lan() {
        assert_eq!(piece_length(0), 4 * MIB);
        assert_eq!(piece_length(3 << 30), 4 * MIB);
        assert_eq!(piece_length(10 << 30), 8 * MIB);
        assert_eq!(piece_length(100 << 30), 16 * MIB);
    }

    #[test]
    fn bencode_is_sorted_and_exact() {
        let t = build("x.tar.zst", "http://10.0.0.1:80/announce", 5, 4 * MIB, &[0xaa; 20]);
        let expect_info =
            [&b"d6:lengthi5e4:name9:x.tar.zst12:piece lengthi4194304e6:pieces20:"[..], &[0xaa; 20], b"7:privatei1ee"]
                .concat();
        let expect = [&b"d8:announce27:http://10.0.0.1:80/announce4:info"[..], &expect_info, b"e"].concat();
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
