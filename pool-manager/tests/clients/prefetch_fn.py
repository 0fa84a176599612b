"""Functions for the prefetch tests.

usage: prefetch_fn.py MODE HOST PORT
  get          one GET, close; prints "<local port> <status>"
  fork         fork first; the child does one GET and exits, then the parent does one;
               prints "child <local port> <status>" and "parent <local port> <status>"
  die-after    one GET, then exit at once without closing (os._exit): the socket carried
               bytes and was never given back
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
else:
    sys.exit(f"unknown mode {mode}")
