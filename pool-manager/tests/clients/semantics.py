"""Checks, from inside one process under the shim, that a pooled connect behaves like a
real one. Prints one line per check: "<name> <value>"; the test asserts the values.

usage: semantics.py HOST PORT
"""
import errno
import os
import select
import socket
import struct
import sys

host, port = sys.argv[1], int(sys.argv[2])
addr = (host, port)


def out(name, value):
    print(name, value, flush=True)


def http(s):
    s.sendall(f"GET /sem HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while not buf.endswith(b"hello\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.startswith(b"HTTP/1.1 200")


# 1. Blocking connect with options set before it: they survive; the fd number is kept.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
fd = s.fileno()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
# (A buffer size would make the connect pass through: it cannot be carried.)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 3, 0))
r = s.connect_ex(addr)
out("blocking_connect", r)
out("same_fd", s.fileno() == fd)
out("nodelay", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
out("keepalive", s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
out("keepidle", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))
out("rcvtimeo", struct.unpack("ll", s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))[0])
out("cloexec", not os.get_inheritable(s.fileno()))
out("blocking", s.getblocking())
out("peer", s.getpeername()[1] == port)
out("http", http(s))
s.close()

# 2. Non-blocking connect: EINPROGRESS, then writable, SO_ERROR 0; O_NONBLOCK kept.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setblocking(False)
r = s.connect_ex(addr)
out("nonblocking_connect", errno.errorcode.get(r, r))
_, w, _ = select.select([], [s], [], 5)
out("writable", bool(w))
out("so_error", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
out("still_nonblocking", not s.getblocking())
out("connect_again", errno.errorcode.get(s.connect_ex(addr), "0"))
s.setblocking(True)
out("http_nb", http(s))
s.close()

# 3. An inheritable socket keeps FD_CLOEXEC off.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.set_inheritable(True)
s.connect(addr)
out("inheritable", os.get_inheritable(s.fileno()))
s.close()

# 4. dup: the duplicate keeps working after the original is closed (never reused).
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(addr)
d = s.dup()
s.close()
out("dup_works", http(d))
d.close()

# 5. fork: the child uses the inherited socket, the parent closes its copy later.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(addr)
pid = os.fork()
if pid == 0:
    ok = http(s)
    s.close()
    os._exit(0 if ok else 1)
_, st = os.waitpid(pid, 0)
out("fork_child_ok", os.waitstatus_to_exitcode(st) == 0)
s.close()

# 6. A socket bound to a local port passes through untouched.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
bound = s.getsockname()[1]
s.connect(addr)
out("bound_kept", s.getsockname()[1] == bound)
out("http_bound", http(s))
s.close()

# 7. UDP connect passes through.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(addr)
out("udp", u.getpeername()[1] == port)
u.close()
