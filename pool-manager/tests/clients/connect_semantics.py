"""Options a program sets before connect(), and what it has after.

usage: connect_semantics.py plain|rcvtimeo|bindtodevice|congestion|bind HOST PORT
Sets the option (or binds 127.0.0.2 with IP_BIND_ADDRESS_NO_PORT), connects, does one GET,
prints "<what the option reads now> <local address> <status>".
"""
import socket
import struct
import sys

from http_get import exchange

IP_BIND_ADDRESS_NO_PORT = 24
variant, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
if variant == "rcvtimeo":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 3, 0))
elif variant == "bindtodevice":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
elif variant == "congestion":
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
elif variant == "bind":
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind(("127.0.0.2", 0))
s.connect((host, port))
now = {
    "rcvtimeo": lambda: str(struct.unpack("ll", s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))[0]),
    "bindtodevice": lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0").decode() or "-",
    "congestion": lambda: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode(),
}.get(variant, lambda: "-")()
status = exchange(s, host, f"/{variant}")[0]
print(now, s.getsockname()[0], status, flush=True)
s.close()
