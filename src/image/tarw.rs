//! A deterministic tar writer: POSIX ustar headers with PAX extended headers (`path`,
//! `linkpath`, `SCHILY.xattr.*`, `hdrcharset`) and, for sparse files, old-GNU `S` headers with
//! their sparse maps. Every header field is derived from the [`Node`] alone: no user/group names,
//! no atime/ctime, fixed extension-header names, so the same tree gives the same bytes.
//! Numbers too large for octal use GNU base-256, which GNU tar, bsdtar and the tar crate read.
//! Pure encoding over any `Write`; the caller supplies file contents.

use std::io::{self, Write};

use super::scan::{Kind, Node};

/// Tar block size.
pub const BLOCK: usize = 512;

/// Name of the PAX extended header entries (ignored by readers; fixed for determinism).
const PAX_NAME: &[u8] = b"././@PaxHeader";

/// Writes tar entries to `W`, counting bytes.
pub struct TarWriter<W: Write> {
    out: W,
}

/// The archive name of a node: `./` for the root, `./rel` otherwise, with `/` after a directory.
pub fn archive_name(node: &Node) -> Vec<u8> {
    let mut name = b"./".to_vec();
    name.extend_from_slice(&node.rel);
    if node.kind == Kind::Dir && !node.rel.is_empty() {
        name.push(b'/');
    }
    name
}

impl<W: Write> TarWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        TarWriter { out }
    }

    /// Writes the header(s) of `node`; for a regular file the caller must then write exactly
    /// [`stored_size`] bytes with [`TarWriter::data`] and call [`TarWriter::pad`].
    ///
    /// # Errors
    /// Any error of the underlying writer.
    pub fn header(&mut self, node: &Node) -> io::Result<()> {
        self.header_named(node, &archive_name(node))
    }

    /// Like [`TarWriter::header`] with an explicit archive name (used for the diff's control entry).
    ///
    /// # Errors
    /// Any error of the underlying writer.
    pub fn header_named(&mut self, node: &Node, name: &[u8]) -> io::Result<()> {
        let link: &[u8] = match &node.kind {
            Kind::Symlink(t) => t,
            Kind::HardLink(t) => t,
            _ => b"",
        };
        let hardlink_name;
        let link = if let Kind::HardLink(_) = node.kind {
            hardlink_name = [b"./", link].concat();
            &hardlink_name[..]
        } else {
            link
        };
        // Names go in as raw bytes: GNU tar 1.34 and the tar crate take PAX path/linkpath bytes
        // as they are (GNU tar warns about, and ignores, `hdrcharset`).
        let mut pax: Vec<(Vec<u8>, &[u8])> = Vec::new();
        let mtime_text;
        if node.mtime_ns != 0 || node.mtime < 0 {
            // Sub-second mtime as GNU tar writes it: "<sec>.<9 digits>".
            mtime_text = if node.mtime < 0 && node.mtime_ns > 0 {
                format!("-{}.{:09}", -(node.mtime + 1), 1_000_000_000 - node.mtime_ns)
            } else {
                format!("{}.{:09}", node.mtime, node.mtime_ns)
            };
            pax.push((b"mtime".to_vec(), mtime_text.as_bytes()));
        }
        if link.len() > 100 {
            pax.push((b"linkpath".to_vec(), link));
        }
        if name.len() > 100 {
            pax.push((b"path".to_vec(), name));
        }
        for (k, v) in &node.xattrs {
            pax.push(([&b"SCHILY.xattr."[..], k].concat(), v));
        }
        if !pax.is_empty() {
            let body = pax_records(&pax);
            let h = Ustar {
                name: PAX_NAME,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: body.len() as u64,
                mtime: 0,
                typeflag: b'x',
                link: b"",
                dev: None,
            }
            .encode();
            self.out.write_all(&h)?;
            self.out.write_all(&body)?;
            self.pad(body.len() as u64)?;
        }
        let (typeflag, size, dev) = match &node.kind {
            Kind::Dir => (b'5', 0, None),
            Kind::File { size, extents: None } => (b'0', *size, None),
            Kind::File { size, extents: Some(ext) } => {
                return self.sparse_header(node, name, *size, ext);
            }
            Kind::Symlink(_) => (b'2', 0, None),
            Kind::HardLink(_) => (b'1', 0, None),
            Kind::Char(a, b) => (b'3', 0, Some((*a, *b))),
            Kind::Block(a, b) => (b'4', 0, Some((*a, *b))),
            Kind::Fifo => (b'6', 0, None),
        };
        let h = Ustar {
            name: truncate(name),
            mode: node.mode,
            uid: node.uid,
            gid: node.gid,
            size,
            mtime: node.mtime.max(0) as u64,
            typeflag,
            link: truncate(link),
            dev,
        }
        .encode();
        self.out.write_all(&h)
    }

    fn sparse_header(&mut self, node: &Node, name: &[u8], real: u64, ext: &[(u64, u64)]) -> io::Result<()> {
        let stored: u64 = ext.iter().map(|e| e.1).sum();
        // The map always ends at the real size so readers know the trailing hole.
        let mut map: Vec<(u64, u64)> = ext.to_vec();
        if map.last().is_none_or(|(o, l)| o + l < real) {
            map.push((real, 0));
        }
        let mut h = Ustar {
            name: truncate(name),
            mode: node.mode,
            uid: node.uid,
            gid: node.gid,
            size: stored,
            mtime: node.mtime.max(0) as u64,
            typeflag: b'S',
            link: b"",
            dev: None,
        }
        .encode();
        // Old-GNU layout: magic "ustar  \0", sparse[4] at 386, isextended at 482, realsize at 483.
        h[257..265].copy_from_slice(b"ustar  \0");
        let first = map.len().min(4);
        for (i, (o, l)) in map[..first].iter().enumerate() {
            let at = 386 + i * 24;
            num(&mut h[at..at + 12], *o);
            num(&mut h[at + 12..at + 24], *l);
        }
        let more = map.len() > 4;
        h[482] = u8::from(more);
        num(&mut h[483..495], real);
        checksum(&mut h);
        self.out.write_all(&h)?;
        let mut rest = &map[first..];
        while !rest.is_empty() {
            let mut x = [0u8; BLOCK];
            let n = rest.len().min(21);
            for (i, (o, l)) in rest[..n].iter().enumerate() {
                num(&mut x[i * 24..i * 24 + 12], *o);
                num(&mut x[i * 24 + 12..i * 24 + 24], *l);
            }
            rest = &rest[n..];
            x[504] = u8::from(!rest.is_empty());
            self.out.write_all(&x)?;
        }
        Ok(())
    }

    /// Writes file data.
    ///
    /// # Errors
    /// Any error of the underlying writer.
    pub fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }

    /// Pads after `len` bytes of data to the next block.
    ///
    /// # Errors
    /// Any error of the underlying writer.
    pub fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Writes the end-of-archive marker and returns the writer.
    ///
    /// # Errors
    /// Any error of the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.out)
    }
}

