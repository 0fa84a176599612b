"""A TCP sink: accepts connections and discards what arrives.

usage: sink.py PORT      (prints "ready" once listening)
"""
import socket
import sys
import threading

ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(64)
print("ready", flush=True)


def drain(c):
    with c:
        while c.recv(1 << 20):
            pass


while True:
    conn, _ = ls.accept()
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
