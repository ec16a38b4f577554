"""Concurrency soak: many worker *processes* race ``transition()`` on shared and separate
encounters, then every stream is checked against what the workers say they committed.

Used three ways:

* ``tests/test_concurrency.py`` calls :func:`run` inside a pytest ``transaction=True`` test on
  PostgreSQL (the workers connect to the test database) for a few seconds;
* ``make soak`` runs ``python -m benchmarks.soak --seconds N`` against a throwaway PostgreSQL
  cluster (``scripts/soak.sh``) — the same check, longer;
* ``python -m benchmarks.soak --sqlite PATH`` runs it on a SQLite file (writers serialised by
  ``BEGIN IMMEDIATE``), which the test suite also does briefly.

The workload (all three definitions below, every worker):

* ``pingpong-ev``: read an encounter of the ping-pong definition (``a <-> b``), then move it to
  the other state with ``expected_version`` = the version read. A concurrent writer in between
  must give ``ConcurrentTransitionError`` (it is checked before the edge), nothing else;
* ``pingpong``: the same without ``expected_version``. The row lock serialises writers and the
  engine decides on the locked, fresh row: a caller whose read went stale is refused with
  ``InvalidTransitionError`` for the edge ``x -> x`` (the other writer already made the move) —
  the only failure allowed here, and it writes nothing;
* ``counter``: blind appends on a self-loop definition (``open -> open``), a quarter of them
  backdated into the middle of the timeline (the slow path that loads the stream under the
  lock). These must never fail: writers wait for the lock instead of clashing on the sequence.

Shared encounters (a few, every worker hits them) see heavy contention; each worker also has
its own encounters (no contention, throughput). Afterwards, from the database alone:

* the ``(encounter, sequence)`` pairs the workers committed are exactly the rows in the table
  (nothing lost, nothing duplicated, nothing written by a failed call);
* every stream is gap-free (1..n), every row's hash chain and ``from_state`` verify (the
  engine's own verifying replay), and every projection (state, version, timeline end, head
  hash) equals the replay of its stream, and also a naive fold written here;
* the only failures are the ones allowed above, and each one was raised to the caller.

Exit status of ``python -m benchmarks.soak``: 0 when every check passed, 1 otherwise; the last
line of stdout is a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import django

ROOT = Path(__file__).resolve().parent.parent

PINGPONG = {
    "name": "Soak ping-pong",
    "code": "SOAK_PINGPONG",
    "states": ["a", "b"],
    "initial_state": "a",
    "final_states": [],
    "transitions": {"a": ["b"], "b": ["a"]},
}
COUNTER = {
    "name": "Soak counter",
    "code": "SOAK_COUNTER",
    "states": ["open"],
    "initial_state": "open",
    "final_states": [],
    "transitions": {"open": ["open"]},
}
OTHER = {"a": "b", "b": "a"}


# ---------------------------------------------------------------------------------------------
# Django configuration for standalone processes (workers, `python -m benchmarks.soak`).
# ---------------------------------------------------------------------------------------------


def database_from_env(sqlite_path: str | None = None) -> dict[str, Any]:
    """A Django ``DATABASES['default']`` dict: a SQLite file, or PostgreSQL from libpq env."""
    if sqlite_path:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": sqlite_path,
            # Writers take the lock at BEGIN and wait for each other (Django >= 5.1).
            "OPTIONS": (
                {"transaction_mode": "IMMEDIATE", "timeout": 60}
                if django.VERSION >= (5, 1)
                else {"timeout": 60}
            ),
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "postgres"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
    }


def configure(database: dict[str, Any], extra_apps: tuple[str, ...] = ()) -> None:
    """Configure and set up Django in this process for ``database`` (idempotent), with
    ``extra_apps`` installed after the package."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="soak",
            USE_TZ=True,
            TIME_ZONE="UTC",
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            INSTALLED_APPS=[
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "django_encounters",
                *extra_apps,
            ],
            DATABASES={"default": database},
        )
    django.setup()


def _sqlite_wal(database: dict[str, Any]) -> None:
    from django.db import connection

    if database["ENGINE"].endswith("sqlite3"):
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")


