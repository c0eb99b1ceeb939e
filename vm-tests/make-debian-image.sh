#!/usr/bin/env bash
# Builds (or reuses) a small real Debian image for demos and tests:
#   debootstrap --variant=minbase bookworm DIR <mirror>
# The mirror is the first Debian URI in /etc/apt/sources.list*. The result is cached: when
# DIR/.si-debootstrap-complete exists, nothing is done. Built in DIR.tmp and renamed into place,
# so an interrupted run never leaves a half image at DIR. Bounded by `timeout`.
#
# Usage: vm-tests/make-debian-image.sh [DIR]   (default /var/cache/si-appliance-test/bookworm-minbase)
set -euo pipefail
dir="${1:-/var/cache/si-appliance-test/bookworm-minbase}"
suite="${SUITE:-bookworm}"
limit="${DEBOOTSTRAP_TIMEOUT:-900}"
if [ -e "$dir/.si-debootstrap-complete" ]; then
  echo "make-debian-image: reusing $dir"
  exit 0
fi
mirror="$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
  | grep -o -E 'https?://[^ ]*debian[^ ]*' | grep -v -- '-security' | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
echo "make-debian-image: debootstrap $suite from $mirror into $dir (timeout ${limit}s)"
mkdir -p "$(dirname "$dir")"
rm -rf "$dir.tmp"
timeout --kill-after=30 "$limit" debootstrap --variant=minbase "$suite" "$dir.tmp" "$mirror"
touch "$dir.tmp/.si-debootstrap-complete"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "make-debian-image: done: $dir"