/// Bytes of data stored in the archive for a node (for a sparse file: its extents only).
pub fn stored_size(node: &Node) -> u64 {
    match &node.kind {
        Kind::File { size, extents: None } => *size,
        Kind::File { extents: Some(e), .. } => e.iter().map(|x| x.1).sum(),
        _ => 0,
    }
}

fn truncate(b: &[u8]) -> &[u8] {
    &b[..b.len().min(100)]
}

/// PAX records `"<len> <key>=<value>\n"`, where `<len>` counts the whole record including itself.
pub fn pax_records(records: &[(Vec<u8>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

struct Ustar<'a> {
    name: &'a [u8],
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: u64,
    typeflag: u8,
    link: &'a [u8],
    dev: Option<(u32, u32)>,
}

impl Ustar<'_> {
    fn encode(&self) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..self.name.len()].copy_from_slice(self.name);
        num(&mut h[100..108], u64::from(self.mode));
        num(&mut h[108..116], u64::from(self.uid));
        num(&mut h[116..124], u64::from(self.gid));
        num(&mut h[124..136], self.size);
        num(&mut h[136..148], self.mtime);
        h[156] = self.typeflag;
        h[157..157 + self.link.len()].copy_from_slice(self.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if let Some((major, minor)) = self.dev {
            num(&mut h[329..337], u64::from(major));
            num(&mut h[337..345], u64::from(minor));
        }
        checksum(&mut h);
        h
    }
}

/// Writes `v` into a numeric field: zero-padded octal with a trailing NUL when it fits, else
/// GNU base-256 (high bit of the first byte set, big-endian).
fn num(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() <= digits {
        field[..digits].copy_from_slice(s.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let be = v.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&be);
        field[0] |= 0x80;
    }
}

fn checksum(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_lengths_count_themselves() {
        let r = pax_records(&[(b"path".to_vec(), &b"abc"[..])]);
        assert_eq!(r, b"12 path=abc\n");
        // A body of 95 bytes needs a 3-digit length (99 + 1 -> 100 would be wrong).
        let v = [b'v'; 91];
        let r = pax_records(&[(b"k".to_vec(), &v[..])]);
        let len: usize = std::str::from_utf8(r.split(|b| *b == b' ').next().unwrap()).unwrap().parse().unwrap();
        assert_eq!(len, r.len());
    }

    #[test]
    fn numbers_octal_then_base256() {
        let mut f = [0u8; 12];
        num(&mut f, 0o755);
        assert_eq!(&f, b"00000000755\0");
        num(&mut f, 1 << 40);
        assert_eq!(f[0] & 0x80, 0x80);
        let mut g = [0u8; 8];
        num(&mut g, 4_000_000_000);
        assert_eq!(g[0], 0x80);
        assert_eq!(u32::from_be_bytes([g[4], g[5], g[6], g[7]]), 4_000_000_000);
    }
}
