# shellcheck shell=bash
# Throwaway PostgreSQL clusters for tests, benchmarks and soak runs.
#
# Source this file, then:
#
#     pg_cluster_start          # initdb + start on a free port; exports PGHOST PGPORT PGUSER PGDATABASE
#     ...                       # run things against it
#     pg_cluster_stop           # stop it (immediate) and delete its directory; safe to call twice
#
# Callers should install a trap so the cluster never outlives them, e.g.
#
#     trap pg_cluster_stop EXIT
#     trap 'exit 130' INT; trap 'exit 143' TERM     # turn signals into an EXIT, which runs the trap
#
# Every cluster lives in its own `mktemp -d` directory (data, log, unix socket) and listens only on
# 127.0.0.1 on a port the kernel reported free, so several runs on one machine do not clash.
#
# PostgreSQL refuses to run as root: when we are root, initdb/pg_ctl run as the `postgres` user
# (created by Debian's postgresql package) and the cluster directory is chown'ed to it.
#
# Knobs (environment):
#   PG_BIN               directory holding initdb/pg_ctl (default: newest /usr/lib/postgresql/*/bin,
#                        else wherever `initdb` is on PATH)
#   PG_CLUSTER_USER      OS user to run the server as when we are root (default: postgres)
#   PG_MAX_CONNECTIONS   max_connections (default: 100)
#   PG_START_TIMEOUT     seconds to wait for the server to accept connections (default: 60)
#   PG_EXTRA_CONF        more postgresql.conf lines (e.g. shared_preload_libraries for Citus)
#
#   PG_CLUSTER_OWNER_PID the process whose death means "stop the cluster" (default: $$, the
#                        script that sourced this file); see the watchdog below
#
# After pg_cluster_start: PG_CLUSTER_DIR (the temp dir), PG_CLUSTER_DATA, PG_CLUSTER_LOG.
#
# Besides the caller's trap, pg_cluster_start leaves a small watchdog process (in its own session,
# so a Ctrl-C or a kill of the caller's process group does not reach it) that stops the cluster
# and deletes its directory once the owner process is gone. That covers what no trap can: the
# caller being killed with SIGKILL, or a caller that forgot to call pg_cluster_stop.

# This file's absolute path, so the watchdog (a separate process) can source it too.
_PG_CLUSTER_SH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

