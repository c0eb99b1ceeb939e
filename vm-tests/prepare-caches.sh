#!/usr/bin/env bash
# Builds every cached artefact the tests and the lab need, one builder after another, so that
# tests running in parallel only ever find them built. Each builder locks its artefact and
# checks it before reuse on its own (pxe-assets/cache-lib.sh), so calling this while tests or a
# lab run is safe, and a second call returns in seconds.
#
# Usage: vm-tests/prepare-caches.sh [trees|boot|all]     (as root; default all)
#   trees  what needs no binary: the debootstrap minbase tree, the lab's demo tree, the test
#          boot files and the USB stick's Debian root tree (vm-tests/run.sh builds these while
#          cargo builds the binary)
#   boot   the clients' kernel + installer initramfs around the release binary, and the USB
#          stick image around both
#          ($CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/si-appliance, or SI_APPLIANCE_BIN)
# Cache roots: SI_CACHE and SI_TEST_CACHE (see pxe-assets/cache-lib.sh).
set -euo pipefail
# One block, parsed before it runs: editing this file while a build runs cannot change it.
{
cd "$(dirname "$0")/.."
say() { printf '%s prepare-caches: %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
. pxe-assets/cache-lib.sh
export SI_CACHE SI_TEST_CACHE
what=${1:-all}

# Each builder runs in the background and is waited for, so that SIGTERM reaches this script's
# trap at once and is passed on (the builders then clean up after themselves).
child=
trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null; wait 2>/dev/null; exit 143' TERM INT
step() {
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s)
  "$@" & child=$!
  wait "$child" || rc=$?
  child=
  [ $rc = 0 ] || die "$name failed (exit $rc)"
  say "$name ready ($(( $(date +%s) - t0 )) s)"
}

case $what in trees|all)
  step "debootstrap minbase tree" vm-tests/make-debian-image.sh "$SI_TEST_CACHE/bookworm-minbase"
  step "demo image tree" qemu/make-demo-image.sh "$SI_TEST_CACHE/demo-bookworm"
  step "test boot files" pxe-assets/build-test-boot.sh "$SI_CACHE/test-boot" >/dev/null
  step "USB stick root tree" pxe-assets/build-usb.sh --root-only
  step "iPXE 2.0 UEFI binaries" pxe-assets/fetch-ipxe-efi.sh "$SI_CACHE/ipxe-efi"
esac
case $what in boot|all)
  bin=${SI_APPLIANCE_BIN:-${CARGO_TARGET_DIR:-$SI_CACHE/cargo-target}/x86_64-unknown-linux-gnu/release/si-appliance}
  [ -x "$bin" ] || die "no release binary at $bin (cargo build --release first)"
  step "client boot files" env SI_APPLIANCE_BIN="$bin" pxe-assets/build-client.sh "$SI_CACHE/client-boot"
  step "USB stick image" env SI_APPLIANCE_BIN="$bin" SI_CLIENT_BOOT="$SI_CACHE/client-boot" \
    pxe-assets/build-usb.sh "$SI_CACHE/usb/si-appliance-usb.img"
esac
case $what in trees|boot|all) ;; *) die "usage: $0 [trees|boot|all]" ;; esac
exit
}
