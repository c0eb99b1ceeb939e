#!/usr/bin/env bash
# The main job, end to end, on one machine: N QEMU VMs PXE-boot from the appliance, install the
# demo image over the swarm onto their blank disks, reboot from those disks into Debian and show
# a login prompt with their own host names.
#
#   sudo qemu/lab.sh              # 3 VMs
#   sudo LAB_VMS=5 qemu/lab.sh
#   sudo LAB_FIRMWARE=uefi qemu/lab.sh   # OVMF; LAB_FIRMWARE=mixed: odd VMs BIOS, even VMs UEFI
#   sudo LAB_APPLIANCE=usb qemu/lab.sh   # the appliance boots from its USB stick image in a VM
#
# What it does, in order: installs its Debian packages if missing (vm-tests/install-deps.sh),
# builds the binary (the one release build the tests use), the client kernel + initramfs
# (pxe-assets/build-client.sh) and the demo image (qemu/make-demo-image.sh, cached), imports the
# image into a lab store (cached), creates two network namespaces — a switch with a bridge and one
# tap per VM, and the appliance's, joined to the bridge by a veth pair — starts the appliance there
# (full DHCP on 10.77.0.0/24, enroll = "any", its own state directory in the lab directory) and the
# VMs (TCG, -nodefaults, a blank sparse disk each; BIOS = SeaBIOS, UEFI = OVMF, see LAB_FIRMWARE).
# Every power-on of every VM boots the network first (bootindex: virtio NIC 1, virtio disk 2): the
# appliance decides what the node boots. A VM's installer ends with a reboot; QEMU runs with
# -no-reboot, so the lab sees that reboot and powers the VM on again, network first as always. The
# appliance now knows the node as installed and answers "boot local": an iPXE script that echoes
# that and runs `exit`, which returns from iPXE (QEMU's efi-virtio.rom: SeaBIOS runs its BIOS
# option ROM, OVMF its EFI driver) to the firmware, and the firmware boots the next device in the
# order, the disk (GRUB i386-pc in the MBR gap on BIOS; \EFI\BOOT\BOOTX64.EFI, GRUB x86_64-efi
# installed --removable, on the ESP on UEFI). Measured on both: SeaBIOS boots the disk at once;
# OVMF's boot manager goes on down its order, which is why the lab turns OVMF's own network boot
# options off (see start_vm). It waits, bounded, for every login
# prompt, prints a per-node table of phase times taken on the host clock (serial lines
# timestamped as they arrive, and the appliance log), and where the dashboard is.
# Ctrl-C or the end removes everything it created (processes by PID, namespaces, taps).
#
# Environment:
#   LAB_VMS=3          number of VMs          LAB_MEM=512      MiB of RAM per VM
#   LAB_DISK=2G        disk size per VM       LAB_TIMEOUT=1800 seconds for the whole deployment
#   LAB_DIR=…          logs, disks, state (default /tmp/si-lab.<pid>; kept when LAB_KEEP=1)
#   LAB_HOLD=1         keep the lab running after the table until Ctrl-C (to look around)
#   LAB_SMALL_DISK=N   give VM number N a 64 MiB disk (the "disk too small" fault)
#   LAB_FIRMWARE=bios  bios (SeaBIOS), uefi (OVMF) or mixed (odd VMs BIOS, even VMs UEFI). A UEFI
#                      VM gets two pflash drives: OVMF_CODE.fd read-only and its own writable copy
#                      of OVMF_VARS.fd (LAB_DIR/ovmf-vars-N.fd); LAB_OVMF_CODE, LAB_OVMF_VARS
#                      override /usr/share/OVMF/OVMF_CODE.fd and OVMF_VARS.fd (package ovmf);
#                      OVMF's own PXE/HTTP boot is off (fw_cfg) unless LAB_OVMF_NETBOOT=1
#   SI_CACHE, SI_TEST_CACHE  the cache roots (default /var/cache/si-appliance and
#                      /var/cache/si-appliance-test; pxe-assets/cache-lib.sh)
#   SI_COLD=1          as a machine that never saw the project: every cache (cargo target and
#                      registry, .debs, boot files, demo tree, lab store) in a new empty
#                      directory, removed at the end unless LAB_KEEP=1
#   CARGO_TARGET_DIR   the release build (default $SI_CACHE/cargo-target)
#   SI_APPLIANCE_BIN   use this binary (the appliance; the installer is si-appliance-node beside
#                      it, or SI_NODE_BIN) instead of building one
#   LAB_APPLIANCE=netns  where the appliance runs: netns (the binary in a namespace) or usb: the
#                      stick image (pxe-assets/build-usb.sh, cached) is copied to LAB_DIR/stick.img,
#                      made LAB_STICK_SIZE big (default 4G), the demo image is added to it as the
#                      default with every VM enrolled (`si-appliance usb add-image`), and a VM boots
#                      it as its only disk (USB storage on xHCI; LAB_APPLIANCE_FIRMWARE=bios or
#                      uefi) with one NIC on the switch. The stick runs its defaults: the first
#                      wired interface with carrier, 10.0.0.1/24, probe for other DHCP servers,
#                      PXE clients and enrolled nodes only. The appliance namespace becomes the
#                      operator's workstation (10.0.0.250) from which the dashboard is reached.
set -euo pipefail
# The whole script is one block, parsed before it runs: editing this file during a run (a lab runs
# for minutes) cannot change what the running lab does.
{
cd "$(dirname "$0")/.."
repo=$(pwd)

vms=${LAB_VMS:-3}
firmware=${LAB_FIRMWARE:-bios}
ovmf_code=${LAB_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE.fd}
ovmf_vars=${LAB_OVMF_VARS:-/usr/share/OVMF/OVMF_VARS.fd}
mem=${LAB_MEM:-512}
disk_size=${LAB_DISK:-2G}
limit=${LAB_TIMEOUT:-1800}
labdir=${LAB_DIR:-/tmp/si-lab.$$}
image=demo
net=10.77.0
appliance=${LAB_APPLIANCE:-netns}
app_fw=${LAB_APPLIANCE_FIRMWARE:-bios}
case $appliance in
  netns) ;;
  # The stick's own default address (network.conf on its data partition).
  usb) net=10.0.0 ;;
  *) echo "LAB_APPLIANCE: netns or usb" >&2; exit 1 ;;
