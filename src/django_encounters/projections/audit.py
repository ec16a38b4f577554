"""Audit replay for compliance reviews.

For a selection of encounters (definition, ids, subject, a business-time period) replay every
stream with the timeline engine (``verify_stream``) and report, per encounter:

* its timeline in business-time order — sequence, from → to, ``effective_at`` (when it
  happened), ``transitioned_at`` (when it was recorded), who, why — with the rows that were
  *backdated* (inserted before an existing row when recorded) and the rows *overtaken* by a
  later-recorded backdated row; with ``known_at``, only the rows recorded by then;
* the anomalies of its stream (``engine.ANOMALY_KINDS``: the genesis, gaps, hash chain,
  ``from_state``, edges, re-chains, system time, and the projection's head compared with the
  log's), each naming the sequence;
* its state as of a given time, optionally as it was known at a given time (bitemporal: only
  rows recorded by then), replayed by the engine from the rows it lists.

``iter_audit()`` streams ``EncounterAudit`` objects in batches (memory per batch, whatever the
number of encounters); ``audit_encounters()`` collects them into an ``AuditReport``;
:mod:`.rendering` writes either as a table, CSV or JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import DEFAULT_DB_ALIAS
from django.db.models import Exists, Model, OuterRef, Q
from django.utils import timezone

from .. import store
from ..arguments import require_aware
from ..engine import TIMELINE_ORDER, Anomaly, known_prefix, verify_stream
from ..models import EncounterTransition
from .selection import GENESIS_COLUMNS, RulesCache, genesis_of, select

_CREATED = GENESIS_COLUMNS.index("created_at")

DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class AuditRow:
    """One row of an encounter's timeline, as an auditor reads it."""

    sequence: int
    from_state: str
    to_state: str
    effective_at: datetime
    transitioned_at: datetime
    transitioned_by: str | None  # the user's username, None when no user was recorded
    reason: str
    backdated: bool  # inserted before an existing row of the timeline when recorded
    overtaken: bool  # a later-recorded row was inserted before it
    overtaken_by: int | None = None  # the sequence of that row
    transitioned_by_id: Any = None

    def as_dict(self) -> dict[str, Any]:
        """The row in the audit's JSON (times as ISO-8601 strings with offset)."""
        return {
            "sequence": self.sequence,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "effective_at": isoformat(self.effective_at),
            "transitioned_at": isoformat(self.transitioned_at),
            "transitioned_by": self.transitioned_by,
            "reason": self.reason,
            "backdated": self.backdated,
            "overtaken": self.overtaken,
        }


@dataclass(frozen=True)
class EncounterAudit:
    """The audit of one encounter."""

    id: UUID
    definition: str  # the definition's code
    state_as_of: str
    timeline: list[AuditRow]  # business-time order: (effective_at, sequence)
    anomalies: list[Anomaly]
    current_state: str = ""  # the stored projection, for reference
    deleted: bool = False  # soft-deleted (its log is kept and audited all the same)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "definition": self.definition,
            "state_as_of": self.state_as_of,
            "timeline": [row.as_dict() for row in self.timeline],
            "anomalies": [
                {"sequence": a.sequence, "kind": a.kind, "detail": a.detail} for a in self.anomalies
            ],
        }


@dataclass
class AuditReport:
    as_of: datetime
    known_at: datetime | None
    encounters: list[EncounterAudit] = field(default_factory=list)

    @property
    def anomaly_count(self) -> int:
        return sum(len(e.anomalies) for e in self.encounters)

    def as_dict(self) -> dict[str, Any]:
        return {
            "encounters": [e.as_dict() for e in self.encounters],
            "anomaly_count": self.anomaly_count,
        }


def isoformat(value: datetime | None) -> str | None:
    """ISO-8601 with offset, in the current time zone (``TIME_ZONE`` unless activated)."""
    if value is None:
        return None
    return timezone.localtime(value).isoformat()


# ---------------------------------------------------------------------------------------------
# Selection and replay
# ---------------------------------------------------------------------------------------------


