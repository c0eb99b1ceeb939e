#!/bin/sh
# /init of the si-appliance client initramfs (built by pxe-assets/build-client.sh).
#
# Mounts the kernel file systems, loads drivers by modalias (a few passes: virtio_pci's devices
# only appear once it is loaded), loads the disk and file-system modules, brings up the NIC whose
# MAC is si.mac (or pxelinux's BOOTIF=) from /proc/cmdline (dotted keys never reach our
# environment), configures it with udhcpc (vendor class "si-appliance", which the appliance
# answers), and runs `si-appliance install`, which reads its orders from /proc/cmdline and
# reboots or powers off at the end. When anything fails, the reason is printed and a shell is
# started on the console (console=ttyS0); leaving it reboots.
#
# Kernel command line words read here:
#   si.mac=aa:bb:..   the NIC to use (the appliance puts it there); BOOTIF=01-aa-bb-.. also works
#   si.onfail=shell|reboot|poweroff   what to do when something fails (default shell)
#   si.break=1        start a shell before the installer (debugging)
#   si.ip=A.B.C.D si.netmask=M si.gw=G   the address iPXE got from the appliance (its node script
#                     writes iPXE's ${ip}, ${netmask}, ${gateway}): the NIC is configured with it
#                     and no second DHCP exchange happens, so a rogue DHCP server on the segment
#                     cannot hand the installer another address, gateway or server. Without
#                     si.ip (pxelinux), udhcpc runs and only a lease from si.server's address is
#                     kept (a lease from another server is dropped and asked again, bounded).
#
# Lines starting with "si-init:" mark the steps on the serial console (the lab times them).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
[ -d /sys/firmware/efi ] && mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null

# /dev/console is only the last console= of the command line; the kernel prints to all of them.
# So that the installer's lines reach every console too (a rack's screen and its serial-over-LAN,
# e.g. "console=ttyS0 console=tty0"), our output goes through tee to the others as well. The
# preferred console is the one /proc/consoles flags C.
dup=
for c in $(sed -n '/(.*C.*)/!s/^\([^ ]*\) .*/\1/p' /proc/consoles 2>/dev/null); do
  [ -c "/dev/$c" ] && dup="$dup /dev/$c"
done
if [ -n "$dup" ] && mkfifo /run/console.fifo 2>/dev/null; then
  tee $dup < /run/console.fifo > /dev/console 2>/dev/null &
  exec > /run/console.fifo 2>&1
fi

say() { echo "si-init: $*"; }
onfail=shell
mac=
brk=
sip=
smask=
sgw=
server=
for w in $(cat /proc/cmdline); do
  case "$w" in
    si.mac=*) mac=${w#si.mac=} ;;
    si.ip=*) sip=${w#si.ip=} ;;
    si.netmask=*) smask=${w#si.netmask=} ;;
    si.gw=*) sgw=${w#si.gw=} ;;
    si.server=*) server=${w#si.server=}; server=${server%:*} ;;
    BOOTIF=*) [ -z "$mac" ] && mac=$(echo "${w#BOOTIF=}" | sed 's/^01-//; s/-/:/g') ;;
    si.onfail=*) onfail=${w#si.onfail=} ;;
    si.break=1) brk=1 ;;
  esac
done
mac=$(echo "$mac" | tr 'A-F' 'a-f')

rescue() {
  say "FAILED: $*"
  case "$onfail" in
    reboot) say "rebooting (si.onfail=reboot)"; sleep 5; reboot -f ;;
    poweroff) say "powering off (si.onfail=poweroff)"; sleep 2; poweroff -f ;;
  esac
  say "starting a shell on the console; leaving it reboots"
  setsid cttyhack sh -l
  reboot -f
}

say "running, kernel $(uname -r)"

# Drivers: every modalias the kernel shows, until a pass loads nothing new (bounded).
loaded() { wc -l < /proc/modules; }
pass=0
while [ $pass -lt 5 ]; do
  pass=$((pass + 1))
  before=$(loaded)
  aliases=$(find /sys/devices -name modalias -exec cat {} + 2>/dev/null | sort -u)
  [ -n "$aliases" ] && modprobe -qab $aliases 2>/dev/null
  [ "$(loaded)" = "$before" ] && break
