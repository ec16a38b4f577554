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

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from ..exceptions import EncounterError
from .streams import RulesCache, iter_streams, parse_encounter_ids
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
) -> RebuildResult:
    """Recompute every projection from the log, or with ``check=True`` only report drift.

    Args:
        check: write nothing; count and report the projections that differ.
        definition: only encounters of the definition with this code.
        encounters: only these encounter ids (UUIDs or strings).
        batch_size: encounters per batch (and per transaction).
        using: database alias.
        progress: called with the running result after each batch.
        max_reported: how many drifts and anomalies to keep in detail.

    Soft-deleted encounters are included: their logs are kept, so are their projections.

    Raises:
        ValueError: bad ``batch_size`` or an encounter id that is not a UUID.
        EncounterError: no definition has the code ``definition``.
    """
    from ..models import Encounter, EncounterTransition

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    started = time.perf_counter()
    result = RebuildResult(check=check)
    rules = RulesCache(using)

    selected = Encounter.all_objects.using(using)
    transitions = EncounterTransition.objects.using(using)
    if definition is not None:
        definition_ids = rules.ids_for_code(definition)
        if not definition_ids:
            raise EncounterError(f"no encounter definition has the code {definition!r}")
        selected = selected.filter(definition_id__in=definition_ids)
        transitions = transitions.filter(encounter__definition_id__in=definition_ids)
    if encounters is not None:
        ids = parse_encounter_ids(encounters)
        selected = selected.filter(pk__in=ids)
        transitions = transitions.filter(encounter_id__in=ids)
    if progress is not None:
        result.encounters_total = selected.count()

    writer = _writer(connections[using])
    page = selected.order_by("pk").values_list(*_ENCOUNTER_COLUMNS)
    last: Any = None
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