# ---------------------------------------------------------------------------------------------
# Fixture data.
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Which encounters exist and who may touch which (ids as strings)."""

    shared_pingpong: list[str]
    shared_counter: list[str]
    own_pingpong: dict[int, list[str]]  # worker index -> encounter ids
    own_counter: dict[int, list[str]]


def create_data(workers: int, shared: int = 3, own: int = 20) -> Plan:
    """Create the definitions and encounters (committed: call outside any transaction)."""
    from django.contrib.auth.models import User

    from django_encounters.models import EncounterDefinition
    from django_encounters.services import create_encounter

    pingpong, _ = EncounterDefinition.objects.get_or_create(
        code=PINGPONG["code"], defaults=PINGPONG
    )
    counter, _ = EncounterDefinition.objects.get_or_create(code=COUNTER["code"], defaults=COUNTER)
    subject = User.objects.create_user(username=f"soak-{time.time_ns()}", password=None)

    def make(definition: Any, n: int) -> list[str]:
        return [str(create_encounter(definition, subject).pk) for _ in range(n)]

    return Plan(
        shared_pingpong=make(pingpong, shared),
        shared_counter=make(counter, max(1, shared // 2)),
        own_pingpong={w: make(pingpong, own) for w in range(workers)},
        own_counter={w: make(counter, max(1, own // 4)) for w in range(workers)},
    )


# ---------------------------------------------------------------------------------------------
# The worker (a separate process: `python -m benchmarks.soak worker`).
# ---------------------------------------------------------------------------------------------


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    configure(spec["database"])
    from django.db import close_old_connections

    from django_encounters.exceptions import ConcurrentTransitionError, InvalidTransitionError
    from django_encounters.models import Encounter
    from django_encounters.services import transition

    rng = random.Random(spec["seed"])
    shared_pp, shared_ct = spec["shared_pingpong"], spec["shared_counter"]
    own_pp, own_ct = spec["own_pingpong"], spec["own_counter"]
    p_shared = spec.get("p_shared", 0.5)

    committed: list[tuple[str, int]] = []
    ok: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    unexpected: list[str] = []
    stale_reads = 0

    # Warm up the connection before the start line so every worker starts racing at once.
    Encounter.objects.filter(pk=shared_pp[0]).exists()
    print("ready", flush=True)
    sys.stdin.readline()  # "go"

    deadline = time.monotonic() + spec["seconds"]
    ops = 0
    while time.monotonic() < deadline and ops < spec.get("max_ops", 10**9):
        ops += 1
        roll = rng.random()
        kind = "counter" if roll < 0.25 else ("pingpong-ev" if roll < 0.625 else "pingpong")
        if kind == "counter":
            pool = shared_ct if rng.random() < p_shared else own_ct
        else:
            pool = shared_pp if rng.random() < p_shared else own_pp
        pk = rng.choice(pool)
        try:
            enc = Encounter.objects.get(pk=pk)
            if kind == "counter":
                backdate = rng.random() < 0.25
                effective_at = None
                if backdate and enc.timeline_end_at is not None:
                    effective_at = enc.timeline_end_at - timedelta(seconds=rng.uniform(0.001, 5))
                record = transition(
                    enc, "open", effective_at=effective_at, reason=f"w{spec['index']}"
                )
            elif kind == "pingpong-ev":
                record = transition(enc, OTHER[enc.state], expected_version=enc.version)
            else:
                record = transition(enc, OTHER[enc.state])
        except ConcurrentTransitionError as exc:
            if kind == "pingpong-ev" and exc.expected_version is not None:
                failures[f"{kind}:ConcurrentTransitionError"] += 1
            else:  # a sequence clash: writers did not wait for the lock
                unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        except InvalidTransitionError as exc:
            if kind == "pingpong" and exc.from_state == exc.to_state:
                failures[f"{kind}:InvalidTransitionError(stale read)"] += 1
                stale_reads += 1
            else:
                unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - everything else is a finding
            unexpected.append(f"{kind}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
            close_old_connections()
            continue
        committed.append((pk, record.sequence))
        ok[kind] += 1
    return {
        "index": spec["index"],
        "ops": ops,
        "committed": committed,
        "ok": dict(ok),
        "failures": dict(failures),
        "unexpected": unexpected[:50],
        "unexpected_count": len(unexpected),
    }


def hold_main(spec: dict[str, Any]) -> None:
    """Fault injection: transition an encounter inside an outer transaction and then hang
    holding its row lock (row inserted, projection updated, nothing committed) until killed."""
    configure(spec["database"])
    from django.db import transaction

    from django_encounters.models import Encounter
    from django_encounters.services import transition

    with transaction.atomic():
        enc = Encounter.objects.get(pk=spec["encounter"])
        record = transition(enc, spec["to_state"])
        print(json.dumps({"holding": True, "sequence": record.sequence}), flush=True)
        time.sleep(spec.get("hold_seconds", 120))
    print(json.dumps({"holding": False}), flush=True)  # pragma: no cover - killed before


# ---------------------------------------------------------------------------------------------
# Orchestration and checks (in the parent process, Django configured for the same database).
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    workers: int
    seconds: float
    elapsed: float = 0.0
    ops: int = 0
    committed: int = 0
    rows: int = 0
    encounters: int = 0
    ok: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and not self.unexpected and self.committed > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "workers": self.workers,
            "seconds": self.seconds,
            "elapsed": round(self.elapsed, 2),
            "ops": self.ops,
            "committed": self.committed,
            "rows": self.rows,
            "encounters": self.encounters,
            "transitions_per_second": round(self.committed / self.elapsed, 1)
            if self.elapsed
            else 0,
            "ok": self.ok,
            "failures": self.failures,
            "unexpected": self.unexpected[:20],
            "problems": self.problems[:20],
        }


def worker_command() -> list[str]:
    return [sys.executable, "-m", "benchmarks.soak", "worker"]


def spawn(kind: str, spec: dict[str, Any]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.soak", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return proc


def run(
    database: dict[str, Any],
    *,
    workers: int = 8,
    seconds: float = 5.0,
    shared: int = 3,
    own: int = 20,
    seed: int = 0,
    max_ops: int | None = None,
    timeout: float | None = None,
) -> Report:
    """Create the data, race ``workers`` processes for ``seconds``, check everything.

    Django must already be configured in this process for ``database`` (the same one the
    workers will use), and data created here must be committed (no surrounding transaction).
    """
    plan = create_data(workers, shared=shared, own=own)
    report = Report(workers=workers, seconds=seconds)
    procs: list[subprocess.Popen] = []
    try:
        for index in range(workers):
            spec = {
                "database": database,
                "index": index,
                "seed": seed * 1000 + index,
                "seconds": seconds,
                "shared_pingpong": plan.shared_pingpong,
                "shared_counter": plan.shared_counter,
                "own_pingpong": plan.own_pingpong[index],
                "own_counter": plan.own_counter[index],
            }
            if max_ops is not None:
                spec["max_ops"] = max_ops
            procs.append(spawn("worker", spec))
        limit = timeout if timeout is not None else 60 + seconds * 2
        _await_line(procs, "ready", limit)
        started = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=limit)
            if proc.returncode != 0:
                report.problems.append(f"worker exited {proc.returncode}: {err.strip()[-2000:]}")
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
        report.elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    committed: list[tuple[str, int]] = []
    ok: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for result in results:
        report.ops += result["ops"]
        committed.extend((pk, seq) for pk, seq in result["committed"])
        ok.update(result["ok"])
        failures.update(result["failures"])
        report.unexpected.extend(f"worker {result['index']}: {u}" for u in result["unexpected"])
        if result["unexpected_count"] > len(result["unexpected"]):
            report.unexpected.append(
                f"worker {result['index']}: … {result['unexpected_count']} in all"
            )
    report.committed = len(committed)
    report.ok, report.failures = dict(ok), dict(failures)

    all_ids = (
        plan.shared_pingpong
        + plan.shared_counter
        + [pk for ids in plan.own_pingpong.values() for pk in ids]
        + [pk for ids in plan.own_counter.values() for pk in ids]
    )
    report.encounters = len(all_ids)
    check(all_ids, committed, report)
    return report


def _await_line(procs: list[subprocess.Popen], expected: str, limit: float) -> None:
    """Wait until every process printed ``expected`` (or fail with its stderr)."""
    deadline = time.monotonic() + limit
    for proc in procs:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker did not print {expected!r} within {limit}s")
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"worker died before {expected!r}: {err.strip()[-3000:]}")
            if line.strip() == expected:
                break
        sel.close()


def naive_fold(origin: str, rows: list[tuple[int, str, Any]]) -> str:
    """The state after a stream: the to_state of the last row by (effective_at, sequence)."""
    if not rows:
        return origin
    return max(rows, key=lambda r: (r[2], r[0]))[1]


def check(encounter_ids: list[str], committed: list[tuple[str, int]], report: Report) -> None:
    """Compare the database with what the workers committed; append problems to ``report``."""
    from django_encounters.engine import StreamRow, verify_stream
    from django_encounters.models import Encounter, EncounterTransition
    from django_encounters.store.schema import ROW_COLUMNS

    problems = report.problems
    claimed = Counter(committed)
    duplicates = [pair for pair, n in claimed.items() if n > 1]
    if duplicates:
        problems.append(
            f"{len(duplicates)} (encounter, sequence) pairs claimed twice: {duplicates[:5]}"
        )

    rows_by_encounter: dict[str, list[tuple]] = defaultdict(list)
    rows = EncounterTransition.objects.filter(encounter_id__in=encounter_ids).order_by(
        "encounter_id", "sequence"
    )
    for values in rows.values_list("encounter_id", *ROW_COLUMNS).iterator(chunk_size=5000):
        rows_by_encounter[str(values[0])].append(values[1:])
    stored = {(pk, v[0]) for pk, vs in rows_by_encounter.items() for v in vs}
    report.rows = len(stored)
    lost = set(claimed) - stored
    extra = stored - set(claimed)
    if lost:
        problems.append(
            f"{len(lost)} committed transitions are not in the table: {sorted(lost)[:5]}"
        )
    if extra:
        problems.append(f"{len(extra)} rows nobody reported committing: {sorted(extra)[:5]}")

    encounters = Encounter.all_objects.select_related("definition").in_bulk(encounter_ids)
    for pk in encounter_ids:
        enc = encounters[_uuid(pk)]
        stream = rows_by_encounter.get(pk, [])
        sequences = [v[0] for v in stream]
        if sequences != list(range(1, len(stream) + 1)):
            problems.append(f"encounter {pk}: stream is not 1..n: {sequences[:10]}…")
        versions = {v.number: v.rules() for v in enc.definition.versions.all()}
        replay = verify_stream(
            enc.genesis(), enc.genesis_hash, (StreamRow(*v) for v in stream), versions.get
        )
        if replay.anomalies:
            problems.append(f"encounter {pk}: anomalies {[str(a) for a in replay.anomalies[:3]]}")
        expected_state = naive_fold(enc.origin_state, [(v[0], v[2], v[3]) for v in stream])
        end_at = max((v[3] for v in stream), default=None)
        head = stream[-1][ROW_COLUMNS.index("hash")] if stream else enc.genesis_hash
        actual = (enc.state, enc.version, enc.timeline_end_at, enc.head_hash)
        if actual != (
            replay.state,
            replay.version,
            replay.timeline.end_at,
            replay.timeline.head_hash,
        ):
            problems.append(f"encounter {pk}: projection {actual} != replay")
        if actual != (expected_state, len(stream), end_at, head):
            problems.append(
                f"encounter {pk}: projection {actual} != naive fold "
                f"{(expected_state, len(stream), end_at, head)}"
            )


def _uuid(pk: str) -> Any:
    import uuid

    return uuid.UUID(pk)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _prepare_standalone(args: argparse.Namespace) -> dict[str, Any]:
    database = database_from_env(args.sqlite)
    configure(database)
    _sqlite_wal(database)
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    return database


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("worker", "hold"):
        spec = json.loads(sys.stdin.readline())
        if argv[0] == "hold":
            hold_main(spec)
            return 0
        print(json.dumps(worker_main(spec)), flush=True)
        return 0

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Race worker processes on transition() and check every stream afterwards. "
        "PostgreSQL from the libpq environment (PGHOST, PGPORT, PGUSER, PGDATABASE) unless "
        "--sqlite is given.",
    )
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SOAK_WORKERS", 8)))
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 60)))
    parser.add_argument(
        "--shared",
        type=int,
        default=int(os.environ.get("SOAK_SHARED", 3)),
        help="shared ping-pong encounters (every worker hits them)",
    )
    parser.add_argument(
        "--own",
        type=int,
        default=int(os.environ.get("SOAK_OWN", 20)),
        help="separate ping-pong encounters per worker",
    )
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", 0)))
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("SOAK_ROUNDS", 1)),
        help="repeat the race this many times (fresh encounters each round)",
    )
    parser.add_argument(
        "--sqlite",
        metavar="PATH",
        help="use a SQLite file instead of PostgreSQL ('-' for a temporary one)",
    )
    args = parser.parse_args(argv)
    tmp = None
    if args.sqlite == "-":
        tmp = tempfile.TemporaryDirectory(prefix="encounters-soak-")
        args.sqlite = os.path.join(tmp.name, "soak.sqlite3")
    database = _prepare_standalone(args)
    backend = "sqlite" if args.sqlite else "postgresql"
    failed = False
    for round_ in range(args.rounds):
        report = run(
            database,
            workers=args.workers,
            seconds=args.seconds,
            shared=args.shared,
            own=args.own,
            seed=args.seed + round_,
        )
        summary = report.as_dict()
        summary["backend"] = backend
        summary["round"] = round_ + 1
        print(
            f"soak round {round_ + 1}/{args.rounds} on {backend}: "
            f"{'PASSED' if report.passed else 'FAILED'} - {report.committed} transitions committed "
            f"by {args.workers} workers in {report.elapsed:.1f}s "
            f"({summary['transitions_per_second']}/s) over {report.encounters} encounters; "
            f"refusals {report.failures}; rows {report.rows}",
            file=sys.stderr,
        )
        for line in report.problems[:20] + report.unexpected[:20]:
            print(f"  {line}", file=sys.stderr)
        print(json.dumps(summary), flush=True)
        failed = failed or not report.passed
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