def iter_audit(
    *,
    definition: str | None = None,
    encounters: Iterable[Any] | None = None,
    subject: Model | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    using: str = DEFAULT_DB_ALIAS,
) -> Iterator[EncounterAudit]:
    """Audit the selected encounters, in ``(created_at, id)`` order, one batch at a time.

    Args:
        definition: only encounters of the definition with this code.
        encounters: only these encounter ids.
        subject: only encounters about this model instance.
        since, until: only encounters with at least one row *effective* in ``[since, until)``
            (either bound may be omitted).
        as_of: business time of ``state_as_of`` (default: now).
        known_at: report ``state_as_of`` as it was known then (rows recorded by then only).
        batch_size: encounters per batch.

    Soft-deleted encounters are included: their history is part of the record.

    Raises:
        ValueError / TypeError: naive or non-datetime times, ``since >= until``, bad ids.
        EncounterError: no definition has the code ``definition``.
    """
    for name, value in (
        ("since", since),
        ("until", until),
        ("as_of", as_of),
        ("known_at", known_at),
    ):
        require_aware(value, name, optional=True)
    if since is not None and until is not None and since >= until:
        raise ValueError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
    if as_of is None:
        as_of = timezone.now()

    rules = RulesCache(using)
    selected, _ = select(using, rules, definition, encounters)
    if subject is not None:
        if subject.pk is None:
            raise ValueError(f"subject {subject!r} is not saved (it has no primary key)")
        selected = selected.filter(
            subject_content_type=ContentType.objects.db_manager(using).get_for_model(subject),
            subject_id=str(subject.pk),
        )
    if since is not None or until is not None:
        period = EncounterTransition.objects.using(using).filter(encounter=OuterRef("pk"))
        if since is not None:
            period = period.filter(effective_at__gte=since)
        if until is not None:
            period = period.filter(effective_at__lt=until)
        selected = selected.filter(Exists(period))

    page = selected.order_by("created_at", "pk").values_list(
        *GENESIS_COLUMNS, "version", "head_hash", "state", "deleted_at"
    )
    # Arguments are checked above, before the first encounter is asked for; the batches are
    # read lazily below.
    return _audit_batches(page, rules, batch_size, using, as_of, known_at)


def _audit_batches(
    page: Any,
    rules: RulesCache,
    batch_size: int,
    using: str,
    as_of: datetime,
    known_at: datetime | None,
) -> Iterator[EncounterAudit]:
    users = _Usernames(using)
    after: tuple[datetime, Any] | None = None
    while True:
        query = page
        if after is not None:
            created, pk = after
            query = page.filter(Q(created_at__gt=created) | Q(created_at=created, pk__gt=pk))
        batch = list(query[:batch_size])
        if not batch:
            return
        after = (batch[-1][_CREATED], batch[-1][0])
        streams = dict(
            store.iter_streams(
                EncounterTransition.objects.using(using).filter(
                    encounter_id__in=[row[0] for row in batch]
                )
            )
        )
        users.load(row.transitioned_by for stream in streams.values() for row in stream)
        for values in batch:
            genesis, stored_genesis = genesis_of(values[: len(GENESIS_COLUMNS)], using)
            version, head_hash, state, deleted_at = values[len(GENESIS_COLUMNS) :]
            stream = list(known_prefix(streams.get(genesis.encounter_id, []), known_at))
            replay = verify_stream(
                genesis, stored_genesis, stream, rules.rules_of(genesis.definition_id)
            )
            anomalies = list(replay.anomalies)
            if known_at is None:  # the projection is today's: compare it with the whole log
                anomalies += replay.check_head(version, head_hash)
            timeline = [
                AuditRow(
                    sequence=row.sequence,
                    from_state=row.from_state,
                    to_state=row.to_state,
                    effective_at=row.effective_at,
                    transitioned_at=row.transitioned_at,
                    transitioned_by=users.name(row.transitioned_by),
                    reason=row.reason,
                    backdated=row.sequence in replay.backdated,
                    overtaken=row.sequence in replay.overtaken,
                    overtaken_by=replay.overtaken.get(row.sequence),
                    transitioned_by_id=row.transitioned_by,
                )
                for row in sorted(stream, key=_timeline_key)
            ]
            yield EncounterAudit(
                id=genesis.encounter_id,
                definition=rules.code(genesis.definition_id),
                state_as_of=replay.timeline.state_at(as_of),
                timeline=timeline,
                anomalies=anomalies,
                current_state=state,
                deleted=deleted_at is not None,
            )
        if len(batch) < batch_size:
            return


def _timeline_key(row: Any) -> tuple:
    return tuple(getattr(row, name) for name in TIMELINE_ORDER)


def audit_encounters(**options: Any) -> AuditReport:
    """``iter_audit(**options)`` collected into an :class:`AuditReport` (``as_of`` defaults to
    now, fixed once for the whole report)."""
    if options.get("as_of") is None:
        options["as_of"] = timezone.now()
    report = AuditReport(as_of=options["as_of"], known_at=options.get("known_at"))
    report.encounters.extend(iter_audit(**options))
    return report


class _Usernames:
    """user id -> username, looked up once per user."""

    def __init__(self, using: str) -> None:
        self.model = get_user_model()
        self.using = using
        self.names: dict[Any, str | None] = {None: None}

    def load(self, ids: Iterable[Any]) -> None:
        missing = {pk for pk in ids if pk not in self.names}
        if not missing:
            return
        field = self.model.USERNAME_FIELD
        found = dict(
            self.model._default_manager.using(self.using)
            .filter(pk__in=missing)
            .values_list("pk", field)
        )
        for pk in missing:
            self.names[pk] = str(found[pk]) if pk in found else f"#{pk}"

    def name(self, pk: Any) -> str | None:
        return self.names.get(pk, f"#{pk}")
