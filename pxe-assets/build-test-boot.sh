#!/usr/bin/env bash
# Builds the clients' test boot files from Debian 12 packages:
#   OUTDIR/vmlinuz     Debian's cloud kernel (LZ4: decompresses ~8x faster than the standard XZ
#                      kernel under QEMU TCG, and has the virtio drivers QEMU guests need)
#   OUTDIR/initrd.img  a tiny busybox initramfs whose /init prints a marker line and the kernel
#                      command line to the console, then powers off
#
# Usage: pxe-assets/build-test-boot.sh [OUTDIR]   (default $SI_CACHE/test-boot)
#   SI_DEB_CACHE   where downloaded .deb files are kept (default $SI_CACHE/debs)
#   SI_KERNEL_PKG  meta-package that names the kernel (default linux-image-cloud-amd64)
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb`; it is never
# installed on this machine. Idempotent: when the outputs exist and were built from the same
# inputs (kernel .deb, busybox binary, this script), nothing is rebuilt. Must run as root (it
# installs missing build tools through apt and creates the /dev/console node of the cpio).
set -euo pipefail
# One block, parsed before it runs: editing this file while a build runs cannot change it.
{

MARKER="SI-APPLIANCE-INITRD-OK"
self=$(readlink -f "$0")
say() { echo "build-test-boot: $*" >&2; }
die() { say "error: $*"; exit 1; }
. "$(dirname "$self")/cache-lib.sh"

out=${1:-$SI_CACHE/test-boot}
cache=${SI_DEB_CACHE:-$SI_CACHE/debs}
meta=${SI_KERNEL_PKG:-linux-image-cloud-amd64}

[ "$(id -u)" = 0 ] || die "run as root (apt, mknod)"

# Build tools, through apt only.
. "$(dirname "$self")/apt-lib.sh"
apt_ensure busybox-static cpio zstd gzip

resolve_kernel_deb

mkdir -p "$cache" "$out"
# One build at a time per output directory (tests may call this concurrently).
cache_lock "$out/build" 600
download_deb

busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox missing (package busybox-static)"

stamp="$(stat -c "%n %s %Y" "$deb") $(sha256sum "$busybox" "$self" | awk "{print \$1}" | tr "\n" " ")$MARKER"
if [ "$(cat "$out/.inputs" 2>/dev/null)" = "$stamp" ] && cache_files_valid "$out/.sha256"; then
  say "up to date ($pkg $ver)"
else
  # Scratch space beside the outputs; holding the lock, an old one belongs to a dead run.
  rm -rf "$out"/.work.*
  work=$(mktemp -d "$out/.work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  trap 'say "interrupted"; exit 143' TERM
  trap 'say "interrupted"; exit 130' INT

  # Kernel: unpack the package into a scratch dir and take boot/vmlinuz-*.
  dpkg-deb -x "$deb" "$work/deb"
  kernel=$(ls "$work"/deb/boot/vmlinuz-* | head -n1)
  config=$(ls "$work"/deb/boot/config-* | head -n1)
  [ -f "$kernel" ] || die "no boot/vmlinuz-* in $deb"

  # Compress the initramfs with what the kernel can unpack: zstd if built in, else gzip.
  if grep -q '^CONFIG_RD_ZSTD=y' "$config"; then
    compress=(zstd -q -19 --no-progress -c); comp=zstd
  elif grep -q '^CONFIG_RD_GZIP=y' "$config"; then
    compress=(gzip -n -9 -c); comp=gzip
  else
    die "$kernel supports neither zstd nor gzip initramfs"
  fi

  # Initramfs tree: busybox, its applets as links, /dev/console (the kernel opens it for /init:
  # without it /init has no stdout), and /init.
  root="$work/root"
  mkdir -p "$root"/{bin,dev,proc,sys}
  cp "$busybox" "$root/bin/busybox"
  for applet in sh mount cat echo poweroff sleep; do ln -s busybox "$root/bin/$applet"; done
  mknod -m 600 "$root/dev/console" c 5 1
  cat > "$root/init" <<INIT
#!/bin/sh
# si-appliance test initramfs: proves the kernel and this initrd arrived and ran, shows the
# command line the appliance rendered, and powers the machine off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "$MARKER cmdline: \$(cat /proc/cmdline)"
poweroff -f
# Only reached if poweroff failed: exiting init panics, and panic=1 + QEMU -no-reboot stops it.
INIT
  chmod 755 "$root/init"

  # Reproducible archive: fixed mtimes, sorted names, owner root.
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
     | cpio --quiet -o -H newc -R 0:0 --reproducible) | "${compress[@]}" > "$work/initrd.img"

  # The stamp goes first and comes back last: outputs replaced half-way are never reused.
  rm -f "$out/.inputs" "$out/.sha256"
  install -m 644 "$kernel" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  install -m 644 "$work/initrd.img" "$out/initrd.img.tmp" && mv "$out/initrd.img.tmp" "$out/initrd.img"
  printf '%s %s %s\n' "$pkg" "$ver" "$comp" > "$out/VERSION"
  (cd "$out" && sha256sum vmlinuz initrd.img) > "$out/.sha256"
  printf '%s' "$stamp" > "$out/.inputs"
  say "built from $pkg $ver (initramfs: $comp)"
fi

for f in vmlinuz initrd.img; do
  printf '%-10s %9d bytes  %s\n' "$f" "$(stat -c %s "$out/$f")" "$out/$f"
done
exit
}
