//! A streaming tar reader for untrusted input: ustar, POSIX PAX (`x` records parsed by their
//! length, so binary xattr values and names with newlines survive), GNU long names (`L`/`K`),
//! old-GNU sparse files (`S`) and PAX sparse format 1.0. It only parses: no I/O besides reading
//! the stream, no path interpretation (that is the unpacker's job). Every length is bounded and
//! checked; a stream that ends anywhere but after the end-of-archive block is an error.

use std::io::{self, Read};

/// Tar block size.
const BLOCK: u64 = 512;
/// Largest PAX or GNU long-name record accepted.
const MAX_META: u64 = 16 << 20;
/// Largest number of sparse extents accepted.
const MAX_EXTENTS: usize = 1 << 20;

/// One parsed entry header (after its extension headers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// Name as stored (bytes).
    pub name: Vec<u8>,
    /// Link target (symlink or hard link).
    pub link: Vec<u8>,
    /// Type flag (`b'0'`, `b'5'`, ...; `b'S'` and PAX sparse are reported as `b'0'` with `sparse`).
    pub typeflag: u8,
    /// Mode bits.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Nanoseconds of the modification time (from PAX).
    pub mtime_ns: u32,
    /// Device major.
    pub devmajor: u32,
    /// Device minor.
    pub devminor: u32,
    /// Bytes of data stored in the archive for this entry.
    pub size: u64,
    /// For a sparse file: logical size and data extents (the stored data, in order).
    pub sparse: Option<(u64, Vec<(u64, u64)>)>,
    /// `SCHILY.xattr.*` records.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// GNU tar's `SCHILY.acl.access` text, if any.
    pub acl_access: Option<Vec<u8>>,
    /// GNU tar's `SCHILY.acl.default` text, if any.
    pub acl_default: Option<Vec<u8>>,
}

