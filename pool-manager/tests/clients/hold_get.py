"""A function that holds its connection across a pool manager restart.

usage: hold_get.py HOST PORT
GET /before on one keep-alive connection, print "ready <local port>", wait for a line on
stdin, GET /after on the same connection, close, print "done <local port> <status>".
"""
import socket
import sys


def get(s, host, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("connection closed before the response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(l.split(":", 1)[1]) for l in lines[1:] if l.lower().startswith("content-length"))
    while len(body) < length:
        body += s.recv(4096)
    return int(lines[0].split()[1])


host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
assert get(s, host, "/before") == 200
local = s.getsockname()[1]
print("ready", local, flush=True)
sys.stdin.readline()
status = get(s, host, "/after")
s.close()
print("done", local, status, flush=True)