esac
case $app_fw in bios|uefi) ;; *) echo "LAB_APPLIANCE_FIRMWARE: bios or uefi" >&2; exit 1 ;; esac
server=$net.1
cold=
if [ "${SI_COLD:-0}" = 1 ]; then
  cold=$(mktemp -d /var/tmp/si-lab-cold.XXXXXX)
  export SI_CACHE=$cold/cache SI_TEST_CACHE=$cold/test-cache
  export CARGO_TARGET_DIR=$cold/cache/cargo-target CARGO_HOME=$cold/cargo-home
  mkdir -p "$CARGO_HOME"
fi
say() { printf '%s lab: %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }
. pxe-assets/cache-lib.sh
export SI_CACHE SI_TEST_CACHE
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SI_CACHE/cargo-target}
bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/si-appliance
client_dir=${LAB_CLIENT_DIR:-$SI_CACHE/client-boot}
demo_dir=${LAB_DEMO_DIR:-$SI_TEST_CACHE/demo-bookworm}
store=${LAB_STORE:-$SI_TEST_CACHE/lab-store}
sw=sialab-$$-sw
ap=sialab-$$-ap

[ "$(id -u)" = 0 ] || die "run as root (namespaces, taps, apt)"
[[ $vms =~ ^[0-9]+$ ]] && [ "$vms" -ge 1 ] && [ "$vms" -le 50 ] || die "LAB_VMS: 1..50"
case $firmware in bios|uefi|mixed) ;; *) die "LAB_FIRMWARE: bios, uefi or mixed" ;; esac
fw_of() { # N -> bios|uefi (mixed: odd VMs BIOS, even VMs UEFI)
  case $firmware in mixed) if [ $(( $1 % 2 )) = 1 ]; then echo bios; else echo uefi; fi ;; *) echo "$firmware" ;; esac
}

