#!/usr/bin/env bash
# The main job on its embedded defaults: sets up the machine, builds, then
#  1. the reuse experiment: fresh "function" processes against a real nginx across an
#     emulated 200 µs path (two network namespaces and a user-space delay line), without
#     the shim, with a pass-through shim, with the pool manager on its embedded default
#     (warm) and with a reuse pool; and
#  2. a short flow-completion-time run at 10 ms RTT, new vs warmed connections;
# and prints both summaries, including what the pools did. Needs root (namespaces).
# Results: results/reuse/<timestamp>/ and results/fct/<timestamp>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup-ebpf.sh
cargo build --release --workspace
target/release/experiments reuse --runs 300
echo
exec target/release/experiments fct --reps 3
