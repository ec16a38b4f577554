"""Rebuild (or check) every encounter's projection from its transition log.

The projection columns — ``state``, ``version``, ``timeline_end_at``, ``head_hash`` — are
recomputed by folding each stream with the timeline engine (``verify_stream``), which also
verifies the stream (gaps, ``from_state``, edges, re-chain, hash chain). Anomalies are reported,
never repaired: rows are facts.

How it runs:

* encounters are taken in primary-key order, ``batch_size`` at a time (keyset pagination);
* each batch is one transaction: lock the batch's encounter rows (``SELECT … FOR UPDATE``, so a
  concurrent ``transition()`` waits and the replay is consistent; on Citus one single-shard
  lock statement per shard, see :func:`_locked_batch`), stream their rows ordered by
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
from typing import Any
from uuid import UUID

from django.db import connections, transaction
from django.db.models import QuerySet
from django.utils import timezone

from .. import store
from ..engine import Anomaly, StreamRow, hash_format, verify_stream
from ..exceptions import EncounterNotFoundError
from ..models import Encounter
from ..store import sharding
from .acknowledgements import Acknowledged, acknowledgements_of, key_of
from .selection import (
    GENESIS_COLUMNS,
    RulesCache,
    genesis_of,
    parse_encounter_ids,
    select,
    write_alias,
)
from .workers import RebuildWorkerError, describe_setup, run_in_workers

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
_ENCOUNTER_COLUMNS = (*GENESIS_COLUMNS, *PROJECTION)
_VERSION, _HEAD = (len(GENESIS_COLUMNS) + PROJECTION.index(n) for n in ("version", "head_hash"))
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
    using = write_alias(using)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, not {jobs!r}")
    if encounters is not None:
        encounters = parse_encounter_ids(encounters)
        found = set(
            Encounter.all_objects.using(using)
            .filter(pk__in=encounters)
            .values_list("pk", flat=True)
        )
        for pk in encounters:
            if pk not in found:
                raise EncounterNotFoundError(pk)
    options: dict[str, Any] = {
        "check": check,
        "definition": definition,
        "encounters": encounters,
        "batch_size": batch_size,
        "using": using,
        "max_reported": max_reported,
    }
    if jobs > 1:
        return _rebuild_in_workers(options, progress=progress, jobs=jobs)
    return rebuild_range(**options, progress=progress)


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

    page = selected.order_by("pk").values_list(*_ENCOUNTER_COLUMNS)
    sharded = sharding.is_sharded(connections[using])
    subject_types: dict[Any, str] = {}
    last: Any = after
    while True:
        with transaction.atomic(using=using):
            query = page if last is None else page.filter(pk__gt=last)
            batch = _locked_batch(query, batch_size, using, sharded)
            if not batch:
                break
            last = batch[-1][0]
            fixes = _replay_batch(
                batch, transitions, rules, result, max_reported, using, subject_types
            )
            if fixes and not check:
                store.write_projections(using, fixes, timezone.now())
                result.projections_fixed += len(fixes)
        if progress is not None:
            result.seconds = time.perf_counter() - started
            progress(result)
        if len(batch) < batch_size:
            break
    result.seconds = time.perf_counter() - started
    return result


def _locked_batch(query: QuerySet, batch_size: int, using: str, sharded: bool) -> list[tuple]:
    """The next ``batch_size`` encounters of ``query``, their rows locked for the transaction.
    One ``SELECT … FOR UPDATE`` of the batch; on a sharded store (Citus), where a lock cannot
    span shards, the batch's ids are read, locked by one statement per shard (one pipeline),
    and the batch is read again under the locks."""
    if not sharded:
        return store.values_rows(query.select_for_update()[:batch_size])
    pks = list(query.values_list("pk", flat=True)[:batch_size])
    if not pks:
        return []
    sharding.lock_each(using, pks)
    # Read again by range (cheaper for Citus to plan than a list of ids), keeping the locked
    # ones: an encounter created in the range since the ids were read is left out, as the
    # one-statement lock leaves out what is created after it ran.
    locked = set(pks)
    return [row for row in store.values_rows(query.filter(pk__lte=pks[-1])) if row[0] in locked]


def _replay_batch(
    batch: list[tuple],
    transitions: QuerySet,
    rules: RulesCache,
    result: RebuildResult,
    max_reported: int,
    using: str,
    subject_types: dict[Any, str],
) -> list[tuple]:
    """Fold the streams of one locked batch; returns ``(pk, *replayed projection)`` for every
    encounter whose stored projection differs and can be derived from the log. A projection
    whose head is evidence of a deleted tail or a replaced head (``truncated``, ``head``) is
    reported and left as it is: a rebuild never lowers a version or replaces a head hash."""
    by_id = {row[0]: row for row in batch}
    rows = transitions.filter(encounter_id__gte=batch[0][0], encounter_id__lte=batch[-1][0])
    fixes: list[tuple] = []
    found: list[list[Anomaly]] = []  # per anomalous encounter, in pk order
    seen: set[Any] = set()

    def fold(encounter: tuple, stream: list[StreamRow]) -> None:
        genesis, stored_genesis = genesis_of(
            encounter[: len(GENESIS_COLUMNS)], using, subject_types
        )
        pk, stored = genesis.encounter_id, encounter[len(GENESIS_COLUMNS) :]
        replay = verify_stream(
            genesis, stored_genesis, stream, rules.rules_of(genesis.definition_id)
        )
        evidence = replay.check_head(encounter[_VERSION], encounter[_HEAD])
        anomalies = [*replay.anomalies, *evidence]
        replayed = store.projection_values(replay.timeline)
        result.rows_replayed += len(stream)
        if anomalies:
            found.append(anomalies)
        if tuple(stored) != replayed and not evidence:
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

    for encounter_id, stream in store.iter_streams(rows):
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
    _count_anomalies(found, result, max_reported, using)
    return fixes


def _count_anomalies(
    found: list[list[Anomaly]], result: RebuildResult, max_reported: int, using: str
) -> None:
    """Add one batch's anomalies to ``result``: acknowledged ones apart (one query, none
    when the batch has no anomaly)."""
    marks = acknowledgements_of((a for anomalies in found for a in anomalies), using)
    for anomalies in found:
        open_ = [a for a in anomalies if key_of(a) not in marks]
        if open_:
            result.anomalous_encounters += 1
            result.anomaly_count += len(open_)
            result.anomalies.extend(open_[: max(0, max_reported - len(result.anomalies))])
        for anomaly in anomalies:
            mark = marks.get(key_of(anomaly))
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
    using, max_reported = options["using"], options["max_reported"]
    setup = describe_setup(using)
    # Bad options fail here, before any worker starts.
    selected, _ = select(using, RulesCache(using), options["definition"], options["encounters"])
    total = selected.count()
    merged = RebuildResult(
        check=options["check"], encounters_total=total if progress is not None else None
    )
    tasks = [
        {**options, "after": after, "upto": upto, "count_total": False}
        for after, upto in _split(selected, total, jobs, options["batch_size"])
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
        f"{__name__}:rebuild_range",
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
    merged.seconds = time.perf_counter() - started
    return merged
