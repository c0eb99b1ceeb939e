//! Archive paths as bytes: normalising an entry name into safe relative components (the first line
//! of defence of the unpacker), and a reversible text escaping for names that are not UTF-8 (used in
//! manifests and messages). Pure; no I/O.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::error::Refusal;

/// Splits an archive entry name into its components, dropping empty and `.` components.
/// An empty result means the root itself (`./`).
///
/// # Errors
/// [`Refusal::AbsolutePath`] for a leading `/`, [`Refusal::DotDot`] for any `..` component,
/// [`Refusal::BadName`] for a NUL byte.
pub fn components(name: &[u8]) -> Result<Vec<&[u8]>, Refusal> {
    if name.first() == Some(&b'/') {
        return Err(Refusal::AbsolutePath);
    }
    if name.contains(&0) {
        return Err(Refusal::BadName);
    }
    let mut out = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Refusal::DotDot),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Joins components onto `root`.
pub fn join(root: &Path, comps: &[&[u8]]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// Joins components with `/` (no leading `./`); empty for the root.
pub fn rel(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

/// Escapes bytes into text: valid UTF-8 is kept except `\` (written `\\`) and control characters;
/// everything else is written `\xNN`. [`unescape`] reverses it exactly.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            match ch {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Reverses [`escape`]; `None` for a malformed escape.
pub fn unescape(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 4;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Escaped display form of a path.
pub fn show(p: &Path) -> String {
    escape(p.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        assert_eq!(components(b"./a//b/./c/").unwrap(), vec![&b"a"[..], b"b", b"c"]);
        assert!(components(b"./").unwrap().is_empty());
        assert_eq!(components(b"/etc/passwd"), Err(Refusal::AbsolutePath));
        assert_eq!(components(b"a/../../x"), Err(Refusal::DotDot));
        assert_eq!(components(b".."), Err(Refusal::DotDot));
        assert_eq!(components(b"a\0b"), Err(Refusal::BadName));
        // "..." and "..x" are ordinary names.
        assert_eq!(components(b".../..x").unwrap(), vec![&b"..."[..], b"..x"]);
    }

    #[test]
    fn escape_round_trips() {
        for s in [&b"plain"[..], b"caf\xc3\xa9", b"bad\xff\xfe", b"back\\slash", b"ctl\n\t", b"\\x41"] {
            let e = escape(s);
            assert!(e.is_ascii() || std::str::from_utf8(s).is_ok());
            assert_eq!(unescape(&e).unwrap(), s, "{e}");
        }
        assert_eq!(escape(b"a\xffb"), "a\\xffb");
        assert!(unescape("\\q").is_none());
        assert!(unescape("\\x4").is_none());
    }
}
