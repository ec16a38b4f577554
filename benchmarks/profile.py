"""Where the microseconds of one ``transition()`` go: each step of the write path timed on its
own, beside the raw-SQL floor of ``benchmarks.run`` measured in the same process.

    python -m benchmarks.profile                      # SQLite (WAL file, synchronous=NORMAL)
    python -m benchmarks.profile --synchronous FULL
    python -m benchmarks.profile --backend postgresql # PGHOST/PGPORT/PGUSER, as benchmarks.run
    python -m benchmarks.profile --json out.json
    python -m benchmarks.profile --workload visit     # benchmarks.run's transition() line

The steps are the package's own functions (``store.lock_encounter``, ``store.insert_row``, …),
wrapped with a timer for the run; the transaction's ``COMMIT`` is timed on the connection; what
is left of the call (Django's ``atomic()``, argument checks, the clock, the aggregate restored
from the projection, the rules, signals) is the remainder. Each step's own SQL is timed
separately (``execute`` on the driver cursor under Django's wrapper), so a step's time splits
into the database's and ours. Only public or store functions are wrapped, so the same script
profiles an older commit of the package too (``git worktree`` + ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

#: The steps timed, in the order a transition runs them: (label, module path, attribute).
STEPS = [
    ("lock: SELECT … FOR UPDATE, instances, proof", "django_encounters.store", "lock_encounter"),
    ("decide (engine: edge, backdating, hash)", "django_encounters.engine", "EncounterTimeline"),
    ("validators", "django_encounters.services", "run_validators"),
    ("the new row's model instance", "django_encounters.store", "record_from_row"),
    ("INSERT the row (signals, values, statement)", "django_encounters.store", "insert_row"),
    ("UPDATE the projection (values, statement)", "django_encounters.store", "update_projection"),
]


def _wrap(owner: Any, name: str, label: str, spent: Counter) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - started

    setattr(owner, name, timed)


def _instrument(spent: Counter, sql: Counter) -> None:
    """Wrap the steps, the commit and the driver's execute (under Django's cursor wrapper, so
    ``sql`` is the database's time plus the driver's)."""
    import importlib

    from django.db import connection

    for label, module, name in STEPS:
        owner = importlib.import_module(module)
        if name == "EncounterTimeline":
            _wrap(owner.EncounterTimeline, "decide", label, spent)
        else:
            _wrap(owner, name, label, spent)
    connection.ensure_connection()
    real = connection.connection
    commit = real.commit

    class Driver:
        """The driver connection, its ``commit`` and cursors' ``execute`` timed."""

        def __getattr__(self, attr: str) -> Any:
            return getattr(real, attr)

        def __setattr__(self, attr: str, value: Any) -> None:  # autocommit, isolation_level
            setattr(real, attr, value)

        def commit(self) -> None:
            started = time.perf_counter()
            try:
                commit()
            finally:
                spent["COMMIT"] += time.perf_counter() - started

        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            return TimedCursor(real.cursor(*args, **kwargs))

    class TimedCursor:
        def __init__(self, cursor: Any) -> None:
            self._cursor = cursor

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._cursor, attr)

        def __iter__(self) -> Any:
            return iter(self._cursor)

        def execute(self, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return self._cursor.execute(*args)
            finally:
                sql["statements"] += time.perf_counter() - started

    connection.connection = Driver()


def profile(backend: str, synchronous: str, total: int, workload: str = "pingpong") -> dict:
    from benchmarks.run import (
        OTHER,
        Schema,
        _visits,
        bench_transition,
        bench_transition_visit,
        configure,
        database_for,
        make_definition,
        make_visit_definition,
        subject,
    )

    tmp = tempfile.TemporaryDirectory(prefix="encounters-profile-")
    if backend == "sqlite":
        database = database_for("sqlite", os.path.join(tmp.name, "profile.sqlite3"))
    else:
        database = database_for("postgresql")
    configure(database)
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0, interactive=False)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA synchronous={synchronous}")
    from django_encounters.services import create_encounter, transition

    definition, who = make_definition(), subject()
    # The floor and ours, alternating, as in benchmarks.run.
    if workload == "visit":
        from benchmarks.definitions import VISIT_PATH

        floor = bench_transition_visit(Schema(), total)[0]
        made = _visits(make_visit_definition(), (total + 400) // len(VISIT_PATH) + 100)
        # in blocks of 100 visits: every visit's first step, then the next, as a clinic
        moves = [
            (enc, to)
            for start in range(0, len(made), 100)
            for to in VISIT_PATH
            for enc in made[start : start + 100]
        ]
    else:
        floor = bench_transition(Schema(), definition, total)
        pool = [create_encounter(definition, who) for _ in range(100)]
    done = [0]

    def run(n: int) -> float:
        started = time.perf_counter()
        for i in range(n):
            if workload == "visit":
                transition(*moves[done[0] + i])
            else:
                enc = pool[i % len(pool)]
                transition(enc, OTHER[enc.state])
        done[0] += n
        return time.perf_counter() - started

    run(300)  # warm up
    spent: Counter = Counter()
    sql: Counter = Counter()
    _instrument(spent, sql)
    run(100)
    spent.clear()
    sql.clear()
    elapsed = run(total)
    per = {label: seconds / total * 1e6 for label, seconds in spent.items()}
    whole = elapsed / total * 1e6
    result = {
        "backend": backend,
        "synchronous": synchronous if backend == "sqlite" else None,
        "workload": workload,
        "transitions": total,
        "floor_us": floor["floor_per_op_us"],
        "ours_us": floor["ours_per_op_us"],
        "instrumented_us": whole,
        "steps_us": per,
        "statements_us": sql["statements"] / total * 1e6,
        "remainder_us": whole - sum(per.values()),
    }
    connection.close()
    tmp.cleanup()
    return result


def report(result: dict) -> str:
    where = result["backend"] + (
        f" (WAL, synchronous={result['synchronous']})" if result["synchronous"] else ""
    )
    lines = [
        f"transition() on {where}, {result.get('workload', 'pingpong')} workload: "
        f"{result['ours_us']:.0f} µs/op "
        f"(raw-SQL floor {result['floor_us']:.0f} µs/op, ratio "
        f"{result['floor_us'] / result['ours_us']:.2f}×; {result['instrumented_us']:.0f} µs/op "
        "with the timers below)",
        "",
        "| step | µs per transition | share |",
        "|---|---:|---:|",
    ]
    whole = result["instrumented_us"]
    rows: list[tuple[str, float]] = [
        (label, result["steps_us"].get(label, 0.0)) for label, *_ in STEPS
    ]
    rows += [
        ("COMMIT", result["steps_us"].get("COMMIT", 0.0)),
        ("the rest: atomic(), arguments, clock, snapshot, rules, signals", result["remainder_us"]),
    ]
    for label, us in rows:
        lines.append(f"| {label} | {us:.1f} | {us / whole:.0%} |")
    lines.append(
        "| *of which the statements: BEGIN, SELECT, INSERT, UPDATE (driver execute)* | "
        f"{result['statements_us']:.1f} | {result['statements_us'] / whole:.0%} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="NORMAL")
    parser.add_argument("--transitions", type=int, default=3000)
    parser.add_argument(
        "--workload",
        choices=("pingpong", "visit"),
        default="pingpong",
        help="visit: visits through the example clinic's definition with its validators, "
        "benchmarks.run's transition() line; pingpong: a pool of two-state encounters",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    result = profile(args.backend, args.synchronous, args.transitions, args.workload)
    print(report(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
