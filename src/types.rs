//! Shared newtypes that cross module boundaries: MAC addresses, client architectures, image
//! names and per-node tokens. Nothing here does I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An Ethernet hardware address (DHCP `chaddr` with `htype` 1, `hlen` 6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Takes the first six bytes of a DHCP `chaddr`; `None` when it is shorter.
    pub fn from_chaddr(chaddr: &[u8]) -> Option<Self> {
        let b: [u8; 6] = chaddr.get(..6)?.try_into().ok()?;
        Some(MacAddr(b))
    }

    /// iPXE's `${mac:hexhyp}` form, used in URLs: `52-54-00-12-34-56`.
    pub fn hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error for a string that is not `aa:bb:cc:dd:ee:ff` (or with `-`).
#[derive(Debug, thiserror::Error)]
#[error("not a MAC address (want aa:bb:cc:dd:ee:ff): {0:?}")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(BadMac(s.to_owned()));
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(BadMac(s.to_owned()));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.to_owned()))?;
        }
        Ok(MacAddr(b))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Client system architecture (DHCP option 93, RFC 4578 / IANA registry), reduced to the
/// boot loaders we can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// 0: x86 BIOS (legacy PXE ROM).
    X86Bios,
    /// 6: x86 (32-bit) UEFI.
    X86Uefi,
    /// 7 and 9: x86-64 UEFI (9 is "EFI BC", used by many x86-64 firmwares).
    X64Uefi,
    /// 11: ARM64 UEFI.
    Arm64Uefi,
    /// 16: x86-64 UEFI HTTP boot.
    X64UefiHttp,
    /// Anything else: we have no boot loader for it.
    Other(u16),
}

impl Arch {
    /// Maps an option 93 value. An absent option means a BIOS ROM (PXE 2.1 predates option 93).
    pub fn from_option93(code: Option<u16>) -> Arch {
        match code {
            None | Some(0) => Arch::X86Bios,
            Some(6) => Arch::X86Uefi,
            Some(7) | Some(9) => Arch::X64Uefi,
            Some(11) => Arch::Arm64Uefi,
            Some(16) => Arch::X64UefiHttp,
            Some(n) => Arch::Other(n),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::X86Bios => f.write_str("bios"),
            Arch::X86Uefi => f.write_str("uefi-x86"),
            Arch::X64Uefi => f.write_str("uefi-x64"),
            Arch::Arm64Uefi => f.write_str("uefi-arm64"),
            Arch::X64UefiHttp => f.write_str("uefi-x64-http"),
            Arch::Other(n) => write!(f, "arch-{n}"),
        }
    }
}

/// An image name: one path component of safe characters (`[A-Za-z0-9._-]`, not starting with
/// `.`), so it can name a directory under the store and appear in URLs unescaped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ImageName(String);

/// Error for a string that is not a valid [`ImageName`].
#[derive(Debug, thiserror::Error)]
#[error("bad image name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -, not starting with '.'")]
pub struct BadImageName(pub String);

impl ImageName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ImageName {
    type Err = BadImageName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok { Ok(ImageName(s.to_owned())) } else { Err(BadImageName(s.to_owned())) }
    }
}

impl<'de> Deserialize<'de> for ImageName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A per-node secret handed to the node in its boot script and carried in its reports, so a
/// node cannot report (or fetch a plan) as another. Derived from the appliance's secret and the
/// MAC: stable across restarts, unguessable without the secret.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeToken(String);

impl NodeToken {
    /// Derives the token of `mac` under the appliance secret.
    pub fn derive(secret: &[u8], mac: MacAddr) -> NodeToken {
        let mut h = Sha256::new();
        h.update(b"si-appliance node token v1\0");
        h.update(secret);
        h.update(mac.0);
        NodeToken(hex::encode(&h.finalize()[..16]))
    }