# --- cleanup: only what this run started, by PID; then the namespaces (taps and veths go with them)
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.3; done
    kill -KILL "$p" 2>/dev/null || true
  done
  ip netns del "$sw" 2>/dev/null || true
  ip netns del "$ap" 2>/dev/null || true
  if [ "${LAB_KEEP:-0}" = 1 ] || [ $rc != 0 ]; then
    say "logs kept in $labdir"
  else
    rm -rf "$labdir"
  fi
  if [ -n "$cold" ]; then
    if [ "${LAB_KEEP:-0}" = 1 ]; then say "cold caches kept in $cold"; else cache_rm "$cold" || true; fi
  fi
  exit $rc
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

t0=$(date +%s)
# --- 1. packages, binary, boot files, demo image
vm-tests/install-deps.sh >&2
if [ "$firmware" != bios ] || [ "$app_fw" = uefi ]; then
  [ -f "$ovmf_code" ] && [ -f "$ovmf_vars" ] || die "no OVMF firmware at $ovmf_code / $ovmf_vars (package ovmf)"
fi
if [ -n "${SI_APPLIANCE_BIN:-}" ]; then
  bin=$SI_APPLIANCE_BIN
  say "using $bin (SI_APPLIANCE_BIN; not building)"
else
  # The same build command as vm-tests/run.sh: the binary is then the very one the tests use
  # (building the bin alone unifies other dependency features and gives a different binary,
  # which would also rebuild the cached client initramfs).
  say "building si-appliance (release, $CARGO_TARGET_DIR)"
  cargo build --release --locked --all-targets >&2
fi
SI_APPLIANCE_BIN=$bin pxe-assets/build-client.sh "$client_dir" >&2
qemu/make-demo-image.sh "$demo_dir" >&2
stick_img=$SI_CACHE/usb/si-appliance-usb.img
if [ "$appliance" = usb ]; then
  SI_APPLIANCE_BIN=$bin SI_CLIENT_BOOT=$client_dir pxe-assets/build-usb.sh "$stick_img" >&2
fi

# --- 2. the lab store: the demo image imported once (again when the demo recipe changes). On
# the stick, the store is the stick's own (step 4).
mkdir -p "$store"
exec 8>"$store.lock"
flock -w 600 8 || die "another lab or test holds $store.lock"
recipe=$(cat "$demo_dir.complete")
if [ "$(cat "$store/$image.recipe" 2>/dev/null)" != "$recipe" ]; then
  say "importing $demo_dir into $store as '$image'"
  "$bin" --store "$store" image rm "$image" >/dev/null 2>&1 || true
  "$bin" --store "$store" image import "$image" --from "$demo_dir" >&2
  echo "$recipe" > "$store/$image.recipe"
fi
t_prep=$(date +%s)

# --- 3. namespaces: switch (bridge + taps) and appliance (veth into the bridge)
mkdir -p "$labdir"
ip netns add "$sw"
ip netns add "$ap"
ip -n "$sw" link set lo up
ip -n "$ap" link set lo up
ip -n "$sw" link add br0 type bridge
ip -n "$sw" link set br0 type bridge stp_state 0 forward_delay 0
ip -n "$sw" link set br0 up
ip -n "$sw" link add p0 type veth peer name eth0 netns "$ap"
ip -n "$sw" link set p0 master br0
ip -n "$sw" link set p0 up
if [ "$appliance" = usb ]; then
  # The operator's workstation: reaches the stick's dashboard.
  ip -n "$ap" link set eth0 address 52:54:00:77:00:fa
  ip -n "$ap" addr add "$net.250/24" dev eth0
