"""A 'function': one HTTP/1.1 keep-alive GET, then close and exit.

usage: http_get.py blocking|asyncio HOST PORT [PATH]
Prints "<local port> <status> <body>" so tests can tell which TCP connection was used.
"""
import asyncio
import socket
import sys


def parse(head: bytes):
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    return status, length


def request(host, path):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode()


def exchange(s, host, path):
    """One keep-alive GET on connected socket `s`: (status, body)."""
    s.sendall(request(host, path))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("connection closed before the response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status, length = parse(head)
    while len(body) < length:
        body += s.recv(4096)
    return status, body


def blocking(host, port, path):
    s = socket.create_connection((host, port), timeout=5)
    status, body = exchange(s, host, path)
    local = s.getsockname()[1]
    s.close()
    return local, status, body


async def nonblocking(host, port, path):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    writer.write(request(host, path))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status, length = parse(head[:-4])
    body = await reader.readexactly(length)
    local = writer.get_extra_info("sockname")[1]
    writer.close()
    await writer.wait_closed()
    return local, status, body


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "/"
    if mode == "blocking":
        local, status, body = blocking(host, port, path)
    else:
        local, status, body = asyncio.run(nonblocking(host, port, path))
    print(local, status, body.decode().strip())


if __name__ == "__main__":
    main()
