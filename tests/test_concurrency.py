"""Concurrency: 8 worker processes, each with its own database
connection, race ``transition()`` on shared and separate encounters, with and without
``expected_version``; afterwards nothing is lost or duplicated, every stream is gap-free and
verifies, every projection equals its replay, and the only failures are the allowed, typed ones.

The workload and the checks live in ``benchmarks/soak.py`` (``make soak`` runs the same thing
for longer); this module runs it briefly:

* on PostgreSQL against the test database (a ``transaction=True`` test, so the data the workers
  need is committed and they see it through their own connections);
* on SQLite against a temporary file (the in-memory test database cannot be shared between
  processes): there ``select_for_update`` is a no-op and writers are serialised by
  ``BEGIN IMMEDIATE`` instead, which is what the check proves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import django
import pytest
from benchmarks import soak
from django.db import connection

from tests.helpers import IS_POSTGRES

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("ENCOUNTERS_CONCURRENCY_SECONDS", 4))


def _database() -> dict:
    """The test database as the worker processes must see it (test-time NAME)."""
    s = connection.settings_dict
    return {
        "ENGINE": s["ENGINE"],
        "NAME": s["NAME"],
        "USER": s["USER"],
        "PASSWORD": s["PASSWORD"],
        "HOST": s["HOST"],
        "PORT": s["PORT"],
    }


def _explain(report: soak.Report) -> str:
    return json.dumps(report.as_dict(), indent=1, default=str)


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_eight_processes_race_on_postgresql():
    report = soak.run(_database(), workers=8, seconds=SECONDS, shared=3, own=20, seed=1)

    assert not report.problems, _explain(report)
    assert not report.unexpected, _explain(report)
    # Every committed transition is a row and every row was committed by someone.
    assert report.committed == report.rows > 8 * 20, _explain(report)
    # All three kinds of operation really happened, and so did contention.
    assert {"pingpong-ev", "pingpong", "counter"} <= set(report.ok), _explain(report)
    assert report.failures.get("pingpong-ev:ConcurrentTransitionError", 0) > 0, _explain(report)
    # Blind appends never failed: writers waited for the row lock rather than clashing.
    assert not any(k.startswith("counter") for k in report.failures), _explain(report)


@pytest.mark.slow
@pytest.mark.skipif(IS_POSTGRES, reason="the SQLite variant runs once, in the SQLite pass")
@pytest.mark.skipif(
    django.VERSION < (5, 1),
    reason="needs Django >= 5.1's SQLite transaction_mode=IMMEDIATE to serialize writers",
)
def test_eight_processes_race_on_a_sqlite_file(tmp_path):
    """SQLite ignores row locks; with ``transaction_mode=IMMEDIATE`` every ``atomic()`` takes
    the database's write lock at BEGIN, so writers are serialised all the same."""
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--sqlite",
            str(tmp_path / "race.sqlite3"),
            "--workers",
            "8",
            "--seconds",
            str(min(SECONDS, 3)),
            "--own",
            "5",
            "--seed",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-5000:] + proc.stdout[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["passed"] and summary["backend"] == "sqlite", summary
    assert summary["committed"] == summary["rows"] > 0, summary
    assert not summary["unexpected"] and not summary["problems"], summary
    assert not any(k.startswith("counter") for k in summary["failures"]), summary
