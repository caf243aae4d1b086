#!/usr/bin/env bash
# Make sure the PostgreSQL binaries the tests and benchmarks need are installed:
#   server: initdb, pg_ctl, postgres      client: psql, pgbench
#
# Search order: $PG_BIN, PATH, /usr/lib/postgresql/*/bin (newest version first).
# If the server binaries are missing and we are root, install them from Debian's packages
# (pgbench ships in postgresql-<ver>; /usr/bin/pgbench is postgresql-client-common's wrapper).
# The Debian system service is never started: the test fixtures run their own throw-away
# clusters on free loopback ports.
#
# Prints the bin directory found (last line: PG_BIN=<dir>). Exits 1 if nothing can be found.
set -euo pipefail

SERVER_TOOLS=(initdb pg_ctl postgres)
CLIENT_TOOLS=(psql pgbench)

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }

# Print candidate bin directories, best first.
candidate_dirs() {
    if [[ -n "${PG_BIN:-}" ]]; then
        printf '%s\n' "$PG_BIN"
    fi
    local tool path
    for tool in "${SERVER_TOOLS[@]}"; do
        if path=$(command -v "$tool" 2>/dev/null); then
            # /usr/local/bin/initdb may be a symlink into /usr/lib/postgresql/N/bin.
            dirname "$(readlink -f "$path")"
            dirname "$path"
        fi
    done
    # Debian/Ubuntu layout, newest major version first.
    local root=${PG_LIB_ROOT:-/usr/lib/postgresql}
    compgen -G "$root/*/bin" | sort -V -r || true
}

has_all() { # has_all DIR TOOL...
    local dir=$1 tool
    shift
    for tool in "$@"; do
        [[ -x "$dir/$tool" ]] || return 1
    done
}

find_server_dir() {
    local d
    while IFS= read -r d; do
        if [[ -n "$d" ]] && has_all "$d" "${SERVER_TOOLS[@]}"; then
            printf '%s\n' "$d"
            return 0
        fi
    done < <(candidate_dirs)
    return 1
}

client_tool_ok() { # client_tool_ok BINDIR TOOL
    [[ -x "$1/$2" ]] || command -v "$2" >/dev/null 2>&1
}

install_with_apt() {
    if [[ "$(id -u)" != 0 ]]; then
        log "PostgreSQL server binaries (${SERVER_TOOLS[*]}) not found in \$PG_BIN, PATH or /usr/lib/postgresql/*/bin,"
        log "and we are not root so we cannot install them."
        log "Install them (Debian/Ubuntu: sudo apt-get install postgresql postgresql-client postgresql-contrib)"
        log "or point PG_BIN at a directory holding ${SERVER_TOOLS[*]}."
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "PostgreSQL binaries not found and apt-get is unavailable; set PG_BIN to a PostgreSQL bin dir."
        exit 1
    fi
    log "installing PostgreSQL from Debian packages"
    # Keep the package scripts from starting the system cluster: invoke-rc.d honours
    # policy-rc.d (exit 101 = action forbidden). Only add one if none exists, and remove it after.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        added_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends \
                postgresql postgresql-client postgresql-contrib
    } || rc=$?
    if [[ $added_policy == 1 ]]; then
        rm -f "$policy"
    fi
    if [[ $rc != 0 ]]; then
        log "apt-get failed (exit $rc)"
        exit 1
    fi
}

bindir=$(find_server_dir || true)
if [[ -z "$bindir" ]]; then
    install_with_apt
    bindir=$(find_server_dir || true)
    if [[ -z "$bindir" ]]; then
        log "PostgreSQL server binaries still not found after installing"
        exit 1
    fi
fi

missing=()
for tool in "${CLIENT_TOOLS[@]}"; do
    client_tool_ok "$bindir" "$tool" || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        install_with_apt
    else
        log "client tools missing: ${missing[*]} (install postgresql-client / postgresql-contrib)"
        exit 1
    fi
    for tool in "${missing[@]}"; do
        if ! client_tool_ok "$bindir" "$tool"; then
            log "client tool $tool still missing after installing"
            exit 1
        fi
    done
fi

version=$("$bindir/postgres" --version 2>/dev/null || echo "unknown version")
log "found $version in $bindir"
printf 'PG_BIN=%s\n' "$bindir"
