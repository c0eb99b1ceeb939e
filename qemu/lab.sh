#!/usr/bin/env bash
# The main job, end to end, on one machine: N QEMU VMs PXE-boot from the appliance, install the
# demo image over the swarm onto their blank disks, reboot from those disks into Debian and show
# a login prompt with their own host names.
#
#   sudo qemu/lab.sh              # 3 VMs
#   sudo LAB_VMS=5 qemu/lab.sh
#
# What it does, in order: installs its Debian packages if missing (vm-tests/install-deps.sh),
# builds the binary (the one release build the tests use), the client kernel + initramfs
# (pxe-assets/build-client.sh) and the demo image (qemu/make-demo-image.sh, cached), imports the
# image into a lab store (cached), creates two network namespaces — a switch with a bridge and one
# tap per VM, and the appliance's, joined to the bridge by a veth pair — starts the appliance there
# (full DHCP on 10.77.0.0/24, its own state directory in the lab directory) and the VMs (TCG,
# -nodefaults, NIC first in the boot order, a blank sparse disk each). A VM's installer ends with a
# reboot; QEMU runs with -no-reboot, so the lab sees that reboot, and starts the VM again from its
# disk (the appliance does not yet tell an installed node to boot locally, see README). It waits,
# bounded, for every login prompt, prints a per-node table of phase times taken on the host clock
# (serial lines timestamped as they arrive, and the appliance log), and where the dashboard is.
# Ctrl-C or the end removes everything it created (processes by PID, namespaces, taps).
#
# Environment:
#   LAB_VMS=3          number of VMs          LAB_MEM=512      MiB of RAM per VM
#   LAB_DISK=2G        disk size per VM       LAB_TIMEOUT=1800 seconds for the whole deployment
#   LAB_DIR=…          logs, disks, state (default /tmp/si-lab.<pid>; kept when LAB_KEEP=1)
#   LAB_HOLD=1         keep the lab running after the table until Ctrl-C (to look around)
#   LAB_SMALL_DISK=N   give VM number N a 64 MiB disk (the "disk too small" fault)
#   SI_CACHE, SI_TEST_CACHE  the cache roots (default /var/cache/si-appliance and
#                      /var/cache/si-appliance-test; pxe-assets/cache-lib.sh)
#   SI_COLD=1          as a machine that never saw the project: every cache (cargo target and
#                      registry, .debs, boot files, demo tree, lab store) in a new empty
#                      directory, removed at the end unless LAB_KEEP=1
#   CARGO_TARGET_DIR   the release build (default $SI_CACHE/cargo-target)
#   SI_APPLIANCE_BIN   use this binary (appliance and installer) instead of building one
set -euo pipefail
# The whole script is one block, parsed before it runs: editing this file during a run (a lab runs
# for minutes) cannot change what the running lab does.
{
cd "$(dirname "$0")/.."
repo=$(pwd)

vms=${LAB_VMS:-3}
mem=${LAB_MEM:-512}
disk_size=${LAB_DISK:-2G}
limit=${LAB_TIMEOUT:-1800}
labdir=${LAB_DIR:-/tmp/si-lab.$$}
image=demo
net=10.77.0
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

# --- 2. the lab store: the demo image imported once (again when the demo recipe changes)
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
ip -n "$ap" link set eth0 address 52:54:00:77:00:01
ip -n "$ap" addr add "$server/24" dev eth0
ip -n "$ap" link set eth0 up
# The appliance's IPv6 router advertisement (which spares iPXE a 15 s wait) needs a link-local
# address past duplicate address detection.
for _ in $(seq 50); do
  ip -n "$ap" -6 addr show dev eth0 scope link | grep -q 'fe80::' \
    && ! ip -n "$ap" -6 addr show dev eth0 scope link | grep -q tentative && break
  sleep 0.2
done

# --- 4. the appliance
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
declare -a macs qpid start state restart_t boot_t boots
start_vm() { # N BOOT(net|disk)
  local i=$1 boot=$2 fifo="$labdir/serial-$1.fifo"
  rm -f "$fifo"; mkfifo "$fifo"
  stamp_serial "$fifo" "$labdir/serial-$i.log" &
  pids+=("$!")
  local nic_idx=1 disk_idx=2
  [ "$boot" = disk ] && { nic_idx=2; disk_idx=1; }
  boot_t[$i]=$(date +%s.%N)
  boots[$i]=$(( ${boots[$i]:-0} + 1 ))
  printf '%s === lab: VM %s powered on (%s first) ===\n' "${boot_t[$i]}" "$i" "$boot" >> "$labdir/serial-$i.log"
  ip netns exec "$sw" qemu-system-x86_64 -name "si-lab-vm$i" \
    -nodefaults -machine pc,graphics=off -accel tcg -display none -m "$mem" -no-reboot \
    -netdev "tap,id=n0,ifname=tap$i,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=n0,mac=${macs[$i]},bootindex=$nic_idx" \
    -drive "file=$labdir/disk-$i.img,format=raw,if=none,id=d0" \
    -device "virtio-blk-pci,drive=d0,bootindex=$disk_idx" \
    -device virtio-rng-pci -serial "file:$fifo" -monitor none > "$labdir/qemu-$i.log" 2>&1 &
  qpid[$i]=$!
  pids+=("${qpid[$i]}")
}
for i in $(seq 1 "$vms"); do
  macs[$i]=$(printf '52:54:00:77:01:%02x' "$i")
  ip -n "$sw" tuntap add "tap$i" mode tap
  ip -n "$sw" link set "tap$i" master br0
  ip -n "$sw" link set "tap$i" up
  size=$disk_size
  [ "${LAB_SMALL_DISK:-0}" = "$i" ] && size=64M
  truncate -s "$size" "$labdir/disk-$i.img"
  start[$i]=$(date +%s.%N)
  state[$i]=installing
  start_vm "$i" net
  say "VM $i (${macs[$i]}, disk $size) PXE-booting; serial: $labdir/serial-$i.log"
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

# --- 6. wait for every VM: installing -> rebooted from disk -> login (or failed)
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
          # The guest rebooted or powered off (-no-reboot ends QEMU). After a finished install
          # (the installer's "done" and the kernel's restart since this power-on) it is powered
          # on again from its disk, otherwise from the network again (a reset mid-install).
          since=${boot_t[$i]}
          if [ -n "$(first_ts "$log" 'install-done ' "$since")" ] && [ -n "$(first_ts "$log" 'reboot: Restarting system' "$since")" ]; then
            state[$i]=disk; restart_t[$i]=$(date +%s.%N)
            say "VM $i rebooted after its install: starting it from its disk"
            start_vm "$i" disk
          elif [ "${boots[$i]}" -lt 4 ]; then
            say "VM $i stopped before its install finished: PXE-booting it again"
            start_vm "$i" net
          else
            state[$i]=failed; say "VM $i stopped four times without finishing its install"
          fi
        fi ;;
      disk)
        if [ -n "$(first_ts "$log" ' login:' "${restart_t[$i]}")" ]; then
          state[$i]=up; say "VM $i: $(login_name "$log" "${restart_t[$i]}") login prompt"
        elif ! kill -0 "${qpid[$i]}" 2>/dev/null; then
          state[$i]=failed; say "VM $i stopped while booting from its disk"
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
  printf '%-3s %-17s %6s %6s %6s %6s %6s %6s %6s %7s %7s %7s %7s %7s %7s  %s\n' VM MAC dhcp files kernel init net \
    plan part dl+unp config loader done reboot login result
  for i in $(seq 1 "$vms"); do
    log="$labdir/serial-$i.log"; b=${start[$i]}
    r=${restart_t[$i]:-}
    # The installer phases of the last network boot (after a reset: the clean install).
    last_net=$(awk '/=== lab: VM .* powered on \(net first\)/ { t = $1 } END { print t }' "$log")
    dhcp=$(app_ts "${macs[$i]}" "lease bound")
    [ -n "$dhcp" ] || dhcp=$(first_ts "$log" 'Configuring \(net0.*ok')
    files=$(first_ts "$log" '/boot/initrd.img.*ok')
    kern=$(first_ts "$log" 'Kernel command line:')
    init=$(first_ts "$log" 'si-init: running')
    netup=$(first_ts "$log" 'si-init: network up')
    cols=""
    for ph in phase=installer phase=partitioning phase=downloading phase=configuring phase=boot-loader 'install-done '; do
      cols="$cols $(rel "$(first_ts "$log" "$ph" "$last_net")" "$b")"
    done
    login=""
    [ -n "$r" ] && login=$(first_ts "$log" ' login:' "$r")
    result=${state[$i]}
    [ "$result" = up ] && result="up: $(login_name "$log" "$r")"
    [ "$result" = failed ] && result="failed: $(grep -m1 -o 'si-init: FAILED.*' "$log" | cut -c 17- | cut -c 1-100)"
    printf '%-3s %-17s %s %s %s %s %s%s %s %s  %s\n' "$i" "${macs[$i]}" "$(rel "$dhcp" "$b")" "$(rel "$files" "$b")" \
      "$(rel "$kern" "$b")" "$(rel "$init" "$b")" "$(rel "$netup" "$b")" "$cols" "$(rel "$r" "$b")" \
      "$(rel "$login" "$b")" "$result"
  done
  echo "  dhcp: lease bound (appliance log); files: initrd fetched by iPXE; kernel: the kernel's first lines on the"
  echo "  console; init: the initramfs runs; net: its udhcpc lease; plan … done: the installer's phases"
  echo "  (plan fetched, partitioning, download+unpack, configuring, boot loader, done); reboot: QEMU"
  echo "  powered on again from the disk; login: the installed system's login prompt."
  echo "Preparation (deps, build, boot files, image): $((t_prep - t0)) s; appliance ready (packing): $((t_ready - t_prep)) s;"
  echo "deployment (first VM power-on to last login or failure): $((t_end - t_ready)) s."
  echo "Kernel $(stat -c %s "$client_dir/vmlinuz") bytes + initrd $(stat -c %s "$client_dir/initrd.img") bytes ($(cat "$client_dir/VERSION" 2>/dev/null))."
  echo "Dashboard: http://$server/ inside namespace $ap, e.g."
  echo "  ip netns exec $ap curl -s http://$server/api/swarm"
  echo "Logs: $labdir (appliance.log, serial-N.log)"
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
