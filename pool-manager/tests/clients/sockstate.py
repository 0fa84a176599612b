"""Functions for the socket-state tests (pool-manager/tests/sockstate.rs).

usage: sockstate.py MODE PORT [ARG...]; prints one JSON object on stdout.

  dirty PORT            connect to redis, set options after (and one before) connect, leave
                        the fd non-blocking, PING, close
  look PORT             connect to redis setting nothing; report every option, then a
                        blocking BLPOP that answers after 200 ms
  buffer PORT HOW       set a buffer size on a pooled socket (HOW: raw = syscall, beside
                        the shim; libc = through it), PING, close
  reconnect N M HOW     connect to N, disconnect (AF_UNSPEC), connect the same fd to M,
                        GET, close (HOW: libc or raw system calls)
  peer PORT             connect, GET, report the peer's port
  preconnect PORT OPT   set OPT before connect, connect, report its value afterwards
  fdcases PORT          the fd cases that must stay right (dup, fork, close_range, ...)
  cycles PORT N         N functions in a row in one process: each checks that it finds a
                        fresh socket's options, then sets some of its own, PINGs, closes
"""
import ctypes
import fcntl
import json
import os
import socket
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_CONNECT = 42  # x86_64
SYS_SETSOCKOPT = 54
SO_BINDTOIFINDEX = 62
IP_BIND_ADDRESS_NO_PORT = 24
TCP_FASTOPEN_CONNECT = 30
IP_TRANSPARENT = 19
IP_FREEBIND = 15
SOL_TCP = socket.IPPROTO_TCP


def ping(s):
    s.sendall(b"PING\r\n")
    got = b""
    while not got.endswith(b"\r\n"):
        got += s.recv(100)
    return got.decode().strip()


def options(s):
    g = s.getsockopt
    return {
        "SO_RCVTIMEO": list(struct.unpack("ll", g(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))),
        "SO_SNDTIMEO": list(struct.unpack("ll", g(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))),
        "SO_RCVLOWAT": g(socket.SOL_SOCKET, socket.SO_RCVLOWAT),
        "SO_KEEPALIVE": g(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "SO_LINGER": list(struct.unpack("ii", g(socket.SOL_SOCKET, socket.SO_LINGER, 8))),
        "SO_PRIORITY": g(socket.SOL_SOCKET, socket.SO_PRIORITY),
        "SO_OOBINLINE": g(socket.SOL_SOCKET, socket.SO_OOBINLINE),
        "TCP_NODELAY": g(SOL_TCP, socket.TCP_NODELAY),
        "TCP_CORK": g(SOL_TCP, socket.TCP_CORK),
        "TCP_KEEPIDLE": g(SOL_TCP, socket.TCP_KEEPIDLE),
        "TCP_KEEPINTVL": g(SOL_TCP, socket.TCP_KEEPINTVL),
        "TCP_KEEPCNT": g(SOL_TCP, socket.TCP_KEEPCNT),
        "TCP_USER_TIMEOUT": g(SOL_TCP, socket.TCP_USER_TIMEOUT),
        "TCP_NOTSENT_LOWAT": g(SOL_TCP, socket.TCP_NOTSENT_LOWAT),
        "TCP_CONGESTION": g(SOL_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode(),
        "IP_TOS": g(socket.IPPROTO_IP, socket.IP_TOS),
        "IP_TTL": g(socket.IPPROTO_IP, socket.IP_TTL),
        "O_NONBLOCK": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),
        "O_ASYNC": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & getattr(os, "O_ASYNC", 0o20000)),
    }


def other_congestion():
    """A congestion control other than a fresh socket's (reno is always built in)."""
    fresh = socket.socket().getsockopt(SOL_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")
    return b"cubic" if fresh == b"reno" else b"reno"


def dirty(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 2, 0))  # before connect
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    s.setsockopt(SOL_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(SOL_TCP, socket.TCP_KEEPIDLE, 5)
    s.setsockopt(SOL_TCP, socket.TCP_KEEPINTVL, 2)
    s.setsockopt(SOL_TCP, socket.TCP_KEEPCNT, 3)
    s.setsockopt(SOL_TCP, socket.TCP_USER_TIMEOUT, 1234)
    s.setsockopt(SOL_TCP, socket.TCP_NOTSENT_LOWAT, 777)
    s.setsockopt(SOL_TCP, socket.TCP_CONGESTION, other_congestion())
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 7)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    answer = ping(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4096)
    fl = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(s.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)  # on the shared description
    out = {"port": s.getsockname()[1], "answer": answer, "options": options(s)}
    s.close()
    return out


def look(port):
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    out = {"port": s.getsockname()[1], "options": options(s)}
    s.sendall(b"BLPOP warmpool-no-such-key 0.2\r\n")  # the server answers after 200 ms
    t = time.time()
    try:
        out["blpop"] = s.recv(100).decode()
    except OSError as e:
        out["blpop"] = "error after %.0f ms: %r" % ((time.time() - t) * 1000, e)
    s.close()
    return out


def buffer(port, how):
    s = socket.socket()
    s.connect(("127.0.0.1", port))
    if how == "raw":  # beside the shim: only the pool manager can notice
        v = ctypes.c_int(4096)
        r = libc.syscall(SYS_SETSOCKOPT, s.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF, ctypes.byref(v), 4)
        assert r == 0, ctypes.get_errno()
    else:  # larger than autotuning starts with: only the shim can notice
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    out = {"port": s.getsockname()[1], "answer": ping(s)}
    s.close()
    return out


