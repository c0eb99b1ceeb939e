#!/usr/bin/env bash
# What the clients' boot payload is made of: unpacks an initramfs built by build-client.sh and
# compresses each part alone with the settings build-client.sh uses (zstd level 22, 32 MiB
# window), so that the figures say which part costs what on the wire. The parts' sum is close to,
# not equal to, the whole (the whole also finds matches across parts).
#
# Usage: pxe-assets/client-sizes.sh [DIR]   (default $SI_CACHE/client-boot; DIR holds vmlinuz
#        and initrd.img). Needs zstd, xz and cpio; no root.
set -euo pipefail
say() { echo "client-sizes: $*" >&2; }
die() { say "error: $*"; exit 1; }
. "$(dirname "$(readlink -f "$0")")/cache-lib.sh"

dir=${1:-$SI_CACHE/client-boot}
[ -f "$dir/initrd.img" ] && [ -f "$dir/vmlinuz" ] || die "no vmlinuz and initrd.img in $dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/root"
case $(head -c 6 "$dir/initrd.img" | od -An -tx1 | tr -d ' \n') in
  28b52ffd*) unpack=(zstd -dc) ;;
  fd377a585a00) unpack=(xz -dc) ;;
  *) die "$dir/initrd.img is neither zstd nor xz" ;;
esac
"${unpack[@]}" "$dir/initrd.img" | (cd "$work/root" && cpio -idm --quiet 2>/dev/null)

# part name, then `find` arguments (relative to the root) that select its regular files.
parts=(
  "si-appliance|-path ./usr/sbin/si-appliance"
  "modules (.ko)|-path ./lib/modules/* -name *.ko*"
  "module indexes|-path ./lib/modules/* ! -name *.ko*"
  "shared libraries|( -path ./lib/* -o -path ./lib64/* -o -path ./usr/lib/* ) -name *.so* ! -path ./lib/modules/*"
  "disk tools|( -path ./usr/sbin/* -o -path ./usr/bin/* -o -path ./sbin/* ) ! -name si-appliance"
  "busybox|-path ./bin/busybox"
  "CA bundle|-path ./etc/ssl/*"
  "other|-path ./init -o -path ./etc/* ! -path ./etc/ssl/*"
)
z() { zstd -q --ultra -22 --zstd=wlog=25 -T0 -c | wc -c; }
printf '%-18s %6s %12s %12s\n' part files bytes compressed
raw_all=0
for p in "${parts[@]}"; do
  name=${p%%|*}
  read -r -a expr <<<"${p#*|}"
  (cd "$work/root" && find . -type f \( "${expr[@]}" \) | LC_ALL=C sort) > "$work/list"
  n=$(wc -l < "$work/list")
  raw=$( (cd "$work/root" && xargs -r cat < "$work/list") | wc -c)
  comp=$( (cd "$work/root" && xargs -r cat < "$work/list") | z)
  raw_all=$((raw_all + raw))
  printf '%-18s %6d %12d %12d\n' "$name" "$n" "$raw" "$comp"
done
k=$(stat -c %s "$dir/vmlinuz"); i=$(stat -c %s "$dir/initrd.img")
printf '%-18s %6s %12s %12d\n' "initrd.img" "" "" "$i"
printf '%-18s %6s %12s %12d\n' "vmlinuz" "" "" "$k"
printf '%-18s %6s %12s %12d  (%.2f MiB)\n' "total" "" "" "$((k + i))" "$(awk -v t=$((k + i)) 'BEGIN{print t/1048576}')"
total_files=$(cd "$work/root" && find . -type f | wc -l)
total_raw=$(cd "$work/root" && find . -type f -printf '%s\n' | awk '{s+=$1} END{print s+0}')
[ "$total_raw" = "$raw_all" ] || say "warning: the parts hold $raw_all of the $total_raw bytes in $total_files files (a file in no part, or in two)"