else
  ip -n "$ap" link set eth0 address 52:54:00:77:00:01
  ip -n "$ap" addr add "$server/24" dev eth0
fi
ip -n "$ap" link set eth0 up
# The appliance's IPv6 router advertisement (which spares iPXE a 15 s wait) needs a link-local
# address past duplicate address detection.
for _ in $(seq 50); do
  ip -n "$ap" -6 addr show dev eth0 scope link | grep -q 'fe80::' \
    && ! ip -n "$ap" -6 addr show dev eth0 scope link | grep -q tentative && break
  sleep 0.2
done

# --- 4. the appliance
for i in $(seq 1 "$vms"); do macs[$i]=$(printf '52:54:00:77:01:%02x' "$i"); done
if [ "$appliance" = usb ]; then
  # As an operator prepares a stick on a workstation: the image, the default, the nodes.
  say "preparing the stick: $stick_img -> $labdir/stick.img (${LAB_STICK_SIZE:-4G}), demo image added, $vms node(s) enrolled"
  cp --sparse=always "$stick_img" "$labdir/stick.img"
  truncate -s "${LAB_STICK_SIZE:-4G}" "$labdir/stick.img"
  enroll=()
  for i in $(seq 1 "$vms"); do enroll+=(--enroll "${macs[$i]}"); done
  "$bin" usb add-image "$labdir/stick.img" "$image" "$demo_dir" --default "${enroll[@]}" >&2
  t_prep=$(date +%s)
  appfw=()
  if [ "$app_fw" = uefi ]; then
    cp "$ovmf_vars" "$labdir/ovmf-vars-appliance.fd"
    appfw=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code"
           -drive "if=pflash,format=raw,unit=1,file=$labdir/ovmf-vars-appliance.fd")
  fi
  ip -n "$sw" tuntap add tap0 mode tap
  ip -n "$sw" link set tap0 master br0
  ip -n "$sw" link set tap0 up
  say "booting the stick ($app_fw) in a VM; its console: $labdir/appliance-serial.log"
  # The stick is its only disk; its NIC has no boot ROM (it boots the stick, never the network).
  ip netns exec "$sw" qemu-system-x86_64 -name si-lab-appliance -nodefaults -machine pc -accel tcg \
    -display none -m 1024 "${appfw[@]}" \
    -drive "file=$labdir/stick.img,format=raw,if=none,id=stick" \
    -device qemu-xhci,id=xhci -device usb-storage,bus=xhci.0,drive=stick,bootindex=1 \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:77:00:01,romfile= \
    -device virtio-rng-pci -serial "file:$labdir/appliance-serial.log" -monitor none \
    > "$labdir/appliance-qemu.log" 2>&1 &
  apid=$!
  pids+=("$apid")
  ready=
  for _ in $(seq 300); do
    if ip netns exec "$ap" "$bin" status --server "$server:80" > "$labdir/status.txt" 2>/dev/null; then ready=1; break; fi
    kill -0 "$apid" 2>/dev/null || { tail -n 30 "$labdir/appliance-serial.log" >&2; die "the appliance VM stopped"; }
    sleep 2
  done
  [ -n "$ready" ] || { tail -n 30 "$labdir/appliance-serial.log" >&2; die "the stick's appliance does not answer after 600 s"; }
  say "the stick's appliance answers: $(head -n1 "$labdir/status.txt")"
  # The per-node table reads lease times from the appliance's log, which is on the stick: the
  # VMs' serial lines stand in.
  : > "$labdir/appliance.log"
else
cat > "$labdir/appliance.toml" <<EOF
# si-appliance configuration of the QEMU lab (qemu/lab.sh).
iface = "eth0"
image = "$image"
store = "$store"
state_dir = "$labdir/state"
# The lab installs every VM that PXE-boots (on a real rack: list the nodes in
# [[dhcp.reservation]] and keep the default enroll = "listed").
enroll = "any"

