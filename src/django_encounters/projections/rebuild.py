"""Rebuild (or check) every encounter's projection from its transition log.

The projection columns — ``state``, ``version``, ``timeline_end_at``, ``head_hash`` — are
recomputed by folding each stream with the timeline engine (``verify_stream``), which also
verifies the stream (gaps, ``from_state``, edges, re-chain, hash chain). Anomalies are reported,
never repaired: rows are facts.

How it runs:

* encounters are taken in primary-key order, ``batch_size`` at a time (keyset pagination);
* each batch is one transaction: lock the batch's encounter rows (``SELECT … FOR UPDATE``, so a
  concurrent ``transition()`` waits and the replay is consistent; on Citus one single-shard
  statement per shard that locks and reads, see ``store.sharding.Claims``), stream their rows
  ordered by ``(encounter, sequence)``, fold each stream, compare with the stored projection
  and ``UPDATE`` only the encounters that differ;
* on PostgreSQL, :data:`OVERLAP` batches are in flight at once, each in its own thread,
  connection and transaction (the server works on one while Python verifies another); they are
  claimed in primary-key order and written and committed in that order, so the result is the
  same as one at a time (:func:`_rebuild_overlapped`);
* memory is bounded by one batch of encounters (with the overlap, :data:`OVERLAP` batches) and
  one stream at a time, whatever the number of rows; killed at any point, a batch either
  committed or rolled back, and a re-run finishes the job (the rebuild is idempotent: a second
  run finds nothing to fix).

With ``jobs=N`` (``--jobs N``) the selected encounters are split into N primary-key ranges of
equal size, each rebuilt as above by its own worker process (``spawn``, own connection); the
results are merged into one, the same as a single process's.

``ended_at``, ``started_at`` and ``scheduled_at`` are ordinary fields and are left alone;
``updated_at`` of a fixed encounter is set to the time of the fix.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import connections, transaction
from django.utils import timezone

from .. import conf, store
from ..arguments import require_positive_int
from ..engine import Anomaly, EncounterError, hash_format
from ..exceptions import EncounterNotFoundError, RebuildWorkerError
from .acknowledgements import Acknowledged, mark_key
from .audit import EncounterAudit, definition_audits
from .replay import Replays, Verified
from .seals import seal_status
from .selection import RulesCache, Selection
from .workers import describe_setup, run_in_workers

__all__ = [
    "AcknowledgedAnomaly",
    "Drift",
    "RebuildResult",
    "RebuildWorkerError",
    "rebuild_projections",
    "rebuild_range",
]

DEFAULT_BATCH_SIZE = 1000
#: How many drifted encounters and anomalies a result keeps in detail (all are counted).
DEFAULT_MAX_REPORTED = 1000

#: Projection columns, in the order of the tuples compared and written below.
PROJECTION = store.PROJECTION_FIELDS


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
    if isinstance(value, str) and hash_format(value) and len(value) > 40:
        return repr(value[:15] + "…")  # a hash ("v2:" + 64 hex): its prefix is enough
    return repr(value)


@dataclass(frozen=True)
class AcknowledgedAnomaly:
    """An anomaly a reviewer acknowledged, and how."""

    anomaly: Anomaly
    acknowledged: Acknowledged

    def __str__(self) -> str:
        return f"{self.anomaly} ({self.acknowledged})"


@dataclass
class RebuildResult:
    """What a rebuild (or ``check``) did. ``drift``, ``anomalies`` and ``acknowledged`` keep
    the first ``max_reported`` items in detail; the counters count everything.
    ``anomaly_count``/``anomalies`` are the anomalies nobody acknowledged (what fails
    ``ok``); acknowledged ones are counted in ``acknowledged_count`` and listed, with who,
    when and why, in ``acknowledged``."""

    check: bool = False
    encounters_total: int | None = None  # known when progress was requested
    encounters_scanned: int = 0
    rows_replayed: int = 0
    projections_drifted: int = 0
    projections_fixed: int = 0  # always 0 with check=True
    anomaly_count: int = 0  # not acknowledged
    anomalous_encounters: int = 0  # with an anomaly nobody acknowledged
    acknowledged_count: int = 0
    seconds: float = 0.0
    drift: list[Drift] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    acknowledged: list[AcknowledgedAnomaly] = field(default_factory=list)
    #: "checked", or why the seals were not checked (``seals.seal_status``)
    seals: str = "checked"

    @property
    def ok(self) -> bool:
        """No unacknowledged anomaly, and (for a check) no drift."""
        return not self.anomaly_count and not (self.check and self.projections_drifted)

    @property
    def rows_per_second(self) -> float:
        return self.rows_replayed / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.check:
            drift = f"{self.projections_drifted} projections drifted (nothing written)"
        else:
            drift = f"{self.projections_fixed} projections fixed"
        acknowledged = (
            f" ({self.acknowledged_count} acknowledged)" if self.acknowledged_count else ""
        )
        return (
            f"{'check' if self.check else 'rebuild'}: {self.encounters_scanned} encounters "
            f"scanned, {self.rows_replayed} rows replayed, {drift}, {self.anomaly_count} "
            f"anomalies{acknowledged}, {self.seconds:.2f} seconds"
        )


def rebuild_projections(
    *,
    check: bool = False,
    definition: str | None = None,
    encounters: Iterable[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    using: str | None = None,
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
    Anomalies a reviewer acknowledged are counted apart (``acknowledged_count``) and do not
    fail ``ok``; a projection whose head is evidence (``truncated``, ``head``) is left as it
    is, acknowledged or not.

    Raises:
        EncounterNotFoundError: an id of ``encounters`` names no encounter (nothing written).
        ValueError: bad ``batch_size`` or ``jobs``, an encounter id that is not a UUID, or
            ``jobs > 1`` on an in-memory SQLite database, on SQLite without
            ``transaction_mode="IMMEDIATE"``, or inside a transaction.
        EncounterError: no definition has the code ``definition``.
        RebuildWorkerError: with ``jobs > 1``, a worker process failed (the others are
            stopped; every batch either committed or rolled back, a re-run finishes the job).
    """
    require_positive_int(jobs, "jobs")
    selection = Selection.of(
        definition=definition,
        encounters=encounters,
        batch_size=batch_size,
        using=using,
        for_write=True,
    )
    absent = selection.absent()
    if absent:
        raise EncounterNotFoundError(absent[0])
    options: dict[str, Any] = {
        "selection": selection,
        "check": check,
        "max_reported": max_reported,
    }
    if jobs > 1:
        result = _rebuild_in_workers(options, progress=progress, jobs=jobs)
    else:
        result = rebuild_range(**options, progress=progress)
    if selection.encounters is None:
        # What is wrong with a definition version itself, reported once (as the audit does).
        for entry in definition_audits(
            RulesCache(selection.using), selection.using, selection.definition_ids, conf.sealer()
        ):
            _count_anomalies(entry, result, max_reported)
    return result


