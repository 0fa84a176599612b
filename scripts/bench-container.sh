#!/bin/bash
# Pooled connect() inside a real podman container vs in the daemon's own namespace, alternating
# in rounds (root; podman + runc, the test image localhost/warmpool-fn-bookworm:test that
# tests/containers.rs builds and imports; redis-server; a release build). N=cycles per round. Everything runs in a namespace this script makes (no default route); servers
# on 198.18.110.1 (its loopback), the podman network 198.18.112.0/24.
set -eu
M=$(cd "$(dirname "$0")/.." && pwd); W=$(mktemp -d); NS=wpcb$$; NET=wpcbnet$$
ip netns add $NS
cleanup() { set +e; [ -n "${PM:-}" ] && kill $PM; [ -n "${RS:-}" ] && kill $RS; wait 2>/dev/null
  nsenter --net=/run/netns/$NS podman --runtime runc --cgroup-manager cgroupfs --events-backend file network rm -f $NET >/dev/null 2>&1
  ip netns del $NS; rm -rf $W; }
trap cleanup EXIT
IN="nsenter --net=/run/netns/$NS"
$IN ip link set lo up; $IN ip addr add 198.18.110.1/32 dev lo
$IN redis-server --bind 198.18.110.1 --port 6390 --save '' --appendonly no --protected-mode no >/dev/null & RS=$!
cat > $W/pool.toml <<T
keep_window_when_idle = false
tenant_sweep = "1h"
[[pool]]
destination = "198.18.110.1:6390"
policy = "reuse"
protocol = "redis"
min_idle = 2
T
$IN env -u LD_PRELOAD $M/target/release/pool-manager serve --config $W/pool.toml --socket $W/pool.sock >$W/pm.log 2>&1 & PM=$!
for i in $(seq 50); do [ -S $W/pool.sock ] && break; sleep 0.1; done
P="podman --runtime runc --cgroup-manager cgroupfs --events-backend file"
$IN $P network create --disable-dns --subnet 198.18.112.0/24 $NET >/dev/null
N=${N:-300}
for round in 1 2 3; do
  $IN env LD_PRELOAD=$M/target/release/libwarmpool_preload.so WARMPOOL_SOCKET=$W/pool.sock python3 $M/scripts/bench-container.py $N > $W/host$round
  $IN $P run --rm --network $NET --ip 198.18.112.5 --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    -v $M/target/release/libwarmpool_preload.so:/opt/warmpool/libwarmpool_preload.so:ro -v $W:/run/warmpool -v $M/scripts:/b:ro \
    -e LD_PRELOAD=/opt/warmpool/libwarmpool_preload.so -e WARMPOOL_SOCKET=/run/warmpool/pool.sock \
    localhost/warmpool-fn-bookworm:test python3 /b/bench-container.py $N > $W/ctr$round
done
python3 - $W <<'PY'
import sys, statistics
w = sys.argv[1]
def q(v, p): v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))] / 1000
for r in (1, 2, 3):
    h = [int(x) for x in open(f"{w}/host{r}").read().split()]
    c = [int(x) for x in open(f"{w}/ctr{r}").read().split()]
    print(f"round {r}: daemon's namespace p50 {q(h,.5):.1f} us p99 {q(h,.99):.1f}; container p50 {q(c,.5):.1f} us p99 {q(c,.99):.1f}; ratio p50 {q(c,.5)/q(h,.5):.3f}")
PY
$M/target/release/pool-manager status --socket $W/pool.sock
