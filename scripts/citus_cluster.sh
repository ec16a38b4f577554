# shellcheck shell=bash
# A throwaway local Citus cluster — a coordinator and two workers — for tests and benchmarks.
#
# Source this file, then:
#
#     citus_cluster_start       # three PostgreSQL clusters on free ports (scripts/pg_cluster.sh),
#                               # Citus loaded in each, the databases created and the workers
#                               # added; exports PGHOST PGPORT PGUSER PGDATABASE (the coordinator)
#     ...                       # run things against the coordinator
#     citus_cluster_stop        # stop all three and delete their directories; safe to call twice
#
# Install a trap as for pg_cluster.sh (`trap citus_cluster_stop EXIT` ...). Each node also has
# pg_cluster.sh's watchdog, so a killed caller does not leave servers behind.
#
# The extension must be installed for the machine's PostgreSQL: citus_cluster_start runs
# ../shared/vendor/citus/build.sh (idempotent) when citus.so is missing, or fails with a clear
# message when it cannot (not root, no source archive).
#
# Knobs (environment), besides pg_cluster.sh's:
#   CITUS_DATABASES     databases created on every node, Citus enabled and the workers added in
#                       each (default: "encounters test_encounters"; the tests use the second)
#   CITUS_SHARD_COUNT   citus.shard_count of the cluster (default: 32, Citus's own default)
#   CITUS_BUILD         the build script (default: ../shared/vendor/citus/build.sh beside the
#                       repository, else /work/shared/vendor/citus/build.sh)
#
# After citus_cluster_start: CITUS_COORDINATOR_PORT, CITUS_WORKER_PORTS (space-separated),
# CITUS_NODE_DIRS (the three pg_cluster directories).

_CITUS_CLUSTER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/pg_cluster.sh
source "$_CITUS_CLUSTER_ROOT/scripts/pg_cluster.sh"

# Installs Citus for the PostgreSQL pg_cluster.sh would use, when it is not installed yet.
citus_ensure_installed() {
    local bin libdir major
    bin=$(pg_cluster_find_bin) || return 1
    libdir=$("$bin/pg_config" --pkglibdir 2>/dev/null || echo "$bin/../lib")
    [[ -f "$libdir/citus.so" ]] && return 0
    major=$(basename "$(dirname "$bin")")
    # The shared build script beside the repository (../shared), or the workplace's copy.
    local build="${CITUS_BUILD:-}" candidate
    if [[ -z "$build" ]]; then
        for candidate in "$_CITUS_CLUSTER_ROOT/../shared/vendor/citus/build.sh" \
            /work/shared/vendor/citus/build.sh; do
            if [[ -f "$candidate" ]]; then
                build=$candidate
                break
            fi
        done
    fi
    if [[ -z "$build" || ! -f "$build" ]]; then
        echo "citus_cluster: Citus is not installed for PostgreSQL $major and no build script" \
            "was found (../shared/vendor/citus/build.sh; set CITUS_BUILD)" >&2
        return 1
    fi
    echo "citus_cluster: building Citus for PostgreSQL $major ($build)"
    PG_MAJOR=$major bash "$build" || {
        echo "citus_cluster: building Citus failed" >&2
        return 1
    }
}

_citus_psql() {
    local port=$1 db=$2
    shift 2
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"
}

citus_cluster_start() {
    if [[ -n "${CITUS_NODE_DIRS:-}" ]]; then
        echo "citus_cluster: a cluster is already running ($CITUS_NODE_DIRS)" >&2
        return 1
    fi
    citus_ensure_installed || return 1
    local owner="${PG_CLUSTER_OWNER_PID:-$$}" role started dir port
    CITUS_NODE_DIRS="" CITUS_COORDINATOR_PORT="" CITUS_WORKER_PORTS=""
    for role in coordinator worker1 worker2; do
        # Each node in a subshell: pg_cluster_start keeps one cluster's variables in globals.
        # The watchdog it leaves watches $owner (this shell), not the subshell.
        started=$(
            export PG_CLUSTER_OWNER_PID=$owner
            export PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-300}
            export PG_EXTRA_CONF="shared_preload_libraries = 'citus'
citus.shard_count = ${CITUS_SHARD_COUNT:-32}
max_prepared_transactions = 200"
            pg_cluster_start >&2 || exit 1
            printf '%s %s\n' "$PG_CLUSTER_DIR" "$PGPORT"
        ) || {
            echo "citus_cluster: could not start the $role" >&2
            citus_cluster_stop
            return 1
        }
        read -r dir port <<<"$started"
        CITUS_NODE_DIRS+="${CITUS_NODE_DIRS:+ }$dir"
        if [[ $role == coordinator ]]; then
            CITUS_COORDINATOR_PORT=$port
        else
            CITUS_WORKER_PORTS+="${CITUS_WORKER_PORTS:+ }$port"
        fi
    done
    local db node databases=${CITUS_DATABASES:-encounters test_encounters}
    for db in $databases; do
        for node in $CITUS_COORDINATOR_PORT $CITUS_WORKER_PORTS; do
            _citus_psql "$node" postgres -c "CREATE DATABASE \"$db\"" \
                && _citus_psql "$node" "$db" -c "CREATE EXTENSION citus" || {
                citus_cluster_stop
                return 1
            }
        done
        _citus_psql "$CITUS_COORDINATOR_PORT" "$db" \
            -c "SELECT citus_set_coordinator_host('127.0.0.1', $CITUS_COORDINATOR_PORT)" \
            >/dev/null || {
            citus_cluster_stop
            return 1
        }
        for node in $CITUS_WORKER_PORTS; do
            _citus_psql "$CITUS_COORDINATOR_PORT" "$db" \
                -c "SELECT citus_add_node('127.0.0.1', $node)" >/dev/null || {
                citus_cluster_stop
                return 1
            }
        done
    done
    export PGHOST=127.0.0.1 PGPORT=$CITUS_COORDINATOR_PORT PGUSER=postgres
    export PGDATABASE=${databases%% *}
    export CITUS_COORDINATOR_PORT CITUS_WORKER_PORTS CITUS_NODE_DIRS
    echo "citus_cluster: Citus $(_citus_psql "$PGPORT" "$PGDATABASE" -Atc \
        "SELECT extversion FROM pg_extension WHERE extname = 'citus'") ready: coordinator" \
        "127.0.0.1:$CITUS_COORDINATOR_PORT, workers $CITUS_WORKER_PORTS"
}

# Stops every node started by citus_cluster_start. Idempotent, never fails.
citus_cluster_stop() {
    local dir
    for dir in ${CITUS_NODE_DIRS:-}; do
        (PG_CLUSTER_DIR=$dir && pg_cluster_stop)
    done
    unset CITUS_NODE_DIRS CITUS_COORDINATOR_PORT CITUS_WORKER_PORTS
    unset PGHOST PGPORT PGUSER PGDATABASE
    return 0
}
