#!/bin/bash
# What TCP delivers when every host's link carries many flows at once, on the swarm bench's
# emulated links (HTB at C, a byte FIFO of 30 ms with the same floor, on each host's egress and
# on its switch port: `shape` in bench_swarm.rs). First one stream from host 0 to host 1 alone
# (the swarm bench's T* probe measures that), then every host sends bulk TCP to every other
# (a full mesh: each link carries N - 1 flows each way). Prints the mesh's per-host receive
# goodput as a share of the one stream's (MESH), the flows that never connected (a host slow
# to start is retried during the warm-up) and the machine's busy share over the mesh (90 % or
# more: flagged, the figure is the CPU's, not the links'). With SLOW=p, p % of the hosts (spread
# as the swarm bench spreads them) have C/4 links, and a second lone stream into a slow host gives
# their MESH apart (the share a slow port keeps when every other host sends into it at once).
# Root; namespaces of its own, removed at exit; traffic only between them.
#
#     sudo vm-tests/bench_mesh.sh N=32 C=10 [SLOW=20] [DUR=30 WARM=10]
set -euo pipefail
for kv in "$@"; do export "${kv?}"; done
N=${N:-32}; C=${C:-10}; DUR=${DUR:-30}; WARM=${WARM:-10}; SLOW=${SLOW:-0}
[ "$N" -ge 2 ] && [ "$N" -le 400 ] || { echo "bench_mesh: N between 2 and 400" >&2; exit 2; }
[ "$WARM" -lt "$DUR" ] || { echo "bench_mesh: WARM must be below DUR" >&2; exit 2; }
[ "$SLOW" -ge 0 ] && [ "$SLOW" -le 50 ] || { echo "bench_mesh: SLOW between 0 and 50 (percent)" >&2; exit 2; }
# Whether host $1 is slow (the swarm bench's rule: (i + 1) p / 100 > i p / 100).
is_slow() { [ $(( ($1 + 1) * SLOW / 100 )) -gt $(( $1 * SLOW / 100 )) ]; }
HERE=$(cd "$(dirname "$0")" && pwd)
P=sim$$
OUT=$(mktemp -d)
NEIGH=/proc/sys/net/ipv4/neigh/default
# The swarm bench's TCP: cubic (a namespace may use only what the host allows: added for the run).
ALLOWED=/proc/sys/net/ipv4/tcp_allowed_congestion_control
OLD_ALLOWED=$(cat $ALLOWED)
OLD_GC=$(cat $NEIGH/gc_thresh1 $NEIGH/gc_thresh2 $NEIGH/gc_thresh3 | tr '\n' ' ')
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for i in $(seq 0 $((N - 1))); do ip netns del $P-h$i 2>/dev/null || true; done
    ip netns del $P-sw 2>/dev/null || true
    read -r g1 g2 g3 <<<"$OLD_GC"; echo "$g1" > $NEIGH/gc_thresh1; echo "$g2" > $NEIGH/gc_thresh2; echo "$g3" > $NEIGH/gc_thresh3
    [ "$(cat $ALLOWED)" = "$NEW_ALLOWED" ] && echo "$OLD_ALLOWED" > $ALLOWED
    rm -rf "$OUT"
}
NEW_ALLOWED=$OLD_ALLOWED
trap cleanup EXIT
case " $OLD_ALLOWED " in *" cubic "*) ;; *) echo "$OLD_ALLOWED cubic" > $ALLOWED; NEW_ALLOWED=$(cat $ALLOWED) ;; esac
# Every namespace's neighbours share one table: N × N entries (as the swarm lab does).
need=$(( (N + 2) * (N + 2) + 1024 ))
if [ "$need" -gt "$(cat $NEIGH/gc_thresh3)" ]; then
    echo $need > $NEIGH/gc_thresh3; echo $((need / 2)) > $NEIGH/gc_thresh2; echo $((need / 4)) > $NEIGH/gc_thresh1
