#!/usr/bin/env python3
"""A raw wire client that starts its connection with Delegate (tests/delegate.rs).

usage: delegate.py SOCKET TARGET [OP...]
  TARGET: a pid, "self" (this process), "dead" (a child that has exited and been reaped),
          or "none" (send no Delegate at all)
  OP:     prewarm:HOST:PORT | acquire:HOST:PORT | status | create:ID | stop:ID | delegate:PID

Prints one line per answer:
  delegate|status|prewarm|create|stop ok <text>  /  <op> error <code> <text>
  acquire grant <local ip> <local port>  /  acquire miss <reason>
"""
import os
import socket
import struct
import subprocess
import sys
import time

MAGIC, VERSION = 0x5057, 1
K_ACQUIRE, K_STATUS, K_PREWARM, K_DELEGATE, K_CONTAINER = 1, 3, 4, 8, 9
K_GRANT, K_MISS, K_STATUSREPLY, K_ERROR = 0x81, 0x82, 0x83, 0x8F
seq = 0


def header(kind):
    global seq
    seq += 1
    return struct.pack("<HBBI", MAGIC, VERSION, kind, seq)


def dest(hostport):
    host, port = hostport.rsplit(":", 1)
    return struct.pack("<BBH16sI", 4, 0, int(port), socket.inet_aton(host) + bytes(12), 0)


def answer(conn, op):
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 1)
    kind = data[3]
    if kind == K_STATUSREPLY:
        print(f"{op} ok {data[8:].decode(errors='replace')}".replace("\n", " | "), flush=True)
    elif kind == K_ERROR:
        code = struct.unpack("<H", data[8:10])[0]
        print(f"{op} error {code} {data[10:].decode(errors='replace')}", flush=True)
    elif kind == K_GRANT:
        s = socket.socket(fileno=fds[0])
        ip, port = s.getsockname()
        print(f"{op} grant {ip} {port}", flush=True)
        s.close()
        return "grant"
    elif kind == K_MISS:
        print(f"{op} miss {data[8]}", flush=True)
        return "miss"
    else:
        print(f"{op} unexpected kind {kind:#x}", flush=True)
    for fd in fds:
        os.close(fd)
    return None


def pidfd_of(target):
    if target == "self":
        return os.pidfd_open(os.getpid())
    if target == "dead":
        child = subprocess.Popen(["true"])
        fd = os.pidfd_open(child.pid)
        child.wait()
        return fd
    return os.pidfd_open(int(target))


def main():
    path, target, ops = sys.argv[1], sys.argv[2], sys.argv[3:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(path)
    if target != "none":
        fd = pidfd_of(target)
        socket.send_fds(conn, [header(K_DELEGATE)], [fd])
        os.close(fd)
        answer(conn, "delegate")
    for op in ops:
        name, _, arg = op.partition(":")
        if name == "status":
            conn.send(header(K_STATUS))
            answer(conn, name)
        elif name == "prewarm":
            conn.send(header(K_PREWARM) + dest(arg))
            answer(conn, name)
        elif name == "acquire":
            # Misses until the pool has filled (bounded: 3 s).
            deadline = time.monotonic() + 3
            while True:
                conn.send(header(K_ACQUIRE) + dest(arg))
                if answer(conn, name) != "miss" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        elif name in ("create", "stop"):
            stage = 1 if name == "create" else 2
            conn.send(header(K_CONTAINER) + bytes([stage]) + arg.encode())
            answer(conn, name)
        elif name == "delegate":
            fd = pidfd_of(arg)
            socket.send_fds(conn, [header(K_DELEGATE)], [fd])
            os.close(fd)
            answer(conn, name)
        else:
            sys.exit(f"unknown op {op}")


if __name__ == "__main__":
    main()