    /// The token as text (32 hex digits).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        let a = self.0.as_bytes();
        let b = presented.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for NodeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_rejects() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert_eq!(m.hyphenated(), "52-54-00-ab-cd-01");
        assert_eq!("52-54-00-ab-cd-01".parse::<MacAddr>().unwrap(), m);
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:01:02", "zz:54:00:ab:cd:01", "5:54:00:ab:cd:011"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn image_names() {
        assert!("RHEL5.1".parse::<ImageName>().is_ok());
        assert!("debian-12_min".parse::<ImageName>().is_ok());
        for bad in ["", ".", "..", "a/b", ".hidden", "x y", &"a".repeat(65)] {
            assert!(bad.parse::<ImageName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn arch_mapping() {
        assert_eq!(Arch::from_option93(None), Arch::X86Bios);
        assert_eq!(Arch::from_option93(Some(7)), Arch::X64Uefi);
        assert_eq!(Arch::from_option93(Some(9)), Arch::X64Uefi);
        assert_eq!(Arch::from_option93(Some(11)), Arch::Arm64Uefi);
        assert_eq!(Arch::from_option93(Some(99)), Arch::Other(99));
    }

    #[test]
    fn tokens_differ_per_mac_and_secret() {
        let a = MacAddr([1, 2, 3, 4, 5, 6]);
        let b = MacAddr([1, 2, 3, 4, 5, 7]);
        let t = NodeToken::derive(b"s1", a);
        assert_eq!(t, NodeToken::derive(b"s1", a));
        assert_ne!(t, NodeToken::derive(b"s1", b));
        assert_ne!(t, NodeToken::derive(b"s2", a));
        assert!(t.matches(t.as_str()));
        assert!(!t.matches("00"));
    }
}

/// The boot loaders the appliance hands out by TFTP, chosen by client architecture. Their TFTP
/// names are keys the boot module maps to files; they are never paths. In the config file they
/// are named `undionly`, `ipxe-efi`, `snponly`, `ipxe-arm64-efi` and `pxelinux`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loader {
    /// iPXE for BIOS PXE ROMs, using the ROM's UNDI driver.
    Undionly,
    /// iPXE for x86-64 UEFI with its own drivers.
    IpxeEfi,
    /// iPXE for x86-64 UEFI using the firmware's SNP driver.
    SnpOnly,
    /// iPXE for ARM64 UEFI.
    IpxeArm64Efi,
    /// pxelinux for BIOS (the alternative path without iPXE).
    Pxelinux,
}

impl Loader {
    /// Every loader, for listings.
    pub const ALL: [Loader; 5] =
        [Loader::Undionly, Loader::IpxeEfi, Loader::SnpOnly, Loader::IpxeArm64Efi, Loader::Pxelinux];

    /// The name clients ask for over TFTP (and find in DHCP option 67).
    pub fn tftp_name(self) -> &'static str {
        match self {
            Loader::Undionly => "undionly.kpxe",
            Loader::IpxeEfi => "ipxe.efi",
            Loader::SnpOnly => "snponly.efi",
            Loader::IpxeArm64Efi => "ipxe-arm64.efi",
            Loader::Pxelinux => "pxelinux.0",
        }
    }

    /// The loader for a firmware architecture, `None` when there is none.
    pub fn for_arch(arch: Arch) -> Option<Loader> {
        match arch {
            Arch::X86Bios => Some(Loader::Undionly),
            Arch::X64Uefi => Some(Loader::SnpOnly),
            Arch::Arm64Uefi => Some(Loader::IpxeArm64Efi),
            Arch::X86Uefi | Arch::X64UefiHttp | Arch::Other(_) => None,
        }
    }
}

/// HTTP path of a node's iPXE boot script; the DHCP server hands it to iPXE clients as a URL and
/// the boot module serves it.
pub fn ipxe_script_path(mac: MacAddr) -> String {
    format!("/boot/{}.ipxe", mac.hyphenated())
}

pub mod events;
pub mod addrs;
pub mod firmware;
pub mod info_hash;
pub mod node_api;

pub use firmware::Firmware;
pub use info_hash::InfoHash;