fi
shape() { # shape <netns> <dev> <kbit/s>
    local limit=$(( $3 * 1000 / 8 * 30 / 1000 )) q=$(( $3 * 1000 / 8 / 1000 ))
    [ $limit -ge $((65536 + 2 * 1514)) ] || limit=$((65536 + 2 * 1514))
    [ $q -ge 1514 ] || q=1514; [ $q -le 60000 ] || q=60000
    ip netns exec "$1" tc qdisc add dev "$2" root handle 1: htb default 10
    ip netns exec "$1" tc class add dev "$2" parent 1: classid 1:10 htb rate "$3kbit" ceil "$3kbit" quantum $q
    ip netns exec "$1" tc qdisc add dev "$2" parent 1:10 handle 10: bfifo limit $limit
}
ip netns add $P-sw
ip -n $P-sw link add br0 type bridge
ip -n $P-sw link set br0 up
for i in $(seq 0 $((N - 1))); do
    ip netns add $P-h$i
    ip link add eth0 netns $P-h$i type veth peer name p$i netns $P-sw
    ip -n $P-h$i addr add 10.72.$((1 + i / 200)).$((10 + i % 200))/16 dev eth0
    ip -n $P-h$i link set lo up
    ip -n $P-h$i link set eth0 up
    ip -n $P-sw link set p$i master br0
    ip -n $P-sw link set p$i up
    kbit=$(( C * 1000 )); if is_slow $i; then kbit=$(( C * 250 )); fi
    shape $P-h$i eth0 $kbit
    shape $P-sw p$i $kbit
    ip netns exec $P-h$i sysctl -q -w net.ipv4.tcp_congestion_control=cubic
done
run() { # run <label> <python args for host i...>: waits for all, bounded by DUR + 30 s
    local start; start=$(python3 -c "import time; print(time.time() + 3 + ${#HOSTS[@]} / 20)")
    PIDS=()
    for i in "${HOSTS[@]}"; do
        timeout $((DUR + 30)) ip netns exec $P-h$i python3 "$HERE/mesh_node.py" "$i" "$N" --dur "$DUR" --warm "$WARM" --start "$start" ${ARGS[$i]:-} > "$OUT/$1.$i" &
        PIDS+=($!)
    done
    for p in "${PIDS[@]}"; do wait "$p"; done
    PIDS=()
}
declare -a ARGS
HOSTS=(0 1); ARGS[0]="--to 1"; ARGS[1]="--send 0"
run one
one=$(awk '{print $2}' "$OUT/one.1")
SLOWS=()
for i in $(seq 0 $((N - 1))); do if is_slow $i; then SLOWS+=($i); fi; done
one_slow=0
if [ ${#SLOWS[@]} -gt 0 ]; then
    s=${SLOWS[0]}; f=0; while is_slow $f; do f=$((f + 1)); done
    HOSTS=($f $s); ARGS=(); ARGS[$f]="--to $s"; ARGS[$s]="--send 0"
    run one_slow
    one_slow=$(awk '{print $2}' "$OUT/one_slow.$s")
fi
HOSTS=($(seq 0 $((N - 1)))); ARGS=()
jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
read -r busy0 total0 <<<"$(jiffies)"
run mesh
read -r busy1 total1 <<<"$(jiffies)"
busy=$(( 100 * (busy1 - busy0) / (total1 - total0 + 1) ))
for i in "${SLOWS[@]}"; do mv "$OUT/mesh.$i" "$OUT/slowmesh.$i"; done
# report <one stream, Mbit/s> <what the hosts are> <files...>: their mean, min and max receive
# goodput, its share of the lone stream, and their flows that never connected.
report() {
    local one=$1 what=$2; shift 2
    awk -v one="$one" -v what="$what" '
        { s += $2; k++; f += $3; if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2 }
        END { printf "one stream %.2f Mbit/s; full mesh per %s %.2f Mbit/s (min %.2f, max %.2f): MESH=%.3f; %d flows failed", one, what, s / k, min, max, s / k / one, f }' "$@"
}
flag=""; [ $busy -lt 90 ] || flag=" (CPU-SATURATED: not a measure of the links)"
if [ ${#SLOWS[@]} -eq 0 ]; then
    echo "bench_mesh: N=$N C=$C Mbit/s: $(report "$one" host "$OUT"/mesh.*); machine $busy % busy$flag"
else
    echo "bench_mesh: N=$N C=$C Mbit/s: $(report "$one" "fast host" "$OUT"/mesh.*); machine $busy % busy$flag"
    echo "bench_mesh: ${#SLOWS[@]} slow hosts on C/4 = $(( C * 250 )) kbit/s: $(report "$one_slow" "slow host" "$OUT"/slowmesh.*)"
fi
ip netns exec $P-sw tc -s qdisc show | awk '/dropped/ { gsub(",", ""); d += $7; s += $4 } END { printf "bench_mesh: switch ports dropped %d of %d packets\n", d, s }'
