"""One function's side of a peer exchange, run with the preload library.

    peer_xfer.py send|recv TARGET SIZE

TARGET is either ADDR:PORT (the peer's virtual address: a plain connect(), as an unmodified
program does) or name:JOB/NAME[:PORT] (the preload library's warmpool_connect_peer()).
send: writes SIZE bytes of a fixed pseudo-random stream, shuts down its write side, waits for
the receiver's digest. recv: reads to EOF, answers with its digest. Prints one line of
key=value pairs: role bytes sha256 connect_ms total_ms peer_digest.
"""
import ctypes
import hashlib
import os
import socket
import sys
import time


def connect(target):
    t0 = time.monotonic()
    if target.startswith("name:"):
        lib = ctypes.CDLL(None, use_errno=True)
        fn = lib.warmpool_connect_peer
        fn.argtypes = [ctypes.c_char_p]
        fn.restype = ctypes.c_int
        fd = fn(target[5:].encode())
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, "warmpool_connect_peer: " + os.strerror(e))
        s = socket.socket(fileno=fd)
    else:
        host, port = target.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect((host, int(port)))
    return s, (time.monotonic() - t0) * 1000


def stream(size):
    block = hashlib.sha256(b"warmpool").digest() * 8192  # 256 KiB, not all zero
    left = size
    while left > 0:
        b = block[: min(len(block), left)]
        left -= len(b)
        yield b


def main():
    role, target, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t0 = time.monotonic()
    s, connect_ms = connect(target)
    h = hashlib.sha256()
    n = 0
    peer_digest = None
    if role == "send":
        for b in stream(size):
            s.sendall(b)
            h.update(b)
            n += len(b)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 64:
            b = s.recv(64 - len(got))
            if not b:
                break
            got += b
        peer_digest = got.decode()
    elif role == "recv":
        while True:
            b = s.recv(1 << 18)
            if not b:
                break
            h.update(b)
            n += len(b)
        s.sendall(h.hexdigest().encode())
        s.shutdown(socket.SHUT_WR)
    else:
        raise SystemExit("role must be send or recv")
    s.close()
    print("role=%s bytes=%d sha256=%s connect_ms=%.3f total_ms=%.3f peer_digest=%s"
          % (role, n, h.hexdigest(), connect_ms, (time.monotonic() - t0) * 1000, peer_digest or "-"), flush=True)


if __name__ == "__main__":
    main()