[dhcp]
mode = "full"
# "all": the installed systems get addresses too (their DHCP has no PXE vendor class).
answer = "all"
probe = false

[[dhcp.pool]]
subnet = "$net.0/24"
range = ["$net.100", "$net.199"]

[tftp]
enable = true

[http]
port = 80

[boot]
kernel = "$client_dir/vmlinuz"
initrd = "$client_dir/initrd.img"
cmdline = "console=ttyS0 panic=10"

[install]
finish = "reboot"
# Nodes seed to each other after their install, until the deployment is done or this long.
seed_for = "${LAB_SEED_FOR:-60s}"
report_every = "2s"
EOF
if [ -n "${LAB_APPLIANCE_TOML_EXTRA:-}" ]; then printf '%s\n' "$LAB_APPLIANCE_TOML_EXTRA" >> "$labdir/appliance.toml"; fi
say "starting the appliance in namespace $ap ($server)"
ip netns exec "$ap" env RUST_LOG=info "$bin" --config "$labdir/appliance.toml" > "$labdir/appliance.log" 2>&1 &
apid=$!
pids+=("$apid")
for _ in $(seq 600); do
  grep -qs 'si-appliance ready' "$labdir/appliance.log" && break
  kill -0 "$apid" 2>/dev/null || { tail -n 30 "$labdir/appliance.log" >&2; die "the appliance exited"; }
  sleep 0.5
done
grep -q 'si-appliance ready' "$labdir/appliance.log" || { tail -n 30 "$labdir/appliance.log" >&2; die "the appliance is not ready after 300 s"; }
fi
t_ready=$(date +%s)

