# Times connect() to a pooled Redis destination (scripts/bench-container.sh), N cycles (PING, PONG, close), 20 ms apart.
import socket, sys, time
n = int(sys.argv[1]); ts = []
for i in range(n):
    t = time.perf_counter_ns()
    s = socket.create_connection(("198.18.110.1", 6390))
    ts.append(time.perf_counter_ns() - t)
    s.sendall(b"PING\r\n"); s.recv(16); s.close()
    time.sleep(0.02)
print(" ".join(str(x) for x in ts))
