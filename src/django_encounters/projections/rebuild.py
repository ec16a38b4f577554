"""Rebuild (or check) every encounter's projection from its transition log (DESIGN §7).

The projection columns — ``state``, ``version``, ``timeline_end_at``, ``head_hash`` — are
recomputed by folding each stream with the timeline engine (``verify_stream``), which also
verifies the stream (gaps, ``from_state``, edges, re-chain, hash chain). Anomalies are reported,
never repaired: rows are facts.

How it runs:

* encounters are taken in primary-key order, ``batch_size`` at a time (keyset pagination);
* each batch is one transaction: lock the batch's encounter rows (``SELECT … FOR UPDATE``, so a
  concurrent ``transition()`` waits and the replay is consistent), stream their rows ordered by
  ``(encounter, sequence)``, fold each stream, compare with the stored projection and ``UPDATE``
  only the encounters that differ;
* memory is bounded by one batch of encounters and one stream at a time, whatever the number of
  rows; killed at any point, a batch either committed or rolled back, and a re-run finishes the
  job (the rebuild is idempotent: a second run finds nothing to fix).

With ``jobs=N`` (``--jobs N``) the selected encounters are split into N primary-key ranges of
equal size, each rebuilt as above by its own worker process (``spawn``, own connection); the
results are merged into one, the same as a single process's.

``ended_at``, ``started_at`` and ``scheduled_at`` are ordinary fields and are left alone;
``updated_at`` of a fixed encounter is set to the time of the fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from .streams import RulesCache, iter_streams, select
from .timeline import Anomaly, StreamRow, verify_stream

DEFAULT_BATCH_SIZE = 1000
#: How many drifted encounters and anomalies a result keeps in detail (all are counted).
DEFAULT_MAX_REPORTED = 1000

#: Projection columns, in the order of the tuples compared and written below.
PROJECTION = ("state", "version", "timeline_end_at", "head_hash")
_ENCOUNTER_COLUMNS = ("pk", "definition_id", "origin_state", "created_at", *PROJECTION)
_NO_ROWS: list[StreamRow] = []


@dataclass(frozen=True)
class Drift:
    """A stored projection that differs from the replay of its stream."""

    encounter_id: UUID
    stored: dict[str, Any]  # the differing columns only
    replayed: dict[str, Any]

    def __str__(self) -> str:
        changes = ", ".join(
            f"{name} {_show(self.stored[name])} -> {_show(self.replayed[name])}"
            for name in self.stored
        )
        return f"encounter {self.encounter_id}: {changes}"


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str) and len(value) == 64:  # a hash: its prefix is enough to compare
        return repr(value[:12] + "…")
    return repr(value)


@dataclass
class RebuildResult:
    """What a rebuild (or ``check``) did. ``drift`` and ``anomalies`` keep the first
    ``max_reported`` items in detail; the counters count everything."""

    check: bool = False
    encounters_total: int | None = None  # known when progress was requested
    encounters_scanned: int = 0
    rows_replayed: int = 0
    projections_drifted: int = 0
    projections_fixed: int = 0  # always 0 with check=True
    anomaly_count: int = 0
    anomalous_encounters: int = 0
    seconds: float = 0.0
    drift: list[Drift] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No anomalies, and (for a check) no drift."""
        return not self.anomaly_count and not (self.check and self.projections_drifted)

    @property
    def rows_per_second(self) -> float:
        return self.rows_replayed / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.check:
            drift = f"{self.projections_drifted} projections drifted (nothing written)"
        else:
            drift = f"{self.projections_fixed} projections fixed"
        return (
            f"{'check' if self.check else 'rebuild'}: {self.encounters_scanned} encounters "
            f"scanned, {self.rows_replayed} rows replayed, {drift}, {self.anomaly_count} "
            f"anomalies, {self.seconds:.2f} seconds"
        )


