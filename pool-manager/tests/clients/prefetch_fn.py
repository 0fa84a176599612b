"""Functions for the prefetch tests.

usage: prefetch_fn.py MODE HOST PORT
  get          one GET, close; prints "<local port> <status>"
  fork         fork first; the child does one GET and exits, then the parent does one;
               prints "child <local port> <status>" and "parent <local port> <status>"
  die-after    one GET, then exit at once without closing (os._exit): the socket carried
               bytes and was never given back
  closefrom    (PORT2: a port nothing listens on) first a connect that fails, so that the shim
               has read its offers; then, like a program that tidies up its descriptors, close
               every fd >= 512 and put a pipe on those numbers; then one GET; then check the
               pipe still works on every one of them. Prints "<n high fds> <local port> <status>"
"""
import os
import socket
import sys

from http_get import exchange

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


def get(tag, path):
    s = socket.create_connection((host, port), timeout=5)
    status = exchange(s, host, path)[0]
    local = s.getsockname()[1]
    print(f"{tag}{local} {status}", flush=True)
    return s


if mode == "get":
    get("", "/prefetch-get").close()
elif mode == "fork":
    pid = os.fork()
    if pid == 0:
        get("child ", "/prefetch-child").close()
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    get("parent ", "/prefetch-parent").close()
    sys.exit(os.waitstatus_to_exitcode(st))
elif mode == "die-after":
    s = get("", "/prefetch-die")
    os._exit(0)
elif mode == "closefrom":
    try:
        socket.create_connection((host, int(sys.argv[4])), timeout=5).close()
    except OSError:
        pass
    high = [int(f) for f in os.listdir("/proc/self/fd") if int(f) >= 512]
    r, w = os.pipe()
    for f in high:
        os.close(f)
        os.dup2(w, f)
    s = socket.create_connection((host, port), timeout=5)
    status = exchange(s, host, "/prefetch-closefrom")[0]
    local = s.getsockname()[1]
    s.close()
    for f in high:
        os.write(f, b"x")
    got = os.read(r, 4096)
    assert got == b"x" * len(high), (got, high)
    print(len(high), local, status, flush=True)
else:
    sys.exit(f"unknown mode {mode}")
