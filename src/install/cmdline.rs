//! The installer's orders from the kernel command line (`/proc/cmdline`), as the appliance's
//! boot script writes them: `si.server=IP:PORT si.mac=MAC si.image=NAME si.token=TOKEN`, and
//! optionally `si.disk=/dev/X`, `si.finish=reboot|poweroff|shell` and the image's seal
//! `si.infohash=HEX si.manifest=HEX`. pxelinux's `BOOTIF=01-<mac>`
//! stands in for a missing `si.mac`. Pure: text in, [`Orders`] out.

use std::net::SocketAddr;

use crate::types::node_api::Finish;
use crate::types::{ImageName, MacAddr};

/// Orders read from the command line; every field may still be overridden by a flag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Orders {
    /// `si.server`.
    pub server: Option<SocketAddr>,
    /// `si.mac` (or `BOOTIF=01-…`).
    pub mac: Option<MacAddr>,
    /// `si.image`.
    pub image: Option<ImageName>,
    /// `si.token`.
    pub token: Option<String>,
    /// `si.disk`.
    pub disk: Option<String>,
    /// `si.finish`.
    pub finish: Option<Finish>,
    /// `si.infohash`: the torrent's info-hash the appliance sealed (40 hex digits).
    pub info_hash: Option<String>,
    /// `si.manifest`: the SHA-256 of the image's manifest (64 hex digits).
    pub manifest: Option<String>,
}

/// Why a command line word was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line: {key}={value:?}: {why}")]
pub struct BadWord {
    /// The key (`si.server`).
    pub key: String,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub why: String,
}

/// Parses a kernel command line. Unknown words are ignored (the line also carries the kernel's
/// own options); a known word with a bad value is refused.
///
/// # Errors
/// [`BadWord`] for the first `si.*` word whose value does not parse.
pub fn parse(line: &str) -> Result<Orders, BadWord> {
    let mut o = Orders::default();
    let mut bootif = None;
    for word in line.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else { continue };
        let bad = |why: String| BadWord { key: key.to_owned(), value: value.to_owned(), why };
        match key {
            "si.server" => o.server = Some(value.parse().map_err(|e| bad(format!("want IP:PORT ({e})")))?),
            "si.mac" => o.mac = Some(value.parse().map_err(|e| bad(format!("{e}")))?),
            "si.image" => o.image = Some(value.parse().map_err(|e| bad(format!("{e}")))?),
            "si.token" => {
                if value.is_empty() || value.len() > 128 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(bad("want the node token (hex digits)".into()));
                }
                o.token = Some(value.to_owned());
            }
            "si.disk" => o.disk = Some(check_disk(value).map_err(bad)?),
            "si.infohash" => o.info_hash = Some(check_hex(value, 40).map_err(bad)?),
            "si.manifest" => o.manifest = Some(check_hex(value, 64).map_err(bad)?),
            "si.finish" => o.finish = Some(parse_finish(value).map_err(bad)?),
            // pxelinux IPAPPEND 2: `BOOTIF=01-aa-bb-cc-dd-ee-ff` (01 = Ethernet).
            "BOOTIF" => bootif = value.strip_prefix("01-").and_then(|m| m.parse::<MacAddr>().ok()),
            _ => {}
        }
    }
    if o.mac.is_none() {
        o.mac = bootif;
    }
    Ok(o)
}

/// `reboot`, `poweroff` or `shell`.
///
/// # Errors
/// In words, for anything else.
pub fn parse_finish(s: &str) -> Result<Finish, String> {
    match s {
        "reboot" => Ok(Finish::Reboot),
        "poweroff" => Ok(Finish::Poweroff),
        "shell" => Ok(Finish::Shell),
        _ => Err("want reboot, poweroff or shell".into()),
    }
}

/// `len` hex digits, returned in lower case.
///
/// # Errors
/// In words, for anything else.
pub fn check_hex(s: &str, len: usize) -> Result<String, String> {
    if s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("want {len} hex digits"))
    }
}

/// A disk path: `/dev/…`, no `..`.
///
/// # Errors
/// In words, for anything else.
pub fn check_disk(s: &str) -> Result<String, String> {
    if s.starts_with("/dev/") && s.len() > 5 && !s.split('/').any(|c| c == "..") {
        Ok(s.to_owned())
    } else {
        Err("want a /dev/ path".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_appliance_line_parses() {
        let o = parse(
            "initrd=initrd.img si.server=10.66.0.1:80 si.mac=52:54:00:12:34:56 si.image=deb12 \
             si.token=0123abcd console=ttyS0 si.disk=/dev/vda si.finish=poweroff quiet\n",
        )
        .unwrap();
        assert_eq!(o.server, Some("10.66.0.1:80".parse().unwrap()));
        assert_eq!(o.mac, Some("52:54:00:12:34:56".parse().unwrap()));
        assert_eq!(o.image.as_ref().map(|i| i.as_str()), Some("deb12"));
        assert_eq!(o.token.as_deref(), Some("0123abcd"));
        assert_eq!(o.disk.as_deref(), Some("/dev/vda"));
        assert_eq!(o.finish, Some(Finish::Poweroff));
    }

    #[test]
    fn bootif_stands_in_for_a_missing_mac_only() {
        let o = parse("BOOTIF=01-52-54-00-00-00-07 si.server=10.0.0.1:80").unwrap();
        assert_eq!(o.mac, Some("52:54:00:00:00:07".parse().unwrap()));
        let o = parse("BOOTIF=01-52-54-00-00-00-07 si.mac=52:54:00:00:00:01").unwrap();
        assert_eq!(o.mac, Some("52:54:00:00:00:01".parse().unwrap()));
        assert_eq!(parse("").unwrap(), Orders::default());
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        for (line, key) in [
            ("si.server=10.0.0.1", "si.server"),
            ("si.mac=52:54", "si.mac"),
            ("si.image=../x", "si.image"),
            ("si.token=", "si.token"),
            ("si.token=a;b", "si.token"),
            ("si.disk=sda", "si.disk"),
            ("si.disk=/dev/../etc/passwd", "si.disk"),
            ("si.finish=explode", "si.finish"),
            ("si.infohash=abc", "si.infohash"),
            ("si.manifest=zz", "si.manifest"),
        ] {
            let e = parse(line).unwrap_err();
            assert_eq!(e.key, key, "{line}");
            assert!(e.to_string().contains(key));
        }
    }
}
