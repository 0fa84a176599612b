"""A function whose HTTP client keeps its keep-alive connection until the process exits.

usage: keep_until_exit.py HOST PORT PATH
One GET with http.client.HTTPConnection, then a normal exit without close(): a background
(daemon) thread still references the connection, so CPython's finalisation never closes it
(as with clients whose pools live until exit). Prints "<local port> <status>".
"""
import http.client
import sys
import threading

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection(host, port, timeout=5)
conn.request("GET", path)
resp = conn.getresponse()
resp.read()
print(conn.sock.getsockname()[1], resp.status, flush=True)
hold = threading.Event()
threading.Thread(target=lambda c=conn: hold.wait(), daemon=True).start()
