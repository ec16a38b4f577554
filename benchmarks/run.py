"""Benchmarks: django-encounters against a raw-SQL floor, on SQLite (WAL, a temp file) and on
PostgreSQL.

    python -m benchmarks.run                 # both backends (PostgreSQL if PGHOST is set)
    python -m benchmarks.run --quick         # small sizes, a smoke run (about a minute)
    python -m benchmarks.run --backend sqlite
    make bench                               # venv + throwaway PostgreSQL cluster + this

Every figure is a ratio measured in the same run: ``ratio = floor time / our time`` (1.0 = as
fast as raw SQL; higher is better). The floor uses the DB-API alone (the driver connection
Django opened, a plain cursor, no ORM) on the same schema, indexes and triggers:

* ``transition()``: visits made by ``create_encounter`` walked through the example clinic's
  definition with its validators (``benchmarks/definitions.py``): the first step, then the later
  ones (a sub-line each), and the ping-pong pool of earlier runs on a line of its own. The
  floor: one transaction of lock/select (encounter joined with its definition, ``FOR UPDATE`` on
  PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) + INSERT of the row + UPDATE of the projection, on
  visits made the same way. The floor computes no hash, no seal and runs no state-machine logic
  or validator: that is ours;
* ``get_state_at()``: the single indexed ``ORDER BY effective_at DESC, sequence DESC LIMIT 1``;
* ``get_encounter_history()``: the single indexed ``SELECT … ORDER BY sequence`` (``fetchall``);
* rebuild of N transitions over N/5 encounters (every projection drifted first, so every one
  is rewritten): one ``UPDATE … FROM`` setting the last state per encounter. Ours replays every
  stream through the engine *and verifies it* (gap-free, from_state, edges, hash chain). Peak
  memory (RSS of a fresh process running the rebuild) at 100k and 1M rows; the big rebuild
  again with ``jobs=2`` (two worker processes, ``--jobs 2``);
* ``Encounter.objects.as_of(t)`` over all encounters (``values_list('pk', 'state_at')``): the
  hand-written correlated-subquery SQL, ``fetchall``;
* event-log export (``export_event_log``, XES at both sizes, CSV at the big one) to a file, in
  a fresh process: rows/s and peak memory (RSS), flat from 100k to 1M rows. The floor: one
  ``SELECT`` of every row in trace order through a plain cursor, written with ``csv.writer``.

Sizes (flags or environment): ``--transitions`` (BENCH_TRANSITIONS, default 2000), ``--reads``
(BENCH_READS, 5000), ``--encounters`` (BENCH_ENCOUNTERS, 200000: the as-of set and the big
rebuild), ``--rows-per-encounter`` (BENCH_ROWS_PER_ENCOUNTER, 5), ``--small-encounters``
(BENCH_SMALL_ENCOUNTERS, 20000: the first memory point). ``--quick`` divides them.

Per-call figures: the floor, ours with seals off and ours with seals on (``SEALS``) in rotating
chunks, wall-clock and CPU time (``time.process_time``) each. Output: one table per database
(``backend_table``), each line with the floor, ours seals off and on, the CPU times and ratios,
the peer (``benchmarks/peers.py``'s run, same database and mode) where it has the operation,
the goal (``TARGETS``) and whether it is met in both measures (``verdict``).

SQLite's per-call figures run with ``synchronous=NORMAL`` and ``transition()`` once more under
the default ``FULL``; ``BENCH_PG_PREPARED=1`` makes PostgreSQL's connection use server-side
binding with prepared statements (``docs/guides/databases.md``), the floor's cursor included.

``--only admin`` runs only the admin's pages (``benchmarks/admin_pages.py``, its own data and
process per backend; also part of a full run).

``--only export`` generates the data and measures the export alone (no rebuild, no per-call
figures); ``--only rebuild`` the rebuilds alone (both sizes, and ``--jobs 2`` at the big one),
``--rebuild-rounds N`` (BENCH_REBUILD_ROUNDS, 1) running each rebuild and its floor N times,
alternating, averaged. Output: a table on stdout; ``--json PATH`` writes the raw results;
``--update-readme`` rewrites the results section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UTC = dt_timezone.utc
OTHER = {"a": "b", "b": "a"}
PINGPONG = {
    "name": "Bench ping-pong",
    "code": "BENCH",
    "states": ["a", "b"],
    "initial_state": "a",
    "final_states": [],
    "transitions": {"a": ["b"], "b": ["a"]},
}
#: Goals (ratio floor/ours must be at least this), per backend: issue 23's (SQLite with WAL and
#: synchronous=NORMAL; PostgreSQL; Citus held to PostgreSQL's but for the rebuild), issue 4's
#: for as_of. A per-call goal holds with seals off and on, in wall-clock and (where the floor's
#: CPU is in this process: SQLite) in CPU time; on PostgreSQL ``transition()`` must also be
#: faster than the peer (django-fsm-2 + django-fsm-log, benchmarks/peers.py, same database).
TARGETS = {
    "sqlite": {
        "transition": 0.5,
        "get_state_at": 0.4,
        "history": 0.3,
        "rebuild": 0.25,
        "as_of": 0.5,
    },
    "postgres": {
        "transition": 0.6,
        "get_state_at": 0.6,
        "history": 0.6,
        "rebuild": 0.25,
        "as_of": 0.5,
    },
}
TARGETS["citus"] = {**TARGETS["postgres"], "rebuild": 0.15}
#: Where the floor's CPU time is in this process (SQLite's engine runs in it), so that the CPU
#: ratio is held to the goal; on PostgreSQL and Citus the server's CPU is not in the client's
#: ``time.process_time``: the CPU ratio is printed there, not held.
CPU_HELD = {"sqlite"}
#: Where ``transition()`` must also be faster than the peer.
BEAT_PEER = {"postgres": ("transition",)}


def set_targets(backend: str, figures: list[dict]) -> None:
    """Give each figure that has a goal (its ``goal`` key: a line under SQLite's default
    ``synchronous=FULL``, an export, a ping-pong or a sub-line has none) the goal's ratio on
    ``backend``, and whether it must beat the peer there."""
    for f in figures:
        key = f.get("goal")
        if key is None:
            continue
        f["target"] = TARGETS[backend][key]
        if key in BEAT_PEER.get(backend, ()):
            f["beat_peer"] = True


# ---------------------------------------------------------------------------------------------
# Django in this process.
# ---------------------------------------------------------------------------------------------


def database_for(backend: str, sqlite_path: str | None = None, pg_name: str | None = None) -> dict:
    if backend == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": sqlite_path,
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 60},
        }
    if backend == "citus":  # the coordinator of scripts/citus_cluster.sh, its ready database
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("BENCH_CITUS_DATABASE", "encounters"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("BENCH_CITUS_HOST", "127.0.0.1"),
            "PORT": os.environ["BENCH_CITUS_PORT"],
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        # BENCH_PG_PREPARED=1: server-side binding with every statement prepared from its first
        # execution (docs/guides/databases.md); the floor's cursor then prepares too.
        "OPTIONS": (
            {"server_side_binding": True, "prepare_threshold": 1}
            if os.environ.get("BENCH_PG_PREPARED") == "1"
            else {}
        ),
        "NAME": pg_name or os.environ.get("PGDATABASE", "postgres"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
    }


def configure(database: dict) -> None:
    from benchmarks.soak import configure as soak_configure

    soak_configure(database)
    from django.db import connection

    connection.ensure_connection()
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")


def raw_connection() -> Any:
    from django.db import connection

    connection.ensure_connection()
    return connection.connection


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    """Current resident set size (KiB)."""
    current = _status_kib("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); ``ru_maxrss`` cannot be used here: it
    survives ``execve`` and would report the parent's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_kib() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


class Schema:
    """Table and column names from the models (so the floor uses exactly our schema)."""

    def __init__(self) -> None:
        from django.db import connection

        from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition

        qn = connection.ops.quote_name
        self.vendor = connection.vendor
        self.qn = qn
        self.enc = qn(Encounter._meta.db_table)
        self.tr = qn(EncounterTransition._meta.db_table)
        self.defn = qn(EncounterDefinition._meta.db_table)
        self.e = {f.name: qn(f.column) for f in Encounter._meta.concrete_fields}
        self.t = {f.name: qn(f.column) for f in EncounterTransition._meta.concrete_fields}
        self.d = {f.name: qn(f.column) for f in EncounterDefinition._meta.concrete_fields}
        self.enc_fields = [f.name for f in Encounter._meta.concrete_fields]
        self.tr_fields = [f.name for f in EncounterTransition._meta.concrete_fields]
        self.ph = "%s" if self.vendor == "postgresql" else "?"

    # Python value -> what the raw driver takes (what Django would send).
    def db(self, value: Any) -> Any:
        if self.vendor == "postgresql":
            return value
        if isinstance(value, uuid.UUID):
            return value.hex
        if isinstance(value, datetime):
            return str(value.astimezone(UTC).replace(tzinfo=None))
        return value


def make_definition() -> Any:
    from django_encounters.models import EncounterDefinition

    definition, _ = EncounterDefinition.objects.get_or_create(
        code=PINGPONG["code"], defaults=PINGPONG
    )
    return definition


def subject() -> Any:
    from django.contrib.auth.models import User

    user, _ = User.objects.get_or_create(username="bench-subject")
    return user


def subject_pool(size: int = 1000) -> list[str]:
    """The ids (as stored in ``subject_id``) of ``size`` users the generated encounters are
    about, created once."""
    from django.contrib.auth.models import User

    names = [f"bench-subject-{i:04d}" for i in range(size)]
    have = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    User.objects.bulk_create(
        User(username=name, password="!") for name in names if name not in have
    )
    return [
        str(pk)
        for pk in User.objects.filter(username__in=names)
        .order_by("pk")
        .values_list("pk", flat=True)
    ]


def generate(
    schema: Schema, definition: Any, start: int, count: int, rows_per: int, chunk: int = 10_000
) -> None:
    """Insert ``count`` encounters with ``rows_per`` valid, hash-chained ping-pong rows each,
    and correct projections, with raw bulk SQL (COPY on PostgreSQL)."""
    from django.contrib.auth.models import User
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection

    from django_encounters.engine import Genesis, StreamRow, genesis_hash, row_hash

    ct = ContentType.objects.get_for_model(User).pk
    # Existing subjects (a rebuild reports an encounter whose subject is gone: subject_missing).
    subjects = subject_pool()
    rng = random.Random(start)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    enc_cols = ", ".join(schema.e[n] for n in schema.enc_fields)
    tr_cols = ", ".join(schema.t[n] for n in schema.tr_fields)
    raw = raw_connection()
    for offset in range(start, start + count, chunk):
        encounters, rows = [], []
        for i in range(offset, min(offset + chunk, start + count)):
            eid = uuid.UUID(int=rng.getrandbits(128), version=4)
            created = base + timedelta(seconds=i, milliseconds=1 + i % 997)
            version = definition.version
            genesis = genesis_hash(
                Genesis(
                    eid,
                    definition.pk,
                    version,
                    "auth.user",
                    subjects[i % len(subjects)],
                    "a",
                    created,
                )
            )
            state, previous, eff = "a", genesis, created
            for seq in range(1, rows_per + 1):
                to = OTHER[state]
                eff = created + timedelta(minutes=seq, milliseconds=seq)
                content = StreamRow(seq, state, to, eff, eff, None, "", {}, version, "")
                digest = row_hash(eid, content, previous)
                values = {
                    "id": uuid.UUID(int=rng.getrandbits(128), version=4),
                    "encounter": eid,
                    "sequence": seq,
                    "from_state": state,
                    "to_state": to,
                    "transitioned_by": None,
                    "transitioned_at": eff,
                    "effective_at": eff,
                    "reason": "",
                    "metadata": "{}",
                    "definition_version": version,
                    "hash": digest,
                    "transitioned_by_name": "",
                    "seal": "",
                }
                rows.append([schema.db(values[n]) for n in schema.tr_fields])
                state, previous = to, digest
            values = {
                "id": eid,
                "definition": definition.pk,
                "subject_content_type": ct,
                "subject_id": subjects[i % len(subjects)],
                "state": state,
                "origin_state": "a",
                "version": rows_per,
                "timeline_end_at": eff if rows_per else None,
                "head_hash": previous,
                "genesis_hash": genesis,
                "genesis_seal": "",
                "origin_version": version,
                "definition_version": version,
                "last_transitioned_at": eff if rows_per else None,
                "scheduled_at": None,
                "started_at": None,
                "ended_at": None,
                "created_by": None,
                "assigned_to": None,
                "notes": "",
                "metadata": "{}",
                "created_at": created,
                "updated_at": created,
                "deleted_at": None,
            }
            encounters.append([schema.db(values[n]) for n in schema.enc_fields])
        if schema.vendor == "postgresql":
            with raw.cursor() as cur:
                with cur.copy(f"COPY {schema.enc} ({enc_cols}) FROM STDIN") as copy:
                    for row in encounters:
                        copy.write_row(row)
                with cur.copy(f"COPY {schema.tr} ({tr_cols}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        else:
            cur = raw.cursor()
            cur.execute("BEGIN")
            enc_marks = ", ".join("?" * len(schema.enc_fields))
            tr_marks = ", ".join("?" * len(schema.tr_fields))
            cur.executemany(
                f"INSERT INTO {schema.enc} ({enc_cols}) VALUES ({enc_marks})", encounters
            )
            cur.executemany(f"INSERT INTO {schema.tr} ({tr_cols}) VALUES ({tr_marks})", rows)
            cur.execute("COMMIT")
    if schema.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {schema.enc}")
            cursor.execute(f"ANALYZE {schema.tr}")
    else:
        raw.execute("ANALYZE")


def drift_all(schema: Schema) -> None:
    """Make every projection wrong in the columns a rebuild derives (the origin state, no
    timeline end, no system time; a rebuild never lowers a version or replaces a head hash, it
    reports those), so a rebuild rewrites all of them and the floor does too."""
    e = schema.e
    raw = raw_connection()
    cur = raw.cursor()
    if schema.vendor == "sqlite":
        cur.execute("BEGIN")
    cur.execute(
        f"UPDATE {schema.enc} SET {e['state']} = {e['origin_state']}, "
        f"{e['timeline_end_at']} = NULL, {e['last_transitioned_at']} = NULL"
    )
    if schema.vendor == "sqlite":
        cur.execute("COMMIT")
    cur.close()


# ---------------------------------------------------------------------------------------------
# Timing helpers.
# ---------------------------------------------------------------------------------------------

#: "Seals on": every row and genesis HMAC-sealed (issue 19), the settings a sealed log runs.
SEALS = {"ENCOUNTERS_SEAL_KEYS": {"bench": "b" * 48}, "ENCOUNTERS_SEAL_KEY_ID": "bench"}
#: The sides of a per-call figure: the raw-SQL floor, ours with seals off, ours with seals on.
SIDES = ("floor", "ours", "sealed")


def timed(fn: Callable[[], Any]) -> float:
    return timed_cpu(fn)[0]


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and this process's CPU time (``time.process_time``) of one call of ``fn``."""
    gc.collect()
    started, started_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - started, time.process_time() - started_cpu


