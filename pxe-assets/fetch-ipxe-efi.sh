#!/usr/bin/env bash
# Installs into DIR the x86-64 UEFI iPXE binaries (snponly.efi, ipxe.efi) of a Debian `ipxe`
# package from version 2.0 on, the first whose EFI build has the digest commands with `--set`
# (`sha256sum --set VAR IMAGE`): with them the node script checks a peer-served kernel and
# initrd against the appliance's SHA-256 before it boots them (README, "Peer-served boot
# files"). Debian bookworm's ipxe (2019) has no digest command; no BIOS build of iPXE has it
# by default (DIGEST_CMD is on only for non-BIOS builds), so BIOS nodes keep Debian's
# undionly.kpxe and cannot check what a peer sends.
#
#   pxe-assets/fetch-ipxe-efi.sh DIR      (default /usr/local/lib/si-appliance/ipxe,
#                                         the first of the default boot.loader_dirs)
#
# Nothing is taken on trust: the suite's InRelease is checked with gpgv against this machine's
# debian-archive-keyring, Packages.xz against the SHA-256 InRelease lists, the .deb against the
# SHA-256 Packages lists. The suite is the first of unstable, testing whose `ipxe` is >= 2.0
# (SI_IPXE_SUITES overrides the list). Idempotent: DIR/VERSION names what is there; the files
# are checked against the SHA-256 recorded beside them before reuse.
set -euo pipefail
dest=${1:-/usr/local/lib/si-appliance/ipxe}
say() { printf '%s fetch-ipxe-efi: %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
. "$(dirname "${BASH_SOURCE[0]}")/cache-lib.sh"
command -v gpgv >/dev/null || die "gpgv missing (package gpgv)"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "$keyring missing (package debian-archive-keyring)"
cache_lock "$dest" 600

if [ -f "$dest/SHA256SUMS" ] && (cd "$dest" && sha256sum --quiet -c SHA256SUMS) 2>/dev/null; then
  say "reusing $dest ($(cat "$dest/VERSION"))"
  exit 0
fi

mirror=$(debian_mirror)
work=$(mktemp -d /tmp/fetch-ipxe-efi.XXXXXX)
trap 'rm -rf "$work"' EXIT
get() { curl -fsS --retry 3 --max-time 300 -o "$2" "$1"; }

found=
for suite in ${SI_IPXE_SUITES:-unstable testing}; do
  get "$mirror/dists/$suite/InRelease" "$work/InRelease" || { say "no InRelease for $suite"; continue; }
  gpgv --keyring "$keyring" --output "$work/Release" "$work/InRelease" 2>"$work/gpgv.log" \
    || { cat "$work/gpgv.log" >&2; die "$suite's InRelease does not verify against $keyring"; }
  want=$(awk '/^SHA256:/{s=1; next} /^[^ ]/{s=0} s && $3 == "main/binary-all/Packages.xz" {print $1}' "$work/Release")
  [ -n "$want" ] || { say "$suite: no main/binary-all/Packages.xz"; continue; }
  get "$mirror/dists/$suite/main/binary-all/Packages.xz" "$work/Packages.xz" || { say "$suite: Packages.xz not fetched"; continue; }
  echo "$want  $work/Packages.xz" | sha256sum --quiet -c - || die "$suite's Packages.xz does not match its InRelease"
  # The ipxe stanza: Version, Filename, SHA256.
  read -r ver file sum < <(xz -dc "$work/Packages.xz" | awk '
    /^Package: /{p = ($2 == "ipxe"); v = f = s = ""}
    p && /^Version: /{v = $2} p && /^Filename: /{f = $2} p && /^SHA256: /{s = $2}
    p && /^$/ && v != "" {print v, f, s; exit}') || true
  [ -n "${ver:-}" ] || { say "$suite: no ipxe package"; continue; }
  if dpkg --compare-versions "$ver" lt 2.0; then
    say "$suite has ipxe $ver (< 2.0: no digest commands)"
    continue
  fi
  found=$suite
  break
done
[ -n "$found" ] || die "no suite of $mirror has ipxe >= 2.0 (tried: ${SI_IPXE_SUITES:-unstable testing})"

say "ipxe $ver from $found"
get "$mirror/$file" "$work/ipxe.deb" || die "could not fetch $mirror/$file"
echo "$sum  $work/ipxe.deb" | sha256sum --quiet -c - || die "$file does not match the SHA-256 its Packages lists"
dpkg-deb -x "$work/ipxe.deb" "$work/x"
src=$work/x/usr/lib/ipxe
[ -f "$src/snponly.efi" ] && [ -f "$src/ipxe-amd64.efi" ] || die "the package has no snponly.efi / ipxe-amd64.efi"
mkdir -p "$dest.tmp"
install -m 0644 "$src/snponly.efi" "$dest.tmp/snponly.efi"
install -m 0644 "$src/ipxe-amd64.efi" "$dest.tmp/ipxe.efi"
echo "ipxe $ver ($found, $file)" >"$dest.tmp/VERSION"
(cd "$dest.tmp" && sha256sum snponly.efi ipxe.efi VERSION >SHA256SUMS)
rm -rf "$dest"
mv "$dest.tmp" "$dest"
say "installed $(cat "$dest/VERSION") in $dest"
