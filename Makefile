# Every target sets up what it needs from a fresh clone: a virtualenv in $(VENV) with the package
# installed in editable mode plus only the extras the target needs (`make demo`: the package and
# its runtime dependencies, Django and eventsourcing, nothing else). The install is redone only
# when pyproject.toml changes (stamp files inside the venv).
#
#   make demo                 the example on a fresh SQLite database; installs the runtime only
#                             (8 packages, about 20 s of CPU from a fresh clone)
#   make test                 whole suite on SQLite, then on a throwaway PostgreSQL cluster
#                             (every test, the slow ones included: what CI runs)
#   make test-sqlite          the quick loop: SQLite only, without the tests marked slow
#                             (pytest -m "not slow"; about 5 s or more each: subprocesses, the
#                             browser tests, the packaging test, the biggest Hypothesis property)
#   make test-sqlite SLOW=1   SQLite only, every test
#   make test-postgres        PostgreSQL only (every test)
#   make test-citus           the suite on a throwaway 3-node Citus cluster (every test)
#   make test PYTEST_ARGS='-x -k history'
#   make test-sqlite PYTEST_ARGS='-k history'   still without the slow ones; a -k that selects
#                             only slow tests runs them, a -m of your own replaces "not slow"
#   make test-matrix          the suite under every other Django/Python pair of $(MATRIX), each
#                             in .venv-matrix/<name>; fails when an interpreter is missing
#   make admin-demo [PORT=8000] [HOST=127.0.0.1]   the example clinic's admin, login admin / admin
#   make bench | soak | docs | lint | clean
#
# The supported versions are MAIN_PAIR (the main venv's) plus MATRIX, below; pyproject.toml's
# classifiers name exactly these (tests/test_packaging.py checks it).

PYTHON ?= python3
# The pair the main venv runs, "name:python:django-spec": `python3` (3.11 on this machine and CI's)
# with the newest Django it installs. tests/test_packaging.py checks that .venv runs it.
MAIN_PAIR := main:3.11:Django>=5.2,<6.0
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# SLOW=1: `make test-sqlite` runs the tests marked slow too (scripts/run_tests.sh's SKIP_SLOW).
SLOW ?=

STAMP_RUNTIME := $(VENV)/.stamp-runtime
STAMP_TEST := $(VENV)/.stamp-test
STAMP_LINT := $(VENV)/.stamp-lint
STAMP_DOCS := $(VENV)/.stamp-docs
STAMP_BENCH := $(VENV)/.stamp-bench

.DEFAULT_GOAL := test
.PHONY: venv test test-sqlite test-postgres test-citus test-matrix demo admin-demo bench soak docs lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(STAMP_TEST)

# The package and its runtime dependencies only (what `pip install django-encounters` brings).
$(STAMP_RUNTIME): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(STAMP_LINT): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[lint]'
	touch $@

$(STAMP_BENCH): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

$(STAMP_DOCS): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

# run_tests.sh runs both backends and fails if either failed; PY tells it which interpreter to use.
test: $(STAMP_TEST)
	PY=$(abspath $(PY)) SKIP_SLOW=0 bash scripts/run_tests.sh $(PYTEST_ARGS)

test-sqlite: $(STAMP_TEST)
	PY=$(abspath $(PY)) BACKENDS=sqlite SKIP_SLOW=$(if $(filter 1,$(SLOW)),0,1) \
		bash scripts/run_tests.sh $(PYTEST_ARGS)

test-postgres: $(STAMP_TEST)
	PY=$(abspath $(PY)) BACKENDS=postgres SKIP_SLOW=0 bash scripts/run_tests.sh $(PYTEST_ARGS)

# The whole suite on a throwaway Citus cluster (a coordinator and 2 workers, the tables
# distributed with distribute_encounters); builds Citus from ../shared/vendor/citus when missing.
test-citus: $(STAMP_TEST)
	PY=$(abspath $(PY)) BACKENDS=citus SKIP_SLOW=0 bash scripts/run_tests.sh $(PYTEST_ARGS)

# The other supported Django/Python pairs, "name:python:django-spec" each, in their own
# virtualenvs, both databases (scripts/test_matrix.sh). Every interpreter must be installed
# (pyenv's ~/.pyenv/versions/3.X.*, /usr/bin/python3.X or python3.X on PATH): a missing one fails
# the target, it is never skipped. Python 3.13 runs Django 5.2, the LTS release (supported to
# April 2028), on the newest Python; Django 6.0 runs on 3.12.
MATRIX ?= django42-py310:3.10:Django>=4.2,<5.0 django6-py312:3.12:Django>=6.0,<6.1 \
	django52-py313:3.13:Django>=5.2,<6.0
test-matrix:
	MATRIX="$(MATRIX)" SKIP_SLOW=0 bash scripts/test_matrix.sh $(PYTEST_ARGS)

# The example project on a fresh SQLite database (see example/demo.py); needs the runtime only.
demo: $(STAMP_RUNTIME)
	$(PY) example/demo.py

# The example clinic in Django's admin (example/, docs/admin.md): migrate example/demo.sqlite3
# (kept between runs), seed it (seed_clinic adds only what is missing, and the superuser
# admin / admin when there is none), then serve it on http://$(HOST):$(PORT)/admin/.
# Needs only the runtime: the package and Django.
HOST ?= 127.0.0.1
PORT ?= 8000
admin-demo: $(STAMP_RUNTIME)
	$(PY) example/manage.py migrate --noinput --verbosity 0
	$(PY) example/manage.py seed_clinic --url http://$(HOST):$(PORT)/admin/
	$(PY) example/manage.py runserver $(HOST):$(PORT)

# Benchmarks on SQLite (WAL file), a throwaway PostgreSQL cluster and a throwaway 3-node Citus
# cluster (built when missing; BENCH_CITUS=0 leaves it out); BENCH_ARGS='--quick' for a smoke
# run, '--update-readme' to rewrite the tables in benchmarks/README.md. Prints one table per
# database: the raw-SQL floor, ours with seals off and on, CPU time per call, the peer
# (django-fsm-2 + django-fsm-log) and issue 23's goals (benchmarks/README.md explains them).
BENCH_ARGS ?=
BENCH_CITUS ?= 1
bench: $(STAMP_BENCH)
	PY=$(abspath $(PY)) BENCH_VIA_MAKE=1 BENCH_CITUS=$(BENCH_CITUS) bash -c 'source scripts/citus_cluster.sh \
		&& trap "pg_cluster_stop; citus_cluster_stop" EXIT && trap "exit 130" INT && trap "exit 143" TERM \
		&& if [ "$$BENCH_CITUS" = 1 ]; then citus_cluster_start && export BENCH_CITUS_PORT=$$PGPORT; fi \
		&& pg_cluster_start && "$$PY" -m benchmarks.run $(BENCH_ARGS)'

soak: $(STAMP_TEST)
	PY=$(abspath $(PY)) bash scripts/soak.sh

# The documentation site (mkdocs-material, API reference from the docstrings, the command
# reference from the commands' --help) into build/site; any warning fails the build.
docs: $(STAMP_DOCS)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint: $(STAMP_LINT)
	$(PY) -m ruff check src tests example benchmarks
	$(PY) -m ruff format --check src tests example benchmarks
	$(PY) -m mypy src

clean:
	rm -rf $(VENV) .venv-matrix build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		example/demo.sqlite3
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
