#!/usr/bin/env bash
# Builds the preload library for musl-linked programs (Alpine images, musl-gcc builds) and
# installs it beside the glibc one as target/release/libwarmpool_preload-musl.so.
# Needs the rustup target x86_64-unknown-linux-musl and musl-gcc (Debian: musl-tools; both
# installed by scripts/setup.sh). The linker and `-crt-static` come from .cargo/config.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p preload --target x86_64-unknown-linux-musl
install -m 0755 target/x86_64-unknown-linux-musl/release/libwarmpool_preload.so target/release/libwarmpool_preload-musl.so
echo "build-musl: target/release/libwarmpool_preload-musl.so"