done
say "drivers loaded ($(loaded) modules, $pass passes)"
# Disks and file systems the installer may need whatever the hardware said: loaded in the
# background while the network comes up (each module costs time under emulation). crc32c first:
# ext4, jbd2 and xfs ask the kernel for it (a soft dependency, which busybox's modprobe does not
# follow; the kernel's request would run /sbin/modprobe once more).
modprobe -qab crc32c_intel crc32c_generic sd_mod virtio_blk ext4 xfs vfat nls_cp437 nls_ascii \
  nls_utf8 nls_iso8859_1 2>/dev/null &
fsmods=$!

# The NIC: the one with si.mac, else the first Ethernet interface with a carrier.
nic=
i=0
while [ $i -lt 100 ] && [ -z "$nic" ]; do
  for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    if [ -n "$mac" ]; then
      [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && nic=$n && break
    else
      ip link set "$n" up 2>/dev/null
      [ "$(cat "$d/carrier" 2>/dev/null)" = 1 ] && nic=$n && break
    fi
  done
  [ -z "$nic" ] && { usleep 100000; i=$((i + 1)); }
done
[ -n "$nic" ] || rescue "no network interface${mac:+ with MAC $mac} (interfaces: $(ls /sys/class/net | tr '\n' ' '))"
ip link set lo up
ip link set "$nic" up
say "interface $nic${mac:+ ($mac)} up"

# A dotted quad, each part 0-255 (what iPXE writes; an unset setting is empty).
is_ip() {
  echo "$1" | grep -qE '^([0-9]{1,3}\.){3}[0-9]{1,3}$' || return 1
  for o in $(echo "$1" | tr . ' '); do [ "$o" -le 255 ] || return 1; done
}
if is_ip "$sip"; then
  # The address iPXE was leased by the appliance a moment ago: no second DHCP exchange.
  is_ip "$smask" || smask=255.255.255.0
  ifconfig "$nic" "$sip" netmask "$smask"
  if is_ip "$sgw" && [ "$sgw" != 0.0.0.0 ]; then ip route add default via "$sgw" dev "$nic"; fi
  cat > /run/si-net.env <<ENV
SI_IFACE=$nic
SI_IP=$sip
SI_NETMASK=$smask
SI_ROUTER=$sgw
SI_SERVER=$server
SI_HOSTNAME=
ENV
  say "address from iPXE's lease: $sip/$smask on $nic${sgw:+ via $sgw} (no second DHCP)"
else
  tries=0
  until udhcpc -i "$nic" -s /etc/udhcpc.script -V si-appliance -t 6 -T 2 -A 2 -n -S 2>&1 && . /run/si-net.env \
    && { [ -z "$server" ] || [ "$SI_SERVER" = "$server" ]; }; do
    if [ -f /run/si-net.env ] && [ -n "$server" ] && [ "$SI_SERVER" != "$server" ]; then
      # A lease from another DHCP server: not ours to use. Drop it and ask again.
      say "dropped a lease from DHCP server ${SI_SERVER:-?}: not the appliance ($server)"
      ip -4 addr flush dev "$nic"
      rm -f /run/si-net.env
      for p in $(pidof udhcpc); do kill "$p" 2>/dev/null; done
    fi
    tries=$((tries + 1))
    [ $tries -ge 10 ] && rescue "no DHCP lease from $server on $nic after $tries attempts"
    say "no DHCP lease on $nic from the appliance yet, retrying"
  done
fi
. /run/si-net.env
say "network up: $nic $SI_IP"

[ -n "$brk" ] && { say "si.break=1: shell before the installer; exit to continue"; setsid cttyhack sh -l; }

wait $fsmods
say "starting si-appliance install"
export RUST_LOG=${RUST_LOG:-info}
set -o pipefail
si-appliance install 2>&1 | tee /run/si-install.log
rc=$?
set +o pipefail
if [ $rc = 0 ]; then
  rescue "si-appliance install returned without rebooting (finish = shell?)"
fi
rescue "si-appliance install failed (exit $rc): $(grep -v '^ *$' /run/si-install.log | tail -n 1)"
