#!/usr/bin/env bash
# Concurrency soak: worker processes race transition() on a throwaway PostgreSQL cluster (and,
# if asked, on a SQLite file), then every stream is checked (benchmarks/soak.py says what).
#
#     make soak                                   # 8 workers, 60 s, PostgreSQL
#     SOAK_SECONDS=600 SOAK_ROUNDS=3 make soak    # longer
#     SOAK_BACKENDS="postgres sqlite" make soak   # also on a SQLite file
#
# Environment:
#   PY             Python with the package and psycopg installed (default: .venv/bin/python)
#   SOAK_BACKENDS  "postgres", "sqlite" or both, in order (default: postgres)
#   SOAK_WORKERS   worker processes (default 8)
#   SOAK_SECONDS   seconds each round races for (default 60)
#   SOAK_ROUNDS    rounds, fresh encounters each (default 1)
#   SOAK_SHARED    shared ping-pong encounters (default 3); SOAK_OWN per-worker ones (default 20)
#   SOAK_SEED      random seed (default 0)
#   PG_*           see scripts/pg_cluster.sh
# Exit status: non-zero if any round on any backend failed a check.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/pg_cluster.sh
source "$ROOT/scripts/pg_cluster.sh"

if [[ -z "${PY:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
BACKENDS=${SOAK_BACKENDS:-postgres}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/encounters-soak.XXXXXXXX")

cleanup() {
    pg_cluster_stop
    rm -rf -- "$SCRATCH"
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT
trap 'echo "soak: terminated" >&2; exit 143' TERM HUP

# Enough connections for the workers plus the orchestrator, with room to spare.
export PG_MAX_CONNECTIONS=$(( ${SOAK_WORKERS:-8} * 2 + 20 ))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset DJANGO_SETTINGS_MODULE

overall=0
for backend in $BACKENDS; do
    echo
    echo "================ soak on $backend ================"
    case $backend in
        postgres)
            pg_cluster_start
            "$PY" -m benchmarks.soak || overall=1
            pg_cluster_stop
            ;;
        sqlite)
            "$PY" -m benchmarks.soak --sqlite "$SCRATCH/soak.sqlite3" || overall=1
            ;;
        *)
            echo "soak: unknown backend '$backend' (expected postgres or sqlite)" >&2
            overall=1
            ;;
    esac
done
if [[ $overall -eq 0 ]]; then echo "soak: PASSED"; else echo "soak: FAILED"; fi
exit $overall
