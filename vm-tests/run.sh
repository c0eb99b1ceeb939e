#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need, builds one release
# profile once, builds every cached artefact the tests use (debootstrap trees, boot files) once,
# and runs every test (unit, loopback, network-namespace and QEMU tests) with per-test timeouts
# (.config/nextest.toml). Must run as root: the tests create namespaces.
#
#   sudo vm-tests/run.sh [nextest arguments]
#   sudo SI_COLD=1 vm-tests/run.sh    as a machine that has never seen the project: every cache
#                                     (cargo target and registry, .debs, debootstrap trees, boot
#                                     files) in a new empty directory, removed at the end
#                                     (kept with SI_COLD_KEEP=1)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "vm-tests/run.sh: run as root (the tests create network namespaces)" >&2
  exit 1
fi
say() { printf '%s run.sh: %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
. pxe-assets/cache-lib.sh
t0=$(date +%s)

cold=
prep=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$prep" ]; then kill -TERM -- "-$prep" 2>/dev/null || true; wait "$prep" 2>/dev/null || true; fi
  if [ -n "$cold" ] && [ "${SI_COLD_KEEP:-0}" != 1 ]; then
    say "removing the cold caches in $cold"
    cache_rm "$cold" || say "could not remove $cold"
  fi
  say "total $(( $(date +%s) - t0 )) s (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${SI_COLD:-0}" = 1 ]; then
  cold=$(mktemp -d /var/tmp/si-cold.XXXXXX)
  export SI_CACHE=$cold/cache SI_TEST_CACHE=$cold/test-cache
  export CARGO_TARGET_DIR=$cold/cache/cargo-target CARGO_HOME=$cold/cargo-home
  mkdir -p "$CARGO_HOME"
  say "cold run: every cache under $cold"
fi
export SI_CACHE SI_TEST_CACHE

vm-tests/install-deps.sh
export CARGO_TERM_COLOR=never
# One release build, reused by every test and benchmark. Kept outside the clone so that runs on
# the same machine share it (a cold run builds it from scratch; that works too, just slower).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SI_CACHE/cargo-target}"
mkdir -p "$CARGO_TARGET_DIR" "$SI_CACHE" "$SI_TEST_CACHE"

# The artefacts that need no binary are built while cargo builds (debootstrap and apt are
# network- and disk-bound), in their own process group so that an interrupted run stops them.
preplog=$SI_CACHE/prepare-trees.log
setsid vm-tests/prepare-caches.sh trees >"$preplog" 2>&1 &
prep=$!
cargo build --release --locked --all-targets
say "build done ($(( $(date +%s) - t0 )) s)"
rc=0
wait "$prep" || rc=$?
prep=
sed 's/^/  /' "$preplog" | grep -E 'prepare-caches|reusing|done in|error' >&2 || true
[ $rc = 0 ] || { cat "$preplog" >&2; die "building the cached trees failed"; }
vm-tests/prepare-caches.sh boot
say "caches ready ($(( $(date +%s) - t0 )) s)"

cargo nextest run --release --locked --profile ci --no-fail-fast "$@"
