#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need, builds one release
# profile once, and runs every test (unit, loopback, network-namespace and QEMU tests) with
# per-test timeouts (.config/nextest.toml). Must run as root: the tests create namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "vm-tests/run.sh: run as root (the tests create network namespaces)" >&2
  exit 1
fi
vm-tests/install-deps.sh
export CARGO_TERM_COLOR=never
# One release build, reused by every test and benchmark. Kept outside the clone so that runs on
# the same machine share it (a cold run builds it from scratch; that works too, just slower).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/si-appliance/cargo-target}"
mkdir -p "$CARGO_TARGET_DIR"
cargo build --release --locked --all-targets
cargo nextest run --release --locked --profile ci --no-fail-fast "$@"
