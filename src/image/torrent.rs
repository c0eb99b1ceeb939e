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

/// Piece length for a LAN swarm: about 8192 pieces (the smallest power of two that gets there),
/// within 64 KiB..=16 MiB. A piece passes from node to node only once it is whole, so the last
/// pieces the seed sends still have to reach every node after it: about N x piece / C, that is
/// N / pieces of T* (S / C). Pieces must outnumber nodes several times over. Measured in the
/// emulated swarm lab (`cargo bench --bench swarm`, one 64 MiB archive, makespan / T*): 128 KiB
/// against 64 KiB pieces 1.36-1.39 / 1.28 at N = 64 nodes on 10 Mbit/s, 1.21 / 1.16 at N = 32
/// on 40 Mbit/s, 1.14 / 1.13 at N = 8 on 100 Mbit/s; earlier, at N = 32 / 40 Mbit/s, 1 MiB 2.04,
/// 256 KiB 1.39-1.50, 128 KiB 1.28-1.31. A 2.7 GB image gets 512 KiB pieces (5150, a 103 KB
/// .torrent); 64 KiB keeps the per-piece messages and hashing calls of a small archive bounded
/// (1024 for 64 MiB), 16 MiB a huge image's piece list.
pub fn piece_length(size: u64) -> u64 {
    (size / 8192).next_power_of_two().clamp(MIN_PIECE, 16 * MIB)
}

/// The shortest piece [`piece_length`] chooses (archives under 512 MiB).
pub const MIN_PIECE: u64 = 64 << 10;

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

/// Why a .torrent cannot be used by the swarm.
#[derive(Debug, thiserror::Error)]
pub enum TorrentError {
    /// Not bencode, or not a dictionary with an `info` dictionary.
    #[error("not a torrent: {0}")]
    NotBencode(&'static str),
    /// The info dictionary lacks a key or has one of the wrong type.
    #[error("not a torrent: its info dictionary")]
    Info(#[source] serde_bencode::Error),
    /// A multi-file torrent (an image is one archive).
    #[error("a multi-file torrent (an image is one archive)")]
    MultiFile,
    /// No `length`.
    #[error("no length")]
    NoLength,
    /// The name is not UTF-8.
    #[error("name is not UTF-8")]
    NameNotUtf8,
    /// The name is not one plain path component.
    #[error("name {0:?} is not a plain file name")]
    NameNotPlain(String),
    /// The piece hashes do not fit the length and the piece length.
    #[error("{hashes} bytes of piece hashes for {size} bytes in pieces of {piece_len}")]
    Pieces {
        /// Bytes of hashes.
        hashes: usize,
        /// File length.
        size: u64,
        /// Piece length.
        piece_len: u64,
    },
}

/// What a torrent file says, as far as the swarm needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorrentInfo {
    /// Info-hash: SHA-1 of the info dictionary's bytes exactly as they are in the file.
    pub info_hash: [u8; 20],
    /// The single file's name.
    pub file_name: String,
    /// Its length.
    pub size: u64,
    /// Piece length.
    pub piece_len: u32,
    /// SHA-1 of every piece (as many as the length needs).
    pub hashes: Vec<[u8; 20]>,
}

/// The keys of an info dictionary the swarm reads (others are ignored, and hashed as they are).
#[derive(serde::Deserialize)]
struct InfoIn {
    length: Option<u64>,
    #[serde(default, with = "serde_bytes")]
    name: Option<Vec<u8>>,
    #[serde(rename = "piece length")]
    piece_length: u64,
    #[serde(with = "serde_bytes")]
    pieces: Vec<u8>,
    files: Option<serde_bencode::value::Value>,
}

/// Deepest nesting of lists and dictionaries accepted (a hostile file must not exhaust the stack).
const MAX_DEPTH: usize = 32;

/// The end (exclusive) of the bencoded value that starts at `at`.
fn value_end(b: &[u8], at: usize, depth: usize) -> Result<usize, TorrentError> {
    let bad = TorrentError::NotBencode;
    match b.get(at).copied() {
        Some(b'i') => {
            let end = at + 1 + b.get(at + 1..).and_then(|r| r.iter().position(|c| *c == b'e')).ok_or(bad("an unterminated integer"))?;
            let digits = &b[at + 1..end];
            let digits = digits.strip_prefix(b"-").unwrap_or(digits);
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(bad("a malformed integer"));
            }
            Ok(end + 1)
        }
        Some(b'l' | b'd') => {
            if depth >= MAX_DEPTH {
                return Err(bad("nested too deep"));
            }
            let mut i = at + 1;
            while b.get(i) != Some(&b'e') {
                if b.get(i).is_none() {
                    return Err(bad("an unterminated list or dictionary"));
                }
                i = value_end(b, i, depth + 1)?;
            }
            Ok(i + 1)
        }
        Some(c) if c.is_ascii_digit() => {
            let colon = at + b[at..].iter().position(|c| *c == b':').ok_or(bad("a string without its length"))?;
            let len: usize = std::str::from_utf8(&b[at..colon]).ok().and_then(|s| s.parse().ok()).ok_or(bad("a malformed string length"))?;
            let end = colon.checked_add(1 + len).filter(|e| *e <= b.len()).ok_or(bad("a string past the end"))?;
            Ok(end)
        }
        _ => Err(bad("an unexpected byte")),
    }
}