/// Reads entries from a tar stream.
pub struct TarReader<R> {
    r: R,
    /// Unread data bytes of the current entry.
    left: u64,
    /// Padding after the current entry's data.
    pad: u64,
    ended: bool,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> TarReader<R> {
    /// Reads from `r`.
    pub fn new(r: R) -> Self {
        TarReader { r, left: 0, pad: 0, ended: false }
    }

    /// The underlying reader (after the end of the archive).
    pub fn into_inner(self) -> R {
        self.r
    }

    fn block(&mut self) -> io::Result<Option<[u8; 512]>> {
        let mut b = [0u8; 512];
        let mut n = 0;
        while n < 512 {
            let k = self.r.read(&mut b[n..])?;
            if k == 0 {
                return if n == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "archive ends inside a header"))
                };
            }
            n += k;
        }
        Ok(Some(b))
    }

    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = self.r.read(&mut buf[..n.min(8192) as usize])?;
            if k == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "archive ends inside an entry"));
            }
            n -= k as u64;
        }
        Ok(())
    }

    fn read_meta(&mut self, size: u64) -> io::Result<Vec<u8>> {
        if size > MAX_META {
            return Err(bad(format!("extension header of {size} bytes is too large")));
        }
        let mut v = vec![0u8; size as usize];
        self.r.read_exact(&mut v).map_err(|e| eof_is_truncation(e, "archive ends inside an extension header"))?;
        self.skip(padding(size))?;
        Ok(v)
    }

    /// The next entry, skipping what is left of the current one; `None` after the end marker.
    ///
    /// # Errors
    /// `InvalidData` for malformed headers, `UnexpectedEof` for a truncated stream.
    pub fn next_entry(&mut self) -> io::Result<Option<Head>> {
        if self.ended {
            return Ok(None);
        }
        let rest = self.left + self.pad;
        self.skip(rest)?;
        self.left = 0;
        self.pad = 0;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut have_pax = false;
        loop {
            let Some(h) = self.block()? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive ends without an end-of-archive block",
                ));
            };
            if h.iter().all(|b| *b == 0) {
                if long_name.is_some() || long_link.is_some() || have_pax {
                    return Err(bad("extension header without an entry"));
                }
                self.ended = true;
                return Ok(None);
            }
            check_sum(&h)?;
            let typeflag = h[156];
            let size = num(&h[124..136]).map_err(|e| bad(format!("size: {e}")))?;
            match typeflag {
                b'x' => {
                    if have_pax {
                        return Err(bad("two PAX headers for one entry"));
                    }
                    let data = self.read_meta(size)?;
                    pax = parse_pax(&data)?;
                    have_pax = true;
                }
                b'g' => {
                    self.read_meta(size)?;
                }
                b'L' => {
                    let mut v = self.read_meta(size)?;
                    trim_nul(&mut v);
                    long_name = Some(v);
                }
                b'K' => {
                    let mut v = self.read_meta(size)?;
                    trim_nul(&mut v);
                    long_link = Some(v);
                }
                _ => return self.entry(&h, typeflag, size, long_name, long_link, pax).map(Some),
            }
        }
    }

    fn entry(
        &mut self,
        h: &[u8; 512],
        typeflag: u8,
        size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> io::Result<Head> {
        let gnu = &h[257..265] == b"ustar  \0";
        let ustar = &h[257..263] == b"ustar\0";
        let mut name = cstr(&h[..100]).to_vec();
        if ustar && h[345] != 0 {
            let mut full = cstr(&h[345..500]).to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
        let field = |r: std::ops::Range<usize>, what: &str| num(&h[r]).map_err(|e| bad(format!("{what}: {e}")));
        let mut head = Head {
            name: long_name.unwrap_or(name),
            link: long_link.unwrap_or_else(|| cstr(&h[157..257]).to_vec()),
            typeflag,
            mode: (field(100..108, "mode")? & 0o7777) as u32,
            uid: field(108..116, "uid")?,
            gid: field(116..124, "gid")?,
            mtime: i64::try_from(field(136..148, "mtime")?).map_err(|_| bad("mtime out of range"))?,
            mtime_ns: 0,
            devmajor: 0,
            devminor: 0,
            size,
            sparse: None,
            xattrs: Vec::new(),
            acl_access: None,
            acl_default: None,
        };
        if matches!(typeflag, b'3' | b'4') {
            head.devmajor = u32::try_from(field(329..337, "devmajor")?).map_err(|_| bad("devmajor out of range"))?;
            head.devminor = u32::try_from(field(337..345, "devminor")?).map_err(|_| bad("devminor out of range"))?;
        }
        let mut sparse_major = None;
        let mut sparse_name = None;
        let mut sparse_real = None;
        for (k, v) in pax {
            let text = || std::str::from_utf8(&v).map_err(|_| bad("non-UTF-8 numeric PAX value"));
            let int = || -> io::Result<u64> {
                text()?.parse::<u64>().map_err(|_| bad(format!("bad PAX value for {}", String::from_utf8_lossy(&k))))
            };
            match &k[..] {
                b"path" => head.name = v,
                b"linkpath" => head.link = v,
                b"size" => head.size = int()?,
                b"uid" => head.uid = int()?,
                b"gid" => head.gid = int()?,
                b"mtime" => {
                    if let Some((s, ns)) = parse_time(text()?) {
                        head.mtime = s;
                        head.mtime_ns = ns;
                    }
                }
                b"SCHILY.acl.access" => head.acl_access = Some(v),
                b"SCHILY.acl.default" => head.acl_default = Some(v),
                b"GNU.sparse.major" => sparse_major = Some(int()?),
                b"GNU.sparse.name" => sparse_name = Some(v),
                b"GNU.sparse.realsize" => sparse_real = Some(int()?),
                b"GNU.sparse.size" => sparse_real = sparse_real.or(Some(int()?)),
                _ => {
                    if let Some(x) = k.strip_prefix(b"SCHILY.xattr.") {
                        head.xattrs.push((x.to_vec(), v));
                    } else if k.starts_with(b"GNU.sparse.") && k != b"GNU.sparse.minor" {
                        return Err(bad("PAX sparse formats 0.0/0.1 are not supported (use --sparse-version=1.0)"));
                    }
                }
            }
        }
        self.left = head.size;
        self.pad = padding(head.size);
        if typeflag == b'S' {
            if !gnu {
                return Err(bad("old-GNU sparse entry without a GNU header"));
            }
            let real = field(483..495, "sparse realsize")?;
            let mut ext = Vec::new();
            read_map(&h[386..482], &mut ext)?;
            let mut more = h[482] != 0;
            while more {
                let Some(x) = self.block()? else {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "archive ends inside a sparse map"));
                };
                read_map(&x[..504], &mut ext)?;
                more = x[504] != 0;
                if ext.len() > MAX_EXTENTS {
                    return Err(bad("sparse map too large"));
                }
            }
            head.typeflag = b'0';
            head.sparse = Some(check_map(real, ext, head.size)?);
        } else if sparse_major == Some(1) {
            let real = sparse_real.ok_or_else(|| bad("PAX sparse entry without GNU.sparse.realsize"))?;
            if let Some(n) = sparse_name {
                head.name = n;
            }
            let ext = self.pax1_map()?;
            head.sparse = Some(check_map(real, ext, self.left)?);
            head.size = self.left;
        } else if sparse_major.is_some() {
            return Err(bad("unsupported PAX sparse version"));
        }
        if !matches!(head.typeflag, b'0' | 0 | b'7') {
            // Only regular files carry data we write; others' data (if any) is skipped.
            if head.sparse.is_some() {
                return Err(bad("sparse map on a non-file entry"));
            }
        }
        Ok(head)
    }

    /// Reads the PAX 1.0 sparse map at the start of the data: decimal lines (count, then
    /// offset/size pairs), padded to a block.
    fn pax1_map(&mut self) -> io::Result<Vec<(u64, u64)>> {
        let mut consumed = 0u64;
        let mut line = Vec::new();
        let mut next_num = |this: &mut Self| -> io::Result<u64> {
            line.clear();
            loop {
                let mut b = [0u8; 1];
                if this.left == 0 {
                    return Err(bad("sparse map runs past the entry"));
                }
                this.r.read_exact(&mut b).map_err(|e| eof_is_truncation(e, "archive ends inside a sparse map"))?;
                this.left -= 1;
                consumed += 1;
                if b[0] == b'\n' {
                    break;
                }
                if line.len() > 20 {
                    return Err(bad("sparse map number too long"));
                }
                line.push(b[0]);
            }
            std::str::from_utf8(&line).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad sparse map number"))
        };
        let count = next_num(self)? as usize;
        if count > MAX_EXTENTS {
            return Err(bad("sparse map too large"));
        }
        let mut ext = Vec::with_capacity(count);
        for _ in 0..count {
            let o = next_num(self)?;
            let l = next_num(self)?;
            ext.push((o, l));
        }
        let pad = padding(consumed);
        if pad > self.left {
            return Err(bad("sparse map runs past the entry"));
        }
        self.skip(pad)?;
        self.left -= pad;
        // The entry's data size is what is left; adjust padding to the whole record.
        self.pad = padding(consumed + pad + self.left);
        Ok(ext)
    }

    /// Reads the current entry's stored data.
    ///
    /// # Errors
    /// `UnexpectedEof` when the stream ends inside the data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "archive ends inside an entry"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn eof_is_truncation(e: io::Error, msg: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(io::ErrorKind::UnexpectedEof, msg.to_owned())
    } else {
        e
    }
}

