#!/usr/bin/env bash
# Runs the suite under the supported Django releases, each in its own virtualenv
# (.venv-matrix/<name>), on both databases via scripts/run_tests.sh.
#
#     bash scripts/test_matrix.sh [pytest args...]
#
# A combination whose interpreter is not installed is reported as skipped, not failed.
# MATRIX overrides the combinations: "name:python:django-spec ..." (see the default below).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

find_python() {  # find_python 3.12 -> path of a working interpreter of that version, or nothing
    local version=$1 candidate
    # pyenv's own builds first: its shims exist for every version but fail for inactive ones.
    for candidate in "$HOME"/.pyenv/versions/"$version".*/bin/python "/usr/bin/python$version" \
                     "$(command -v "python$version" 2>/dev/null || true)"; do
        [[ -n "$candidate" && -x "$candidate" ]] || continue
        if "$candidate" -c 'import venv' >/dev/null 2>&1; then echo "$candidate"; return 0; fi
    done
    return 0
}

MATRIX=${MATRIX:-"django42-py310:3.10:Django>=4.2,<5.0 django52-py311:3.11:Django>=5.2,<6.0 django6-py312:3.12:Django>=6.0,<7.0"}

failed=() passed=() skipped=()
for combo in $MATRIX; do
    IFS=: read -r name pyversion spec <<<"$combo"
    python=$(find_python "$pyversion")
    if [[ -z "$python" ]]; then
        echo "== $name: no Python $pyversion here, skipped"
        skipped+=("$name")
        continue
    fi
    venv="$ROOT/.venv-matrix/$name"
    echo "== $name: $($python --version) with '$spec'"
    if [[ ! -x "$venv/bin/python" ]]; then
        "$python" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install -q -e ".[test]" "$spec"
    echo "   $("$venv/bin/python" -c 'import django, eventsourcing; print("Django", django.get_version(), "/ eventsourcing", eventsourcing.__version__ if hasattr(eventsourcing, "__version__") else "")')"
    if PY="$venv/bin/python" bash scripts/run_tests.sh "$@"; then
        passed+=("$name")
    else
        failed+=("$name")
    fi
done

echo
echo "matrix: passed: ${passed[*]:-none}; failed: ${failed[*]:-none}; skipped: ${skipped[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
