"""A line server that answers each line after a delay, on any connection.

usage: delayed_server.py PORT DELAY_SECONDS
Each reply is "reply:<line>\n". Prints "ready" once listening.
"""
import socket
import sys
import threading
import time

port, delay = int(sys.argv[1]), float(sys.argv[2])


def serve(conn):
    buf = b""
    with conn:
        while True:
            try:
                chunk = conn.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                time.sleep(delay)
                try:
                    conn.sendall(b"reply:" + line + b"\n")
                except OSError:
                    return


ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(128)
print("ready", flush=True)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
