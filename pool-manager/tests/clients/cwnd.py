"""Connect to 127.0.0.1:PORT (cubic), optionally upload 16 MB, and print tcpi_snd_cwnd.

usage: cwnd.py PORT new|bulk
With "new" the window is read right after the handshake, before any data is sent.
"""
import socket
import struct
import sys

port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
s.connect(("127.0.0.1", port))
if mode == "bulk":
    s.sendall(b"x" * (16 << 20))
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
# struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_snd_cwnd is the 19th u32.
print(struct.unpack_from("I", info, 8 + 18 * 4)[0])
s.close()