# --- 5. the VMs
# Serial output goes through a FIFO to a timestamper that prefixes each line with the host's
# clock (the guest clock drifts under TCG), appending to serial-N.log across both boots.
stamp_serial() { # FIFO LOG
  # Reads chunks, not lines: a login prompt ("node-1 login: ") has no newline after it.
  exec perl -e 'use Time::HiRes qw(time); open(my $in, "<", $ARGV[0]) or die; open(my $out, ">>", $ARGV[1]) or die;
           select($out); $|=1; my $bol = 1;
           while (sysread($in, my $c, 4096)) {
             $c =~ s/\r//g; $c =~ s/\e\[[0-9;?]*[a-zA-Z]//g;
             for my $p (split /(?<=\n)/, $c) { printf "%.3f ", time if $bol; print $p; $bol = ($p =~ /\n\z/); }
           }' "$1" "$2"
}
declare -a macs qpid start state restart_t boot_t boots fw why
# Every power-on boots the network first (bootindex: NIC 1, disk 2), as a rack's nodes are set up:
# the appliance decides. A node it has not installed gets the installer; an installed one gets
# "boot local" (an iPXE script that is `echo` + `exit`), and iPXE's `exit` hands control back to
# the firmware, which boots the next device in the order, the disk. SeaBIOS runs iPXE as the NIC's
# option ROM (QEMU's default ROM for virtio-net-pci, /usr/lib/ipxe/qemu/efi-virtio.rom, holds both
# the BIOS and the EFI iPXE); OVMF runs the same ROM's EFI driver. (Naming that ROM explicitly with
# romfile= loses SeaBIOS its NIC boot entry here, QEMU 7.2: SeaBIOS then boots the disk first.) UEFI VMs get OVMF as two pflash drives: the firmware code read-only, and a per-VM
# copy of the variable store (ovmf-vars-N.fd in the lab directory), kept across its power-ons.
start_vm() { # N
  local i=$1 fifo="$labdir/serial-$1.fifo"
  local -a fwargs=()
  rm -f "$fifo"; mkfifo "$fifo"
  stamp_serial "$fifo" "$labdir/serial-$i.log" &
  pids+=("$!")
  if [ "${fw[$i]}" = uefi ]; then
    # OVMF makes several boot options of the NIC, all first in the order (bootindex names the
    # device): iPXE's (the ROM's EFI driver), then its own network stack's PXEv4, PXEv6,
    # HTTPv4, HTTPv6 over iPXE's SNP. After iPXE's `exit` it tries each of those before the
    # disk (measured: 172 s under TCG). The fw_cfg knobs switch OVMF's own network boot off,
    # as one would in a rack's firmware set-up; iPXE's option is untouched.
    fwargs=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code"
            -drive "if=pflash,format=raw,unit=1,file=$labdir/ovmf-vars-$i.fd")
    if [ "${LAB_OVMF_NETBOOT:-0}" != 1 ]; then
      for k in IPv4PXESupport IPv6PXESupport IPv4Support IPv6Support; do
        fwargs+=(-fw_cfg "name=opt/org.tianocore/$k,string=no")
      done
    fi
  fi
  boot_t[$i]=$(date +%s.%N)
  boots[$i]=$(( ${boots[$i]:-0} + 1 ))
  printf '%s === lab: VM %s powered on (%s, network first) ===\n' "${boot_t[$i]}" "$i" "${fw[$i]}" >> "$labdir/serial-$i.log"
  ip netns exec "$sw" qemu-system-x86_64 -name "si-lab-vm$i" \
    -nodefaults -machine pc,graphics=off -accel tcg -display none -m "$mem" -no-reboot \
    "${fwargs[@]}" \
    -netdev "tap,id=n0,ifname=tap$i,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=n0,mac=${macs[$i]},bootindex=1" \
    -drive "file=$labdir/disk-$i.img,format=raw,if=none,id=d0" \
    -device "virtio-blk-pci,drive=d0,bootindex=2" \
    -device virtio-rng-pci -serial "file:$fifo" -monitor none > "$labdir/qemu-$i.log" 2>&1 &
  qpid[$i]=$!
  pids+=("${qpid[$i]}")
}
for i in $(seq 1 "$vms"); do
  ip -n "$sw" tuntap add "tap$i" mode tap
  ip -n "$sw" link set "tap$i" master br0
  ip -n "$sw" link set "tap$i" up
  size=$disk_size
  [ "${LAB_SMALL_DISK:-0}" = "$i" ] && size=64M
  truncate -s "$size" "$labdir/disk-$i.img"
  fw[$i]=$(fw_of "$i")
  [ "${fw[$i]}" = uefi ] && cp "$ovmf_vars" "$labdir/ovmf-vars-$i.fd"
  start[$i]=$(date +%s.%N)
  state[$i]=installing
  start_vm "$i"
  say "VM $i (${macs[$i]}, ${fw[$i]}, disk $size) PXE-booting; serial: $labdir/serial-$i.log"
done

first_ts() { # LOG REGEX [AFTER_TS] -> first timestamp of a matching line after AFTER_TS
  awk -v re="$2" -v after="${3:-0}" '$1 > after && $0 ~ re { print $1; exit }' "$1"
}
rel() { # TS BASE
  if [ -n "$1" ]; then awk -v a="$1" -v b="$2" 'BEGIN{printf "%6.1f", a-b}'; else printf '%6s' -; fi
}
login_name() { # LOG AFTER_TS -> the host name of the first login prompt after AFTER_TS
  awk -v after="$2" '$1 > after && / login:/ { for (i = 2; i <= NF; i++) if ($(i) == "login:") { print $(i-1); exit } }' "$1"
}

