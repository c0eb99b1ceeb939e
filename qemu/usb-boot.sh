#!/usr/bin/env bash
# Boots a USB stick image (pxe-assets/build-usb.sh) in QEMU and waits for its login prompt on the
# serial console: the hand check that the stick boots on each firmware, Secure Boot included.
#
#   sudo qemu/usb-boot.sh STICK.img sb|uefi|bios [SERIAL.log]
#
#   sb    OVMF with Secure Boot on and Microsoft's keys enrolled (OVMF_CODE_4M.secboot.fd and a
#         copy of OVMF_VARS_4M.ms.fd, q35 with SMM: the secure variable store needs it), as laptops
#         and servers ship
#   uefi  OVMF without Secure Boot (OVMF_CODE_4M.fd, OVMF_VARS_4M.fd)
#   bios  SeaBIOS
#
# The stick is the only disk (usb-storage on xHCI, a sparse copy: the data partition grows at the
# first boot and the image stays as built). The VM has no NIC at all (-nic none): nothing leaves
# the machine. TCG, 1 vCPU, 1 GiB. Prints the seconds from QEMU's start to `login:` on the serial
# console, and the lines that name the boot chain: GRUB's banner (Debian's signed GRUB on UEFI),
# the firmware's refusals, and the kernel's Secure Boot lines, which the stick's `quiet` hides
# (boot a copy whose /boot/grub/grub.cfg lacks it to see them). The serial log goes to SERIAL.log
# (default /var/tmp/usb-boot-MODE.log). Bounded by USB_BOOT_TIMEOUT (default 480 s); stops the
# VM it started, by PID.
set -euo pipefail

say() { echo "usb-boot: $*" >&2; }
die() { say "error: $*"; exit 1; }

img=${1:-}; mode=${2:-}
[ -s "$img" ] || die "usage: $0 STICK.img sb|uefi|bios [SERIAL.log]"
secs=${USB_BOOT_TIMEOUT:-480}
ovmf=/usr/share/OVMF
dir=$(mktemp -d /var/tmp/usb-boot.XXXXXX)
log=${3:-/var/tmp/usb-boot-$mode.log}
qpid=
cleanup() {
  if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

case $mode in
  sb)   code=$ovmf/OVMF_CODE_4M.secboot.fd vars=$ovmf/OVMF_VARS_4M.ms.fd
        fw=(-machine q35,smm=on -global driver=cfi.pflash01,property=secure,value=on) ;;
  uefi) code=$ovmf/OVMF_CODE_4M.fd vars=$ovmf/OVMF_VARS_4M.fd
        fw=(-machine q35) ;;
  bios) fw=(-machine q35) ;;
  *)    die "firmware must be sb, uefi or bios, not '$mode'" ;;
esac
if [ "$mode" != bios ]; then
  [ -s "$code" ] && [ -s "$vars" ] || die "no $code / $vars (package ovmf)"
  # The variable store is written by the firmware: each run gets its own copy.
  cp "$vars" "$dir/vars.fd"
  fw+=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$code"
       -drive "if=pflash,format=raw,unit=1,file=$dir/vars.fd")
fi
cp --sparse=always "$img" "$dir/stick.img"
: > "$log"

t0=$(date +%s%N)
timeout --kill-after=10 "$secs" qemu-system-x86_64 "${fw[@]}" -accel tcg -m 1024 -smp 1 \
  -nodefaults -display none -nic none -serial "file:$log" \
  -drive "file=$dir/stick.img,if=none,id=stick,format=raw" \
  -device qemu-xhci -device usb-storage,drive=stick,bootindex=1 2>"$dir/qemu.err" &
qpid=$!
say "QEMU ($mode) is PID $qpid, serial console in $log"
result=
while kill -0 "$qpid" 2>/dev/null; do
  if grep -aq 'login:' "$log"; then
    t=$(( ($(date +%s%N) - t0) / 1000000 ))
    result="login prompt after $((t / 1000)).$(printf %03d $((t % 1000))) s"
    break
  fi
  sleep 0.5
done
tr '\r' '\n' < "$log" | grep -a -o -E 'GNU GRUB  version [^ ]+|EFI stub: UEFI Secure Boot is [a-z]+|secureboot: Secure boot [a-z]+|Kernel is locked down from EFI Secure Boot|BdsDxe: failed to .*|Verification failed: .*' \
  | sort -u | sed 's/^/  serial: /' >&2 || true
[ -n "$result" ] || { cat "$dir/qemu.err" >&2; die "no login prompt within ${secs} s (QEMU ended or timed out; see $log)"; }
echo "$mode: $result"
