//! The BitTorrent peer wire protocol (BEP 3): the handshake and the length-prefixed messages
//! the node-to-node engine speaks, and the extension protocol's envelope (BEP 10: reserved bit
//! 0x10 of byte 5, message 20). The only extension we announce is our own `si_claim` (see
//! [`core`](super::core)): a standard peer (aria2c, transmission, librqbit) answers with its
//! extension handshake, which names no `si_claim`, and sends nothing else of ours; anything
//! else it sends is skipped. Every length is checked before a byte is buffered.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The protocol string of the handshake.
pub const PSTR: &[u8; 19] = b"BitTorrent protocol";
/// Handshake length: 1 + 19 + 8 reserved + 20 info-hash + 20 peer id.
pub const HANDSHAKE_LEN: usize = 68;
/// The block size we request (every client uses 16 KiB).
pub const BLOCK: u32 = 16 * 1024;
/// Largest block a peer may ask of us (BEP 3 clients use 16 KiB; some allow up to 128 KiB).
pub const MAX_REQUEST: u32 = 128 * 1024;

/// A decoded handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// The torrent.
    pub info_hash: [u8; 20],
    /// The sender's id.
    pub peer_id: [u8; 20],
    /// The sender speaks the extension protocol (BEP 10).
    pub extensions: bool,
}

/// Byte of the handshake (reserved byte 5) and bit announcing BEP 10.
const EXT_BYTE: usize = 20 + 5;
const EXT_BIT: u8 = 0x10;

impl Handshake {
    /// The 68 bytes on the wire.
    pub fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut b = [0u8; HANDSHAKE_LEN];
        b[0] = 19;
        b[1..20].copy_from_slice(PSTR);
        if self.extensions {
            b[EXT_BYTE] |= EXT_BIT;
        }
        b[28..48].copy_from_slice(&self.info_hash);
        b[48..68].copy_from_slice(&self.peer_id);
        b
    }

    /// Parses 68 bytes.
    ///
    /// # Errors
    /// [`WireError::Handshake`] when it is not a BitTorrent handshake.
    pub fn decode(b: &[u8; HANDSHAKE_LEN]) -> Result<Handshake, WireError> {
        if b[0] != 19 || &b[1..20] != PSTR {
            return Err(WireError::Handshake);
        }
        let mut info_hash = [0u8; 20];
        let mut peer_id = [0u8; 20];
        info_hash.copy_from_slice(&b[28..48]);
        peer_id.copy_from_slice(&b[48..68]);
        Ok(Handshake { info_hash, peer_id, extensions: b[EXT_BYTE] & EXT_BIT != 0 })
    }
}

/// Errors of the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading from the peer failed or it closed the connection.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The first 20 bytes are not `\x13BitTorrent protocol`.
    #[error("not a BitTorrent handshake")]
    Handshake,
    /// A message longer than anything this torrent can need.
    #[error("message of {len} bytes (at most {max})")]
    TooLong {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A known message with the wrong payload length.
    #[error("message {id} with a payload of {len} bytes")]
    BadLength {
        /// Message id.
        id: u8,
        /// Payload length.
        len: usize,
    },
}

