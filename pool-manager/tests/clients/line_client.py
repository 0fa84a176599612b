"""A 'function' for the line server: send one line; with --read, print the reply.

usage: line_client.py PORT WORD [--read]
Without --read it closes right after sending, abandoning the reply.
"""
import socket
import sys

port, word = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=5)
s.sendall(word.encode() + b"\n")
if "--read" in sys.argv:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    print(buf.decode().strip())
s.close()