fn padding(n: u64) -> u64 {
    (BLOCK - n % BLOCK) % BLOCK
}

fn trim_nul(v: &mut Vec<u8>) {
    while v.last() == Some(&0) {
        v.pop();
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|c| *c == 0).unwrap_or(b.len())]
}

fn check_sum(h: &[u8; 512]) -> io::Result<()> {
    let stored = num(&h[148..156]).map_err(|_| bad("bad header checksum field"))?;
    let unsigned: u64 =
        h.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u64::from(*b) }).sum();
    let signed: i64 =
        h.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { i64::from(*b as i8) }).sum();
    if stored == unsigned || i64::try_from(stored).ok() == Some(signed) {
        Ok(())
    } else {
        Err(bad("header checksum mismatch"))
    }
}

/// Parses a numeric field: octal (spaces/NULs around) or GNU base-256 (positive only).
fn num(f: &[u8]) -> Result<u64, &'static str> {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        if f[0] != 0x80 && f[0] & 0x40 != 0 {
            return Err("negative base-256 number");
        }
        let mut v: u64 = u64::from(f[0] & 0x3f);
        for b in &f[1..] {
            v = v.checked_mul(256).ok_or("base-256 number too large")? | u64::from(*b);
        }
        return Ok(v);
    }
    let s: Vec<u8> =
        f.iter().copied().skip_while(|b| *b == b' ' || *b == 0).take_while(|b| *b != b' ' && *b != 0).collect();
    if s.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&s).map_err(|_| "not octal")?;
    u64::from_str_radix(s, 8).map_err(|_| "not octal")
}

fn read_map(b: &[u8], out: &mut Vec<(u64, u64)>) -> io::Result<()> {
    for e in b.chunks_exact(24) {
        if e.iter().all(|c| *c == 0) {
            break;
        }
        let o = num(&e[..12]).map_err(|m| bad(format!("sparse offset: {m}")))?;
        let l = num(&e[12..]).map_err(|m| bad(format!("sparse length: {m}")))?;
        out.push((o, l));
    }
    Ok(())
}