def rebuild_range(
    *,
    selection: Selection,
    check: bool,
    progress: Callable[[RebuildResult], None] | None,
    max_reported: int,
    after: Any = None,
    upto: Any = None,
    count_total: bool = True,
) -> RebuildResult:
    """The rebuild in this process, of the selected encounters with ``after < pk <= upto``
    (``None``: unbounded). A worker of ``jobs > 1`` runs this for its range."""
    started = time.perf_counter()
    using = selection.using
    result = RebuildResult(check=check)
    replays = Replays(selection, after=after, upto=upto)
    result.seals = seal_status(replays.sealer)
    if progress is not None and count_total:
        counted = selection.queryset()
        if after is not None:
            counted = counted.filter(pk__gt=after)
        if upto is not None:
            counted = counted.filter(pk__lte=upto)
        result.encounters_total = counted.count()
    depth = _overlap(using)
    with _collected_per_batch() as collect:
        if depth > 1:
            _rebuild_overlapped(
                replays,
                result,
                check,
                max_reported,
                progress,
                started,
                depth=depth,
                collect=collect,
            )
        else:
            while not replays.exhausted and _rebuild_batch(replays, result, check, max_reported):
                collect()
                if progress is not None:
                    result.seconds = time.perf_counter() - started
                    progress(result)
    result.seconds = time.perf_counter() - started
    return result


