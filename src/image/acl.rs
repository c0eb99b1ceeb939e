//! POSIX ACLs in the text form GNU tar stores as `SCHILY.acl.access` / `SCHILY.acl.default`
//! (one `tag:qualifier:perms` entry per line, qualifiers as names or numbers), converted to the
//! kernel's `system.posix_acl_*` xattr value (linux/posix_acl_xattr.h: a little-endian version
//! 2 header, then `{u16 tag, u16 perm, u32 id}` entries in the order the kernel requires).
//! Only needed for archives made with `tar --acls` but without `--xattrs`; ours carry the xattr.
//! Pure: name lookups come from the caller.

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

/// Which name database a qualifier is looked up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    /// Users (`/etc/passwd`).
    User,
    /// Groups (`/etc/group`).
    Group,
}

/// Converts ACL text to the xattr value. `lookup` resolves a user or group name; numbers are
/// taken as they are. `None` when the text is malformed or a name cannot be resolved.
pub fn text_to_xattr(text: &[u8], lookup: &dyn Fn(Db, &str) -> Option<u32>) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut entries: Vec<(u16, u32, u16)> = Vec::new();
    for e in text.split(['\n', ',']).map(str::trim).filter(|e| !e.is_empty()) {
        // Drop a trailing comment (`#effective:r--`), as getfacl output may carry one.
        let e = e.split('#').next()?.trim();
        let mut parts = e.splitn(3, ':');
        let (tag, qual, perms) = (parts.next()?, parts.next()?, parts.next()?);
        let perm = parse_perms(perms)?;
        let id = |db| if qual.is_empty() { None } else { qual.parse::<u32>().ok().or_else(|| lookup(db, qual)) };
        let (t, i) = match (tag, qual.is_empty()) {
            ("user" | "u", true) => (USER_OBJ, UNDEFINED_ID),
            ("user" | "u", false) => (USER, id(Db::User)?),
            ("group" | "g", true) => (GROUP_OBJ, UNDEFINED_ID),
            ("group" | "g", false) => (GROUP, id(Db::Group)?),
            ("mask" | "m", _) => (MASK, UNDEFINED_ID),
            ("other" | "o", _) => (OTHER, UNDEFINED_ID),
            _ => return None,
        };
        entries.push((t, i, perm));
    }
    if entries.is_empty() {
        return None;
    }
    entries.sort_by_key(|(t, i, _)| (*t, *i));
    let mut out = VERSION.to_le_bytes().to_vec();
    for (t, i, p) in entries {
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&i.to_le_bytes());
    }
    Some(out)
}

fn parse_perms(p: &str) -> Option<u16> {
    let b = p.as_bytes();
    if b.len() != 3 {
        return None;
    }
    let bit = |c: u8, want: u8, v: u16| match c {
        c if c == want => Some(v),
        b'-' => Some(0),
        _ => None,
    };
    Some(bit(b[0], b'r', 4)? | bit(b[1], b'w', 2)? | bit(b[2], b'x', 1)?)
}

/// Looks `name` up in a passwd- or group-format file's contents: `name:x:ID:...`.
pub fn lookup_in(contents: &[u8], name: &str) -> Option<u32> {
    contents.split(|b| *b == b'\n').find_map(|line| {
        let mut f = line.split(|b| *b == b':');
        let n = f.next()?;
        if n != name.as_bytes() {
            return None;
        }
        f.next()?;
        std::str::from_utf8(f.next()?).ok()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(db: Db, n: &str) -> Option<u32> {
        match (db, n) {
            (Db::User, "daemon") => Some(1),
            (Db::Group, "users") => Some(100),
            _ => None,
        }
    }

    #[test]
    fn matches_the_kernel_format() {
        // getfattr -e base64 of `setfacl -m u:1234:r` on a 0644 file.
        let want = [
            2, 0, 0, 0, 1, 0, 6, 0, 255, 255, 255, 255, 2, 0, 4, 0, 0xd2, 4, 0, 0, 4, 0, 4, 0, 255, 255, 255, 255, 16,
            0, 4, 0, 255, 255, 255, 255, 32, 0, 4, 0, 255, 255, 255, 255,
        ];
        let got = text_to_xattr(b"user::rw-\nuser:1234:r--\ngroup::r--\nmask::r--\nother::r--\n\n", &names).unwrap();
        assert_eq!(got, want);
        // Same ACL, other order and separators.
        assert_eq!(text_to_xattr(b"other::r--,mask::r--,u:1234:r--,g::r--,u::rw-", &names).unwrap(), want);
    }

    #[test]
    fn names_resolve_or_fail() {
        let x =
            text_to_xattr(b"user::rw-\nuser:daemon:r--\ngroup::r-x\ngroup:users:r--\nmask::r-x\nother::r--\n", &names)
                .unwrap();
        assert_eq!(&x[16..20], &1u32.to_le_bytes());
        assert!(text_to_xattr(b"user::rw-\nuser:nobody-here:r--\n", &names).is_none());
        for bad in [&b""[..], b"user::rwz", b"bogus::rw-", b"user:rw-", b"\xff"] {
            assert!(text_to_xattr(bad, &names).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(lookup_in(b"root:x:0:0::/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\n", "daemon"), Some(1));
        assert_eq!(lookup_in(b"root:x:0:0\n", "daem"), None);
    }
}
