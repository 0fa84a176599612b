"""A function that holds its connection across a pool manager restart.

usage: hold_get.py HOST PORT
GET /before on one keep-alive connection, print "ready <local port>", wait for a line on
stdin, GET /after on the same connection, close, print "done <local port> <status>".
"""
import socket
import sys

from http_get import exchange

host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
assert exchange(s, host, "/before")[0] == 200
local = s.getsockname()[1]
print("ready", local, flush=True)
sys.stdin.readline()
status = exchange(s, host, "/after")[0]
s.close()
print("done", local, status, flush=True)