def measure_sides(
    sides: dict[str, Callable[[int], None]],
    total: int,
    rounds: int = 6,
    settings: dict[str, dict] | None = None,
) -> tuple[dict[str, tuple[float, float]], int]:
    """Run every side ``total`` times in ``rounds`` chunks, rotating (and reversing every other
    lap) which side goes first, so that noise on a shared machine hits all alike. A side named
    in ``settings`` runs under those Django settings (entered outside the timed part). Returns
    each side's summed (wall, CPU) seconds and the number of calls each made."""
    from contextlib import nullcontext

    from django.test import override_settings

    per = max(1, total // rounds)
    names = list(sides)
    spent = {name: [0.0, 0.0] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if (r // len(names)) % 2:
            order.reverse()
        for name in order:
            overrides = (settings or {}).get(name)
            with override_settings(**overrides) if overrides else nullcontext():
                wall, cpu = timed_cpu(lambda run=sides[name]: run(per))
            spent[name][0] += wall
            spent[name][1] += cpu
    return {name: (wall, cpu) for name, (wall, cpu) in spent.items()}, per * rounds


def alternate(
    floor: Callable[[int], None], ours: Callable[[int], None], total: int, rounds: int = 5
) -> tuple[float, float]:
    """The floor and ours alone, alternating (``measure_sides`` with two sides); returns the
    summed wall-clock seconds of each."""
    spent, _ = measure_sides({"floor": floor, "ours": ours}, total, rounds)
    return spent["floor"][0], spent["ours"][0]


def figure(
    name: str, floor_s: float, ours_s: float, n: int, unit: str = "op", **extra: Any
) -> dict:
    return {
        "name": name,
        "floor_s": floor_s,
        "ours_s": ours_s,
        "n": n,
        "unit": unit,
        "floor_per_op_us": floor_s / n * 1e6,
        "ours_per_op_us": ours_s / n * 1e6,
        "ratio": floor_s / ours_s if ours_s else float("inf"),
        **extra,
    }


def _ratio(floor: float, ours: float) -> float:
    return floor / ours if ours else float("inf")


def call_figure(
    name: str, spent: dict[str, tuple[float, float]], n: int, unit: str = "op", **extra: Any
) -> dict:
    """A per-call figure from ``measure_sides``' floor, ours (seals off) and, when measured,
    ours with seals on: wall-clock and CPU seconds of each, and the ratios against the floor
    (``ratio``: wall, seals off; ``sealed_ratio``: wall, seals on; ``cpu_ratio`` and
    ``sealed_cpu_ratio``: the same in CPU time)."""
    floor_s, floor_cpu = spent["floor"]
    ours_s, ours_cpu = spent["ours"]
    result = figure(
        name,
        floor_s,
        ours_s,
        n,
        unit,
        floor_cpu_s=floor_cpu,
        ours_cpu_s=ours_cpu,
        cpu_ratio=_ratio(floor_cpu, ours_cpu),
        **extra,
    )
    if "sealed" in spent:
        sealed_s, sealed_cpu = spent["sealed"]
        result.update(
            sealed_s=sealed_s,
            sealed_cpu_s=sealed_cpu,
            sealed_per_op_us=sealed_s / n * 1e6,
            sealed_ratio=_ratio(floor_s, sealed_s),
            sealed_cpu_ratio=_ratio(floor_cpu, sealed_cpu),
        )
    return result


def _added(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> dict:
    return {name: (a[name][0] + b[name][0], a[name][1] + b[name][1]) for name in a}


# ---------------------------------------------------------------------------------------------
# The benchmarks.
# ---------------------------------------------------------------------------------------------


class TransitionFloor:
    """The raw one-transaction equivalent of ``transition()``: ``BEGIN`` (``BEGIN IMMEDIATE`` on
    SQLite), ``SELECT`` the encounter joined with its definition (``FOR UPDATE OF e`` on
    PostgreSQL), ``INSERT`` the row, ``UPDATE`` the projection, ``COMMIT`` — no hash, no seal, no
    state-machine logic, no validator. ``step(pk, to_state)`` moves one encounter."""

    def __init__(self, schema: Schema) -> None:
        e, t, d, ph = schema.e, schema.t, schema.d, schema.ph
        columns = ", ".join(
            [f"e.{e[n]}" for n in schema.enc_fields] + [f"d.{col}" for col in schema.d.values()]
        )
        self.lock = (
            f"SELECT {columns} FROM {schema.enc} e INNER JOIN {schema.defn} d ON "
            f"e.{e['definition']} = d.{d['id']} WHERE e.{e['id']} = {ph} AND "
            f"e.{e['deleted_at']} IS NULL"
            + (" FOR UPDATE OF e" if schema.vendor == "postgresql" else "")
        )
        self.state_index = schema.enc_fields.index("state")
        self.version_index = schema.enc_fields.index("version")
        self.definition_version_index = schema.enc_fields.index("definition_version")
        cols = ", ".join(t[n] for n in schema.tr_fields)
        marks = ", ".join([ph] * len(schema.tr_fields))
        self.insert = f"INSERT INTO {schema.tr} ({cols}) VALUES ({marks})"
        self.update = (
            f"UPDATE {schema.enc} SET {e['state']} = {ph}, {e['version']} = {ph}, "
            f"{e['timeline_end_at']} = {ph}, {e['head_hash']} = {ph}, {e['updated_at']} = {ph} "
            f"WHERE {e['id']} = {ph}"
        )
        self.begin = "BEGIN" if schema.vendor == "postgresql" else "BEGIN IMMEDIATE"
        self.schema = schema
        self.cursor = raw_connection().cursor()
        self.digest = "0" * 64

    def step(self, pk: Any, to: str) -> None:
        schema, cur = self.schema, self.cursor
        now = datetime.now(UTC)
        key = schema.db(pk)
        cur.execute(self.begin)
        cur.execute(self.lock, [key])
        row = cur.fetchone()
        state, version = row[self.state_index], row[self.version_index]
        values = {
            "id": uuid.uuid4(),
            "encounter": pk,
            "sequence": version + 1,
            "from_state": state,
            "to_state": to,
            "transitioned_by": None,
            "transitioned_at": now,
            "effective_at": now,
            "reason": "",
            "metadata": "{}",
            "definition_version": row[self.definition_version_index],
            "hash": self.digest,
            "transitioned_by_name": "",
            "seal": "",
        }
        cur.execute(self.insert, [schema.db(values[n]) for n in schema.tr_fields])
        stamp = schema.db(now)
        cur.execute(self.update, [to, version + 1, stamp, self.digest, stamp, key])
        cur.execute("COMMIT")


def _runner(queue: list[tuple[Any, str]], step: Callable[[Any, str], Any]) -> Callable[[int], None]:
    """A side of ``measure_sides`` that makes the next ``n`` moves of ``queue`` each call."""
    position = [0]

    def run(n: int) -> None:
        start = position[0]
        for target, to in queue[start : start + n]:
            step(target, to)
        position[0] = start + n

    return run


def make_visit_definition() -> Any:
    from benchmarks.definitions import VISIT
    from django_encounters.models import EncounterDefinition

    definition, _ = EncounterDefinition.objects.get_or_create(code=VISIT["code"], defaults=VISIT)
    return definition


def _visits(definition: Any, count: int) -> list[Any]:
    """``count`` visits made by ``create_encounter``, then started and ended (``started_at``,
    ``ended_at``: what the admin's transition form writes in the step that needs them) so that
    the visit's RequiredFieldsValidator passes."""
    from django_encounters.models import Encounter
    from django_encounters.services import create_encounter

    who = subject()
    made = [create_encounter(definition, who) for _ in range(count)]
    now = datetime.now(UTC)
    for start in range(0, count, 500):
        pks = [enc.pk for enc in made[start : start + 500]]
        Encounter.objects.filter(pk__in=pks).update(started_at=now, ended_at=now)
    return made


def bench_transition_visit(
    schema: Schema, total: int, rounds: int = 6, warm: int = 20, name: str = "transition()"
) -> list[dict]:
    """``transition()`` as a user runs it: visits made by ``create_encounter`` walked through
    the example clinic's definition with its two validators (``benchmarks/definitions.py``),
    scheduled → checked_in (the first step) then → in_progress → completed (the later ones, in
    rounds over all visits as a clinic records them). Three sides alternate: the raw floor,
    ours with seals off, ours with seals on, each on its own visits. Returns the figure of
    every step together (the headline, held to the goal) and the first and the later steps'."""
    from django.test import override_settings

    from benchmarks.definitions import VISIT, VISIT_PATH
    from django_encounters.services import transition

    definition = make_visit_definition()
    first, later = VISIT_PATH[0], VISIT_PATH[1:]
    visits = max(rounds, total // len(VISIT_PATH) // rounds * rounds)
    made: dict[str, list[Any]] = {}
    for side in SIDES:
        with override_settings(**SEALS) if side == "sealed" else _nothing():
            made[side] = _visits(definition, warm + visits)
    floor = TransitionFloor(schema)
    steps: dict[str, Callable[[Any, str], Any]] = {
        "floor": lambda enc, to: floor.step(enc.pk, to),
        "ours": transition,
        "sealed": transition,
    }
    settings = {"sealed": SEALS}
    for side in SIDES:  # warm up (statement caches, first touch of pages, rules caches)
        with override_settings(**SEALS) if side == "sealed" else _nothing():
            for enc in made[side][:warm]:
                for to in VISIT_PATH:
                    steps[side](enc, to)
    firsts = {side: [(enc, first) for enc in made[side][warm:]] for side in SIDES}
    spent_first, n_first = measure_sides(
        {side: _runner(firsts[side], steps[side]) for side in SIDES}, visits, rounds, settings
    )
    laters = {
        side: [(enc, to) for to in later for enc in made[side][warm : warm + n_first]]
        for side in SIDES
    }
    spent_later, n_later = measure_sides(
        {side: _runner(laters[side], steps[side]) for side in SIDES},
        n_first * len(later),
        rounds,
        settings,
    )
    _check_sealed(made["ours"][-1], made["sealed"][-1], len(VISIT_PATH))
    workload = {"workload": "visit", "peer_op": "transition_us"}
    return [
        call_figure(
            name,
            _added(spent_first, spent_later),
            n_first + n_later,
            goal="transition",
            **workload,
        ),
        call_figure(f"  ↳ first step ({VISIT['initial_state']} → {first})", spent_first, n_first),
        call_figure(f"  ↳ later steps (→ {' → '.join(later)})", spent_later, n_later),
    ]


def _check_sealed(unsealed: Any, sealed: Any, rows: int) -> None:
    """The seals-on side sealed its rows, the seals-off side did not (so each figure measures
    what its column says)."""
    from django_encounters.models import EncounterTransition

    rows_of = EncounterTransition.objects.filter
    found = (
        rows_of(encounter=unsealed.pk).exclude(seal="").count(),
        rows_of(encounter=sealed.pk).exclude(seal="").count(),
    )
    if found != (0, rows):
        raise RuntimeError(f"sealed rows (seals off, seals on): {found}, expected (0, {rows})")


def _nothing() -> Any:
    from contextlib import nullcontext

    return nullcontext()


def bench_transition(schema: Schema, definition: Any, total: int, pool: int = 100) -> dict:
    """The ping-pong line: ``transition(enc, other_state)`` on a pool of ``pool`` two-state
    encounters without a validator, against the same raw transaction, seals off and on
    (``benchmarks/peers.py`` and ``benchmarks/profile.py`` take its floor)."""
    from django.test import override_settings

    from django_encounters.services import create_encounter, transition

    who = subject()
    pools: dict[str, list[Any]] = {}
    for side in SIDES:
        with override_settings(**SEALS) if side == "sealed" else _nothing():
            pools[side] = [create_encounter(definition, who) for _ in range(pool)]
    # Each encounter starts in "a": its k-th move goes to "b" when k is even.
    warm, moves = pool, total + pool
    queues = {
        side: [(pools[side][j % pool], "b" if (j // pool) % 2 == 0 else "a") for j in range(moves)]
        for side in SIDES
    }
    floor = TransitionFloor(schema)
    steps: dict[str, Callable[[Any, str], Any]] = {
        "floor": lambda enc, to: floor.step(enc.pk, to),
        "ours": transition,
        "sealed": transition,
    }
    runners = {side: _runner(queues[side], steps[side]) for side in SIDES}
    for side in SIDES:
        with override_settings(**SEALS) if side == "sealed" else _nothing():
            runners[side](warm)
    spent, n = measure_sides(runners, total, settings={"sealed": SEALS})
    _check_sealed(pools["ours"][0], pools["sealed"][0], (warm + n - 1) // pool + 1)
    return call_figure(
        "transition(): ping-pong pool (2 states, no validator)", spent, n, workload="pingpong"
    )


def _reading_encounter(definition: Any, rows: int = 20) -> Any:
    from django_encounters.services import create_encounter, transition

    enc = create_encounter(definition, subject())
    start = datetime.now(UTC) - timedelta(days=rows + 1)
    for i in range(rows):
        transition(enc, OTHER[enc.state], effective_at=start + timedelta(days=i))
    return enc, start


def bench_get_state_at(schema: Schema, definition: Any, total: int) -> dict:
    from django_encounters.services import get_state_at

    enc, start = _reading_encounter(definition)
    t, ph = schema.t, schema.ph
    sql = (
        f"SELECT {t['to_state']} FROM {schema.tr} WHERE {t['encounter']} = {ph} AND "
        f"{t['effective_at']} <= {ph} ORDER BY {t['effective_at']} DESC, {t['sequence']} DESC "
        f"LIMIT 1"
    )
    rng = random.Random(1)
    times = [start + timedelta(hours=rng.uniform(-24, 24 * 22)) for _ in range(1000)]
    key = schema.db(enc.pk)
    raw = raw_connection()
    counter = {side: 0 for side in SIDES}

    def floor(n: int) -> None:
        cur = raw.cursor()
        for _ in range(n):
            at = times[counter["floor"] % len(times)]
            counter["floor"] += 1
            cur.execute(sql, [key, schema.db(at)])
            row = cur.fetchone()
            _ = row[0] if row else "a"
        cur.close()

    def ours_as(side: str) -> Callable[[int], None]:
        def ours(n: int) -> None:
            for _ in range(n):
                at = times[counter[side] % len(times)]
                counter[side] += 1
                get_state_at(enc, at)

        return ours

    sides = {"floor": floor, "ours": ours_as("ours"), "sealed": ours_as("sealed")}
    spent, n = measure_sides(sides, 600, rounds=3, settings={"sealed": SEALS})  # warm up
    spent, n = measure_sides(sides, total, settings={"sealed": SEALS})
    return call_figure(
        "get_state_at()", spent, n, goal="get_state_at", peer_op="state_at_us", workload="20 rows"
    )


def bench_history(schema: Schema, definition: Any, total: int) -> dict:
    from django_encounters.services import get_encounter_history

    enc, _ = _reading_encounter(definition)
    t, ph = schema.t, schema.ph
    cols = ", ".join(t[n] for n in schema.tr_fields)
    sql = f"SELECT {cols} FROM {schema.tr} WHERE {t['encounter']} = {ph} ORDER BY {t['sequence']}"
    key = schema.db(enc.pk)
    raw = raw_connection()

    def floor(n: int) -> None:
        cur = raw.cursor()
        for _ in range(n):
            cur.execute(sql, [key])
            cur.fetchall()
        cur.close()

    def ours(n: int) -> None:
        for _ in range(n):
            get_encounter_history(enc)

    sides = {"floor": floor, "ours": ours, "sealed": ours}
    measure_sides(sides, 300, rounds=3, settings={"sealed": SEALS})  # warm up
    spent, n = measure_sides(sides, total, settings={"sealed": SEALS})
    return call_figure(
        "get_encounter_history() (20 rows)", spent, n, goal="history", peer_op="history_us"
    )


def bench_as_of(schema: Schema, encounters: int, repeats: int = 3) -> dict:
    from django_encounters.models import Encounter

    e, t, ph = schema.e, schema.t, schema.ph
    at = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=encounters // 2, minutes=3)
    sql = (
        f"SELECT e.{e['id']}, COALESCE((SELECT t.{t['to_state']} FROM {schema.tr} t "
        f"WHERE t.{t['encounter']} = e.{e['id']} AND t.{t['effective_at']} <= {ph} "
        f"ORDER BY t.{t['effective_at']} DESC, t.{t['sequence']} DESC LIMIT 1), "
        f"e.{e['origin_state']}) FROM {schema.enc} e WHERE e.{e['deleted_at']} IS NULL"
    )
    raw = raw_connection()
    counts = {}

    def floor(_: int) -> None:
        cur = raw.cursor()
        cur.execute(sql, [schema.db(at)])
        counts["floor"] = len(cur.fetchall())
        cur.close()

    def ours(_: int) -> None:
        counts["ours"] = len(list(Encounter.objects.as_of(at).values_list("pk", "state_at")))

    floor(1)
    ours(1)
    from django.test import override_settings

    # the fastest of ``repeats`` runs of each side (wall and CPU apart), alternating
    best: dict[str, list[float]] = {side: [float("inf"), float("inf")] for side in SIDES}
    for r in range(repeats):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            with override_settings(**SEALS) if side == "sealed" else _nothing():
                wall, cpu = timed_cpu(lambda run=floor if side == "floor" else ours: run(1))
            best[side] = [min(best[side][0], wall), min(best[side][1], cpu)]
    assert counts["floor"] == counts["ours"], counts
    return call_figure(
        f"as_of(t) over {counts['ours']:,} encounters",
        {side: (wall, cpu) for side, (wall, cpu) in best.items()},
        1,
        unit="query",
        rows=counts["ours"],
        goal="as_of",
    )


def bench_distribute(encounters: int, rows: int) -> dict:
    """Time ``distribute_encounters`` on tables that already hold rows (what moving a live
    installation onto Citus costs: writes wait for it)."""
    from django.core.management import call_command

    started = time.perf_counter()
    call_command("distribute_encounters", verbosity=0)
    seconds = time.perf_counter() - started
    return {"encounters": encounters, "rows": rows, "seconds": seconds}


def rebuild_floor(schema: Schema) -> float:
    """One UPDATE … FROM setting each encounter's state to its last timeline row's to_state."""
    e, t = schema.e, schema.t
    if schema.vendor == "postgresql":
        sql = (
            f"UPDATE {schema.enc} AS e SET {e['state']} = last.{t['to_state']} FROM ("
            f"SELECT DISTINCT ON ({t['encounter']}) {t['encounter']}, {t['to_state']} "
            f"FROM {schema.tr} ORDER BY {t['encounter']}, {t['effective_at']} DESC, "
            f"{t['sequence']} DESC) AS last WHERE e.{e['id']} = last.{t['encounter']}"
        )
    else:
        sql = (
            f"UPDATE {schema.enc} AS e SET {e['state']} = last.{t['to_state']} FROM ("
            f"SELECT {t['encounter']}, {t['to_state']}, ROW_NUMBER() OVER (PARTITION BY "
            f"{t['encounter']} ORDER BY {t['effective_at']} DESC, {t['sequence']} DESC) AS rn "
            f"FROM {schema.tr}) AS last WHERE last.rn = 1 AND e.{e['id']} = last.{t['encounter']}"
        )
    raw = raw_connection()
    drift_all(schema)
    gc.collect()
    started = time.perf_counter()
    cur = raw.cursor()
    cur.execute("BEGIN" if schema.vendor == "postgresql" else "BEGIN IMMEDIATE")
    cur.execute(sql)
    cur.execute("COMMIT")
    cur.close()
    return time.perf_counter() - started


def child_env() -> dict[str, str]:
    """The environment of a benchmark's child process: this checkout importable, no settings
    module (the child configures Django itself)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def run_child(what: str, *arguments: str) -> dict:
    """``python -m benchmarks.run <arguments>`` in a fresh process (so that its peak RSS is its
    own); the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *arguments],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} child failed: {proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rebuild_in_child(database: dict, jobs: int = 1) -> dict:
    """Run the real rebuild in a fresh process (so its peak RSS is the rebuild's own); with
    ``jobs > 1`` that process spawns the workers (the RSS is then the parent's alone)."""
    return run_child("rebuild", "--rebuild-child", json.dumps(database), str(jobs))


def rebuild_child(database: dict, jobs: int = 1) -> dict:
    configure(database)
    from django_encounters.projections.rebuild import rebuild_projections

    schema = Schema()
    drift_all(schema)
    gc.collect()
    baseline = rss_kib()
    reset_peak_rss()
    started = time.perf_counter()
    result = rebuild_projections(jobs=jobs)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rows": result.rows_replayed,
        "encounters": result.encounters_scanned,
        "fixed": result.projections_fixed,
        "anomalies": result.anomaly_count,
        "rss_baseline_kib": baseline,
        "rss_peak_kib": peak_rss_kib(),
    }


def bench_rebuild(
    schema: Schema, database: dict, rows_label: str, jobs: int = 1, rounds: int = 1
) -> dict:
    """The rebuild (in a fresh process each time) against its floor; with ``rounds > 1``
    they alternate (ours then the floor, the floor then ours, …) and the times are averaged,
    so that another load on a shared machine hits both alike. Peak RSS: the round with the
    largest peak."""
    ours_s = floor_s = 0.0
    ours: dict = {}
    for round_ in range(rounds):
        if round_ % 2:
            floor_s += rebuild_floor(schema)
        run = rebuild_in_child(database, jobs)
        if run["anomalies"]:
            raise RuntimeError(f"rebuild reported {run['anomalies']} anomalies on generated data")
        if run["fixed"] != run["encounters"]:
            raise RuntimeError(f"rebuild fixed {run['fixed']} of {run['encounters']} encounters")
        ours_s += run["seconds"]
        if not ours or run["rss_peak_kib"] > ours["rss_peak_kib"]:
            ours = run
        if not round_ % 2:
            floor_s += rebuild_floor(schema)
    name = "rebuild" if jobs == 1 else f"rebuild --jobs {jobs}"
    return figure(
        f"{name}, {ours['rows']:,} rows / {ours['encounters']:,} encounters (verified)",
        floor_s / rounds,
        ours_s / rounds,
        ours["rows"],
        unit="row",
        rss_peak_mib=ours["rss_peak_kib"] / 1024,
        rss_growth_mib=(ours["rss_peak_kib"] - ours["rss_baseline_kib"]) / 1024,
        fixed=ours["fixed"],
        label=rows_label,
        jobs=jobs,
        rounds=rounds,
        goal="rebuild",
    )


def export_floor(schema: Schema, path: str) -> tuple[float, int]:
    """Every row, in trace order, through a plain cursor, written with ``csv.writer``."""
    import csv

    t = schema.t
    columns = ", ".join(
        t[n]
        for n in (
            "encounter",
            "to_state",
            "effective_at",
            "transitioned_by",
            "sequence",
            "from_state",
            "transitioned_at",
            "reason",
        )
    )
    sql = (
        f"SELECT {columns} FROM {schema.tr} "
        f"ORDER BY {t['encounter']}, {t['effective_at']}, {t['sequence']}"
    )
    raw = raw_connection()
    gc.collect()
    started = time.perf_counter()
    rows = 0
    cur = raw.cursor()
    cur.execute(sql)
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        while True:
            chunk = cur.fetchmany(2000)
            if not chunk:
                break
            writer.writerows(chunk)
            rows += len(chunk)
    cur.close()
    return time.perf_counter() - started, rows


def export_in_child(database: dict, fmt: str) -> dict:
    """Run the real export in a fresh process (so its peak RSS is the export's own)."""
    return run_child("export", "--export-child", json.dumps(database), fmt)


def export_child(database: dict, fmt: str) -> dict:
    configure(database)
    from django_encounters.projections.event_log import export_event_log

    with tempfile.TemporaryDirectory(prefix="encounters-export-") as tmp:
        path = os.path.join(tmp, f"log.{fmt}")
        gc.collect()
        baseline = rss_kib()
        reset_peak_rss()
        started = time.perf_counter()
        counts = export_event_log(fmt, path)
        seconds = time.perf_counter() - started
        size = os.path.getsize(path)
    return {
        "seconds": seconds,
        "traces": counts.traces,
        "events": counts.events,
        "bytes": size,
        "rss_baseline_kib": baseline,
        "rss_peak_kib": peak_rss_kib(),
    }


def bench_export(schema: Schema, database: dict, fmt: str, rows_label: str) -> dict:
    ours = export_in_child(database, fmt)
    rows = ours["events"] - ours["traces"]  # the creation events are not rows
    with tempfile.TemporaryDirectory(prefix="encounters-export-floor-") as tmp:
        floor_s, floor_rows = export_floor(schema, os.path.join(tmp, "floor.csv"))
    if floor_rows != rows:
        raise RuntimeError(f"export wrote {rows} rows, the table holds {floor_rows}")
    return figure(
        f"export {fmt.upper()}, {rows:,} rows / {ours['traces']:,} encounters",
        floor_s,
        ours["seconds"],
        rows,
        unit="row",
        kind="export",
        rss_peak_mib=ours["rss_peak_kib"] / 1024,
        rss_growth_mib=(ours["rss_peak_kib"] - ours["rss_baseline_kib"]) / 1024,
        mib_written=ours["bytes"] / 2**20,
        label=rows_label,
    )


# ---------------------------------------------------------------------------------------------
# One backend, in this process.
# ---------------------------------------------------------------------------------------------


@contextmanager
def bench_database(
    backend: str, prefix: str = "encounters_bench", setup: Callable[[dict], None] | None = None
) -> Iterator[dict]:
    """A database to measure on, Django configured for it and migrated, removed afterwards:
    SQLite in a temp file, a fresh database on the PostgreSQL cluster (``PGHOST`` …; dropped at
    the end), or the Citus cluster's ready database (``BENCH_CITUS_PORT``). ``setup`` configures
    Django (default: ``configure``; ``benchmarks/admin_pages.py`` passes its own, with the admin).
    Yields the ``DATABASES["default"]`` entry."""
    tmp = pg_name = None
    if backend == "sqlite":
        tmp = tempfile.TemporaryDirectory(prefix=prefix.replace("_", "-") + "-")
        database = database_for("sqlite", os.path.join(tmp.name, "bench.sqlite3"))
    elif backend == "citus":
        database = database_for("citus")
    else:
        pg_name = f"{prefix}_{os.getpid()}"
        _pg_admin(f'CREATE DATABASE "{pg_name}"')
        database = database_for("postgresql", pg_name=pg_name)
    try:
        (setup or configure)(database)
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        yield database
    finally:
        from django.conf import settings

        if settings.configured:
            from django.db import connection

            connection.close()
        if pg_name:
            _pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}"')
        if tmp is not None:
            tmp.cleanup()


def run_backend(backend: str, sizes: dict) -> dict:
    with bench_database(backend) as database:
        from django.db import connection

        schema = Schema()
        definition = make_definition()
        # Every user the run needs exists before the tables are distributed on Citus: a user
        # inserted after distribute_encounters made auth_user a reference table collided with
        # an existing id (duplicate key auth_user_pkey, id=1; seen 2026-12-07).
        subject()
        subject_pool()
        results: dict[str, Any] = {
            "backend": backend,
            "server": _server_version(connection),
            "figures": [],
        }
        log = lambda msg: print(f"[{backend}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

        rows_per = sizes["rows_per_encounter"]
        small, big = sizes["small_encounters"], sizes["encounters"]
        log(f"generating {small:,} encounters x {rows_per} rows")
        t0 = time.perf_counter()
        generate(schema, definition, 0, small, rows_per)
        if backend == "citus":
            # An installation moving onto Citus: its tables are distributed with their rows.
            log("  distribute_encounters on the populated tables")
            results["distribute"] = bench_distribute(small, small * rows_per)
        only = sizes.get("only")
        rounds = sizes.get("rebuild_rounds", 1)
        if only != "export":
            log(f"  {time.perf_counter() - t0:.1f}s; rebuild (memory point 1)")
            results["figures"].append(bench_rebuild(schema, database, "small", rounds=rounds))
        if only != "rebuild":
            log("export XES (memory point 1)")
            results["figures"].append(bench_export(schema, database, "xes", "small"))
        log(f"generating {big - small:,} more encounters")
        t0 = time.perf_counter()
        generate(schema, definition, small, big - small, rows_per)
        if only != "rebuild":
            log(f"  {time.perf_counter() - t0:.1f}s; export XES and CSV (memory point 2)")
            results["figures"].append(bench_export(schema, database, "xes", "big"))
            results["figures"].append(bench_export(schema, database, "csv", "big"))
        if only == "export":
            set_targets(backend, results["figures"])
            return results
        log("rebuild (memory point 2)")
        results["figures"].append(bench_rebuild(schema, database, "big", rounds=rounds))
        log("rebuild --jobs 2 (same data)")
        results["figures"].append(bench_rebuild(schema, database, "big", jobs=2, rounds=rounds))
        if only == "rebuild":
            set_targets(backend, results["figures"])
            return results
        log("as_of(t)")
        as_of = bench_as_of(schema, big)
        # The per-call benchmarks run last, on the big tables (realistic index depth); the
        # floor's rows carry no valid hash, so they must not be there for the rebuilds above.
        # SQLite: what a performance-minded user runs with WAL (synchronous=NORMAL, which
        # SQLite's documentation recommends there), then the transition again under the
        # default FULL (an fsync per commit), reported separately.
        _synchronous("NORMAL")
        # Three sides alternate in each: the floor, ours with seals off, ours with seals on.
        log(f"transition() x {sizes['transitions']}: visits through a definition with validators")
        results["figures"] += bench_transition_visit(schema, sizes["transitions"])
        log(f"transition() x {sizes['transitions']}: ping-pong pool")
        results["figures"].append(bench_transition(schema, definition, sizes["transitions"]))
        log(f"get_state_at() x {sizes['reads']}")
        results["figures"].append(bench_get_state_at(schema, definition, sizes["reads"]))
        log(f"get_encounter_history() x {sizes['reads'] // 2}")
        results["figures"].append(bench_history(schema, definition, sizes["reads"] // 2))
        if backend == "sqlite":
            _synchronous("FULL")
            log(f"transition() x {sizes['transitions']}, synchronous=FULL")
            full = bench_transition_visit(
                schema, sizes["transitions"], name="transition() (synchronous=FULL, the default)"
            )[0]
            full.pop("goal")
            full["synchronous"] = "FULL"
            results["figures"].append(full)
        results["figures"].append(as_of)
        set_targets(backend, results["figures"])
        return results


def _synchronous(mode: str) -> None:
    from django.db import connection

    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA synchronous={mode}")


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER", "postgres"),
        password=os.environ.get("PGPASSWORD", ""),
        dbname=os.environ.get("PGDATABASE", "postgres"),
        autocommit=True,
    ) as conn:
        conn.execute(sql)


def _server_version(connection: Any) -> str:
    if connection.vendor == "sqlite":
        import sqlite3

        return (
            f"SQLite {sqlite3.sqlite_version} (WAL, file; per-call figures with "
            "synchronous=NORMAL unless the line says FULL)"
        )
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        binding = (
            "server-side binding, prepared statements"
            if connection.settings_dict.get("OPTIONS", {}).get("server_side_binding")
            else "Django's default client-side binding"
        )
        version = f"PostgreSQL {cursor.fetchone()[0]} ({binding})"
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
        citus = cursor.fetchone()
        if citus is None:
            return version
        cursor.execute("SELECT count(*) FROM pg_dist_node WHERE groupid > 0")
        workers = cursor.fetchone()[0]
        cursor.execute("SHOW citus.shard_count")
        shards = cursor.fetchone()[0]
        return f"Citus {citus[0]} on {version} (coordinator + {workers} workers, {shards} shards)"


# ---------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------


def attach_peers(all_results: list[dict], peer_results: list[dict]) -> None:
    """Put the peer's figures (``benchmarks/peers.py``, same database and mode) beside the lines
    that have its operation (``peer_op``): the peer's time, its floor's, and ours in that run
    (the same visit workload as the peer's, so ``faster than the peer`` compares like with
    like); and the wrong "state at t" answers of that run on the backend's result."""
    from benchmarks.peers import FLOOR, OURS, PEER

    runs = {(r["backend"], r.get("synchronous") or None): r for r in peer_results}
    for result in all_results:
        backend = {"postgres": "postgresql"}.get(result["backend"], result["backend"])
        for f in result["figures"]:
            op = f.get("peer_op")
            mode = f.get("synchronous", "NORMAL") if backend == "sqlite" else None
            run = runs.get((backend, mode))
            if op is None or run is None:
                continue
            sides = run["sides"]
            f["peer"] = {
                "us": sides[PEER][op],
                "floor_us": sides[FLOOR][op],
                "ours_us": sides[OURS][op],
            }
        run = runs.get((backend, "NORMAL" if backend == "sqlite" else None))
        if run is not None:
            result["peer_wrong"] = {
                "queries": run["sides"][OURS]["queries"],
                "floor": run["sides"][FLOOR]["wrong"],
                "ours": run["sides"][OURS]["wrong"],
                "peer": run["sides"][PEER]["wrong"],
                "late_share": run["late_steps"] / max(1, run["visits"] * 3),
                "lag": run["lag"],
            }


def verdict(backend: str, f: dict) -> tuple[str, str]:
    """A line's goal and whether it is met: the ratio, with seals off and on, at least the goal
    in wall-clock time and — where the floor's CPU is in this process (``CPU_HELD``) — in CPU
    time; on a backend of ``BEAT_PEER``, ours faster than the peer too. ``("", "")`` for a line
    without a goal; otherwise ``met`` is ``yes`` or ``**no** (<which measures failed>)``."""
    target = f.get("target")
    if target is None:
        return "", ""
    goal = f"≥ {target}×" + (", faster than the peer" if f.get("beat_peer") else "")
    failed = []
    wall = [f["ratio"]] + ([f["sealed_ratio"]] if "sealed_ratio" in f else [])
    if min(wall) < target:
        failed.append("wall")
    if backend in CPU_HELD and "cpu_ratio" in f:
        cpu = [f["cpu_ratio"]] + ([f["sealed_cpu_ratio"]] if "sealed_cpu_ratio" in f else [])
        if min(cpu) < target:
            failed.append("CPU")
    if f.get("beat_peer"):
        peer = f.get("peer")
        if peer is None:
            failed.append("peer not measured")
        elif peer["ours_us"] >= peer["us"]:
            failed.append("peer")
    return goal, "yes" if not failed else f"**no** ({', '.join(failed)})"


def _time(figure: dict, side: str) -> str:
    """A figure's ``side`` ("floor", "ours" or "sealed") time as the tables show it: seconds and
    rows per second for a rebuild, milliseconds for one big query, microseconds per call
    otherwise; ``—`` when that side was not measured."""
    seconds = figure.get(f"{side}_s")
    if seconds is None:
        return "—"
    if figure["unit"] == "row":
        return f"{seconds:.2f} s ({figure['n'] / seconds:,.0f} rows/s)"
    if figure["unit"] == "query":
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds / figure['n'] * 1e6:.0f} µs/op"


def _cpu(f: dict) -> str:
    """The CPU cell: floor / ours seals off / ours seals on per call, and the two CPU ratios."""
    if "floor_cpu_s" not in f:
        return "—"
    scale, unit = (1000, "ms") if f["unit"] == "query" else (1e6, "µs")
    times = [f["floor_cpu_s"], f["ours_cpu_s"]] + (
        [f["sealed_cpu_s"]] if "sealed_cpu_s" in f else []
    )
    ratios = [f["cpu_ratio"]] + ([f["sealed_cpu_ratio"]] if "sealed_cpu_ratio" in f else [])
    return (
        " / ".join(f"{t / f['n'] * scale:.0f}" for t in times)
        + f" {unit} · "
        + " / ".join(f"{r:.2f}×" for r in ratios)
    )


def _peer(f: dict) -> str:
    peer = f.get("peer")
    if peer is None:
        return ""
    us, ours = peer["us"], peer["ours_us"]
    ahead = (
        f"ours {us / ours:.1f}× faster" if ours < us else f"**the peer** {ours / us:.1f}× faster"
    )
    return f"{us:,.0f} µs · {peer['floor_us'] / us:.2f}× its floor · {ahead}"


TABLE_HEAD = [
    "| benchmark | floor (raw SQL) | ours, seals off | ours, seals on | CPU per call: floor / "
    "ours off / ours on · CPU ratios | peer: django-fsm-2 + django-fsm-log | goal | met |",
    "|---|---:|---:|---:|---:|---:|---:|:---:|",
]


def backend_table(result: dict) -> list[str]:
    """One database's table: every line with the floor, ours with seals off and on (each with
    its ratio to the floor), the CPU times and ratios, the peer where it has the operation, the
    goal and whether it is met (``verdict``)."""
    backend = result["backend"]
    cpu_note = (
        "CPU: this process's `time.process_time`, SQLite's engine included, held to the goal."
        if backend in CPU_HELD
        else "CPU: client-side only (this process's `time.process_time`; the server's CPU is "
        "not in it), printed, not held to the goal."
    )
    lines = [f"**{backend}** — {result['server']}. {cpu_note}", "", *TABLE_HEAD]
    for f in result["figures"]:
        goal, met = verdict(backend, f)
        ours = f"{_time(f, 'ours')} · {f['ratio']:.2f}×"
        sealed = _time(f, "sealed")
        if "sealed_ratio" in f:
            sealed += f" · {f['sealed_ratio']:.2f}×"
        lines.append(
            f"| {f['name']} | {_time(f, 'floor')} | {ours} | {sealed} | {_cpu(f)} | {_peer(f)} | "
            f"{goal} | {met} |"
        )
    wrong = result.get("peer_wrong")
    if wrong:
        q = wrong["queries"]
        lines.append(
            f'| wrong "state at t" answers (peer workload: {wrong["late_share"]:.0%} of steps '
            f"entered {wrong['lag']} events late) | {wrong['floor']}/{q} | {wrong['ours']}/{q} | "
            f"| | {wrong['peer']}/{q} ({wrong['peer'] / q:.1%}) | | |"
        )
    return lines


def table(all_results: list[dict]) -> str:
    lines: list[str] = []
    for result in all_results:
        if lines:
            lines.append("")
        lines += backend_table(result)
    memory = [
        (r["backend"], f)
        for r in all_results
        for f in r["figures"]
        if f["unit"] == "row"
        and f.get("jobs", 1) == 1  # with jobs, the workers' RSS is not seen
        and f.get("kind") != "export"
    ]
    if memory:
        lines += [
            "",
            "| backend | rebuild over | peak RSS | growth over the process baseline |",
            "|---|---:|---:|---:|",
        ]
        for backend, f in memory:
            lines.append(
                f"| {backend} | {f['n']:,} rows | {f['rss_peak_mib']:.0f} MiB | "
                f"{f['rss_growth_mib']:.0f} MiB |"
            )
    exports = [(r["backend"], f) for r in all_results for f in r["figures"]]
    exports = [(backend, f) for backend, f in exports if f.get("kind") == "export"]
    if exports:
        lines += [
            "",
            "| backend | event-log export | rows/s | written | peak RSS | growth over the "
            "process baseline |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for backend, f in exports:
            lines.append(
                f"| {backend} | {f['name']} | {f['n'] / f['ours_s']:,.0f} | "
                f"{f['mib_written']:.0f} MiB | {f['rss_peak_mib']:.0f} MiB | "
                f"{f['rss_growth_mib']:.0f} MiB |"
            )
    lines += _citus_comparison(all_results)
    for result in all_results:
        moved = result.get("distribute")
        if moved:
            lines += [
                "",
                f"`distribute_encounters` on tables holding {moved['encounters']:,} encounters "
                f"and {moved['rows']:,} transitions: {moved['seconds']:.1f} s "
                f"({moved['rows'] / moved['seconds']:,.0f} transitions/s moved to the shards).",
            ]
    return "\n".join(lines)


def run_peers(backends: list[str], sizes: dict, env: dict) -> list[dict]:
    """``benchmarks/peers.py`` for SQLite (WAL) with ``synchronous=NORMAL`` and with the default
    ``FULL``, and for PostgreSQL when it is measured: each in its own process and database."""
    try:
        import django_fsm  # noqa: F401
        import django_fsm_log  # noqa: F401
    except ImportError:
        print(
            "bench: django-fsm-2/django-fsm-log not installed, skipping the peers "
            "(pip install -e '.[bench]'; `make bench` does)",
            file=sys.stderr,
        )
        return []
    runs = []
    if "sqlite" in backends:
        runs += [["--backend", "sqlite", "--synchronous", mode] for mode in ("NORMAL", "FULL")]
    if "postgres" in backends:
        runs.append(["--backend", "postgresql"])
    results = []
    visits = max(50, min(400, sizes["transitions"] // 5))
    for arguments in runs:
        with tempfile.TemporaryDirectory(prefix="encounters-peers-") as tmp:
            out = os.path.join(tmp, "peers.json")
            database = None
            if arguments[1] == "postgresql":
                database = f"encounters_peers_{os.getpid()}"
                _pg_admin(f'CREATE DATABASE "{database}"')
            cmd = [sys.executable, "-m", "benchmarks.peers", *arguments, "--json", out]
            cmd += ["--visits", str(visits), "--queries", str(sizes["reads"] // 2)]
            cmd += ["--transitions", str(sizes["transitions"])]
            print(f"[peers] {' '.join(arguments)}", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env={**env, **({"BENCH_PEERS_DATABASE": database} if database else {})},
                    stdout=subprocess.DEVNULL,
                )
            finally:
                if database:
                    _pg_admin(f'DROP DATABASE IF EXISTS "{database}"')
            if proc.returncode != 0:
                raise RuntimeError(f"peers {' '.join(arguments)} failed (exit {proc.returncode})")
            results.append(json.loads(Path(out).read_text()))
    return results


def run_admin_pages(backends: list[str], env: dict) -> list[dict]:
    """``benchmarks/admin_pages.py`` for SQLite and, when it is measured, PostgreSQL: each in
    its own process and database (Django configured with the admin)."""
    results = []
    for backend in [b for b in backends if b in ("sqlite", "postgres")]:
        with tempfile.TemporaryDirectory(prefix="encounters-admin-") as tmp:
            out = os.path.join(tmp, "admin.json")
            cmd = [sys.executable, "-m", "benchmarks.admin_pages", "--backend", backend]
            print(f"[admin] {backend}", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [*cmd, "--json", out], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
            )
            if proc.returncode != 0:
                raise RuntimeError(f"admin pages on {backend} failed (exit {proc.returncode})")
            results.append(json.loads(Path(out).read_text()))
    return results


def _citus_comparison(all_results: list[dict]) -> list[str]:
    """Ours on the Citus cluster beside ours on the single PostgreSQL server, figure by figure
    (``ratio`` = PostgreSQL time / Citus time: above 1, Citus is faster)."""
    by_backend = {r["backend"]: {f["name"]: f for f in r["figures"]} for r in all_results}
    if "citus" not in by_backend or "postgres" not in by_backend:
        return []
    lines = [
        "",
        "| django-encounters on | benchmark | single PostgreSQL | Citus (3 nodes) | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for name, citus in by_backend["citus"].items():
        single = by_backend["postgres"].get(name)
        if single is None:
            continue
        a, b = _time(single, "ours"), _time(citus, "ours")
        ratio = (single["ours_s"] / single["n"]) / (citus["ours_s"] / citus["n"])
        lines.append(f"| both | {name} | {a} | {b} | {ratio:.2f}× |")
    return lines


README_BEGIN = "<!-- bench-results:begin -->"
README_END = "<!-- bench-results:end -->"


def update_readme(text: str) -> None:
    path = ROOT / "benchmarks" / "README.md"
    content = path.read_text()
    start, end = content.index(README_BEGIN), content.index(README_END)
    path.write_text(content[: start + len(README_BEGIN)] + "\n" + text + "\n" + content[end:])


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rebuild-child"]:
        jobs = int(argv[2]) if len(argv) > 2 else 1
        print(json.dumps(rebuild_child(json.loads(argv[1]), jobs)), flush=True)
        return 0
    if argv[:1] == ["--export-child"]:
        print(json.dumps(export_child(json.loads(argv[1]), argv[2])), flush=True)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=("all", "sqlite", "postgres", "citus"), default="all")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=bool(os.environ.get("BENCH_QUICK")),
        help="small sizes (smoke run)",
    )
    parser.add_argument("--transitions", type=int, default=_env_int("BENCH_TRANSITIONS", 2000))
    parser.add_argument("--reads", type=int, default=_env_int("BENCH_READS", 5000))
    parser.add_argument("--encounters", type=int, default=_env_int("BENCH_ENCOUNTERS", 200_000))
    parser.add_argument(
        "--small-encounters", type=int, default=_env_int("BENCH_SMALL_ENCOUNTERS", 20_000)
    )
    parser.add_argument(
        "--rows-per-encounter", type=int, default=_env_int("BENCH_ROWS_PER_ENCOUNTER", 5)
    )
    parser.add_argument(
        "--only",
        choices=("all", "export", "rebuild", "peers", "admin"),
        default="all",
        help="export: measure the event-log export alone (generates the data, skips the rest); "
        "rebuild: the verified rebuilds alone (both sizes, and --jobs 2 at the big one); "
        "peers: only django-encounters beside django-fsm-2 + django-fsm-log (benchmarks/peers.py); "
        "admin: only the admin's pages at 15,000/20,000 encounters (benchmarks/admin_pages.py)",
    )
    parser.add_argument(
        "--rebuild-rounds",
        type=int,
        default=_env_int("BENCH_REBUILD_ROUNDS", 1),
        help="run each rebuild and its floor this many times, alternating, and average them",
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw results here")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="rewrite the results section of benchmarks/README.md",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = {
        "transitions": args.transitions,
        "reads": args.reads,
        "encounters": args.encounters,
        "small_encounters": args.small_encounters,
        "rows_per_encounter": args.rows_per_encounter,
        "rebuild_rounds": args.rebuild_rounds,
    }
    only = args.only
    if args.quick:
        sizes.update(
            transitions=min(sizes["transitions"], 400),
            reads=min(sizes["reads"], 1000),
            encounters=min(sizes["encounters"], 20_000),
            small_encounters=min(sizes["small_encounters"], 2_000),
        )

    if args.child:  # one backend in this process; results as JSON on stdout
        print(
            json.dumps(run_backend(args.backend, {**sizes, "only": only}), default=str), flush=True
        )
        return 0

    backends = ["sqlite", "postgres", "citus"] if args.backend == "all" else [args.backend]
    # A server backend needs the cluster `make bench` starts: asked for alone, that is an
    # error; as part of "all", it is left out with a word on stderr.
    for backend, variable in (("postgres", "PGHOST"), ("citus", "BENCH_CITUS_PORT")):
        if backend in backends and not os.environ.get(variable):
            if args.backend == backend:
                print(
                    f"bench: {variable} is not set (use `make bench`, which starts a cluster)",
                    file=sys.stderr,
                )
                return 2
            print(
                f"bench: {variable} not set, skipping {backend} (`make bench` starts a cluster)",
                file=sys.stderr,
            )
            backends.remove(backend)
    all_results = []
    env = child_env()
    for backend in backends if only not in ("peers", "admin") else []:
        # each backend in its own process: Django is configured once
        cmd = [sys.executable, "-m", "benchmarks.run", "--child", "--backend", backend]
        for key, value in sizes.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        cmd += ["--only", only]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"bench: {backend} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        all_results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    peer_results = run_peers(backends, sizes, env) if only in ("all", "peers") else []
    admin_results = run_admin_pages(backends, env) if only in ("all", "admin") else []

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if os.environ.get("BENCH_VIA_MAKE"):
        command = "make bench"
    else:
        command = " ".join(["python -m benchmarks.run", *argv])
    servers = list(
        dict.fromkeys(r["server"] for r in [*all_results, *peer_results, *admin_results])
    )
    header = (
        f"Measured {stamp} on {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {', '.join(servers)}; sizes "
        f"{json.dumps(sizes)}; command: `{command}`."
    )
    parts = [header]
    attach_peers(all_results, peer_results)
    if all_results:
        parts.append(table(all_results))
    elif peer_results:  # --only peers: the peer's own tables
        from benchmarks.peers import table as peer_table

        parts += [peer_table(result) for result in peer_results]
    if admin_results:
        from benchmarks.admin_pages import table as admin_table

        parts.append(
            "The admin's pages (benchmarks/admin_pages.py: 15,000 encounters of the definition "
            "shown, 20,000 in the list, a 500-row history), through Django's test client:\n\n"
            + admin_table(admin_results)
        )
    text = "\n\n".join(parts)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"sizes": sizes, "results": all_results, "peers": peer_results},
                indent=1,
                default=str,
            )
        )
    if args.update_readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