/// One peer message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Zero-length message.
    KeepAlive,
    /// 0.
    Choke,
    /// 1.
    Unchoke,
    /// 2.
    Interested,
    /// 3.
    NotInterested,
    /// 4: the sender has verified this piece.
    Have(u32),
    /// 5: the sender's pieces, high bit first.
    Bitfield(Vec<u8>),
    /// 6: please send this block.
    Request {
        /// Piece index.
        piece: u32,
        /// Offset in the piece.
        begin: u32,
        /// Length.
        len: u32,
    },
    /// 7: a block.
    Piece {
        /// Piece index.
        piece: u32,
        /// Offset in the piece.
        begin: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// 8: never mind that request.
    Cancel {
        /// Piece index.
        piece: u32,
        /// Offset in the piece.
        begin: u32,
        /// Length.
        len: u32,
    },
    /// 20 (BEP 10): an extension message, `id` 0 the extension handshake (a bencoded
    /// dictionary), any other id the number the receiver gave the extension in its handshake.
    Extended {
        /// Extended message id.
        id: u8,
        /// The rest.
        payload: Vec<u8>,
    },
    /// Any other id (DHT port, fast extension: not announced): skipped.
    Other(u8),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Msg {
    /// Decodes a message body (id + payload; the length prefix already stripped; not empty).
    ///
    /// # Errors
    /// [`WireError::BadLength`].
    pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
        let Some((&id, p)) = body.split_first() else { return Ok(Msg::KeepAlive) };
        let want = |n: usize| if p.len() == n { Ok(()) } else { Err(WireError::BadLength { id, len: p.len() }) };
        Ok(match id {
            0 => want(0).map(|()| Msg::Choke)?,
            1 => want(0).map(|()| Msg::Unchoke)?,
            2 => want(0).map(|()| Msg::Interested)?,
            3 => want(0).map(|()| Msg::NotInterested)?,
            4 => want(4).map(|()| Msg::Have(u32_at(p, 0)))?,
            5 => Msg::Bitfield(p.to_vec()),
            6 => want(12).map(|()| Msg::Request { piece: u32_at(p, 0), begin: u32_at(p, 4), len: u32_at(p, 8) })?,
            7 => {
                if p.len() < 8 {
                    return Err(WireError::BadLength { id, len: p.len() });
                }
                Msg::Piece { piece: u32_at(p, 0), begin: u32_at(p, 4), data: p[8..].to_vec() }
            }
            8 => want(12).map(|()| Msg::Cancel { piece: u32_at(p, 0), begin: u32_at(p, 4), len: u32_at(p, 8) })?,
            20 => match p.split_first() {
                Some((&id, rest)) => Msg::Extended { id, payload: rest.to_vec() },
                None => return Err(WireError::BadLength { id, len: 0 }),
            },
            other => Msg::Other(other),
        })
    }

    /// The message with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        let three = |v: &mut Vec<u8>, id: u8, a: u32, b: u32, c: u32| {
            v.extend_from_slice(&13u32.to_be_bytes());
            v.push(id);
            for x in [a, b, c] {
                v.extend_from_slice(&x.to_be_bytes());
            }
        };
        match self {
            Msg::KeepAlive => v.extend_from_slice(&0u32.to_be_bytes()),
            Msg::Choke | Msg::Unchoke | Msg::Interested | Msg::NotInterested => {
                let id = match self {
                    Msg::Choke => 0,
                    Msg::Unchoke => 1,
                    Msg::Interested => 2,
                    _ => 3,
                };
                v.extend_from_slice(&1u32.to_be_bytes());
                v.push(id);
            }
            Msg::Have(i) => {
                v.extend_from_slice(&5u32.to_be_bytes());
                v.push(4);
                v.extend_from_slice(&i.to_be_bytes());
            }
            Msg::Bitfield(bits) => {
                v.extend_from_slice(&(1 + bits.len() as u32).to_be_bytes());
                v.push(5);
                v.extend_from_slice(bits);
            }
            Msg::Request { piece, begin, len } => three(&mut v, 6, *piece, *begin, *len),
            Msg::Cancel { piece, begin, len } => three(&mut v, 8, *piece, *begin, *len),
            Msg::Piece { piece, begin, data } => {
                v.reserve(data.len() + 13);
                v.extend_from_slice(&piece_header(*piece, *begin, data.len() as u32));
                v.extend_from_slice(data);
            }
            Msg::Extended { id, payload } => {
                v.extend_from_slice(&(2 + payload.len() as u32).to_be_bytes());
                v.push(20);
                v.push(*id);
                v.extend_from_slice(payload);
            }
            Msg::Other(_) => {}
        }
        v
    }
}

/// The 13 bytes before a block's data in a `piece` message.
pub fn piece_header(piece: u32, begin: u32, len: u32) -> [u8; 13] {
    let mut h = [0u8; 13];
    h[..4].copy_from_slice(&(9 + len).to_be_bytes());
    h[4] = 7;
    h[5..9].copy_from_slice(&piece.to_be_bytes());
    h[9..13].copy_from_slice(&begin.to_be_bytes());
    h
}

/// Largest message body a peer may send for a torrent of `pieces` pieces: a bitfield, a block
/// of at most [`MAX_REQUEST`], or a small control message.
pub fn max_body(pieces: u32) -> u32 {
    (1 + pieces.div_ceil(8)).max(9 + MAX_REQUEST)
}

/// Reads one message; `buf` is reused between calls.
///
/// # Errors
/// [`WireError`]: I/O, an oversized or malformed message.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: u32) -> Result<Msg, WireError> {
    read_msg_hinted(r, buf, max, |_, _| {}).await
}

/// [`read_msg`], telling `body(r, n)` once a block's header is read that `n` more bytes of it
/// are to come: the caller may then wait for them in one wake-up (see the engine's
/// connection reader) instead of one per arriving segment.
///
/// # Errors
/// As [`read_msg`].
pub async fn read_msg_hinted<R, H>(r: &mut R, buf: &mut Vec<u8>, max: u32, mut body: H) -> Result<Msg, WireError>
where
    R: AsyncRead + Unpin,
    H: FnMut(&mut R, usize),
{
    let len = r.read_u32().await?;
    if len == 0 {
        return Ok(Msg::KeepAlive);
    }
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    let id = r.read_u8().await?;
    if id == 7 && len >= 9 {
        // A block: its bytes go straight into their own buffer (no second copy).
        let piece = r.read_u32().await?;
        let begin = r.read_u32().await?;
        let mut data = vec![0u8; len as usize - 9];
        body(r, data.len());
        r.read_exact(&mut data).await?;
        return Ok(Msg::Piece { piece, begin, data });
    }
    buf.clear();
    buf.push(id);
    buf.resize(len as usize, 0);
    r.read_exact(&mut buf[1..]).await?;
    Msg::decode(buf)
}

