"""A function that starts a subprocess while it holds a pooled connection, N times.

usage: subprocess_loop.py HOST PORT N DAEMON_PID
Each cycle: connect, one keep-alive GET, subprocess.run(["true"]) (CPython >= 3.10 spawns
with vfork and closes every fd in the child with close_range), close. Prints
"start <own fds> <daemon fds>" after the first cycle and "end <own fds> <daemon fds>" after
the last, while this process still runs (a leaked link would still be open).
"""
import os
import socket
import subprocess
import sys

from http_get import exchange

host, port, n, daemon = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


def counts():
    return len(os.listdir("/proc/self/fd")), len(os.listdir(f"/proc/{daemon}/fd"))


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
