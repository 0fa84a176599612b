#!/usr/bin/env bash
# Installs the eBPF build toolchain (see shared/TOOLCHAIN.md): the nightly toolchain's
# rust-src (for -Z build-std=core) and bpf-linker, linked against the nightly toolchain's own
# libLLVM (Debian has no matching system LLVM). Idempotent and quick when already done.
set -euo pipefail
log() { printf 'setup-ebpf: %s\n' "$*"; }

if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
fi
if command -v bpf-linker >/dev/null 2>&1; then
    log "bpf-linker: $(bpf-linker --version 2>/dev/null | head -1)"
else
    NL="$(rustc +nightly --print sysroot)/lib"
    LLVM_SO=$(ls "$NL"/libLLVM-*.so | head -1)
    LLVM_MAJOR=$(basename "$LLVM_SO" | sed -E 's/libLLVM-([0-9]+).*/\1/')
    LIB=$(basename "$LLVM_SO" .so | sed 's/^lib//')
    log "building bpf-linker against $LIB (a few minutes, once)"
    RUSTFLAGS="-C link-arg=-L$NL -C link-arg=-l$LIB -C link-arg=-Wl,-rpath,$NL" \
        cargo install bpf-linker --no-default-features --features "llvm-$LLVM_MAJOR,no-llvm-linking"
fi
log "done"
