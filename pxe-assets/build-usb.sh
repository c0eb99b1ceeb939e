#!/usr/bin/env bash
# Builds the appliance's USB stick image: one raw GPT disk image that boots on BIOS (GRUB) and on
# UEFI, with Secure Boot on or off (Debian's signed shim and GRUB), into a small read-only Debian
# root that starts si-appliance at boot.
#
#   pxe-assets/build-usb.sh [OUT.img]      (default $SI_CACHE/usb/si-appliance-usb.img)
#   pxe-assets/build-usb.sh --root-only    only the cached Debian root tree (needs no binary:
#                                          vm-tests/run.sh builds it while cargo builds)
#
# Write it with `dd if=OUT.img of=/dev/sdX bs=4M conv=fsync` or any image writer.
#
# Layout (512-byte sectors, 1 MiB aligned):
#   1  BIOS boot   1 MiB   GRUB's i386-pc core image (what grub-bios-setup would embed)
#   2  ESP        32 MiB   FAT: EFI/BOOT/BOOTX64.EFI = Debian's shim (signed by Microsoft's UEFI
#                          CA), EFI/BOOT/grubx64.efi = Debian's GRUB and EFI/BOOT/mmx64.efi = shim's
#                          MokManager (both signed by Debian's Secure Boot CA, which shim holds),
#                          EFI/debian/grub.cfg (signed GRUB's prefix) pointing at the root's menu
#   3  root        ext4, label si-root, mounted read-only: Debian bookworm minbase + kernel,
#                  systemd, udev, iproute2, e2fsprogs, fdisk, the iPXE/pxelinux loaders, the
#                  static si-appliance, the clients' kernel + initramfs it serves
#                  (/usr/share/si-appliance/client/), GRUB's config (/boot/grub/grub.cfg)
#   4  data        ext4, label SI-DATA, mounted at /srv/si: si-appliance.toml, network.conf,
#                  store/ (images, archives), state/ (leases, node records, keys), reports,
#                  log/. Grown to the end of the stick at the first boot (si-grow-data.service).
#
# Why ext4 for the data partition (not FAT): the image store keeps trees with owners, modes,
# xattrs and hard links, and the lease and node journals rely on fsync + rename being durable
# across a power cut; FAT gives neither. Linux reads and writes it from any workstation
# (`si-appliance usb add-image`, or mount it); Windows and macOS do not, which is the price.
#
# Built from Debian packages only (mmdebstrap, grub-pc-bin, mtools, dosfstools, e2fsprogs, fdisk;
# the signed boot chain from shim-signed, shim-helpers-amd64-signed and grub-efi-amd64-signed,
# downloaded as .debs into $SI_CACHE/usb-efi-debs and unpacked, never installed), as a plain
# file: no loop devices, no mounts, no grub-install (which needs a block device and whose grub-pc
# package wants to own this machine's boot loader). The few bytes grub-bios-setup would patch are written here (see `bios_setup`).
#
# Inputs (the output is rebuilt only when one changes; the root tree is cached on its own):
#   SI_APPLIANCE_BIN   static si-appliance (default $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/
#                      release/si-appliance)
#   SI_CLIENT_BOOT     the clients' vmlinuz + initrd.img (default $SI_CACHE/client-boot, made by
#                      pxe-assets/build-client.sh)
#   SI_USB_DATA_MIB    initial size of the data partition (default 256)
# Must run as root (mmdebstrap in root mode, device nodes in the tree).
set -euo pipefail
{

self=$(readlink -f "$0")
here=$(dirname "$self")
say() { echo "build-usb: $*" >&2; }
die() { say "error: $*"; exit 1; }
. "$here/cache-lib.sh"
. "$here/apt-lib.sh"

root_only=0
if [ "${1:-}" = --root-only ]; then root_only=1; shift; fi
out=${1:-$SI_CACHE/usb/si-appliance-usb.img}
target_dir=${CARGO_TARGET_DIR:-$SI_CACHE/cargo-target}
bin=${SI_APPLIANCE_BIN:-$target_dir/x86_64-unknown-linux-gnu/release/si-appliance}
client=${SI_CLIENT_BOOT:-$SI_CACHE/client-boot}
data_mib=${SI_USB_DATA_MIB:-256}
suite=bookworm
rootcache=$SI_CACHE/usb-root
debs=$SI_CACHE/usb-debs
efidebs=$SI_CACHE/usb-efi-debs
efi=$SI_CACHE/usb-efi

[ "$(id -u)" = 0 ] || die "run as root"
[ $root_only = 1 ] || {
[ -x "$bin" ] || die "no si-appliance binary at $bin (cargo build --release, or set SI_APPLIANCE_BIN)"
file -L "$bin" | grep -Eq 'statically linked|static-pie linked' || die "$bin is not statically linked"
[ -s "$client/vmlinuz" ] && [ -s "$client/initrd.img" ] || die "no client boot files in $client (pxe-assets/build-client.sh)"
}
apt_ensure mmdebstrap grub-pc-bin mtools dosfstools e2fsprogs fdisk file binutils uuid-runtime sbsigntool

# The packages of the stick's root. initramfs-tools builds its initramfs (ext4 and the USB,
# SATA, NVMe and virtio drivers are modules in Debian's kernel). ca-certificates: the seed's
# BitTorrent library refuses to start without a CA bundle, although the tracker is plain HTTP.
pkgs=linux-image-amd64,ca-certificates,systemd,systemd-sysv,udev,initramfs-tools,zstd,e2fsprogs,fdisk,iproute2,kmod,procps,less,ipxe,pxelinux,syslinux-common
mkdir -p "$(dirname "$out")" "$debs" "$rootcache"
# The root tree has its own lock (fd 8; cache_lock's fd 9 is the image's), held until the
# image's copy of the tree is made: an image build and a root-only build may run at once.
exec 8>"$rootcache/tree.lock"
flock -w 1800 8 || die "timed out waiting for $rootcache/tree.lock"

# ---- 1. The root tree (Debian packages + trimming), cached by the package list and the hook
# below; the appliance's own files are added to a copy each time (step 2).
# The stick runs on a production switch: its root carries bookworm's updates and security
# updates, not only the release's packages.
root_key=$(printf '%s+updates+security %s %s' "$suite" "$pkgs" "$(sed -n '/^# ROOT-HOOK-BEGIN/,/^# ROOT-HOOK-END/p' "$self" | sha256sum | cut -c1-16)")
if [ "$(cat "$rootcache/.key" 2>/dev/null)" != "$root_key" ] || [ ! -d "$rootcache/tree/usr" ]; then
  t0=$(date +%s)
  rm -rf "$rootcache"
  mkdir -p "$rootcache"
  mirror=$(debian_mirror); security=$(debian_security_mirror)
  say "mmdebstrap $suite from $mirror and $security (packages cached in $debs)"
  cache_run_bounded 1200 mmdebstrap --variant=minbase --include="$pkgs" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --aptopt='Acquire::Retries "3"' \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $debs /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $debs" \
    "$suite" "$rootcache/tree.tmp" "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb $security $suite-security main" >&2 || die "mmdebstrap failed"
  tree=$rootcache/tree.tmp
# ROOT-HOOK-BEGIN (its text is part of the cache key)
  kver=$(ls "$tree/usr/lib/modules" | head -n1)
  # Drivers an imaging appliance never loads: sound, GPUs, cameras, Wi-Fi, Bluetooth,
  # InfiniBand, CAN, staging, industrial I/O, exotic file systems. Kept: wired NICs, USB, SATA,
  # SAS/SCSI, NVMe, virtio, input, ext4/vfat.
  m=$tree/usr/lib/modules/$kver/kernel
  rm -rf "$m/sound" "$m/drivers/gpu" "$m/drivers/media" "$m/drivers/net/wireless" \
    "$m/drivers/infiniband" "$m/drivers/staging" "$m/drivers/bluetooth" "$m/net/wireless" \
    "$m/net/mac80211" "$m/net/bluetooth" "$m/drivers/iio" "$m/drivers/isdn" "$m/drivers/net/can" \
    "$m/drivers/mtd" "$m/drivers/hwmon" "$m/drivers/video/fbdev" "$m/drivers/net/ethernet/mellanox/mlx5/core/en_accel" \
    "$m/fs/btrfs" "$m/fs/xfs" "$m/fs/ocfs2" "$m/fs/gfs2" "$m/fs/nfs" "$m/fs/nfsd" "$m/fs/smb" \
    "$m/fs/ceph" "$m/fs/f2fs" "$m/fs/ntfs3" "$m/fs/ubifs" "$m/fs/jfs" "$m/fs/nilfs2" "$m/fs/reiserfs"
  chroot "$tree" depmod "$kver"
  printf 'COMPRESS=zstd\n' > "$tree/etc/initramfs-tools/conf.d/si-compress"
  chroot "$tree" update-initramfs -u -k "$kver" >&2
  rm -rf "$tree/var/cache/apt/archives"/*.deb "$tree/var/lib/apt/lists"/* "$tree/usr/share/doc" \
    "$tree/usr/share/man" "$tree/usr/share/locale"
# ROOT-HOOK-END
  mv "$tree" "$rootcache/tree"
  printf '%s' "$root_key" > "$rootcache/.key"
  say "root tree built in $(( $(date +%s) - t0 )) s: $(du -sm "$rootcache/tree" | cut -f1) MiB"
fi
if [ $root_only = 1 ]; then
  say "root tree ready: $rootcache/tree"
  exit 0
fi
cache_lock "$out" 1800

# ---- 1b. The UEFI boot chain: Debian's signed shim, MokManager and GRUB, so that a machine with
# Secure Boot on and only Microsoft's keys (as shipped) boots the stick, and one with it off as
# well (shim runs either way). Downloaded as .debs (apt checks them against the signed Release
# files; the root's package list, the root tree's cache key, is not touched) and unpacked into
# $efi, once per set of .debs.
efi_key=
for efipkg in shim-signed shim-helpers-amd64-signed grub-efi-amd64-signed; do
  cache=$efidebs
  resolve_deb "$efipkg"
  download_deb
  efi_key="$efi_key $(basename "$deb")"
done
if [ "$(cat "$efi/.key" 2>/dev/null)" != "$efi_key" ] || [ ! -s "$efi/grubx64.efi" ]; then
  rm -rf "$efi" "$efi.tmp"
  mkdir -p "$efi.tmp/x"
  for d in $efi_key; do dpkg-deb -x "$efidebs/$d" "$efi.tmp/x"; done
  cp "$efi.tmp/x/usr/lib/shim/shimx64.efi.signed" "$efi.tmp/BOOTX64.EFI"
  cp "$efi.tmp/x/usr/lib/shim/mmx64.efi.signed" "$efi.tmp/mmx64.efi"
  cp "$efi.tmp/x/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" "$efi.tmp/grubx64.efi"
  rm -rf "$efi.tmp/x"
  printf '%s' "$efi_key" > "$efi.tmp/.key"
  mv "$efi.tmp" "$efi"
fi
# A check that each piece carries the signature the chain needs (not a cryptographic proof, apt
# gave that; it catches a packaging change, or a kernel Debian did not sign, before a machine with
# Secure Boot refuses the stick): shim by Microsoft's UEFI CA, GRUB, MokManager and the root's
# kernel by Debian's Secure Boot CA (which shim trusts; lockdown then takes only signed modules).
signed_by() { sbverify --list "$1" 2>/dev/null | grep -Eq "issuer: .*($2)" || die "$1 is not signed by $2"; }
signed_by "$efi/BOOTX64.EFI" "Microsoft Corporation UEFI CA 2011|Microsoft UEFI CA 2023"
signed_by "$efi/grubx64.efi" "Debian Secure Boot CA"
signed_by "$efi/mmx64.efi" "Debian Secure Boot CA"
signed_by "$(ls "$rootcache"/tree/boot/vmlinuz-* | head -n1)" "Debian Secure Boot CA"

# ---- 2. Is the image up to date?
stamp="$root_key $(sha256sum "$self" "$here"/usb/* "$here/../config/si-appliance.toml" "$bin" "$client/vmlinuz" "$client/initrd.img" "$efi"/*.efi "$efi"/*.EFI | awk '{print $1}' | tr '\n' ' ') $data_mib"
if [ "$(cat "$out.inputs" 2>/dev/null)" = "$stamp" ] && [ -s "$out" ]; then
  say "up to date: $out"
  ls -l "$out" >&2
  exit 0
fi
t0=$(date +%s)
rm -rf "$out".work.*
work=$(mktemp -d "$out.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'say "interrupted"; exit 143' TERM
trap 'say "interrupted"; exit 130' INT
rm -f "$out.inputs"

# The root: a copy of the cached tree plus the appliance's files.
tree=$work/root
cp -a "$rootcache/tree" "$tree"
exec 8>&-   # the copy is made: the root tree may be rebuilt by others now
kver=$(ls "$tree/usr/lib/modules" | head -n1)
strip -o "$tree/usr/sbin/si-appliance" "$bin"
chmod 755 "$tree/usr/sbin/si-appliance"
install -d "$tree/usr/share/si-appliance/client" "$tree/usr/lib/si-appliance" "$tree/srv/si"
install -m 644 "$client/vmlinuz" "$client/initrd.img" "$tree/usr/share/si-appliance/client/"
install -m 755 "$here/usb/usb-start" "$here/usb/grow-data" "$here/usb/console-screen" "$tree/usr/lib/si-appliance/"
install -m 644 "$here/usb/si-appliance.service" "$here/usb/si-grow-data.service" "$here/usb/si-console.service" "$tree/etc/systemd/system/"
for u in si-appliance si-grow-data si-console; do
  ln -sf "/etc/systemd/system/$u.service" "$tree/etc/systemd/system/multi-user.target.wants/$u.service"
done
echo si-appliance > "$tree/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 si-appliance\n' > "$tree/etc/hosts"
# machine-id empty: systemd gives the read-only root a transient one at each boot.
: > "$tree/etc/machine-id"
# Journal in RAM only: the root is read-only and the appliance keeps its own log on /srv/si.
mkdir -p "$tree/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' > "$tree/etc/systemd/journald.conf.d/si.conf"
# Root login on the serial and local consoles without a password would be an open door on a
# production switch: root stays locked; the console screen is read-only.
root_uuid=$(uuidgen); data_uuid=$(uuidgen); esp_id=$(printf '%08X' $((RANDOM * 65536 + RANDOM)))
cat > "$tree/etc/fstab" <<EOF
# The root is read-only: a power cut during a deployment cannot damage it.
UUID=$root_uuid  /          ext4   ro,noatime,errors=remount-ro  0 1
# Configuration, images, leases, node records, reports: the data partition.
UUID=$data_uuid  /srv/si    ext4   rw,noatime,nodev,nosuid,x-systemd.device-timeout=30s  0 2
tmpfs  /tmp              tmpfs  mode=1777,nosuid,nodev  0 0
tmpfs  /var/tmp          tmpfs  mode=1777,nosuid,nodev  0 0
tmpfs  /var/log          tmpfs  mode=0755,nosuid,nodev  0 0
tmpfs  /var/lib/systemd  tmpfs  mode=0755,nosuid,nodev  0 0
tmpfs  /var/cache        tmpfs  mode=0755,nosuid,nodev  0 0
EOF
# GRUB's menu: serial and screen, one entry, no wait worth noticing.
mkdir -p "$tree/boot/grub"
cat > "$tree/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry "si-appliance" {
  linux /boot/vmlinuz-$kver root=UUID=$root_uuid ro console=tty0 console=ttyS0,115200n8 quiet modprobe.blacklist=floppy systemd.show_status=1
  initrd /boot/initrd.img-$kver
}
EOF

# The data partition's first contents: the configuration (the example with the stick's paths,
# no fixed interface and its sample reservation commented out: `usb add-image --enroll`, the
# dashboard or `node add` enrol the real nodes), the address to take when the interface has none, empty store and
# state directories.
data=$work/data
mkdir -p "$data/store" "$data/state" "$data/log"
sed -e 's|^iface = .*|# iface = "eth1"   (unset: the first wired interface with carrier)|' \
    -e 's|^store = .*|store = "/srv/si/store"|' \
    -e 's|^state_dir = .*|state_dir = "/srv/si/state"|' \
    -e 's|^# kernel = .*|kernel = "/usr/share/si-appliance/client/vmlinuz"|' \
    -e 's|^# initrd = .*|initrd = "/usr/share/si-appliance/client/initrd.img"|' \
    -e '/^\[\[dhcp.reservation\]\]$/,/^hostname = /s|^|# |' \
    "$here/../config/si-appliance.toml" > "$data/si-appliance.toml"
grep -q '^kernel = "/usr/share' "$data/si-appliance.toml" || die "config/si-appliance.toml: no boot.kernel line to set"
cat > "$data/network.conf" <<'EOF'
# The stick's address on the provisioning interface, used when that interface has none.
ADDRESS=10.0.0.1/24
EOF

# ---- 3. File systems, as files.
root_mib=$(( $(du -sm "$tree" | cut -f1) * 115 / 100 + 64 ))
mkfs.ext4 -q -F -L si-root -U "$root_uuid" -d "$tree" -E root_owner=0:0 -O ^has_journal "$work/root.fs" "${root_mib}M"
mkfs.ext4 -q -F -L SI-DATA -U "$data_uuid" -d "$data" "$work/data.fs" "${data_mib}M"
esp_mib=32
mkfs.vfat -n SI-EFI -i "$esp_id" -C "$work/esp.fs" $((esp_mib * 1024)) >/dev/null

# ---- 4. The boot loaders. One small config finds the root by file-system UUID (the stick's disk
# number differs from machine to machine) and reads /boot/grub/grub.cfg there.
# BIOS: embedded in GRUB's core image, which holds every module it needs (nothing is loaded from
# disk).
cat > "$work/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
configfile (\$root)/boot/grub/grub.cfg
EOF
mods="part_gpt part_msdos ext2 search search_fs_uuid configfile linux normal echo test serial terminal gzio"
grub-mkimage -O i386-pc -o "$work/core.img" -p /boot/grub -c "$work/early.cfg" biosdisk $mods
# UEFI: the firmware's removable-media path EFI/BOOT/BOOTX64.EFI is shim; shim loads grubx64.efi
# from its own directory (mmx64.efi when a MOK request is pending; no fbx64.efi, so it never
# writes boot entries into the machine's NVRAM). Debian's signed GRUB is one image with every
# module built in (under Secure Boot it loads none from disk) and prefix /EFI/debian on the
# ESP: its built-in config sources $prefix/grub.cfg, or $cmdpath/grub.cfg (EFI/BOOT) when
# /EFI/debian is missing; the same small config is in both. It boots only kernels shim accepts
# (Debian-signed, or enrolled with MokManager).
mmd -i "$work/esp.fs" ::/EFI ::/EFI/BOOT ::/EFI/debian
cp "$work/early.cfg" "$work/grub.cfg"
mcopy -i "$work/esp.fs" "$efi/BOOTX64.EFI" "$efi/grubx64.efi" "$efi/mmx64.efi" "$work/grub.cfg" ::/EFI/BOOT/
mcopy -i "$work/esp.fs" "$work/grub.cfg" ::/EFI/debian/

# ---- 5. The disk: GPT, then each file system at its partition's offset.
mib=2048   # sectors per MiB
p1=$mib; p2=$((p1 + mib)); p3=$((p2 + esp_mib * mib)); p4=$((p3 + root_mib * mib))
total_mib=$(( (p4 / mib) + data_mib + 1 ))
truncate -s 0 "$work/disk.img"
truncate -s "${total_mib}M" "$work/disk.img"
sfdisk -q --no-reread --no-tell-kernel "$work/disk.img" <<EOF
label: gpt
first-lba: 2048
start=$p1, size=$mib, type=21686148-6449-6E6F-744E-656564454649, name="bios-boot"
start=$p2, size=$((esp_mib * mib)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="si-efi"
start=$p3, size=$((root_mib * mib)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="si-root"
start=$p4, size=$((data_mib * mib)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="si-data"
EOF
put() { dd if="$1" of="$work/disk.img" bs=512 seek="$2" conv=notrunc,sparse status=none; }
put "$work/esp.fs" "$p2"
put "$work/root.fs" "$p3"
put "$work/data.fs" "$p4"

# BIOS: what grub-bios-setup does for a GPT disk with a BIOS boot partition.
#  - boot.img's code (bytes 0..439) over the protective MBR, which keeps its partition entry
#    and signature (440..511) and a zero BPB area;
#  - boot.img's "kernel sector" (8 bytes at 0x5c) = the first sector of core.img;
#  - the drive check (2 bytes at 0x66) replaced by NOPs, as grub-bios-setup does for hard disks
#    and USB sticks (some BIOSes pass a wrong boot drive);
#  - core.img's first sector (diskboot.img) ends with a block list { u64 start, u16 len,
#    u16 segment }: start = the sector after it (len and segment are filled by grub-mkimage).
bios_setup() {
  local boot=/usr/lib/grub/i386-pc/boot.img core=$work/core.img
  local core_bytes; core_bytes=$(stat -c %s "$core")
  [ "$core_bytes" -le $((mib * 512)) ] || die "core.img ($core_bytes bytes) does not fit the BIOS boot partition"
  [ "$(stat -c %s "$boot")" = 512 ] || die "$boot is not one sector"
  le64() { local v=$1 i; for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(( (v >> (8 * i)) & 255 )))"; done; }
  cp "$boot" "$work/mbr"
  dd if=/dev/zero of="$work/mbr" bs=1 seek=3 count=$((0x5a - 3)) conv=notrunc status=none
  le64 "$p1" | dd of="$work/mbr" bs=1 seek=$((0x5c)) conv=notrunc status=none
  printf '\x90\x90' | dd of="$work/mbr" bs=1 seek=$((0x66)) conv=notrunc status=none
  dd if="$work/mbr" of="$work/disk.img" bs=1 count=440 conv=notrunc status=none
  le64 $((p1 + 1)) | dd of="$core" bs=1 seek=$((512 - 12)) conv=notrunc status=none
  put "$core" "$p1"
}
bios_setup

mv "$work/disk.img" "$out.tmp"
mv "$out.tmp" "$out"
printf '%s' "$stamp" > "$out.inputs"
say "built $out in $(( $(date +%s) - t0 )) s: $(( $(stat -c %s "$out") / 1048576 )) MiB (root ${root_mib} MiB, data ${data_mib} MiB, kernel $kver)"
exit 0
}
