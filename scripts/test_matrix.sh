#!/usr/bin/env bash
# Runs the suite under the supported Django/Python pairs other than the main venv's, each in its
# own virtualenv (.venv-matrix/<name>), on both databases via scripts/run_tests.sh.
#
#     MATRIX="name:python:django-spec ..." bash scripts/test_matrix.sh [pytest args...]
#     make test-matrix                  (passes the Makefile's MATRIX, the one list of them)
#
# Every interpreter must be installed: this script never downloads one (only PyPI and Debian's
# packages are reachable from CI, and neither ships these Pythons), it looks for pyenv's builds
# (~/.pyenv/versions/3.X.*), /usr/bin/python3.X and python3.X on PATH. A missing interpreter is
# a failure, named in the summary, never a skip: a matrix that tested nothing must not pass.
# MATRIX_CHECK_ONLY=1 only looks for the interpreters (what .ci/run does first, so that a missing
# one fails CI in seconds rather than after the rest of the suite).
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

if [[ -z "${MATRIX:-}" ]]; then
    echo "test_matrix: MATRIX is not set; run 'make test-matrix' (the Makefile's MATRIX lists" \
        "the combinations) or set MATRIX='name:python:django-spec ...'" >&2
    exit 2
fi

failed=() passed=() missing=()
for combo in $MATRIX; do
    IFS=: read -r name pyversion spec <<<"$combo"
    if [[ -z "$name" || -z "$pyversion" || -z "$spec" ]]; then
        echo "test_matrix: '$combo' is not name:python:django-spec" >&2
        exit 2
    fi
    python=$(find_python "$pyversion")
    if [[ -z "$python" ]]; then
        echo "== $name: FAILED: no Python $pyversion with a working venv module here (looked in" \
            "$HOME/.pyenv/versions/$pyversion.*, /usr/bin/python$pyversion and PATH); install" \
            "it (e.g. 'pyenv install $pyversion') or take $name out of the Makefile's MATRIX and" \
            "pyproject.toml's classifiers" >&2
        missing+=("$name")
        continue
    fi
    if [[ "${MATRIX_CHECK_ONLY:-0}" == 1 ]]; then
        echo "== $name: $("$python" --version) at $python"
        passed+=("$name")
        continue
    fi
    venv="$ROOT/.venv-matrix/$name"
    echo "== $name: $("$python" --version) with '$spec'"
    if [[ ! -x "$venv/bin/python" ]] && ! "$python" -m venv "$venv"; then
        echo "== $name: FAILED: could not create $venv with $python" >&2
        failed+=("$name")
        continue
    fi
    if ! "$venv/bin/python" -m pip install -q -e ".[test]" "$spec"; then
        echo "== $name: FAILED: could not install the package with its test extra and '$spec'" >&2
        failed+=("$name")
        continue
    fi
    echo "   $("$venv/bin/python" -c 'import django, eventsourcing; print("Django", django.get_version(), "/ eventsourcing", eventsourcing.__version__ if hasattr(eventsourcing, "__version__") else "")')"
    # ENCOUNTERS_TEST_MATRIX: tests/test_packaging.py checks this venv runs the pair it names.
    if ENCOUNTERS_TEST_MATRIX="$name" PY="$venv/bin/python" bash scripts/run_tests.sh "$@"; then
        passed+=("$name")
    else
        failed+=("$name")
    fi
done

echo
what=passed
[[ "${MATRIX_CHECK_ONLY:-0}" == 1 ]] && what="interpreter found"
echo "matrix: $what: ${passed[*]:-none}; failed: ${failed[*]:-none};" \
    "interpreter missing (failed): ${missing[*]:-none}"
[[ ${#failed[@]} -eq 0 && ${#missing[@]} -eq 0 ]]
