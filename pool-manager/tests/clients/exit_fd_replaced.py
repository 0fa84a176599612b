"""A function whose pooled fd number holds another socket by the time it exits.

usage: exit_fd_replaced.py HOST PORT
GET /granted on a pooled connection; close that fd with the raw system call (which the
shim never sees); a new socket takes the same fd number and makes its own connection
(GET /replacement); exit normally holding it. Prints "<fd> <fd of the new socket>".
"""
import ctypes
import os
import socket
import sys
import threading

from http_get import exchange

SYS_CLOSE = {"x86_64": 3, "aarch64": 57}[os.uname().machine]
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
assert exchange(s, host, "/granted")[0] == 200
fd = s.detach()
assert ctypes.CDLL(None, use_errno=True).syscall(SYS_CLOSE, fd) == 0
t = socket.socket()
t.settimeout(5)
t.connect((host, port))
assert exchange(t, host, "/replacement")[0] == 200
print(fd, t.fileno(), flush=True)
hold = threading.Event()
threading.Thread(target=lambda c=t: hold.wait(), daemon=True).start()