# Prints the directory holding initdb and pg_ctl, or fails.
pg_cluster_find_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then
        if [[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]]; then
            printf '%s\n' "$PG_BIN"
            return 0
        fi
        echo "pg_cluster: PG_BIN=$PG_BIN has no initdb/pg_ctl" >&2
        return 1
    fi
    # Debian keeps the server binaries off PATH, one directory per major version; take the newest.
    local dir
    dir=$(
        for d in /usr/lib/postgresql/*/bin; do
            [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && printf '%s\n' "$d"
        done | sort -V | tail -n 1
    )
    if [[ -n "$dir" ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    local initdb
    if initdb=$(command -v initdb) && [[ -x "$(dirname "$initdb")/pg_ctl" ]]; then
        dirname "$initdb"
        return 0
    fi
    echo "pg_cluster: no initdb/pg_ctl found (install the 'postgresql' package, or set PG_BIN)" >&2
    return 1
}

# Runs a command as the cluster's owner: the `postgres` user when we are root, else ourselves.
# The command runs from inside the cluster directory, because the postgres user may not be
# allowed into our working directory (initdb/pg_ctl complain about that).
_pg_cluster_as_owner() {
    if [[ "$(id -u)" -eq 0 ]]; then
        (cd "$PG_CLUSTER_DIR" && runuser -u "${PG_CLUSTER_USER:-postgres}" -- "$@")
    else
        (cd "$PG_CLUSTER_DIR" && "$@")
    fi
}

# Asks the kernel for a currently free TCP port on 127.0.0.1. Another process can still grab it
# before PostgreSQL binds it; pg_cluster_start retries with a new port when the start fails.
_pg_cluster_free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

pg_cluster_start() {
    if [[ -n "${PG_CLUSTER_DIR:-}" ]]; then
        echo "pg_cluster: a cluster is already running in $PG_CLUSTER_DIR" >&2
        return 1
    fi

    local bin
    bin=$(pg_cluster_find_bin) || return 1

    if [[ "$(id -u)" -eq 0 ]]; then
        local owner="${PG_CLUSTER_USER:-postgres}"
        if ! id "$owner" >/dev/null 2>&1; then
            echo "pg_cluster: running as root but there is no '$owner' user to run PostgreSQL as" >&2
            return 1
        fi
        # /tmp rather than $TMPDIR: the postgres user must be able to reach the directory.
        PG_CLUSTER_DIR=$(mktemp -d /tmp/encounters-pg.XXXXXXXX) || return 1
        chown "$owner": "$PG_CLUSTER_DIR" || return 1
    else
        PG_CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/encounters-pg.XXXXXXXX") || return 1
    fi
    PG_CLUSTER_DATA="$PG_CLUSTER_DIR/data"
    PG_CLUSTER_LOG="$PG_CLUSTER_DIR/postgres.log"
    local sockdir="$PG_CLUSTER_DIR/sock"
    _pg_cluster_as_owner mkdir "$sockdir" || return 1

    echo "pg_cluster: initdb in $PG_CLUSTER_DATA ($bin)"
    if ! _pg_cluster_as_owner "$bin/initdb" -D "$PG_CLUSTER_DATA" --auth=trust -U postgres \
        --encoding=UTF8 --locale=C --no-sync >"$PG_CLUSTER_DIR/initdb.log" 2>&1; then
        echo "pg_cluster: initdb failed:" >&2
        cat "$PG_CLUSTER_DIR/initdb.log" >&2
        return 1
    fi

    # Settings for a disposable test server: durability off (fast), reachable only from this
    # machine, socket kept inside our own directory instead of the shared /var/run/postgresql.
    _pg_cluster_as_owner tee -a "$PG_CLUSTER_DATA/postgresql.conf" >/dev/null <<EOF || return 1

# --- added by scripts/pg_cluster.sh (throwaway test cluster) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockdir'
max_connections = ${PG_MAX_CONNECTIONS:-100}
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    if [[ -n "${PG_EXTRA_CONF:-}" ]]; then
        printf '%s\n' "$PG_EXTRA_CONF" | _pg_cluster_as_owner tee -a "$PG_CLUSTER_DATA/postgresql.conf" \
            >/dev/null || return 1
    fi

    local attempt port
    for attempt in 1 2 3 4 5; do
        port=$(_pg_cluster_free_port) || return 1
        # -w: return only once the server accepts connections (or has failed to start).
        if _pg_cluster_as_owner "$bin/pg_ctl" -D "$PG_CLUSTER_DATA" -l "$PG_CLUSTER_LOG" \
            -o "-p $port" -w -t "${PG_START_TIMEOUT:-60}" start >/dev/null; then
            if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -t 10 2>/dev/null \
                || [[ ! -x "$bin/pg_isready" ]]; then
                export PGHOST=127.0.0.1 PGPORT="$port" PGUSER=postgres PGDATABASE=postgres
                _pg_cluster_start_watchdog
                echo "pg_cluster: PostgreSQL $("$bin/pg_ctl" --version | awk '{print $3}')" \
                    "ready on 127.0.0.1:$port (dir $PG_CLUSTER_DIR)"
                return 0
            fi
        fi
        # Most likely the port was taken between our check and the server's bind; try another.
        echo "pg_cluster: start on port $port failed (attempt $attempt); server log tail:" >&2
        tail -n 5 "$PG_CLUSTER_LOG" >&2 2>/dev/null || true
        _pg_cluster_as_owner "$bin/pg_ctl" -D "$PG_CLUSTER_DATA" -m immediate -w stop \
            >/dev/null 2>&1 || true
    done
    echo "pg_cluster: could not start PostgreSQL; full log: $PG_CLUSTER_LOG" >&2
    return 1
}

# Starts the watchdog described at the top: it polls every 2 s and, when the owner process has
# exited while the cluster directory still exists, runs pg_cluster_stop on it. It exits by itself
# as soon as the directory is gone (pg_cluster_stop also ends it at once, by its pid).
_pg_cluster_start_watchdog() {
    local owner="${PG_CLUSTER_OWNER_PID:-$$}" launcher=()
    command -v setsid >/dev/null && launcher=(setsid)
    # shellcheck disable=SC2016  # the inner script expands its own positional parameters
    "${launcher[@]}" bash -c '
        owner=$1 PG_CLUSTER_DIR=$2
        trap "" INT HUP
        while kill -0 "$owner" 2>/dev/null && [[ -d "$PG_CLUSTER_DIR" ]]; do sleep 2; done
        if [[ -d "$PG_CLUSTER_DIR" ]]; then
            source "$3" && pg_cluster_stop
        fi
    ' pg-cluster-watchdog "$owner" "$PG_CLUSTER_DIR" "$_PG_CLUSTER_SH" \
        </dev/null >/dev/null 2>&1 &
    PG_CLUSTER_WATCHDOG_PID=$!
}

# Stops the cluster started by pg_cluster_start and deletes its directory. Idempotent, never fails,
# so it can run from an EXIT trap (also after a half-finished pg_cluster_start).
pg_cluster_stop() {
    local dir="${PG_CLUSTER_DIR:-}"
    [[ -n "$dir" ]] || return 0
    local data="$dir/data" bin
    if [[ -f "$data/postmaster.pid" ]]; then
        # Immediate mode: no checkpoint, nothing worth keeping in a throwaway cluster.
        if bin=$(pg_cluster_find_bin 2>/dev/null); then
            _pg_cluster_as_owner "$bin/pg_ctl" -D "$data" -m immediate -w -t 30 stop \
                >/dev/null 2>&1 || true
        fi
        # If pg_ctl could not stop it, kill the postmaster of *this* cluster by its pid.
        if [[ -f "$data/postmaster.pid" ]]; then
            local pid
            pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
            if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
                kill -QUIT "$pid" 2>/dev/null || true
                sleep 2
                if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
            fi
        fi
    fi
    rm -rf -- "$dir"
    if [[ -n "${PG_CLUSTER_WATCHDOG_PID:-}" ]]; then
        kill "$PG_CLUSTER_WATCHDOG_PID" 2>/dev/null || true
    fi
    unset PG_CLUSTER_DIR PG_CLUSTER_DATA PG_CLUSTER_LOG PG_CLUSTER_WATCHDOG_PID
    unset PGHOST PGPORT PGUSER PGDATABASE
    return 0
}