/// Whether `b` is exactly one bencoded value, nested at most 32 deep: check a peer's bencode
/// with it before serde_bencode (whose recursion has no depth limit) reads it.
pub fn well_formed(b: &[u8]) -> bool {
    value_end(b, 0, 0).is_ok_and(|end| end == b.len())
}

/// The raw bytes of the top-level dictionary's `info` value (hashed as they are: re-encoding
/// could reorder or drop keys and change the info-hash).
fn raw_info(b: &[u8]) -> Result<&[u8], TorrentError> {
    let bad = TorrentError::NotBencode;
    if b.first() != Some(&b'd') {
        return Err(bad("not a dictionary"));
    }
    let mut info = None;
    let mut i = 1;
    while b.get(i) != Some(&b'e') {
        if !b.get(i).is_some_and(u8::is_ascii_digit) {
            return Err(bad("a dictionary key that is not a string"));
        }
        let kend = value_end(b, i, 1)?;
        let key = &b[i..kend];
        let vend = value_end(b, kend, 1)?;
        if key.ends_with(b":info") && key.starts_with(b"4:") {
            info = Some(&b[kend..vend]);
        }
        i = vend;
    }
    if i + 1 != b.len() {
        return Err(bad("bytes after the dictionary"));
    }
    let info = info.ok_or(bad("no info dictionary"))?;
    if info.first() != Some(&b'd') {
        return Err(bad("info is not a dictionary"));
    }
    Ok(info)
}

