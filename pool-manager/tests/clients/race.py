"""Threads racing connect()/close() on the same fd numbers, through the shim.

usage: race.py PORT THREADS ROUNDS
Every thread does ROUNDS of: connect, GET, check the body, close. Closed fd numbers are
reused at once by other threads, so the shim's per-fd lease table sees numbers change owner
while requests are in flight. Exits non-zero on any wrong answer.
"""
import socket
import sys
import threading

from http_get import exchange

port, threads, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
errors = []


def worker(n):
    for i in range(rounds):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            path = f"/t{n}/r{i}"
            status, body = exchange(s, "127.0.0.1", path)
            s.close()
            if status != 200 or body != b"hello\n":
                errors.append(f"{path}: {status} {body[:60]!r}")
        except BaseException as e:  # noqa: BLE001 - every failure counts (SystemExit too)
            errors.append(f"thread {n} round {i}: {e!r}")


ts = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(f"{threads * rounds - len(errors)} ok, {len(errors)} errors")
for e in errors[:10]:
    print(e)
sys.exit(1 if errors else 0)