# --- 6. wait for every VM: installing -> powered on again, network first -> "boot local" -> its
# disk -> login (or failed)
deadline=$(( $(date +%s) + limit ))
while :; do
  pending=0
  for i in $(seq 1 "$vms"); do
    log="$labdir/serial-$i.log"
    case ${state[$i]} in
      installing)
        if grep -q 'si-init: FAILED' "$log"; then
          state[$i]=failed; say "VM $i failed: $(grep -m1 'si-init: FAILED' "$log" | cut -d' ' -f2-)"
        elif ! kill -0 "${qpid[$i]}" 2>/dev/null; then
          # The guest rebooted or powered off (-no-reboot ends QEMU, so the lab sees it). It is
          # powered on again, network first as always: after a finished install (the
          # installer's "seeding" phase or its "install-done" line, then the kernel's restart,
          # since this power-on; "seeding" is what makes the appliance book the node installed,
          # and the "install-done" line can be lost: the installer reboots right after printing
          # it, before /init's tee has copied it to the console) the appliance should answer
          # "boot local"; after a reset mid-install it installs again.
          since=${boot_t[$i]}
          if [ -n "$(first_ts "$log" 'install-done |phase=seeding' "$since")" ] && [ -n "$(first_ts "$log" 'reboot: Restarting system' "$since")" ]; then
            state[$i]=local; restart_t[$i]=$(date +%s.%N)
            say "VM $i rebooted after its install: powering it on again (network first)"
            start_vm "$i"
          elif [ "${boots[$i]}" -lt 4 ]; then
            say "VM $i stopped before its install finished: powering it on again (network first)"
            start_vm "$i"
          else
            state[$i]=failed; say "VM $i stopped four times without finishing its install"
          fi
        fi ;;
      local)
        if [ -n "$(first_ts "$log" ' login:' "${restart_t[$i]}")" ]; then
          state[$i]=up; say "VM $i: $(login_name "$log" "${restart_t[$i]}") login prompt"
        elif [ -n "$(first_ts "$log" 'si-init: running' "${restart_t[$i]}")" ]; then
          state[$i]=failed; why[$i]="installed, but the appliance sent the installer again"
          say "VM $i: ${why[$i]}"
        elif ! kill -0 "${qpid[$i]}" 2>/dev/null; then
          state[$i]=failed; why[$i]="stopped after the \"boot local\" answer, before a login prompt"
          say "VM $i ${why[$i]}"
        fi ;;
    esac
    case ${state[$i]} in up|failed) ;; *) pending=$((pending + 1)) ;; esac
  done
  [ $pending = 0 ] && break
  if [ "$(date +%s)" -ge $deadline ]; then say "timed out after ${limit}s with $pending VM(s) unfinished"; break; fi
  sleep 1
done
t_end=$(date +%s)

