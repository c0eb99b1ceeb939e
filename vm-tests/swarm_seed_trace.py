#!/usr/bin/env python3
"""The appliance's seed in a traced swarm bench run: its first copies and repeats over time, and
who got each repeated piece (owner of the share or helper).

    KEEP=1 FETCH_LOG='info,si_appliance::swarm::engine::core=trace' \
        cargo bench --bench swarm -- N=32 C=20 METHODS=ours
    mkdir /tmp/tr && for f in <lab dir>/r1-fetch*.log; do cp "$f" /tmp/tr/"${f##*/r1-}"; done
    BIN=2 python3 vm-tests/swarm_seed_trace.py /tmp/tr [seed address]

Each node logs every verified piece with the sender of each block ("piece verified"); a piece is
counted as sent by the seed to a node when any of its blocks came from the seed's address. Times
are when the receiver verified the piece, from the earliest log line. The owner of piece i is
taken as node i mod N (every node counted in the shares, addresses in node order).
"""
import sys, re, glob, os, datetime, collections, statistics
d = sys.argv[1]; seed = sys.argv[2] if len(sys.argv) > 2 else "10.70.0.1"
binw = float(os.environ.get("BIN", "5"))
logs = sorted(glob.glob(os.path.join(d, "fetch*.log")), key=lambda p: int(re.findall(r"fetch(\d+)", p)[-1]))
ts_re = re.compile(r"^(\S+Z)")
def ts(s):
    s = re.sub(r"\x1b\[[0-9;]*m", "", s)
    m = ts_re.match(s)
    if not m: return None
    t = m.group(1).rstrip("Z")
    if "." in t:
        a, b = t.split("."); t = a + "." + (b + "000000")[:6]
    return datetime.datetime.fromisoformat(t).timestamp(), s
ev = []  # (t, node, piece, from_seed)
done = {}
t0 = None
N = len(logs)
for h, p in enumerate(logs):
    for line in open(p, errors="replace"):
        r = ts(line)
        if not r: continue
        t, s = r
        if t0 is None or t < t0: t0 = t
        if "piece verified" in s and "from=" in s:
            m = re.search(r"piece=(\d+)", s); f = re.search(r"from=\[([^\]]*)\]", s)
            if m and f:
                ev.append((t, h, int(m.group(1)), seed in f.group(1)))
        elif "download complete" in s:
            done[h] = t
ev.sort()
npieces = max(e[2] for e in ev) + 1
bys = collections.defaultdict(list)
for t, h, i, fs in ev:
    if fs: bys[i].append((t - t0, h))
first = {i: v[0] for i, v in bys.items()}
rep = [(t, h, i) for i, v in bys.items() for (t, h) in v[1:]]
tmax = max(e[0] for e in ev) - t0
print(f"nodes {N} pieces {npieces} pieces from seed {len(bys)} seed copies {sum(len(v) for v in bys.values())/npieces:.3f} repeats {len(rep)}")
print(f"last first copy at {max(v[0] for v in first.values()):.1f} s; done median {statistics.median(t-t0 for t in done.values()):.1f} max {max(t-t0 for t in done.values()):.1f}")
bins = collections.Counter(int(v[0] // binw) for v in first.values()); rb = collections.Counter(int(t // binw) for t, _, _ in rep)
print("per %g s: first copies / repeats (by verify time at the receiver)" % binw)
for b in range(int(tmax // binw) + 1):
    print(f"  {b*binw:5.0f}-{(b+1)*binw:<5.0f} {bins[b]:4d} {rb[b]:4d}")
# owner = h == i % N (every node in the share, IPs in h order)
cls = collections.Counter(); gaps = []
for i, v in bys.items():
    if len(v) < 2: continue
    o = i % N
    a, b = v[0][1] == o, v[1][1] == o
    cls[("owner" if a else "helper") + "->" + ("owner" if b else "helper")] += 1
    gaps.append(v[1][0] - v[0][0])
print("repeated pieces by first->second receiver:", dict(cls), "gap median %.2f s" % (statistics.median(gaps) if gaps else 0))
