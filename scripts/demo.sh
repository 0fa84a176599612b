#!/usr/bin/env bash
# The main job on its embedded defaults: sets up the machine, builds, then runs the reuse
# experiment (fresh "function" processes against a real nginx, with and without the pool,
# the pool manager on its embedded default configuration) and prints the summary and what
# the pools did. Extra arguments go to `experiments reuse` (e.g. --runs 2000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --workspace
exec target/release/experiments reuse --runs 300 "$@"
