#!/usr/bin/env bash
# Runs the whole pytest suite on SQLite, then on PostgreSQL (a throwaway cluster started here and
# removed on exit, whatever happens), and prints a per-backend summary. BACKENDS=citus runs it on
# a throwaway 3-node Citus cluster (scripts/citus_cluster.sh; builds Citus when missing).
#
#     bash scripts/run_tests.sh [pytest args...]
#
# Both backends always run, even when the first one fails; the exit status is non-zero if either
# failed. pytest's exit code 5 ("no tests collected") counts as a failure.
#
# SKIP_SLOW=1 (what `make test-sqlite` sets) leaves out the tests marked slow: it adds
# `-m "not slow"` before the given arguments, so a `-k` composes with it; a `-m` of your own
# replaces it (every test that selects runs). When leaving them out leaves no test at all (a `-k`
# that names only slow tests), the selection runs again with them, since they were asked for by
# name, and the summary says so; exit 5 is still a failure when nothing matches even then.
#
# Environment:
#   PY        Python to run pytest with (default: .venv/bin/python if it exists, else python3)
#   BACKENDS  which backends to run, in order (default: "sqlite postgres"; also: citus)
#   SKIP_SLOW 1 to leave out the tests marked slow (default: 0, every test runs)
#   PG_*      see scripts/pg_cluster.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/pg_cluster.sh
source "$ROOT/scripts/pg_cluster.sh"
# shellcheck source=scripts/citus_cluster.sh
source "$ROOT/scripts/citus_cluster.sh"

if [[ -z "${PY:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
BACKENDS=${BACKENDS:-sqlite postgres}
SKIP_SLOW=${SKIP_SLOW:-0}

# Scratch space for the JUnit reports we count tests from (separate from the cluster's directory).
REPORT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/encounters-tests.XXXXXXXX")

# shellcheck disable=SC2317  # called from the trap
cleanup() {
    pg_cluster_stop
    citus_cluster_stop
    rm -rf -- "$REPORT_DIR"
}
trap cleanup EXIT
# Signals become a normal exit, so the EXIT trap above stops the cluster.
trap 'echo "run_tests: interrupted" >&2; exit 130' INT
trap 'echo "run_tests: terminated" >&2; exit 143' TERM HUP

declare -A STATUS=() DETAIL=() COUNTS=()
TOTAL_PASSED=0 TOTAL_FAILED=0 TOTAL_SKIPPED=0

# Prints "passed failed skipped" from a JUnit XML report, or nothing if there is none.
junit_counts() {
    [[ -s "$1" ]] || return 0
    python3 - "$1" <<'EOF' 2>/dev/null || true
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = failed = skipped = 0
for s in suites:
    tests += int(s.get("tests", 0))
    failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
    skipped += int(s.get("skipped", 0))
print(tests - failed - skipped, failed, skipped)
EOF
}

# run_pytest BACKEND [pytest args...]: runs the suite with ENCOUNTERS_TEST_DB=BACKEND and records
# the outcome; never fails itself, so the next backend still runs under `set -e`.
run_pytest() {
    local backend=$1
    shift
    local report="$REPORT_DIR/$backend.xml" rc=0 not_slow=() arg
    if [[ "$SKIP_SLOW" == 1 ]]; then
        not_slow=(-m "not slow")
        # A marker expression of the caller's own wins (pytest keeps the last -m anyway).
        for arg in "$@"; do
            [[ "$arg" == -m* || "$arg" == --markexpr* ]] && not_slow=()
        done
    fi
    echo
    echo "================ pytest on $backend ================"
    ENCOUNTERS_TEST_DB=$backend "$PY" -m pytest --junitxml="$report" "${not_slow[@]}" "$@" || rc=$?
    if [[ $rc -eq 5 && ${#not_slow[@]} -gt 0 ]]; then
        # Everything selected is marked slow (or nothing matched at all): run the selection with
        # the slow tests; if nothing matches even then, exit 5 stays a failure below.
        echo
        echo "run_tests: no test left once the slow ones are left out (SKIP_SLOW=1);" \
            "running the selection with them"
        rc=0
        ENCOUNTERS_TEST_DB=$backend "$PY" -m pytest --junitxml="$report" "$@" || rc=$?
        DETAIL[$backend]="only slow tests were selected: ran them"
    elif [[ ${#not_slow[@]} -gt 0 ]]; then
        DETAIL[$backend]="tests marked slow left out (SKIP_SLOW=1; make test-sqlite SLOW=1 runs them)"
    fi
    case $rc in
        0) STATUS[$backend]=PASSED ;;
        5) STATUS[$backend]=FAILED DETAIL[$backend]="no tests collected (pytest exit 5)" ;;
        *) STATUS[$backend]=FAILED DETAIL[$backend]="pytest exit $rc" ;;
    esac
    local counts passed failed skipped
    counts=$(junit_counts "$report")
    if [[ -n "$counts" ]]; then
        read -r passed failed skipped <<<"$counts"
        COUNTS[$backend]="$passed passed, $failed failed, $skipped skipped"
        TOTAL_PASSED=$((TOTAL_PASSED + passed))
        TOTAL_FAILED=$((TOTAL_FAILED + failed))
        TOTAL_SKIPPED=$((TOTAL_SKIPPED + skipped))
    fi
}

for backend in $BACKENDS; do
    case $backend in
        sqlite)
            run_pytest sqlite "$@"
            ;;
        postgres)
            echo
            echo "================ starting a throwaway PostgreSQL cluster ================"
            if pg_cluster_start; then
                run_pytest postgres "$@"
            else
                STATUS[postgres]=FAILED DETAIL[postgres]="could not start a PostgreSQL cluster"
            fi
            pg_cluster_stop
            ;;
        citus)
            echo
            echo "================ starting a throwaway Citus cluster (coordinator + 2 workers) ================"
            # Fewer shards than Citus's default 32: every TRUNCATE between tests touches each.
            if CITUS_SHARD_COUNT=${CITUS_SHARD_COUNT:-4} citus_cluster_start; then
                run_pytest citus "$@"
            else
                STATUS[citus]=FAILED DETAIL[citus]="could not start a Citus cluster"
            fi
            citus_cluster_stop
            ;;
        *)
            echo "run_tests: unknown backend '$backend' (expected sqlite, postgres or citus)" >&2
            STATUS[$backend]=FAILED DETAIL[$backend]="unknown backend"
            ;;
    esac
done

echo
echo "================ summary ================"
overall=0
for backend in $BACKENDS; do
    line=$(printf '%-9s %s' "$backend:" "${STATUS[$backend]}")
    [[ -n "${COUNTS[$backend]:-}" ]] && line+=" (${COUNTS[$backend]})"
    [[ -n "${DETAIL[$backend]:-}" ]] && line+=" - ${DETAIL[$backend]}"
    echo "$line"
    [[ "${STATUS[$backend]}" == PASSED ]] || overall=1
done
if [[ $overall -eq 0 ]]; then echo "result:   PASSED"; else echo "result:   FAILED"; fi
echo "total: $TOTAL_PASSED passed, $TOTAL_FAILED failed, $TOTAL_SKIPPED skipped"
exit $overall