def _rebuild_batch(replays: Replays, result: RebuildResult, check: bool, max_reported: int) -> bool:
    """One batch in one transaction: lock and read it, replay it, write what differs; False
    when there was no batch left. (A function of its own so that the batch's objects are gone
    when it returns, before the collection that follows it.)"""
    using = replays.using
    with transaction.atomic(using=using):
        batch = replays.next_batch(lock=True)
        if batch is None:
            return False
        fixes = _compare(batch, result, max_reported)
        if fixes and not check:
            store.write_projections(using, fixes, timezone.now())
            result.projections_fixed += len(fixes)
    return True


@contextmanager
def _collected_per_batch() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector paused for the rebuild, and run on the young
    generations once after each batch instead (the function yielded).

    A batch makes tens of thousands of small objects (rows, events, timeline entries) that live
    until the batch is done; with the collector on, they trigger its collections every few
    hundred allocations, and every so often a full one that walks every object of the process
    (Django's included): about a sixth of a rebuild's time on SQLite. Nearly all of them are
    freed by reference counting; the few reference cycles a batch leaves are collected by the
    young collection after it (the collector is never paused when it was off already, and is
    turned back on at the end even when the rebuild fails)."""
    if not gc.isenabled():
        yield _nothing
        return
    gc.disable()
    try:
        yield _collect_young
    finally:
        gc.enable()


def _collect_young() -> None:
    gc.collect(1)


def _nothing() -> None:
    pass


# ---------------------------------------------------------------------------------------------
# PostgreSQL: batches overlapped in one process.
# ---------------------------------------------------------------------------------------------

#: How many batches a rebuild on PostgreSQL (and Citus) keeps in flight in one process: each
#: in its own thread, on its own connection and transaction, so that the server locks, reads,
#: writes and commits one batch while Python verifies another (the driver releases the GIL
#: while it waits for the server). 1 turns the overlap off.
OVERLAP = 2


def _overlap(using: str) -> int:
    """How many batches to keep in flight: :data:`OVERLAP` on PostgreSQL; 1 elsewhere (SQLite
    has one writer at a time), inside a transaction (the other threads' connections would not
    see its work) and while this connection's queries are logged (``DEBUG``, a
    ``CaptureQueriesContext``): the statements then run, and are logged, here."""
    connection = connections[using]
    if connection.vendor != "postgresql" or connection.in_atomic_block or connection.queries_logged:
        return 1
    return max(1, OVERLAP)


class _Overlapped:
    """The shared state of an overlapped rebuild: batches are claimed (locked and read) one at
    a time in primary-key order, replayed concurrently, written and committed in order."""

    def __init__(self, replays: Replays, check: bool, max_reported: int, depth: int) -> None:
        self.replays = replays
        self.check = check
        self.max_reported = max_reported
        self.claiming = threading.Lock()
        self.changed = threading.Condition()
        self.claimed = 0  # batches claimed so far (the next one's index)
        self.committed = 0  # batches committed, in order: 0 .. committed - 1
        self.parts: dict[int, RebuildResult] = {}
        self.failure: tuple[int, BaseException] | None = None
        self.running = depth
        self.stop = False

    def work(self) -> None:
        """A thread's loop: claim the next batch (lock and read it), replay it, wait for the
        batches before it to commit, write what differs, commit."""
        using = self.replays.using
        index = -1
        try:
            while True:
                with transaction.atomic(using=using):
                    with self.claiming:
                        if self.stop:
                            return
                        index = self.claimed
                        batch = self.replays.claim(lock=True)
                        if batch is None:
                            return
                        self.claimed += 1
                    part = RebuildResult(check=self.check)
                    fixes = _compare(self.replays.fold(batch), part, self.max_reported)
                    # Written and committed in batch order, as one at a time would: a failure
                    # (or a kill) leaves a prefix of the batches committed.
                    with self.changed:
                        while self.committed < index and not self.stop:
                            self.changed.wait()
                        if self.stop:
                            raise _Abandoned
                    if fixes and not self.check:
                        store.write_projections(using, fixes, timezone.now())
                        part.projections_fixed += len(fixes)
                with self.changed:
                    self.committed = index + 1
                    self.parts[index] = part
                    self.changed.notify_all()
        except _Abandoned:
            pass
        except BaseException as exc:
            with self.changed:
                if self.failure is None or index < self.failure[0]:
                    self.failure = (index if index >= 0 else self.claimed, exc)
                self.stop = True
                self.changed.notify_all()
        finally:
            connections[using].close()
            with self.changed:
                self.running -= 1
                self.changed.notify_all()

    def next_part(self, index: int) -> RebuildResult | None:
        """Batch ``index``'s result once committed; None when there is no such batch. Raises
        what failed a batch before it."""
        with self.changed:
            while True:
                if self.failure is not None and self.failure[0] <= index:
                    raise self.failure[1]
                if index in self.parts:
                    return self.parts.pop(index)
                if not self.running:
                    if self.failure is not None:
                        raise self.failure[1]
                    return None
                self.changed.wait()

    def abandon(self) -> None:
        with self.changed:
            self.stop = True
            self.changed.notify_all()


class _Abandoned(EncounterError):
    """Rolls a batch back when a batch before it failed (never leaves the rebuild: the thread
    that raises it catches it)."""


def _rebuild_overlapped(
    replays: Replays,
    result: RebuildResult,
    check: bool,
    max_reported: int,
    progress: Callable[[RebuildResult], None] | None,
    started: float,
    *,
    depth: int,
    collect: Callable[[], None] = lambda: None,
) -> None:
    """The batches of ``replays`` rebuilt by ``depth`` threads, merged into ``result`` in batch
    order: the same result as one at a time. Each batch is what a single process does (one
    transaction: lock, read, replay, write), and writes and commits after the one before it
    committed, so a failure leaves the batches before it committed and none after it."""
    shared = _Overlapped(replays, check, max_reported, depth)
    threads = [
        threading.Thread(target=shared.work, name=f"rebuild-batch-{n + 1}", daemon=True)
        for n in range(depth)
    ]
    for thread in threads:
        thread.start()
    try:
        index = 0
        while (part := shared.next_part(index)) is not None:
            _merge(result, part, max_reported)
            index += 1
            part = None
            collect()
            if progress is not None:
                result.seconds = time.perf_counter() - started
                progress(result)
    finally:
        shared.abandon()
        for thread in threads:
            thread.join()


def _merge(result: RebuildResult, part: RebuildResult, max_reported: int) -> None:
    """Add ``part`` (the result of the batches after ``result``'s) to ``result``."""
    for name in _COUNTERS:
        setattr(result, name, getattr(result, name) + getattr(part, name))
    result.drift.extend(part.drift[: max(0, max_reported - len(result.drift))])
    result.anomalies.extend(part.anomalies[: max(0, max_reported - len(result.anomalies))])
    result.acknowledged.extend(part.acknowledged[: max(0, max_reported - len(result.acknowledged))])


def _compare(batch: list[Verified], result: RebuildResult, max_reported: int) -> list[tuple]:
    """Compare one locked batch's stored projections with their replays; returns
    ``(pk, *replayed projection)`` for every encounter whose stored projection differs and can
    be derived from the log. A projection whose head is evidence of a deleted tail or a
    replaced head (``truncated``, ``head``) is reported and left as it is: a rebuild never
    lowers a version or replaces a head hash."""
    fixes: list[tuple] = []
    for verified in batch:
        stored = verified.projection
        replayed = store.projection_values(verified.replay.timeline)
        result.rows_replayed += len(verified.stream)
        if verified.anomalies:
            _count_anomalies(verified, result, max_reported)
        if stored != replayed and not verified.evidence:
            result.projections_drifted += 1
            if len(result.drift) < max_reported:
                pairs = enumerate(zip(stored, replayed, strict=True))
                differing = [i for i, (a, b) in pairs if a != b]
                result.drift.append(
                    Drift(
                        verified.id,
                        {PROJECTION[i]: stored[i] for i in differing},
                        {PROJECTION[i]: replayed[i] for i in differing},
                    )
                )
            fixes.append((verified.id, *replayed))
    result.encounters_scanned += len(batch)
    return fixes


def _count_anomalies(
    verified: Verified | EncounterAudit, result: RebuildResult, max_reported: int
) -> None:
    """Add one encounter's (or definition version's) anomalies to ``result``, acknowledged
    ones apart."""
    marks = verified.acknowledged
    open_ = [a for a in verified.anomalies if mark_key(a) not in marks]
    if open_:
        result.anomalous_encounters += 1
        result.anomaly_count += len(open_)
        result.anomalies.extend(open_[: max(0, max_reported - len(result.anomalies))])
    for anomaly in verified.anomalies:
        mark = marks.get(mark_key(anomaly))
        if mark is None:
            continue
        result.acknowledged_count += 1
        if len(result.acknowledged) < max_reported:
            result.acknowledged.append(AcknowledgedAnomaly(anomaly, mark))


# ---------------------------------------------------------------------------------------------
# jobs > 1: primary-key ranges over worker processes, results merged.
# ---------------------------------------------------------------------------------------------

#: Counters a worker reports after each batch (for the aggregate progress display).
_COUNTERS = (
    "encounters_scanned",
    "rows_replayed",
    "projections_drifted",
    "projections_fixed",
    "anomaly_count",
    "anomalous_encounters",
    "acknowledged_count",
)


def _rebuild_range_in_worker(*, selection: dict[str, Any], **options: Any) -> RebuildResult:
    """A worker's :func:`rebuild_range` (its selection given as :meth:`Selection.fields`)."""
    return rebuild_range(selection=Selection(**selection), count_total=False, **options)


def _counters(result: RebuildResult) -> list[int]:
    return [getattr(result, name) for name in _COUNTERS]


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


def _rebuild_in_workers(
    options: dict[str, Any],
    *,
    progress: Callable[[RebuildResult], None] | None,
    jobs: int,
) -> RebuildResult:
    """``rebuild_range(**options)`` over up to ``jobs`` worker processes, results merged."""
    started = time.perf_counter()
    selection, max_reported = options["selection"], options["max_reported"]
    setup = describe_setup(selection.using)
    selected = selection.queryset()
    total = selected.count()
    merged = RebuildResult(
        check=options["check"], encounters_total=total if progress is not None else None
    )
    # A worker unpickles its task before Django is set up: the selection travels as its fields.
    tasks = [
        {**options, "selection": selection.fields(), "after": after, "upto": upto}
        for after, upto in _split(selected, total, jobs, selection.batch_size)
    ]
    running: dict[int, list[int]] = {}

    def on_progress(index: int, counters: list[int]) -> None:
        assert progress is not None
        running[index] = counters
        for position, name in enumerate(_COUNTERS):
            setattr(merged, name, sum(c[position] for c in running.values()))
        merged.seconds = time.perf_counter() - started
        progress(merged)

    parts = run_in_workers(
        f"{__name__}:_rebuild_range_in_worker",
        tasks,
        setup,
        snapshot=f"{__name__}:_counters" if progress is not None else None,
        on_progress=on_progress if progress is not None else None,
    )
    for name in _COUNTERS:  # progress may have left running sums here
        setattr(merged, name, sum(getattr(part, name) for part in parts))
    for part in parts:  # in pk order: the same order as a single process
        merged.drift.extend(part.drift[: max_reported - len(merged.drift)])
        merged.anomalies.extend(part.anomalies[: max_reported - len(merged.anomalies)])
        merged.acknowledged.extend(part.acknowledged[: max_reported - len(merged.acknowledged)])
    if parts:
        merged.seals = parts[0].seals
    merged.seconds = time.perf_counter() - started
    return merged