def get(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(1000)
    return got.split(b"\r\n")[0].decode()


def raw_connect(s, addr):
    r = libc.syscall(SYS_CONNECT, s.fileno(), addr, len(addr))
    return 0 if r == 0 else ctypes.get_errno()


def reconnect(n, m, how):
    s = socket.create_connection(("127.0.0.1", n))
    first = s.getpeername()[1]
    unspec = struct.pack("H14x", socket.AF_UNSPEC)
    to_m = struct.pack("!HH4s8x", socket.AF_INET, m, socket.inet_aton("127.0.0.1"))
    to_m = struct.pack("H", socket.AF_INET) + to_m[2:]  # sin_family in host order
    if how == "raw":
        r1, r2 = raw_connect(s, unspec), raw_connect(s, to_m)
    else:
        r1 = libc.connect(s.fileno(), unspec, len(unspec))
        r2 = libc.connect(s.fileno(), to_m, len(to_m))
    out = {"first": first, "unspec": r1, "connect": r2, "now": s.getpeername()[1], "status": get(s)}
    s.close()
    return out


def peer(port):
    s = socket.create_connection(("127.0.0.1", port))
    out = {"peer": s.getpeername()[1], "status": get(s)}
    s.close()
    return out


def preconnect(port, opt):
    s = socket.socket()
    value = lambda: None  # noqa: E731
    if opt == "bindtodevice":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        value = lambda: s.getsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX)  # noqa: E731
    elif opt == "congestion":
        s.setsockopt(SOL_TCP, socket.TCP_CONGESTION, other_congestion())
        value = lambda: s.getsockopt(SOL_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == other_congestion()  # noqa: E731
    elif opt == "bound":
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind(("127.0.0.2", 0))
        value = lambda: s.getsockname()[0]  # noqa: E731
    elif opt == "mark":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)
        value = lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)  # noqa: E731
    elif opt == "transparent":
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        value = lambda: s.getsockopt(socket.IPPROTO_IP, IP_TRANSPARENT)  # noqa: E731
    elif opt == "freebind":
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        value = lambda: s.getsockopt(socket.IPPROTO_IP, IP_FREEBIND)  # noqa: E731
    elif opt == "fastopen_connect":
        s.setsockopt(SOL_TCP, TCP_FASTOPEN_CONNECT, 1)
        value = lambda: s.getsockopt(SOL_TCP, TCP_FASTOPEN_CONNECT)  # noqa: E731
    elif opt == "buffer_size":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        value = lambda: s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # noqa: E731
    elif opt == "rcvtimeo":  # carried over: the connect is pooled
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1, 0))
        value = lambda: struct.unpack("ll", s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))[0]  # noqa: E731
    else:
        raise SystemExit("unknown option " + opt)
    s.connect(("127.0.0.1", port))
    out = {"value": value(), "status": get(s)}
    s.close()
    return out


def fdcases(port):
    def conn():
        s = socket.create_connection(("127.0.0.1", port))
        get(s)
        return s

    s = conn(); d = os.dup(s.fileno()); s.close(); os.close(d)  # noqa: E702
    s = conn(); d = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100); s.close(); os.close(d)  # noqa: E702
    s = conn(); x = socket.socket(); os.dup2(x.fileno(), s.fileno()); s.detach(); x.close()  # noqa: E702
    s = conn()
    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)  # the case itself: a child still holds the socket when the parent closes it
        os._exit(0)
    s.close(); os.waitpid(pid, 0)  # noqa: E702
    s = conn(); pid = os.posix_spawn("/bin/true", ["true"], os.environ); s.close(); os.waitpid(pid, 0)  # noqa: E702
    s = conn(); fd = s.detach(); os.closerange(fd, fd + 1)  # noqa: E702
    s = conn(); s.close()  # noqa: E702
    return {"done": 7}


DIRT = [
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4096),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.SOL_SOCKET, socket.SO_PRIORITY, 5),
    (socket.SOL_SOCKET, socket.SO_OOBINLINE, 1),
    (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
    (socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0)),
    (socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 2, 500000)),
    (SOL_TCP, socket.TCP_NODELAY, 1),
    (SOL_TCP, socket.TCP_KEEPIDLE, 5),
    (SOL_TCP, socket.TCP_KEEPCNT, 3),
    (SOL_TCP, socket.TCP_USER_TIMEOUT, 1234),
    (SOL_TCP, socket.TCP_NOTSENT_LOWAT, 777),
    (socket.IPPROTO_IP, socket.IP_TOS, 0x10),
    (socket.IPPROTO_IP, socket.IP_TTL, 7),
]


def cycles(port, n):
    fresh = socket.socket()
    fresh.connect(("127.0.0.1", port))  # before the shim hands anything out: not pooled?
    want = options(fresh)
    fresh.close()
    leaks, ports = [], set()
    for i in range(n):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        ports.add(s.getsockname()[1])
        got = options(s)
        if got != want:
            leaks.append({k: v for k, v in got.items() if want[k] != v})
        for j, (level, name, value) in enumerate(DIRT):
            if (i + j) % 3 == 0:
                s.setsockopt(level, name, value)
        s.setsockopt(SOL_TCP, socket.TCP_CONGESTION, other_congestion()) if i % 2 else None
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        assert ping(s) == "+PONG"
        s.setblocking(False) if i % 5 == 0 else None
        s.close()
        time.sleep(0.003)  # past the quarantine
    return {"cycles": n, "connections": len(ports), "leaks": len(leaks), "first_leaks": leaks[:3]}


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode in ("dirty", "look", "peer", "fdcases"):
        result = globals()[mode](int(args[0]))
    elif mode in ("buffer", "preconnect"):
        result = globals()[mode](int(args[0]), args[1])
    elif mode == "cycles":
        result = cycles(int(args[0]), int(args[1]))
    elif mode == "reconnect":
        result = reconnect(int(args[0]), int(args[1]), args[2])
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))
