#!/usr/bin/env bash
# Ensures the boot loaders the appliance serves are installed from Debian packages:
#   ipxe            -> /usr/lib/ipxe/undionly.kpxe, snponly.efi, ipxe.efi (a symlink to /boot/ipxe.efi)
#   pxelinux        -> /usr/lib/PXELINUX/pxelinux.0
#   syslinux-common -> /usr/lib/syslinux/modules/bios/ldlinux.c32 and the other .c32 modules
# and, with pxe-assets/fetch-ipxe-efi.sh, iPXE 2.0's UEFI binaries from Debian unstable/testing
#   ipxe (>= 2.0)   -> /usr/local/lib/si-appliance/ipxe/snponly.efi, ipxe.efi (digest commands:
#                      UEFI nodes can check peer-served boot files; not fatal when unreachable)
# These are the default `boot.loader_dirs`. Binaries are never committed to the repository.
# Idempotent: installs only what is missing, then lists what the appliance will find.
#
# Note: Debian ships /usr/lib/ipxe/ipxe.efi as a symlink to /boot/ipxe.efi. The appliance follows
# a symlink only when its target stays inside one of the loader directories; "/boot" is among the
# default boot.loader_dirs for that reason (only loader names are ever looked up there). x86-64
# UEFI clients get snponly.efi (a regular file) by default.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install-loaders.sh: run as root (apt-get)" >&2
  exit 1
fi
pkgs=(ipxe pxelinux syslinux-common)
. "$(dirname "${BASH_SOURCE[0]}")/apt-lib.sh"
mapfile -t missing < <(apt_missing "${pkgs[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-loaders: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
"$(dirname "${BASH_SOURCE[0]}")/fetch-ipxe-efi.sh" /usr/local/lib/si-appliance/ipxe \
  || echo "install-loaders: no iPXE >= 2.0 for UEFI: UEFI nodes get Debian's iPXE (cannot check peer-served boot files)"
status=0
[ -e /usr/local/lib/si-appliance/ipxe/snponly.efi ] && echo "ok       /usr/local/lib/si-appliance/ipxe/snponly.efi ($(cat /usr/local/lib/si-appliance/ipxe/VERSION))"
for f in /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/snponly.efi /usr/lib/ipxe/ipxe.efi \
         /usr/lib/PXELINUX/pxelinux.0 /usr/lib/syslinux/modules/bios/ldlinux.c32; do
  if [ -e "$f" ]; then
    echo "ok       $f$( [ -L "$f" ] && echo " -> $(readlink -f "$f")")"
  else
    echo "MISSING  $f"
    status=1
  fi
done
exit $status
