#!/usr/bin/env bash
# Installs the system packages the warmpool test suite needs. Idempotent; does nothing
# (quickly) when everything is already present.
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }

# Privilege for apt: root as is, otherwise sudo if available.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    fi
fi

# package -> command that proves it is installed ("" = check with dpkg -s only)
declare -A CHECK=(
    [nginx-light]="/usr/sbin/nginx"
    [redis-server]="redis-server"
    [redis-tools]="redis-cli"
    [curl]="curl"
    [python3]="/usr/bin/python3"
    [busybox-static]=""
    [iproute2]="ip"
    [nftables]="nft"
    [util-linux]="setpriv"
    [procps]="pkill"
    [ca-certificates]=""
    [build-essential]="cc"
    [pkg-config]="pkg-config"
    [librsvg2-bin]="rsvg-convert"
    [bpftool]="bpftool"
    [python3-venv]=""
    [g++]="g++"
    [python3-yaml]=""
    [systemd]="systemd-analyze"
    [haproxy]="haproxy"
    [podman]="podman"
    [runc]="runc"
    [mmdebstrap]="mmdebstrap"
    [containernetworking-plugins]=""
    [iptables]="iptables"
    [uidmap]="newuidmap"
    [musl-tools]="musl-gcc"
)
ORDER=(nginx-light redis-server redis-tools curl python3 busybox-static iproute2 nftables
       util-linux procps ca-certificates build-essential pkg-config librsvg2-bin bpftool
       python3-venv g++ python3-yaml systemd haproxy
       podman runc mmdebstrap containernetworking-plugins iptables uidmap musl-tools)

have_cmd() {
    local c=$1
    case "$c" in
        /*) [ -x "$c" ] ;;
        *) command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || [ -x "/sbin/$c" ] ;;
    esac
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for pkg in "${ORDER[@]}"; do
    cmd=${CHECK[$pkg]}
    if [ -n "$cmd" ]; then
        have_cmd "$cmd" && continue
    else
        pkg_installed "$pkg" && continue
    fi
    missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    log "system packages: all present"
else
    log "system packages missing: ${missing[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: apt-get not found; install these packages manually: ${missing[*]}" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
        log "ERROR: not root and sudo not available; cannot install: ${missing[*]}" >&2
        exit 1
    fi
    log "apt-get update"
    ${SUDO[@]+"${SUDO[@]}"} apt-get update -q
    # Newer releases fold nginx-light into plain `nginx`.
    for i in "${!missing[@]}"; do
        if [ "${missing[$i]}" = nginx-light ] &&
            ! apt-cache policy nginx-light 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            log "nginx-light not available, using nginx"
            missing[$i]=nginx
        fi
    done
    log "apt-get install ${missing[*]}"
    # policy-rc.d is not touched: if dpkg starts the nginx/redis system services that is
    # harmless, the tests run their own instances on free ports.
    ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Verify the binaries the tests look for.
for c in /usr/sbin/nginx redis-server redis-cli curl python3 setpriv cc; do
    if ! have_cmd "$c"; then
        log "ERROR: $c still not available after install" >&2
        exit 1
    fi
done
if ! [ -x /bin/busybox ] && ! command -v busybox >/dev/null 2>&1; then
    log "ERROR: busybox still not available after install" >&2
    exit 1
fi
log "tools: nginx redis-server redis-cli curl python3 setpriv cc busybox ok"

# The S3-compatible object store for `experiments shuffle`: moto's server (PyPI) in its own
# virtual environment, so the system Python stays untouched.
S3VENV=${WARMPOOL_S3VENV:-/opt/warmpool/s3venv}
if [ -x "$S3VENV/bin/moto_server" ]; then
    log "S3 server: $S3VENV/bin/moto_server present"
else
    log "S3 server: installing moto[server] into $S3VENV"
    ${SUDO[@]+"${SUDO[@]}"} mkdir -p "$(dirname "$S3VENV")"
    ${SUDO[@]+"${SUDO[@]}"} /usr/bin/python3 -m venv "$S3VENV"
    ${SUDO[@]+"${SUDO[@]}"} "$S3VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6'
    [ -x "$S3VENV/bin/moto_server" ] || { log "ERROR: moto_server missing after install" >&2; exit 1; }
fi

if command -v cargo >/dev/null 2>&1; then
    log "cargo: $(cargo --version)"
else
    log "ERROR: cargo not found in PATH. Install the Rust toolchain with rustup:" >&2
    log "  (see the rustup documentation for the one-line installer)" >&2
    log "then 'source \$HOME/.cargo/env' and re-run." >&2
    exit 1
fi
# The preload library for musl-linked programs (scripts/build-musl.sh).
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    log "rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl
fi

log "done"
