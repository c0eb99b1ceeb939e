#!/usr/bin/env bash
# Builds (or reuses) the lab's bootable Debian demo image: the tree the appliance packs and the
# VMs install. debootstrap bookworm minbase plus
#   linux-image-cloud-amd64  (LZ4: boots ~8x faster under QEMU TCG than the standard kernel, and
#                             has the virtio drivers the lab VMs use; see /work/shared/QEMU-LAB.md)
#   grub-pc                  (the installer runs grub-install/update-grub from the image, chrooted)
#   systemd-sysv udev        (init; a serial getty on ttyS0 comes from console=ttyS0)
#   e2fsprogs                (the root file system is ext4)
#   openssh-server           (small; the installer gives each node fresh host keys)
# configured for a serial console (GRUB_TERMINAL=serial, GRUB_TIMEOUT=0, console=ttyS0) and DHCP
# on every Ethernet NIC through systemd-networkd, then trimmed (docs, man pages, locales, apt
# lists and caches, host keys, machine-id).
#
# The mirror is the first Debian URI of this machine's apt sources. The result is cached: when
# DIR.complete names this recipe's version nothing is done (built once per machine; bump RECIPE
# when the recipe changes).
# Built in DIR.tmp and renamed, so an interrupted run never leaves a half image at DIR. Bounded
# by `timeout`. Must run as root.
#
# Usage: qemu/make-demo-image.sh [DIR]   (default /var/cache/si-appliance-test/demo-bookworm)
set -euo pipefail
dir="${1:-/var/cache/si-appliance-test/demo-bookworm}"
suite="${SUITE:-bookworm}"
limit="${DEBOOTSTRAP_TIMEOUT:-1200}"
RECIPE="demo-1 $suite"
stamp="$RECIPE"
say() { echo "make-demo-image: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }
if [ "$(cat "$dir.complete" 2>/dev/null)" = "$stamp" ]; then
  say "reusing $dir ($(du -sh --apparent-size "$dir" | cut -f1))"
  exit 0
fi
command -v debootstrap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }

mirror="$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
  | grep -o -E 'https?://[^ ]*debian[^ ]*' | grep -v -- '-security' | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock -w "$limit" 9 || { say "timed out waiting for $dir.lock"; exit 1; }
# Another run may have finished it while we waited for the lock.
if [ "$(cat "$dir.complete" 2>/dev/null)" = "$stamp" ]; then
  say "reusing $dir"; exit 0
fi
tmp="$dir.tmp"
rm -rf "$tmp"
start=$(date +%s)
say "debootstrap $suite from $mirror into $tmp (timeout ${limit}s)"
timeout --kill-after=30 "$limit" debootstrap --variant=minbase \
  --include=linux-image-cloud-amd64,grub-pc,systemd-sysv,udev,e2fsprogs,openssh-server,iproute2 \
  "$suite" "$tmp" "$mirror" >&2

# Serial console everywhere: GRUB on the serial port with no menu wait, the kernel on ttyS0
# (systemd then starts a getty there: the login prompt shows the node's host name).
cat > "$tmp/etc/default/grub" <<'GRUB'
# si-appliance demo image: serial console, no menu wait.
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_DISTRIBUTOR="Debian"
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8 panic=10"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB_DISABLE_RECOVERY=true
GRUB
# DHCP on every Ethernet NIC, through systemd-networkd (part of systemd).
mkdir -p "$tmp/etc/systemd/network"
cat > "$tmp/etc/systemd/network/80-dhcp.network" <<'NET'
# si-appliance demo image: DHCP on every Ethernet NIC.
[Match]
Type=ether

[Network]
DHCP=ipv4
NET
chroot "$tmp" systemctl enable systemd-networkd.service >&2
# Do not wait for the network at boot: the login prompt should not depend on DHCP.
chroot "$tmp" systemctl mask systemd-networkd-wait-online.service >&2 || true
echo "demo" > "$tmp/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdemo\n' > "$tmp/etc/hosts"
# The installer writes the real fstab (UUIDs from its layout); this one only documents that.
echo "# written by si-appliance install" > "$tmp/etc/fstab"

# Trim: documentation, man pages, locales other than C, apt's lists and caches, logs. Per-node
# identity (machine-id, ssh host keys) is made fresh by the installer on each node.
rm -rf "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* "$tmp"/usr/share/info/* \
       "$tmp"/usr/share/locale/* "$tmp"/usr/share/lintian "$tmp"/usr/share/linda \
       "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/apt/archives/*.deb \
       "$tmp"/var/cache/debconf/*-old "$tmp"/var/log/*.log "$tmp"/var/log/apt/* \
       "$tmp"/etc/ssh/ssh_host_*
: > "$tmp/etc/machine-id"
rm -f "$tmp/var/lib/dbus/machine-id"
# Keep later apt runs in the image from bringing docs and locales back.
cat > "$tmp/etc/dpkg/dpkg.cfg.d/01-si-trim" <<'DPKG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
DPKG

rm -f "$dir.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
echo "$stamp" > "$dir.complete"
say "done in $(( $(date +%s) - start )) s: $dir ($(du -sh --apparent-size "$dir" | cut -f1))"