/// A bitfield of `n` pieces from `have` (spare bits zero).
pub fn bitfield(have: &[bool]) -> Vec<u8> {
    let mut b = vec![0u8; have.len().div_ceil(8)];
    for (i, _) in have.iter().enumerate().filter(|(_, h)| **h) {
        b[i / 8] |= 0x80 >> (i % 8);
    }
    b
}

/// The pieces of a received bitfield, or None when its length does not fit `n` pieces or a
/// spare bit is set (BEP 3: drop the connection).
pub fn parse_bitfield(b: &[u8], n: u32) -> Option<Vec<bool>> {
    if b.len() != (n as usize).div_ceil(8) {
        return None;
    }
    let bits: Vec<bool> = (0..b.len() * 8).map(|i| b[i / 8] & (0x80 >> (i % 8)) != 0).collect();
    if bits[n as usize..].iter().any(|x| *x) {
        return None;
    }
    Some(bits[..n as usize].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Msg::Choke,
            Msg::Unchoke,
            Msg::Interested,
            Msg::NotInterested,
            Msg::Have(7),
            Msg::Bitfield(vec![0xf0, 0x80]),
            Msg::Request { piece: 1, begin: 16384, len: 16384 },
            Msg::Cancel { piece: 2, begin: 0, len: 100 },
            Msg::Piece { piece: 3, begin: 32768, data: vec![9; 100] },
            Msg::Extended { id: 0, payload: b"d1:md8:si_claimi3eee".to_vec() },
            Msg::Extended { id: 3, payload: vec![0, 0, 1, 2] },
        ] {
            let e = m.encode();
            assert_eq!(u32_at(&e, 0) as usize, e.len() - 4, "{m:?}");
            assert_eq!(Msg::decode(&e[4..]).unwrap(), m);
        }
        assert_eq!(Msg::KeepAlive.encode(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn bad_lengths_are_refused_unknown_ids_skipped() {
        assert!(matches!(Msg::decode(&[4, 0, 0]), Err(WireError::BadLength { id: 4, len: 2 })));
        assert!(Msg::decode(&[6, 0]).is_err());
        assert!(Msg::decode(&[7, 0, 0, 0]).is_err());
        assert!(Msg::decode(&[0, 1]).is_err());
        assert_eq!(Msg::decode(&[20, 1, 2, 3]).unwrap(), Msg::Extended { id: 1, payload: vec![2, 3] });
        assert!(matches!(Msg::decode(&[20]), Err(WireError::BadLength { id: 20, len: 0 })));
        assert_eq!(Msg::decode(&[9, 1, 2]).unwrap(), Msg::Other(9));
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_before_reading() {
        let mut wire: &[u8] = &[0x7f, 0xff, 0xff, 0xff, 7];
        let mut buf = Vec::new();
        assert!(matches!(read_msg(&mut wire, &mut buf, max_body(1024)).await, Err(WireError::TooLong { .. })));
        assert!(buf.capacity() < 1024);
        let mut two: &[u8] = &[0, 0, 0, 0, 0, 0, 0, 1, 1];
        assert_eq!(read_msg(&mut two, &mut buf, 100).await.unwrap(), Msg::KeepAlive);
        assert_eq!(read_msg(&mut two, &mut buf, 100).await.unwrap(), Msg::Unchoke);
        assert!(read_msg(&mut two, &mut buf, 100).await.is_err());
        // A block and a short `piece` message (refused as before) read through the stream.
        let block = Msg::Piece { piece: 5, begin: 16384, data: (0..=255u8).cycle().take(1000).collect() };
        let mut wire: Vec<u8> = block.encode();
        wire.extend_from_slice(&[0, 0, 0, 5, 7, 0, 0, 0, 1]);
        let mut rd: &[u8] = &wire;
        assert_eq!(read_msg(&mut rd, &mut buf, 2000).await.unwrap(), block);
        assert!(matches!(read_msg(&mut rd, &mut buf, 2000).await, Err(WireError::BadLength { id: 7, len: 4 })));
    }

    #[test]
    fn handshakes_and_bitfields() {
        let h = Handshake { info_hash: [1; 20], peer_id: [2; 20], extensions: false };
        assert_eq!(Handshake::decode(&h.encode()).unwrap(), h);
        assert_eq!(&h.encode()[20..28], &[0; 8], "no reserved bit without extensions");
        let x = Handshake { extensions: true, ..h };
        assert_eq!(x.encode()[25], 0x10, "BEP 10: bit 0x10 of reserved byte 5");
        assert_eq!(Handshake::decode(&x.encode()).unwrap(), x);
        let mut bad = h.encode();
        bad[3] = b'x';
        assert!(Handshake::decode(&bad).is_err());
        let have = [true, false, false, false, false, false, false, false, true, true];
        let b = bitfield(&have);
        assert_eq!(b, vec![0x80, 0xc0]);
        assert_eq!(parse_bitfield(&b, 10).unwrap(), have);
        assert!(parse_bitfield(&b, 9).is_none(), "spare bit set");
        assert!(parse_bitfield(&b, 17).is_none(), "wrong length");
    }
}
