"""A "function" for the reuse-proof tests (pool-manager/tests/reuse_proof.rs): one short
process per run, connecting through the shim, in one of these modes:

  redis-auth PORT      AUTH admin, SELECT 5, SET k (session state a next function must not get)
  redis-abandon PORT   PING, then BLPOP q 0.3 sent and abandoned at close()
  redis-ask PORT       ACL WHOAMI + GET k; prints every byte received within 0.5 s (repr)
  http-halfread PORT   GET /big (rate-limited), reads what arrived after 0.2 s, closes
  http-abandon PORT P  GET / read in full, then GET P sent and abandoned at close()
  http-ask PORT        GET /; prints every byte received within 0.5 s (repr)
  http-keepalive PORT  GET / with http.client, then exits without close() (as runtimes do)
"""
import os
import socket
import sys
import time


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_for(s, seconds):
    """Every byte that arrives within `seconds` (or until EOF)."""
    s.settimeout(0.05)
    got = b""
    end = time.time() + seconds
    while time.time() < end:
        try:
            b = s.recv(65536)
        except socket.timeout:
            continue
        if not b:
            break
        got += b
    return got


def read_until(s, pred, seconds=2.0):
    got = b""
    s.settimeout(seconds)
    while not pred(got):
        b = s.recv(65536)
        if not b:
            break
        got += b
    return got


def http_complete(b):
    head, sep, body = b.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def main():
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "http-keepalive":
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", port)
        c.request("GET", "/")
        r = c.getresponse()
        print(r.status, r.read().decode().strip())
        sys.stdout.flush()
        os._exit(0)
    s = socket.create_connection(("127.0.0.1", port))
    if mode == "redis-auth":
        for cmd in (("AUTH", "admin", "adminpw"), ("SELECT", "5"), ("SET", "k", "db5-secret")):
            s.sendall(resp(*cmd))
            print(read_until(s, lambda b: b.endswith(b"\r\n")))
    elif mode == "redis-abandon":
        s.sendall(resp("PING"))
        read_until(s, lambda b: b.endswith(b"\r\n"))
        s.sendall(resp("BLPOP", "q", "0.3"))
    elif mode == "redis-ask":
        s.sendall(resp("ACL", "WHOAMI") + resp("GET", "k"))
        print(repr(read_for(s, 0.5)))
    elif mode == "http-halfread":
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        # Until the head and the first bytes of the body are here (bounded): the rest of the
        # body (20 KB at 2 KB/s) is still on its way when the function closes.
        got = read_until(s, lambda b: len(b.partition(b"\r\n\r\n")[2]) > 0)
        print("read %d bytes of /big" % len(got))
    elif mode == "http-abandon":
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        read_until(s, http_complete)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % sys.argv[3].encode())
    elif mode == "http-ask":
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        print(repr(read_for(s, 0.5)))
    else:
        sys.exit("unknown mode " + mode)
    s.close()


main()
