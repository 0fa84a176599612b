#!/usr/bin/env bash
# Sets up the machine, builds the workspace in release mode (the integration tests need
# target/release/libwarmpool_preload.so next to pool-manager), then runs all tests
# single-threaded. Extra arguments are passed to the test binaries, e.g.
#   scripts/test.sh nginx_keepalive --nocapture
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "test: running scripts/setup.sh"
bash scripts/setup.sh
echo "test: running scripts/setup-ebpf.sh"
bash scripts/setup-ebpf.sh

echo "test: cargo build --release --workspace"
cargo build --release --workspace
echo "test: scripts/build-musl.sh"
bash scripts/build-musl.sh

echo "test: cargo test --release --workspace -- --test-threads=1 $*"
set +e
cargo test --release --workspace -- --test-threads=1 "$@"
status=$?
set -e
echo "test: cargo test exited with status $status"
# House rule: no source file over 800 lines, no function over 100 lines outside tests.
if ! python3 scripts/check-sizes.py; then
    status=1
fi
# Bounded fuzzing of the wire and rendezvous protocols (seed corpus in fuzz/corpus), only
# for a full run (no test-name filter given).
if [ "$#" -eq 0 ] && [ "${WARMPOOL_FUZZ_SECONDS:-30}" != 0 ]; then
    echo "test: scripts/fuzz.sh ${WARMPOOL_FUZZ_SECONDS:-30}"
    if ! bash scripts/fuzz.sh "${WARMPOOL_FUZZ_SECONDS:-30}"; then
        echo "test: fuzzing found a failure"
        status=1
    fi
fi
exit "$status"
