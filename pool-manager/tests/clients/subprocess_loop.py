"""A function that starts a subprocess while it holds a pooled connection, N times.

usage: subprocess_loop.py HOST PORT N DAEMON_PID
Each cycle: connect, one keep-alive GET, subprocess.run(["true"]) (CPython >= 3.10 spawns
with vfork and closes every fd in the child with close_range), close. Prints
"start <own fds> <daemon unix-socket fds>" after the first cycle and "end <own fds> <daemon unix-socket fds>" after
the last, while this process still runs (a leaked link would still be open).
"""
import os
import socket
import subprocess
import sys

from http_get import exchange

host, port, n, daemon = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


def unix_fds(pid):
    """The fds of `pid` that are Unix sockets (the daemon's client links), not its pooled TCP
    sockets, whose number moves with the pool's return path."""
    with open("/proc/net/unix") as f:
        unix = {line.split()[6] for line in f.readlines()[1:] if len(line.split()) > 6}
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in unix:
            n += 1
    return n


def counts():
    return len(os.listdir("/proc/self/fd")), unix_fds(daemon)


def cycle(i):
    s = socket.create_connection((host, port), timeout=5)
    assert exchange(s, host, f"/sub{i}")[0] == 200
    subprocess.run(["true"], check=True)
    s.close()


cycle(0)
print("start", *counts(), flush=True)
for i in range(1, n + 1):
    cycle(i)
print("end", *counts(), flush=True)
