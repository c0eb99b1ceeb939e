#!/usr/bin/env bash
# Builds (or reuses) the lab's bootable Debian demo image: the tree the appliance packs and the
# VMs install. debootstrap bookworm minbase plus
#   linux-image-cloud-amd64  (LZ4: boots ~8x faster under QEMU TCG than the standard kernel, and
#                             has the virtio drivers the lab VMs use; see /work/shared/QEMU-LAB.md)
#   grub-pc                  (the installer runs grub-install/update-grub from the image, chrooted)
#   grub-efi-amd64-bin       (GRUB's x86_64-efi modules, beside grub-pc: the installer runs
#                             grub-install --target=x86_64-efi --removable on UEFI nodes)
#   systemd-sysv udev        (init; a serial getty on ttyS0 comes from console=ttyS0)
#   e2fsprogs                (the root file system is ext4)
#   openssh-server           (small; the installer gives each node fresh host keys)
#   rsync attr acl           (the node can be a golden node: `image capture` runs rsync over ssh;
#                             setfattr/setfacl to give a capture something to keep)
# configured for a serial console (GRUB_TERMINAL=serial, GRUB_TIMEOUT=0, console=ttyS0) and DHCP
# on every Ethernet NIC through systemd-networkd, then trimmed (docs, man pages, locales, apt
# lists and caches, host keys, machine-id).
#
# The mirror is the first Debian URI of this machine's apt sources.
#
# Cached, and safe to call from parallel tests and labs (the rules are in
# pxe-assets/cache-lib.sh): one build at a time under DIR.lock, a concurrent caller waits and
# reuses the result; built in DIR.tmp and renamed into place; reused only when DIR.complete names
# this recipe (bump RECIPE when the recipe changes) and the digest of the tree's listing still
# matches; on any exit, SIGTERM and SIGINT included, what debootstrap mounted inside DIR.tmp is
# unmounted and the partial tree removed. Packages are kept in
# $SI_TEST_CACHE/debootstrap-debs/demo-<suite>. Bounded by `timeout`. Must run as root.
#
# Usage: qemu/make-demo-image.sh [DIR]          (default $SI_TEST_CACHE/demo-bookworm)
#        qemu/make-demo-image.sh --check DIR    exit 0 when DIR is a valid finished build
set -euo pipefail
# One block, parsed before it runs: editing this file while a build runs cannot change it.
{
self=$(readlink -f "$0")
say() { echo "make-demo-image: $*" >&2; }
die() { say "error: $*"; exit 1; }
. "$(dirname "$self")/../pxe-assets/cache-lib.sh"

suite="${SUITE:-bookworm}"
limit="${DEBOOTSTRAP_TIMEOUT:-1200}"
RECIPE="demo-3 $suite grub-pc+grub-efi-amd64-bin+rsync+attr+acl"
keys="bin/sh usr/bin/rsync usr/bin/setfattr usr/bin/setfacl usr/sbin/grub-install usr/lib/grub/i386-pc usr/lib/grub/x86_64-efi boot etc/default/grub etc/systemd/network/80-dhcp.network lib/systemd/systemd"
cache_tree_start "$SI_TEST_CACHE/demo-bookworm" "$RECIPE" "$limit" "$keys" "$@"
command -v debootstrap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
debs="$SI_TEST_CACHE/debootstrap-debs/demo-$suite"
mkdir -p "$debs"
mirror=$(debian_mirror)
start=$(date +%s)
say "debootstrap $suite from $mirror into $tmp (timeout ${limit}s)"
cache_run_bounded "$limit" debootstrap --variant=minbase --cache-dir="$debs" \
  --include=linux-image-cloud-amd64,grub-pc,grub-efi-amd64-bin,systemd-sysv,udev,e2fsprogs,openssh-server,iproute2,rsync,attr,acl \
  "$suite" "$tmp" "$mirror" >&2 || die "debootstrap failed"

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

cache_tree_commit "$tmp" "$dir" "$RECIPE"
say "done in $(( $(date +%s) - start )) s: $dir ($(du -sh --apparent-size "$dir" | cut -f1))"
exit
}