def rebuild_projections(
    *,
    check: bool = False,
    definition: str | None = None,
    encounters: Iterable[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    using: str = DEFAULT_DB_ALIAS,
    progress: Callable[[RebuildResult], None] | None = None,
    max_reported: int = DEFAULT_MAX_REPORTED,
    jobs: int = 1,
) -> RebuildResult:
    """Recompute every projection from the log, or with ``check=True`` only report drift.

    Args:
        check: write nothing; count and report the projections that differ.
        definition: only encounters of the definition with this code.
        encounters: only these encounter ids (UUIDs or strings).
        batch_size: encounters per batch (and per transaction).
        using: database alias.
        progress: called with the running result after each batch (with ``jobs > 1``: the
            sum over the workers, after any worker's batch).
        max_reported: how many drifts and anomalies to keep in detail.
        jobs: worker processes. ``1`` (the default) runs here, in this process and on this
            connection. ``N > 1`` splits the selected encounters into N primary-key ranges of
            (nearly) equal size and runs each range in its own process (``spawn``), with its own
            connection, exactly as a single process would (batches, one transaction each,
            locks, replay, writes); the ranges start on batch boundaries (never more workers
            than batches), so the merged result is identical to ``jobs=1``'s.

    Soft-deleted encounters are included: their logs are kept, so are their projections.

    Raises:
        ValueError: bad ``batch_size`` or ``jobs``, an encounter id that is not a UUID, or
            ``jobs > 1`` on an in-memory SQLite database, on SQLite without
            ``transaction_mode="IMMEDIATE"``, or inside a transaction.
        EncounterError: no definition has the code ``definition``.
        RebuildWorkerError: with ``jobs > 1``, a worker process failed (the others are
            stopped; every batch either committed or rolled back, a re-run finishes the job).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, not {jobs!r}")
    if encounters is not None:
        encounters = list(encounters)  # parsed (and checked) by select()
    if jobs > 1:
        return _rebuild_in_workers(
            check=check,
            definition=definition,
            encounters=encounters,
            batch_size=batch_size,
            using=using,
            progress=progress,
            max_reported=max_reported,
            jobs=jobs,
        )
    return rebuild_range(
        check=check,
        definition=definition,
        encounters=encounters,
        batch_size=batch_size,
        using=using,
        progress=progress,
        max_reported=max_reported,
    )


def rebuild_range(
    *,
    check: bool,
    definition: str | None,
    encounters: list[Any] | None,
    batch_size: int,
    using: str,
    progress: Callable[[RebuildResult], None] | None,
    max_reported: int,
    after: Any = None,
    upto: Any = None,
    count_total: bool = True,
) -> RebuildResult:
    """The rebuild in this process, of the selected encounters with ``after < pk <= upto``
    (``None``: unbounded). A worker of ``jobs > 1`` runs this for its range."""
    started = time.perf_counter()
    result = RebuildResult(check=check)
    rules = RulesCache(using)
    selected, transitions = select(using, rules, definition, encounters)
    if upto is not None:
        selected = selected.filter(pk__lte=upto)
    if progress is not None and count_total:
        counted = selected if after is None else selected.filter(pk__gt=after)
        result.encounters_total = counted.count()

    writer = _writer(connections[using])
    page = selected.order_by("pk").values_list(*_ENCOUNTER_COLUMNS)
    last: Any = after
    while True:
        with transaction.atomic(using=using):
            query = page if last is None else page.filter(pk__gt=last)
            batch = list(query.select_for_update()[:batch_size])
            if not batch:
                break
            last = batch[-1][0]
            fixes = _replay_batch(batch, transitions, rules, result, max_reported)
            if fixes and not check:
                writer(fixes, timezone.now())
                result.projections_fixed += len(fixes)
        if progress is not None:
            result.seconds = time.perf_counter() - started
            progress(result)
        if len(batch) < batch_size:
            break
    result.seconds = time.perf_counter() - started
    return result


def _replay_batch(
    batch: list[tuple],
    transitions: Any,
    rules: RulesCache,
    result: RebuildResult,
    max_reported: int,
) -> list[tuple]:
    """Fold the streams of one locked batch; returns ``(pk, *replayed projection)`` for every
    encounter whose stored projection differs."""
    by_id = {row[0]: row for row in batch}
    rows = transitions.filter(encounter_id__gte=batch[0][0], encounter_id__lte=batch[-1][0])
    fixes: list[tuple] = []
    seen: set[Any] = set()

    def fold(encounter: tuple, stream: list[StreamRow]) -> None:
        pk, definition_id, origin_state, created_at, *stored = encounter
        replay = verify_stream(pk, origin_state, created_at, stream, rules.rules(definition_id))
        timeline = replay.timeline
        replayed = (timeline.state, timeline.version, timeline.end_at, timeline.head_hash)
        result.rows_replayed += len(stream)
        if replay.anomalies:
            result.anomalous_encounters += 1
            result.anomaly_count += len(replay.anomalies)
            room = max_reported - len(result.anomalies)
            if room > 0:
                result.anomalies.extend(replay.anomalies[:room])
        if tuple(stored) != replayed:
            result.projections_drifted += 1
            if len(result.drift) < max_reported:
                pairs = enumerate(zip(stored, replayed, strict=True))
                differing = [i for i, (a, b) in pairs if a != b]
                result.drift.append(
                    Drift(
                        pk,
                        {PROJECTION[i]: stored[i] for i in differing},
                        {PROJECTION[i]: replayed[i] for i in differing},
                    )
                )
            fixes.append((pk, *replayed))

    for encounter_id, stream in iter_streams(rows):
        encounter = by_id.get(encounter_id)
        if encounter is None:  # in the pk range but not selected
            continue
        seen.add(encounter_id)
        fold(encounter, stream)
    if len(seen) < len(batch):
        for encounter in batch:
            if encounter[0] not in seen:
                fold(encounter, _NO_ROWS)
    result.encounters_scanned += len(batch)
    return fixes


# ---------------------------------------------------------------------------------------------
# jobs > 1: primary-key ranges over worker processes, results merged.
# ---------------------------------------------------------------------------------------------


class RebuildWorkerError(RuntimeError):
    """A worker process of a ``jobs > 1`` rebuild failed; the message carries its error."""


#: Counters a worker reports after each batch (for the aggregate progress display).
_COUNTERS = (
    "encounters_scanned",
    "rows_replayed",
    "projections_drifted",
    "projections_fixed",
    "anomaly_count",
    "anomalous_encounters",
)


def _split(selected: Any, total: int, jobs: int, batch_size: int) -> list[tuple[Any, Any]]:
    """Up to ``jobs`` contiguous ``(after, upto]`` primary-key ranges with (nearly) the same
    number of selected encounters each, their boundaries on ``batch_size`` multiples of the pk
    order: each worker's batches are then exactly the batches a single process would take (so
    the results, their order included, are the same), and there are never more workers than
    batches. The first range is open below, the last open above (encounters created meanwhile
    with a larger pk are the last worker's, as they would be a single process's)."""
    batches = -(-total // batch_size)
    workers = max(1, min(jobs, batches))
    pks = selected.order_by("pk").values_list("pk", flat=True)
    bounds: list[Any] = []
    for k in range(1, workers):
        offset = batches * k // workers * batch_size  # strictly increasing in k
        found = list(pks[offset - 1 : offset])
        if found and (not bounds or found[0] > bounds[-1]):
            bounds.append(found[0])
    lows: list[Any] = [None, *bounds]
    highs: list[Any] = [*bounds, None]
    return list(zip(lows, highs, strict=True))


def _worker_setup(using: str) -> dict[str, Any]:
    """What a spawned worker needs to set Django up like this process: the settings module (or,
    for ``settings.configure()``, the explicitly configured settings) and the *current*
    connection settings of ``using`` (under a test runner: the test database's name)."""
    import pickle

    from django.conf import settings

    connection: Any = connections[using]
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        raise ValueError(
            "jobs > 1 needs a database the worker processes can open: an in-memory SQLite "
            "database cannot be shared between processes (use jobs=1, or a database file)"
        )
    if (
        connection.vendor == "sqlite"
        and str(connection.settings_dict.get("OPTIONS", {}).get("transaction_mode", "")).upper()
        != "IMMEDIATE"
    ):
        # Deferred SQLite transactions cannot upgrade their read lock while another process
        # writes: workers would fail with "database is locked" instead of waiting.
        raise ValueError(
            "jobs > 1 on SQLite needs OPTIONS={'transaction_mode': 'IMMEDIATE'} (Django >= 5.1) "
            "so that the workers wait for each other's write transactions (use jobs=1)"
        )
    if connection.in_atomic_block:
        raise ValueError(
            "jobs > 1 cannot run inside a transaction: the workers use their own connections "
            "and would not see (or would wait for) this one's uncommitted work"
        )
    module = getattr(settings, "SETTINGS_MODULE", None)
    configured: dict[str, Any] = {}
    if not module:
        for name, value in vars(cast(Any, settings)._wrapped).items():
            if name.isupper():
                try:
                    pickle.dumps(value)
                except Exception:  # noqa: BLE001 - a setting a worker cannot be given
                    continue
                configured[name] = value
    return {
        "module": module,
        "settings": configured,
        "alias": using,
        "database": dict(connection.settings_dict),
    }


def _setup_django_in_worker(setup: dict[str, Any]) -> None:
    import os

    import django
    from django.conf import settings

    if not settings.configured:
        if setup["module"]:
            os.environ["DJANGO_SETTINGS_MODULE"] = setup["module"]
        else:
            settings.configure(**setup["settings"])
    django.setup()
    alias = setup["alias"]
    connections.settings[alias] = setup["database"]
    for connection in connections.all(initialized_only=True):
        if connection.alias == alias:  # opened while setting up: reopen with the new settings
            connection.close()
            del connections[alias]


def _worker_main(index: int, setup: dict[str, Any], task: dict[str, Any], messages: Any) -> None:
    """Entry point of a worker process: the single-process rebuild of its range."""
    import traceback

    try:
        _setup_django_in_worker(setup)

        def report(result: RebuildResult) -> None:
            messages.put(("progress", index, [getattr(result, n) for n in _COUNTERS]))

        wants_progress = task.pop("report")
        result = rebuild_range(**task, progress=report if wants_progress else None)
        messages.put(("done", index, result))
    except BaseException as exc:
        traceback.print_exc()
        messages.put(("error", index, "".join(traceback.format_exception_only(exc)).strip()))
        raise SystemExit(1) from None
    finally:
        connections.close_all()


def _rebuild_in_workers(
    *,
    check: bool,
    definition: str | None,
    encounters: list[Any] | None,
    batch_size: int,
    using: str,
    progress: Callable[[RebuildResult], None] | None,
    max_reported: int,
    jobs: int,
) -> RebuildResult:
    import multiprocessing
    import queue

    started = time.perf_counter()
    setup = _worker_setup(using)
    rules = RulesCache(using)
    selected, _ = select(using, rules, definition, encounters)  # bad options fail here
    total = selected.count()
    ranges = _split(selected, total, jobs, batch_size)
    merged = RebuildResult(check=check, encounters_total=total if progress is not None else None)

    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    workers = []
    for index, (after, upto) in enumerate(ranges):
        task = {
            "check": check,
            "definition": definition,
            "encounters": encounters,
            "batch_size": batch_size,
            "using": using,
            "max_reported": max_reported,
            "after": after,
            "upto": upto,
            "count_total": False,
            "report": progress is not None,
        }
        worker = context.Process(
            target=_worker_main,
            args=(index, setup, task, messages),
            name=f"rebuild-worker-{index + 1}",
            daemon=True,
        )
        workers.append(worker)
    counters: dict[int, list[int]] = {}
    results: dict[int, RebuildResult] = {}
    failure: str | None = None

    def receive(message: tuple) -> None:
        nonlocal failure
        kind, index, payload = message
        if kind == "progress":
            counters[index] = payload
            if progress is not None:
                for position, name in enumerate(_COUNTERS):
                    setattr(merged, name, sum(c[position] for c in counters.values()))
                merged.seconds = time.perf_counter() - started
                progress(merged)
        elif kind == "done":
            results[index] = payload
        elif failure is None:
            failure = f"rebuild worker {index + 1} of {len(workers)} failed: {payload}"

    try:
        for worker in workers:
            worker.start()
        while len(results) < len(workers) and failure is None:
            try:
                receive(messages.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            dead = [i for i, w in enumerate(workers) if w.exitcode is not None and i not in results]
            if dead:
                # Whatever a dead worker sent before exiting is in the pipe by now.
                try:
                    while True:
                        receive(messages.get(timeout=0.5))
                except queue.Empty:
                    pass
                for i in dead:
                    if i not in results and failure is None:
                        failure = (
                            f"rebuild worker {i + 1} of {len(workers)} failed: it exited with "
                            f"status {workers[i].exitcode} without a result"
                        )
    finally:
        for worker in workers:
            if worker.is_alive() and (failure is not None or len(results) < len(workers)):
                worker.terminate()  # its open batch rolls back with its connection
        for worker in workers:
            if worker.pid is not None:
                worker.join()
        messages.close()
    if failure is not None:
        raise RebuildWorkerError(
            failure + " (the other workers were stopped; every batch either committed or "
            "rolled back: a re-run finishes the job)"
        )

    for name in _COUNTERS:  # progress may have left running sums here
        setattr(merged, name, 0)
    for index in range(len(workers)):  # in pk order: the same order as a single process
        part = results[index]
        for name in _COUNTERS:
            setattr(merged, name, getattr(merged, name) + getattr(part, name))
        merged.drift.extend(part.drift[: max_reported - len(merged.drift)])
        merged.anomalies.extend(part.anomalies[: max_reported - len(merged.anomalies)])
    merged.seconds = time.perf_counter() - started
    return merged


# ---------------------------------------------------------------------------------------------
# Writing fixed projections: one UPDATE … FROM unnest(arrays) per batch on PostgreSQL,
# executemany of a per-row UPDATE elsewhere.
# ---------------------------------------------------------------------------------------------


def _writer(connection: Any) -> Callable[[list[tuple], datetime], None]:
    from ..models import Encounter

    meta = Encounter._meta
    qn = connection.ops.quote_name
    fields: list[Any] = [meta.pk] + [meta.get_field(name) for name in PROJECTION]
    updated_at: Any = meta.get_field("updated_at")
    table = qn(meta.db_table)

    def prepare(fixes: list[tuple], now: datetime) -> list[list[Any]]:
        stamp = updated_at.get_db_prep_save(now, connection)
        return [
            [f.get_db_prep_save(v, connection) for f, v in zip(fields, fix, strict=True)] + [stamp]
            for fix in fixes
        ]

    if connection.vendor == "postgresql":
        # One statement per batch, whatever its size: the new values travel as five arrays.
        names = [qn(f.column) for f in fields]
        arrays = ", ".join(f"%s::{f.db_type(connection)}[]" for f in fields)
        assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
        sql = (
            f"UPDATE {table} AS e SET {assignments}, {qn(updated_at.column)} = %s "
            f"FROM unnest({arrays}) AS v({', '.join(names)}) "
            f"WHERE e.{names[0]} = v.{names[0]}"
        )

        def write(fixes: list[tuple], now: datetime) -> None:
            # The replayed values are already what psycopg adapts natively (UUID, str, int,
            # aware datetime, None): no per-value field preparation.
            columns = [list(column) for column in zip(*fixes, strict=True)]
            stamp = updated_at.get_db_prep_save(now, connection)
            with connection.cursor() as cursor:
                cursor.execute(sql, [stamp, *columns])

        return write

    sql = (
        f"UPDATE {table} SET "
        + ", ".join(f"{qn(f.column)} = %s" for f in [*fields[1:], updated_at])
        + f" WHERE {qn(meta.pk.column)} = %s"
    )

    def write_each(fixes: list[tuple], now: datetime) -> None:
        params = [row[1:] + row[:1] for row in prepare(fixes, now)]
        with connection.cursor() as cursor:
            cursor.executemany(sql, params)

    return write_each