/// Parses .torrent bytes: a single-file v1 torrent whose name is one plain path component.
/// The info-hash is the SHA-1 of the info dictionary's bytes as found in the file.
///
/// # Errors
/// [`TorrentError`] naming what is wrong.
pub fn parse(bytes: &[u8]) -> Result<TorrentInfo, TorrentError> {
    let raw = raw_info(bytes)?;
    let info: InfoIn = serde_bencode::from_bytes(raw).map_err(TorrentError::Info)?;
    if info.files.is_some() {
        return Err(TorrentError::MultiFile);
    }
    let size = info.length.ok_or(TorrentError::NoLength)?;
    let name = info.name.ok_or(TorrentError::NameNotPlain(String::new()))?;
    let file_name = String::from_utf8(name).map_err(|_| TorrentError::NameNotUtf8)?;
    let mut comps = Path::new(&file_name).components();
    if !matches!((comps.next(), comps.next()), (Some(std::path::Component::Normal(_)), None)) {
        return Err(TorrentError::NameNotPlain(file_name));
    }
    let piece_len = info.piece_length;
    let n = if piece_len == 0 { 0 } else { size.div_ceil(piece_len) };
    let pieces_bad = || TorrentError::Pieces { hashes: info.pieces.len(), size, piece_len };
    if piece_len == 0 || piece_len > u32::MAX as u64 || info.pieces.len() as u64 != n * 20 {
        return Err(pieces_bad());
    }
    let hashes = info.pieces.chunks_exact(20).map(|c| c.try_into().unwrap_or([0; 20])).collect();
    Ok(TorrentInfo { info_hash: Sha1::digest(raw).into(), file_name, size, piece_len: piece_len as u32, hashes })
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
    fn piece_lengths_aim_at_eight_thousand_pieces() {
        assert_eq!(piece_length(0), 64 << 10);
        assert_eq!(piece_length(64 * MIB), 64 << 10);
        assert_eq!(piece_length(512 * MIB), 64 << 10);
        assert_eq!(piece_length(1 << 30), 128 << 10);
        assert_eq!(piece_length(2_700_000_000), 512 << 10);
        assert_eq!(piece_length(3 << 30), 512 << 10);
        assert_eq!(piece_length(100 << 30), 16 * MIB);
        assert_eq!(piece_length(1 << 40), 16 * MIB);
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
    fn parse_reads_what_make_wrote_and_hashes_the_info_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img.tar.zst");
        std::fs::write(&f, vec![3u8; (1 << 20) + 5]).unwrap();
        let t = make(&f, "img.tar.zst", "http://10.0.0.1:80/announce").unwrap();
        let ti = parse(&t.bytes).unwrap();
        assert_eq!(hex::encode(ti.info_hash), t.info_hash);
        assert_eq!((ti.file_name.as_str(), ti.size, ti.piece_len as u64), ("img.tar.zst", (1 << 20) + 5, t.piece_length));
        // 1 MiB + 5 bytes in 64 KiB pieces: 16 full pieces and one of 5 bytes.
        assert_eq!(ti.hashes.len(), 17);
        assert_eq!(ti.hashes[16], <[u8; 20]>::from(Sha1::digest([3u8; 5])));
    }

    /// Keys the parser does not read, in an order serde would not write, stay in the hash:
    /// the info-hash is that of the bytes in the file, not of a re-encoding.
    #[test]
    fn the_info_hash_covers_unknown_keys_as_they_are() {
        let info = [&b"d6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces20:"[..], &[7; 20], b"7:privatei1e3:zzzli1ei2eee"].concat();
        let t = [&b"d8:announce3:abc4:info"[..], &info, b"7:comment2:hie"].concat();
        let ti = parse(&t).unwrap();
        assert_eq!(ti.info_hash, <[u8; 20]>::from(Sha1::digest(&info)));
        assert_eq!(ti.hashes, vec![[7u8; 20]]);
    }

    #[test]
    fn unusable_torrents_are_refused_with_the_reason() {
        let info = |body: &[u8]| [&b"d4:info"[..], body, b"e"].concat();
        let one = [&b"d6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces20:"[..], &[7; 20], b"e"].concat();
        assert!(parse(&info(&one)).is_ok());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"garbage".to_vec(), "not a torrent"),
            (b"d4:infoi3ee".to_vec(), "not a dictionary"),
            (b"d3:foo3:bare".to_vec(), "no info"),
            ([&info(&one)[..], b"x"].concat(), "after"),
            (info(b"d4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaa5:fileslee"), "multi-file"),
            (info(b"d4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "no length"),
            (info(b"d6:lengthi5e4:name2:..12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "plain"),
            (info(b"d6:lengthi5e4:name3:a/b12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaae"), "plain"),
            (info(b"d6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces19:aaaaaaaaaaaaaaaaaaae"), "piece hashes"),
            (info(b"d6:lengthi5e4:name1:x12:piece lengthi0e6:pieces0:e"), "piece hashes"),
            (info(b"d6:lengthi5e4:name1:x6:pieces0:e"), "info dictionary"),
            (b"d4:info999:xe".to_vec(), "past the end"),
            ([&b"d4:info"[..], &[b'l'; 100], &[b'e'; 101]].concat(), "nested"),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).expect_err(want);
            assert!(e.to_string().contains(want), "{e} (wanted {want:?}) for {:?}", String::from_utf8_lossy(&bytes));
        }
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