# --- 7. the table: seconds since each VM's power-on, from host-clock serial timestamps
# The appliance logs in UTC RFC 3339; the first line naming MAC and containing WORDS, as epoch.
app_ts() { # MAC WORDS
  local line
  line=$(grep -a -F "$1" "$labdir/appliance.log" | grep -a -m1 -F "$2" | sed 's/\x1b\[[0-9;]*m//g' | awk '{print $1}')
  [ -n "$line" ] && date -d "$line" +%s.%N 2>/dev/null || true
}
{
  echo
  echo "Per-node phase times (seconds since the VM was first powered on; host clock)"
  printf '%-3s %-4s %-17s %6s %6s %6s %6s %6s %6s %6s %7s %7s %7s %7s %7s %7s %7s  %s\n' VM fw MAC dhcp files kernel init net \
    plan part dl+unp config loader done reboot local login result
  for i in $(seq 1 "$vms"); do
    log="$labdir/serial-$i.log"; b=${start[$i]}
    r=${restart_t[$i]:-}
    # The installer phases of the last network boot (after a reset: the clean install).
    last_net=$(awk -v r="${r:-9e99}" '/=== lab: VM .* powered on/ && $1 < r { t = $1 } END { print t }' "$log")
    dhcp=$(app_ts "${macs[$i]}" "lease bound")
    [ -n "$dhcp" ] || dhcp=$(first_ts "$log" 'Configuring \(net0.*ok')
    files=$(first_ts "$log" '/boot/initrd.img.*ok')
    kern=$(first_ts "$log" 'Kernel command line:')
    init=$(first_ts "$log" 'si-init: running')
    netup=$(first_ts "$log" 'si-init: network up')
    cols=""
    for ph in phase=installer phase=partitioning phase=downloading phase=configuring phase=boot-loader 'install-done |stopped seeding'; do
      cols="$cols $(rel "$(first_ts "$log" "$ph" "$last_net")" "$b")"
    done
    login="" local_t=""
    [ -n "$r" ] && login=$(first_ts "$log" ' login:' "$r")
    # The start of the script's echo ("si-appliance: MAC why: booting from the local disk"):
    # iPXE's BIOS console wraps it at 80 columns.
    [ -n "$r" ] && local_t=$(first_ts "$log" 'si-appliance: [0-9a-f][0-9a-f]:[0-9a-f:]* ' "$r")
    result=${state[$i]}
    [ "$result" = up ] && result="up: $(login_name "$log" "$r")"
    [ "$result" = failed ] && result="failed: ${why[$i]:-$(grep -m1 -o 'si-init: FAILED.*' "$log" | cut -c 17- | cut -c 1-100)}"
    printf '%-3s %-4s %-17s %s %s %s %s %s%s %s %s %s  %s\n' "$i" "${fw[$i]}" "${macs[$i]}" "$(rel "$dhcp" "$b")" "$(rel "$files" "$b")" \
      "$(rel "$kern" "$b")" "$(rel "$init" "$b")" "$(rel "$netup" "$b")" "$cols" "$(rel "$r" "$b")" \
      "$(rel "$local_t" "$b")" "$(rel "$login" "$b")" "$result"
  done
  echo "  dhcp: lease bound (appliance log); files: initrd fetched by iPXE; kernel: the kernel's first lines on the"
  echo "  console; init: the initramfs runs; net: its udhcpc lease; plan … done: the installer's phases"
  echo "  (plan fetched, partitioning, download+unpack, configuring, boot loader, done); reboot: QEMU"
  echo "  powered on again (network first); local: iPXE printed the appliance's \"boot local\" answer"
  echo "  (then \`exit\`); login: the installed system's login prompt (from its disk)."
  if [ "$appliance" = usb ]; then
    echo "Preparation (deps, build, boot files, stick image, add-image): $((t_prep - t0)) s; the stick ($app_fw) booted to ready: $((t_ready - t_prep)) s;"
  else
    echo "Preparation (deps, build, boot files, image): $((t_prep - t0)) s; appliance ready (packing): $((t_ready - t_prep)) s;"
  fi
  echo "deployment (first VM power-on to last login or failure): $((t_end - t_ready)) s."
  echo "Kernel $(stat -c %s "$client_dir/vmlinuz") bytes + initrd $(stat -c %s "$client_dir/initrd.img") bytes ($(cat "$client_dir/VERSION" 2>/dev/null))."
  echo "Dashboard: http://$server/ inside namespace $ap, e.g."
  echo "  ip netns exec $ap curl -s http://$server/api/swarm"
  if [ "$appliance" = usb ]; then
    echo "Logs: $labdir (appliance-serial.log, serial-N.log; the appliance's own log is /srv/si/log/appliance.log on the stick's data partition, $labdir/stick.img)"
  else
    echo "Logs: $labdir (appliance.log, serial-N.log)"
  fi
} | tee "$labdir/summary.txt"

failed=0
for i in $(seq 1 "$vms"); do [ "${state[$i]}" = up ] || failed=$((failed + 1)); done
if [ "${LAB_HOLD:-0}" = 1 ]; then
  say "LAB_HOLD=1: the lab keeps running; Ctrl-C removes it"
  while kill -0 "$apid" 2>/dev/null; do sleep 2; done
fi
[ $failed = 0 ] || { say "$failed VM(s) did not reach a login prompt"; LAB_KEEP=1; exit 1; }
say "all $vms VMs installed and up"
exit 0
}
