#!/usr/bin/env bash
# Installs the Debian packages the tests, benchmarks and the lab use: real DHCP/TFTP/BitTorrent
# clients and servers to test against, QEMU with its iPXE ROMs and OVMF (UEFI), boot loaders, and the tools that
# build the clients' initramfs. Idempotent: does nothing when everything is there.
set -euo pipefail
pkgs=(
  iproute2 iputils-ping procps kmod psmisc
  udhcpc isc-dhcp-client dhcpcd-base kea-admin kea-dhcp4-server dnsmasq-base
  tftp-hpa tftpd-hpa atftp curl aria2 transmission-cli opentracker
  qemu-system-x86 ipxe-qemu ipxe ovmf pxelinux syslinux-common busybox-static cpio zstd gzip
  tcpdump ndisc6
  debootstrap attr acl rsync libcap2-bin openssh-client gpgv debian-archive-keyring python3
  fdisk util-linux e2fsprogs xfsprogs dosfstools
  chromium
)
# The client initramfs (pxe-assets/build-client.sh): the disk tools it copies, and its build tools.
pkgs+=(file binutils xz-utils util-linux fdisk e2fsprogs xfsprogs dosfstools ca-certificates)
# The appliance's USB stick (pxe-assets/build-usb.sh): a Debian root without debootstrap's
# chroot dance, GRUB for BIOS as files (no grub-install), the ESP written with mtools, the
# signatures of Debian's shim and GRUB (downloaded, not installed) checked with sbverify.
pkgs+=(mmdebstrap grub-pc-bin mtools uuid-runtime sbsigntool)
. "$(dirname "${BASH_SOURCE[0]}")/../pxe-assets/apt-lib.sh"
mapfile -t missing < <(apt_missing "${pkgs[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The test runner: cargo-nextest (per-test timeouts). Machines of this kind ship it; install it
# from crates.io only where it is missing.
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
