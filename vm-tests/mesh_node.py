#!/usr/bin/env python3
"""One host of `bench_mesh.sh`: bulk TCP to every other host (or to `--to` only) for `dur`
seconds from `start` (epoch), receiving whatever comes; prints this host's index, its receive
goodput in Mbit/s over the last `dur - warm` seconds and how many of its flows never got through
(refused flows are tried again during the first half of the warm-up). Only addresses inside the
bench's namespaces."""
import argparse, selectors, socket, time

ap = argparse.ArgumentParser()
ap.add_argument("me", type=int)
ap.add_argument("n", type=int)
ap.add_argument("--dur", type=float, default=30)
ap.add_argument("--warm", type=float, default=10)
ap.add_argument("--start", type=float, required=True)
ap.add_argument("--to", type=int, action="append", default=None, help="send only to these hosts")
ap.add_argument("--lowat", type=int, default=16384, help="SO_RCVLOWAT of received flows")
ap.add_argument("--send", type=int, default=1, help="0: receive only")
a = ap.parse_args()

def addr(i):
    return "10.72.%d.%d" % (1 + i // 200, 10 + i % 200)

sel = selectors.DefaultSelector()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr(a.me), 9000))
ls.listen(512)
ls.setblocking(False)
sel.register(ls, selectors.EVENT_READ, "L")
while time.time() < a.start:
    time.sleep(0.01)
buf = b"x" * 65536
peers = a.to if a.to is not None else [j for j in range(a.n) if j != a.me]


def connect(j):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((addr(j), 9000))
    except OSError:  # in progress, or failed: a failure shows on the first send
        pass
    sel.register(s, selectors.EVENT_WRITE, j)


if a.send:
    for j in peers:
        connect(j)
t0 = time.time()
rx = 0
failed = 0
retry = []
at_warm = None
while True:
    now = time.time()
    if at_warm is None and now >= t0 + a.warm:
        at_warm = (now, rx)
    if now >= t0 + a.dur:
        break
    for when, j in [r for r in retry if r[0] <= now]:
        retry.remove((when, j))
        connect(j)
    for key, _ in sel.select(0.1):
        if key.data == "L":
            try:
                c, _ = ls.accept()
                c.setblocking(False)
                # Woken per 16 KiB, not per segment: with N - 1 flows into one slow link each
                # segment would wake this host alone (the swarm's readers do the same).
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, a.lowat)
                sel.register(c, selectors.EVENT_READ, "R")
            except BlockingIOError:
                pass
        elif key.data == "R":
            try:
                got = key.fileobj.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                got = b""
            if not got:  # closed or reset: readable for ever, so dropped
                sel.unregister(key.fileobj)
                key.fileobj.close()
            rx += len(got)
        else:  # a flow we send, to host key.data
            try:
                key.fileobj.send(buf)
            except BlockingIOError:
                pass
            except OSError:  # refused or reset: writable for ever, so dropped
                sel.unregister(key.fileobj)
                key.fileobj.close()
                # A host slow to start was not listening yet: tried again during the warm-up.
                if now < t0 + a.warm / 2:
                    retry.append((now + 0.2, key.data))
                else:
                    failed += 1
end = time.time()
print("%d %.4f %d" % (a.me, (rx - at_warm[1]) * 8 / (end - at_warm[0]) / 1e6, failed))
