#!/usr/bin/env bash
# Builds the clients' boot files: the kernel and the installer initramfs every node fetches from
# the appliance (boot.kernel / boot.initrd).
#
#   OUTDIR/vmlinuz     the kernel of Debian's linux-image-amd64 (the standard kernel: it has the
#                      drivers of real server NICs and disks; SI_KERNEL_PKG picks another)
#   OUTDIR/initrd.img  busybox-static (its modprobe, insmod, lsmod… load the modules), the kernel
#                      modules for common server NICs and disks (with their dependencies,
#                      `depmod -b`, text indexes only), the disk tools the installer calls
#                      (sfdisk, wipefs, blkid, blockdev, partx, mkfs.ext4, mkfs.xfs, mkfs.vfat,
#                      mkswap) with their shared libraries, the static si-appliance binary, and an
#                      /init that loads drivers by modalias, brings up the NIC named by si.mac,
#                      runs udhcpc and then `si-appliance install` (a shell on failure).
#
# Usage: pxe-assets/build-client.sh [OUTDIR]      (default $SI_CACHE/client-boot; SI_CACHE is
#        /var/cache/si-appliance unless set, see pxe-assets/cache-lib.sh)
#   SI_NODE_BIN       the installer: the node build of si-appliance (default si-appliance-node
#                     beside $SI_APPLIANCE_BIN, else
#                     $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/si-appliance-node),
#                     installed as /usr/sbin/si-appliance; it must be statically linked
#                     (.cargo/config.toml builds it with crt-static)
#   SI_APPLIANCE_BIN  the appliance's binary; only its directory is used, to find the node build
#   SI_DEB_CACHE      where downloaded .deb files are kept (default $SI_CACHE/debs)
#   SI_KERNEL_PKG     meta-package naming the kernel (default linux-image-amd64)
#   SI_INITRD_COMP    zstd (default: level 22 with a 32 MiB window, see below) or xz
#
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb`, never
# installed here. Idempotent: when the outputs were built from the same inputs (kernel .deb,
# every copied binary, the installer, this script) nothing is rebuilt. Must run as root (apt,
# mknod). Prints the two sizes at the end.
set -euo pipefail
# One block, parsed before it runs: editing this file while a build runs cannot change it.
{

self=$(readlink -f "$0")
say() { echo "build-client: $*" >&2; }
die() { say "error: $*"; exit 1; }
. "$(dirname "$self")/cache-lib.sh"

out=${1:-$SI_CACHE/client-boot}
cache=${SI_DEB_CACHE:-$SI_CACHE/debs}
meta=${SI_KERNEL_PKG:-linux-image-amd64}
comp=${SI_INITRD_COMP:-zstd}
target_dir=${CARGO_TARGET_DIR:-$SI_CACHE/cargo-target}
# The node build (src/bin/si-appliance-node): install, fetch, boot-peer and update only, without
# the appliance's services, which every node would otherwise download at boot.
if [ -n "${SI_APPLIANCE_BIN:-}" ]; then
  installer=${SI_NODE_BIN:-$(dirname "$SI_APPLIANCE_BIN")/si-appliance-node}
else
  installer=${SI_NODE_BIN:-$target_dir/x86_64-unknown-linux-gnu/release/si-appliance-node}
fi

[ "$(id -u)" = 0 ] || die "run as root (apt, mknod)"
[ -x "$installer" ] || die "no installer binary at $installer (cargo build --release --bin si-appliance-node, or set SI_NODE_BIN)"
# A dynamically linked installer would not run in the initramfs (it has no glibc of its own).
if ! file -L "$installer" | grep -Eq 'statically linked|static-pie linked'; then
  die "$installer is not statically linked: $(file -L "$installer")"
fi

# Build tools and the tools copied into the initramfs, through apt only.
. "$(dirname "$self")/apt-lib.sh"
apt_ensure busybox-static cpio zstd xz-utils kmod file binutils util-linux fdisk e2fsprogs xfsprogs dosfstools ca-certificates

resolve_kernel_deb

mkdir -p "$cache" "$out"
cache_lock "$out/build" 900
download_deb

# What goes in. Modules: NICs (virtio, Intel, Broadcom), disk controllers (virtio, AHCI, NVMe,
# SCSI disks) and file systems; virtio_pci is listed because modprobe's dependency walk does not
# reach it from virtio_net (QEMU-LAB.md pitfall 7). crc32c is requested by ext4/xfs through the
# crypto API at mount time, not as a module dependency, so it is listed too. virtio_rng feeds the
# kernel's random pool in VMs: without RDRAND (QEMU TCG) and without it, getrandom(2) — which the
# installer's swarm client calls — blocks for minutes after boot.
modules=(
  virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev virtio_net virtio_blk virtio_scsi virtio_rng
  e1000 e1000e igb ixgbe tg3 bnx2
  ahci sd_mod nvme
  ext4 xfs vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1 crc32c_generic crc32c_intel efivarfs
)
# Modules are loaded by busybox's modprobe (aliases, dependencies, -q -a -b), not kmod: kmod
# would bring libcrypto, libzstd and liblzma along, 2.1 MB of the compressed initramfs.
tools=(/usr/sbin/sfdisk /usr/sbin/wipefs /usr/sbin/blkid /usr/sbin/blockdev /usr/bin/partx
       /usr/sbin/mke2fs /usr/sbin/mkfs.xfs /usr/sbin/mkfs.vfat /usr/sbin/mkswap)
busybox=/bin/busybox
modapplets=(modprobe insmod rmmod lsmod modinfo depmod)
for t in "$busybox" "${tools[@]}"; do [ -x "$t" ] || die "$t missing"; done
applets=$("$busybox" --list)
for a in "${modapplets[@]}"; do
  grep -qx "$a" <<<"$applets" || die "$busybox has no $a applet (the initramfs loads modules with it)"
done
[ -s /etc/ssl/certs/ca-certificates.crt ] || die "/etc/ssl/certs/ca-certificates.crt missing (package ca-certificates)"

stamp="$(stat -c "%n %s %Y" "$deb") $comp $(sha256sum "$self" /etc/ssl/certs/ca-certificates.crt "$(dirname "$self")/client-init.sh" "$(dirname "$self")/client-udhcpc.sh" "$busybox" "${tools[@]}" "$installer" | awk '{print $1}' | tr '\n' ' ')"
if [ "$(cat "$out/.inputs" 2>/dev/null)" = "$stamp" ] && cache_files_valid "$out/.sha256"; then
  say "up to date ($pkg $ver)"
else
  started=$(date +%s.%N)
  # Scratch space beside the outputs; holding the lock, an old one belongs to a dead run.
  rm -rf "$out"/.work.*
  work=$(mktemp -d "$out/.work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  trap 'say "interrupted"; exit 143' TERM
  trap 'say "interrupted"; exit 130' INT
  dpkg-deb -x "$deb" "$work/deb"
  kernel=$(ls "$work"/deb/boot/vmlinuz-* | head -n1)
  config=$(ls "$work"/deb/boot/config-* | head -n1)
  [ -f "$kernel" ] || die "no boot/vmlinuz-* in $deb"
  kver=${kernel##*/vmlinuz-}
  case $comp in
    # Level 22 with a 32 MiB window (wlog=25): the kernel's streaming unpacker allocates the
    # window (up to 128 MiB accepted) for the unpack only. Against -19 (8 MiB window) it is
    # 0.64 MB smaller, mostly matches across the 22 MB installer binary; a 64 MiB window gains
    # 0.05 MB more for twice the memory.
    zstd) grep -q '^CONFIG_RD_ZSTD=y' "$config" || die "$kver cannot unpack a zstd initramfs"
          compress=(zstd -q --ultra -22 --zstd=wlog=25 -T0 --no-progress -c) ;;
    xz)   grep -q '^CONFIG_RD_XZ=y' "$config" || die "$kver cannot unpack an xz initramfs"
          compress=(xz -9 -T0 --check=crc32 -c) ;;
    *)    die "SI_INITRD_COMP: zstd or xz, not $comp" ;;
  esac

  root="$work/root"
  mkdir -p "$root"/{bin,sbin,etc,dev,proc,sys,run,tmp,mnt,root,var/tmp,usr/bin,usr/sbin,lib/modules/"$kver"}
  ln -s ../run "$root/var/run"

  # Modules: the deb ships no modules.dep, so index its tree first, then copy every module of the
  # list with the dependencies modprobe names, keeping their paths; index the copy.
  depmod -b "$work/deb" "$kver"
  declare -A seen=()
  declare -A want=()
  for m in "${modules[@]}"; do
    deps=$(modprobe -d "$work/deb" -S "$kver" --show-depends "$m" 2>/dev/null) \
      || { say "warning: $kver has no module $m (built in or absent)"; continue; }
    want[$m]=$(awk -v d="$work/deb" '$1 == "insmod" { sub("^" d, "", $2); print $2 }' <<<"$deps" | LC_ALL=C sort | tr '\n' ' ')
    while read -r kind path _; do
      [ "$kind" = insmod ] || continue
      rel=${path#"$work/deb"}
      [ -n "${seen[$rel]:-}" ] && continue
      seen[$rel]=1
      mkdir -p "$root$(dirname "$rel")"
      cp "$path" "$root$rel"
    done <<<"$deps"
  done
  # depmod's inputs: the builtin list and the order (cut to the modules copied: it is 160 kB for
  # all of them). busybox reads the text indexes only: the .bin ones and modules.builtin.modinfo
  # are kmod's and are left out.
  cp "$work/deb/lib/modules/$kver"/modules.{builtin,builtin.modinfo} "$root/lib/modules/$kver/"
  (cd "$root/lib/modules/$kver" && find kernel -name '*.ko*' | LC_ALL=C sort > "$work/present" \
     && grep -Fxf "$work/present" "$work/deb/lib/modules/$kver/modules.order" > modules.order || true)
  depmod -b "$root" "$kver"
  rm -f "$root/lib/modules/$kver"/modules.*.bin "$root/lib/modules/$kver/modules.builtin.modinfo"

  # busybox: every applet as a link, except those util-linux provides.
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list-full); do
    case ${applet##*/} in blkid|blockdev|mkswap) continue ;; esac
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done

  # Content check: busybox's modprobe, run in the tree, must find for every module of the list
  # the files kmod's finds on the full tree. busybox ignores soft dependencies (modules.softdep:
  # ext4, jbd2, libcrc32c want crc32c, crc_t10dif crct10dif, …); the kernel asks for those by
  # name itself (request_module runs /sbin/modprobe, busybox's), so each soft dependency must
  # resolve in the tree too and covers the files kmod names beyond busybox's. busybox looks in
  # /lib/modules/$(uname -r): that name points at the copy for the check only.
  host_kver=$(uname -r)
  link=
  [ -e "$root/lib/modules/$host_kver" ] || { ln -s "$kver" "$root/lib/modules/$host_kver"; link=$root/lib/modules/$host_kver; }
  bb_deps() {
    { chroot "$root" /bin/busybox modprobe -D "$1" 2>/dev/null || true; } \
      | awk -v d="/lib/modules/$host_kver" -v k="/lib/modules/$kver" '$1 == "insmod" { if (index($2, d "/") == 1) $2 = k substr($2, length(d) + 1); print $2 }'
  }
  declare -A soft=()
  for s in $(sed -n 's/^softdep [^ ]* pre: //p' "$root/lib/modules/$kver/modules.softdep"); do
    modprobe -d "$work/deb" -S "$kver" --show-depends "$s" >/dev/null 2>&1 || continue
    files=$(bb_deps "$s")
    [ -n "$files" ] || die "busybox modprobe cannot resolve the soft dependency $s in the initramfs"
    for f in $files; do soft[$f]=1; done
  done
  for m in "${!want[@]}"; do
    declare -A got=()
    for f in $(bb_deps "$m"); do got[$f]=1; done
    for f in ${want[$m]}; do
      [ -n "${got[$f]:-}" ] || [ -n "${soft[$f]:-}" ] || die "busybox modprobe does not load $f for $m (kmod does)"
    done
    for f in "${!got[@]}"; do
      [[ " ${want[$m]} " == *" $f "* ]] || die "busybox modprobe loads $f for $m (kmod does not)"
    done
    unset got
  done
  [ -z "$link" ] || rm -f "$link"

  # Dynamic tools with their shared libraries and the loader, at the same paths as here.
  copy_with_libs() {
    local bin=$1
    mkdir -p "$root$(dirname "$bin")"
    cp -L "$bin" "$root$bin"
    ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  }
  for t in "${tools[@]}"; do copy_with_libs "$t"; done
  for f in mkfs.ext4 mkfs.ext3 mkfs.ext2; do ln -sf mke2fs "$root/usr/sbin/$f"; done
  ln -sf mkfs.vfat "$root/usr/sbin/mkfs.fat"
  # The usrmerge links Debian has (/lib64 -> usr/lib64 etc.) are plain directories here; make sure
  # the loader is where the binaries look for it.
  [ -e "$root/lib64/ld-linux-x86-64.so.2" ] || { mkdir -p "$root/lib64"; cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"; }
  [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
  # The CA bundle: librqbit's HTTP client (rustls with the platform's roots) refuses to start
  # without any, even though the appliance's tracker is plain HTTP.
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"

  # The installer, without debug info (its line tables are for the appliance's backtraces).
  strip -o "$root/usr/sbin/si-appliance" "$installer"
  chmod 755 "$root/usr/sbin/si-appliance"

  mknod -m 600 "$root/dev/console" c 5 1
  mknod -m 666 "$root/dev/null" c 1 3
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
  printf 'root:x:0:\n' > "$root/etc/group"
  install -m 755 "$(dirname "$self")/client-init.sh" "$root/init"
  install -m 755 "$(dirname "$self")/client-udhcpc.sh" "$root/etc/udhcpc.script"
  printf '%s %s\n' "$pkg" "$ver" > "$root/etc/si-client-version"

  # Reproducible archive: fixed mtimes, sorted names, owner root.
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
     | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$work/initrd.cpio"
  "${compress[@]}" "$work/initrd.cpio" > "$work/initrd.img"
  unpacked=$(stat -c %s "$work/initrd.cpio")

  # The stamp goes first and comes back last: outputs replaced half-way are never reused.
  rm -f "$out/.inputs" "$out/.sha256"
  install -m 644 "$kernel" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  install -m 644 "$work/initrd.img" "$out/initrd.img.tmp" && mv "$out/initrd.img.tmp" "$out/initrd.img"
  printf '%s %s initrd=%s unpacked=%s modules=%s\n' "$pkg" "$ver" "$comp" "$unpacked" "${#seen[@]}" > "$out/VERSION"
  (cd "$out" && sha256sum vmlinuz initrd.img) > "$out/.sha256"
  printf '%s' "$stamp" > "$out/.inputs"
  say "built from $pkg $ver in $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s: ${#seen[@]} modules, initramfs $comp, $unpacked bytes unpacked"
fi

k=$(stat -c %s "$out/vmlinuz"); i=$(stat -c %s "$out/initrd.img")
printf '%-10s %9d bytes  %s\n' vmlinuz "$k" "$out/vmlinuz"
printf '%-10s %9d bytes  %s\n' initrd.img "$i" "$out/initrd.img"
printf '%-10s %9d bytes  (%.1f MiB; target <= 16 MiB)\n' total "$((k + i))" "$(awk -v t=$((k + i)) 'BEGIN{print t/1048576}')"
exit
}
