#!/usr/bin/env bash
# Builds (or reuses) a small real Debian image for tests and benchmarks:
#   debootstrap --variant=minbase bookworm DIR <mirror>
# The mirror is the first Debian URI in this machine's apt sources.
#
# Cached, and safe to call from parallel tests (the rules are in pxe-assets/cache-lib.sh): one
# build at a time under DIR.lock, a concurrent caller waits and reuses the result; the tree is
# built in DIR.tmp and renamed into place; it is reused only when DIR.complete names this recipe
# and the digest of the tree's listing still matches; on any exit, SIGTERM and SIGINT included,
# whatever debootstrap mounted inside DIR.tmp is unmounted and the partial tree removed; a tree
# left by a builder killed with SIGKILL is unmounted and rebuilt by the next call. Downloaded
# packages are kept in $SI_TEST_CACHE/debootstrap-debs/<recipe> (debootstrap checks them against
# the release's digests before use). Bounded by `timeout`. Must run as root.
#
# Usage: vm-tests/make-debian-image.sh [DIR]   (default $SI_TEST_CACHE/bookworm-minbase)
#        vm-tests/make-debian-image.sh --check DIR   exit 0 when DIR is a valid finished build
set -euo pipefail
# One block, parsed before it runs: editing this file while a build runs cannot change it.
{
self=$(readlink -f "$0")
say() { echo "make-debian-image: $*" >&2; }
die() { say "error: $*"; exit 1; }
. "$(dirname "$self")/../pxe-assets/cache-lib.sh"

suite="${SUITE:-bookworm}"
limit="${DEBOOTSTRAP_TIMEOUT:-900}"
recipe="minbase-2 $suite"
keys="bin/sh usr/bin/dpkg var/lib/dpkg/status etc/os-release usr/share/base-passwd/group.master"
cache_tree_start "$SI_TEST_CACHE/bookworm-minbase" "$recipe" "$limit" "$keys" "$@"

debs="$SI_TEST_CACHE/debootstrap-debs/minbase-$suite"
mkdir -p "$debs"
mirror=$(debian_mirror)
start=$(date +%s)
say "debootstrap $suite from $mirror into $tmp (timeout ${limit}s)"
cache_run_bounded "$limit" debootstrap --variant=minbase --cache-dir="$debs" "$suite" "$tmp" "$mirror" >&2 \
  || die "debootstrap failed"
cache_tree_commit "$tmp" "$dir" "$recipe"
say "done in $(( $(date +%s) - start )) s: $dir"
exit
}
