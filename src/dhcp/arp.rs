//! ARP: the pre-offer check of an address (`probe`, through the kernel's neighbour table) and
//! cache injection (ioctl SIOCSARP), so a reply can be unicast to a client that has no
//! address yet (RFC 2131 §4.1: "unicast to the client's hardware address and yiaddr"). This is
//! what dnsmasq and dora do on Linux; it needs CAP_NET_ADMIN. The caller falls back to
//! broadcast when it fails.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use crate::types::MacAddr;

/// `ATF_COM` from <net/if_arp.h>: the entry is complete (has a hardware address).
const ATF_COM: libc::c_int = 0x02;

/// Sets the ARP entry `ip` → `mac` on `iface`, using any socket's descriptor for the ioctl.
///
/// # Errors
/// The ioctl's errno (EPERM without CAP_NET_ADMIN, ENODEV for a bad interface name).
pub fn inject(sock: &impl AsRawFd, iface: &str, ip: Ipv4Addr, mac: MacAddr) -> io::Result<()> {
    let mut req = request(iface, ip)?;
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *d = s as libc::c_char;
    }
    req.arp_flags = ATF_COM;
    // SAFETY: a valid descriptor and a fully initialised arpreq that outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP as _, &req as *const libc::arpreq) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The hardware address the kernel's neighbour table holds, complete, for `ip` on `iface`.
///
/// # Errors
/// The ioctl's errno other than "no entry".
pub fn lookup(sock: &impl AsRawFd, iface: &str, ip: Ipv4Addr) -> io::Result<Option<MacAddr>> {
    let mut req = request(iface, ip)?;
    // SAFETY: a valid descriptor and a fully initialised arpreq the kernel writes into.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGARP as _, &mut req as *mut libc::arpreq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    if req.arp_flags & ATF_COM == 0 {
        return Ok(None);
    }
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(req.arp_ha.sa_data) {
        *d = s as u8;
    }
    Ok(Some(MacAddr(mac)))
}

/// Asks the segment who has `ip` (the kernel sends the ARP request for a datagram to the
/// discard port, from a socket bound to `iface`) and, after `wait`, returns the hardware address
/// that answered, if any. An entry already complete is returned at once.
///
/// # Errors
/// Socket or ioctl errors.
pub async fn probe(iface: &str, ip: Ipv4Addr, wait: std::time::Duration) -> io::Result<Option<MacAddr>> {
    let std_sock = crate::net::udp_on(iface, std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).map_err(io::Error::other)?;
    if let Some(m) = lookup(&std_sock, iface, ip)? {
        return Ok(Some(m));
    }
    let sock = tokio::net::UdpSocket::from_std(std_sock)?;
    // An unreachable or refused datagram is expected; only the neighbour entry matters.
    let _ = sock.send_to(&[], std::net::SocketAddrV4::new(ip, 9)).await;
    tokio::time::sleep(wait).await;
    lookup(&sock, iface, ip)
}

/// An `arpreq` naming `ip` on `iface`.
fn request(iface: &str, ip: Ipv4Addr) -> io::Result<libc::arpreq> {
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in (16 bytes) fits in sockaddr (16 bytes); both are POD.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&sin as *const libc::sockaddr_in).cast::<u8>(),
            (&mut req.arp_pa as *mut libc::sockaddr).cast::<u8>(),
            std::mem::size_of::<libc::sockaddr_in>(),
        );
    }
    let name = iface.as_bytes();
    if name.len() >= req.arp_dev.len() {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    for (d, s) in req.arp_dev.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}