/// Checks a sparse map: ordered, non-overlapping, within the logical size, and its lengths sum
/// to the stored size. Drops empty extents.
fn check_map(real: u64, ext: Vec<(u64, u64)>, stored: u64) -> io::Result<(u64, Vec<(u64, u64)>)> {
    let mut end = 0u64;
    let mut sum = 0u64;
    let mut out = Vec::with_capacity(ext.len());
    for (o, l) in ext {
        if o < end {
            return Err(bad("sparse map out of order or overlapping"));
        }
        end = o.checked_add(l).ok_or_else(|| bad("sparse extent overflows"))?;
        if end > real {
            return Err(bad("sparse extent beyond the file size"));
        }
        sum = sum.checked_add(l).ok_or_else(|| bad("sparse map overflows"))?;
        if l > 0 {
            out.push((o, l));
        }
    }
    if sum != stored {
        return Err(bad("sparse map does not match the stored size"));
    }
    Ok((real, out))
}

/// Parses PAX records `"<len> <key>=<value>\n"` by their lengths.
///
/// # Errors
/// `InvalidData` for a malformed record.
pub fn parse_pax(data: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let sp = rest.iter().take(20).position(|b| *b == b' ').ok_or_else(|| bad("malformed PAX record length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("malformed PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("malformed PAX record"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq =
            rec.iter().position(|b| *b == b'=').filter(|e| *e > 0).ok_or_else(|| bad("PAX record without a key"))?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Parses a PAX time `[-]SEC[.FRACTION]` into seconds and nanoseconds (fraction truncated to 9
/// digits); `None` when malformed.
pub fn parse_time(v: &str) -> Option<(i64, u32)> {
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = s.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let ns: u32 = digits.parse().ok()?;
    if s.starts_with('-') && ns > 0 {
        // -1.25 means 1.25 s before the epoch: -2 s + 0.75 s.
        return Some((secs - 1, 1_000_000_000 - ns));
    }
    Some((secs, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_by_length_keep_newlines() {
        let v = b"a\nb\0\xff";
        let mut rec = Vec::new();
        let body = format!(" SCHILY.xattr.user.x={}\n", "");
        let len = body.len() + v.len() + 2;
        rec.extend_from_slice(format!("{len} SCHILY.xattr.user.x=").as_bytes());
        rec.extend_from_slice(v);
        rec.push(b'\n');
        rec.extend_from_slice(b"12 path=abc\n");
        let r = parse_pax(&rec).unwrap();
        assert_eq!(r, vec![(b"SCHILY.xattr.user.x".to_vec(), v.to_vec()), (b"path".to_vec(), b"abc".to_vec())]);
        for bad in [&b"5 a=b\n"[..], b"x path=a\n", b"12 path=abc", b"99 k=v\n", b"4 =\n", b"3 \n"] {
            assert!(parse_pax(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn times_and_numbers() {
        assert_eq!(parse_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(parse_time("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_time("-1.25"), Some((-2, 750_000_000)));
        for bad in ["", "x", "1.x", "1.2.3"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(num(b"0000755\0"), Ok(0o755));
        assert_eq!(num(b"   755 \0"), Ok(0o755));
        assert_eq!(num(b"\0\0\0\0"), Ok(0));
        assert_eq!(num(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert!(num(b"0009\0").is_err());
        assert!(num(&[0xff; 8]).is_err());
    }

    #[test]
    fn sparse_maps_are_checked() {
        assert_eq!(check_map(100, vec![(0, 10), (50, 10), (100, 0)], 20).unwrap(), (100, vec![(0, 10), (50, 10)]));
        assert!(check_map(100, vec![(50, 10), (0, 10)], 20).is_err());
        assert!(check_map(100, vec![(95, 10)], 10).is_err());
        assert!(check_map(100, vec![(0, 10)], 11).is_err());
        assert!(check_map(u64::MAX, vec![(u64::MAX, 1)], 1).is_err());
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        assert!(TarReader::new(&b""[..]).next_entry().is_err(), "empty stream has no end marker");
        assert!(TarReader::new(&[0u8; 100][..]).next_entry().is_err());
        assert!(TarReader::new(&[0x41u8; 512][..]).next_entry().is_err());
        assert_eq!(TarReader::new(&[0u8; 1024][..]).next_entry().unwrap(), None);
    }
}
