#!/usr/bin/env bash
# Fuzzes the shim <-> daemon wire protocol (crate warmpool-wire, project in fuzz/) for a
# bounded time per target, and exits non-zero if any target crashes.
#
#   bash scripts/fuzz.sh [SECONDS]      # SECONDS per target, default 30
#
# Installs what it needs when missing: the nightly toolchain (rustup) and cargo-fuzz
# (cargo install --locked), plus a C++ compiler for libFuzzer (apt-get, normally already
# there from scripts/setup.sh). Each target runs on a scratch copy of its committed seeds
# (fuzz/corpus/<target>/seed-*), so a run never grows the repository. A crashing input is
# kept in fuzz/artifacts/<target>/ (git-ignored) and the command to replay it is printed.
#
# Environment: FUZZ_TARGETS="wire_decode" to run a subset; CARGO_BUILD_JOBS is honoured
# for the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

log() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: ERROR: %s\n' "$*" >&2; exit 2; }

SECONDS_PER_TARGET=${1:-30}
case "$SECONDS_PER_TARGET" in
    '' | *[!0-9]*) die "usage: $0 [SECONDS]  (got '$SECONDS_PER_TARGET')" ;;
esac
[ "$SECONDS_PER_TARGET" -gt 0 ] || die "SECONDS must be at least 1"
MAX_LEN=4096
TARGETS=(${FUZZ_TARGETS:-wire_decode wire_roundtrip rdv_decode})

# rustup's cargo may not be on PATH in a non-login shell.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust with rustup first"
command -v rustup >/dev/null 2>&1 || die "rustup not found; the fuzz build needs rustup's nightly toolchain"

# libFuzzer (built by libfuzzer-sys) is C++.
if ! command -v c++ >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        log "installing g++ (libFuzzer is C++)"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends g++
    else
        die "no C++ compiler (c++) found; install g++ (scripts/setup.sh does)"
    fi
fi

# Nightly: cargo-fuzz builds with -Zsanitizer=address. No rust-src needed (no build-std).
if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi

if cargo fuzz --version >/dev/null 2>&1; then
    log "$(cargo fuzz --version)"
else
    log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
    cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz still not runnable after install (is ~/.cargo/bin on PATH?)"
fi

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/warmpool-fuzz.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

failed=()
for target in "${TARGETS[@]}"; do
    [ -f "fuzz/fuzz_targets/$target.rs" ] || die "no such fuzz target: $target"
    corpus="$SCRATCH/$target"
    mkdir -p "$corpus"
    seeds=0
    for f in "fuzz/corpus/$target"/seed-*; do
        [ -f "$f" ] || continue
        cp "$f" "$corpus/"
        seeds=$((seeds + 1))
    done
    log "$target: ${SECONDS_PER_TARGET}s, $seeds seeds, max_len $MAX_LEN"
    # --debug-assertions: overflow checks and debug_assert! are part of what we test.
    cmd=(cargo +nightly fuzz run --debug-assertions "$target" "$corpus" --
         "-max_total_time=$SECONDS_PER_TARGET" "-max_len=$MAX_LEN" -print_final_stats=1)
    log "${cmd[*]}"
    touch "$SCRATCH/$target.start"
    set +e
    (cd "$ROOT" && "${cmd[@]}")
    status=$?
    set -e
    if [ "$status" -eq 0 ]; then
        log "$target: ok"
    else
        log "$target: FAILED (exit status $status)"
        if [ -d "fuzz/artifacts/$target" ]; then
            find "fuzz/artifacts/$target" -type f -newer "$SCRATCH/$target.start" | while read -r a; do
                log "  crashing input: $a"
                log "  replay: cargo +nightly fuzz run --debug-assertions $target $a"
            done
        fi
        failed+=("$target")
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all targets ok: ${TARGETS[*]}"
