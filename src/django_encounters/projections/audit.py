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
  rows recorded by then), replayed by the engine from the rows it lists;
* with ``against`` (a checkpoint, :mod:`.checkpoints`), whether its log still extends the
  prefix the checkpoint recorded (``rewritten``, ``truncated``; encounters of the checkpoint
  that are gone are reported ``missing``, after the others);
* which anomalies a reviewer acknowledged (who, when, why): they are still listed, marked,
  and no longer counted in ``anomaly_count``.

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
from django.db.models import Model, Q
from django.utils import timezone

from .. import store
from ..arguments import require_aware
from ..engine import TIMELINE_ORDER, Anomaly, Genesis, known_prefix, verify_stream
from ..exceptions import EncounterError, EncounterNotFoundError
from ..models import AnomalyAcknowledgement, Encounter, EncounterTransition
from .acknowledgements import (
    Acknowledged,
    acknowledge_anomaly,
    acknowledgement_arguments,
    acknowledgements_of,
    key_of,
)
from .checkpoints import CheckpointCheck, verify_checkpoint
from .selection import (
    GENESIS_COLUMNS,
    RulesCache,
    effective_between,
    genesis_of,
    parse_encounter_ids,
    read_alias,
    select,
    write_alias,
)

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
    definition: str  # the definition's code ("" for a missing encounter)
    state_as_of: str  # "" for a missing encounter
    timeline: list[AuditRow]  # business-time order: (effective_at, sequence)
    anomalies: list[Anomaly]  # acknowledged ones included
    current_state: str = ""  # the stored projection, for reference
    deleted: bool = False  # soft-deleted (its log is kept and audited all the same)
    missing: bool = False  # in the checkpoint audited against, gone from the database
    #: (sequence, kind) -> how that anomaly was acknowledged
    acknowledged: dict[tuple[int, str], Acknowledged] = field(default_factory=dict)
    #: the facts it was created with (subject, origin state, created_at); None when missing
    genesis: Genesis | None = None

    def acknowledgement(self, anomaly: Anomaly) -> Acknowledged | None:
        """How ``anomaly`` (one of :attr:`anomalies`) was acknowledged, if it was."""
        return self.acknowledged.get((anomaly.sequence, anomaly.kind))

    @property
    def unacknowledged(self) -> list[Anomaly]:
        return [a for a in self.anomalies if (a.sequence, a.kind) not in self.acknowledged]

    @property
    def anomaly_count(self) -> int:
        """The anomalies nobody acknowledged (what fails an exit status)."""
        return len(self.unacknowledged)

    @property
    def acknowledged_count(self) -> int:
        return len(self.anomalies) - self.anomaly_count

    def anomaly_dict(self, anomaly: Anomaly) -> dict[str, Any]:
        found: dict[str, Any] = {
            "sequence": anomaly.sequence,
            "kind": anomaly.kind,
            "detail": anomaly.detail,
        }
        acknowledged = self.acknowledgement(anomaly)
        if acknowledged is not None:
            found["acknowledged"] = acknowledged.as_dict()
        return found

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "definition": None if self.missing else self.definition,
            "state_as_of": None if self.missing else self.state_as_of,
            "timeline": [row.as_dict() for row in self.timeline],
            "anomalies": [self.anomaly_dict(a) for a in self.anomalies],
        }
        if self.missing:
            data["missing"] = True
        return data


@dataclass
class AuditReport:
    as_of: datetime
    known_at: datetime | None
    encounters: list[EncounterAudit] = field(default_factory=list)
    checkpoint: CheckpointCheck | None = None  # the checkpoint audited against, if any

    @property
    def anomaly_count(self) -> int:
        """Anomalies nobody acknowledged."""
        return sum(e.anomaly_count for e in self.encounters)

    @property
    def acknowledged_count(self) -> int:
        return sum(e.acknowledged_count for e in self.encounters)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "encounters": [e.as_dict() for e in self.encounters],
            "anomaly_count": self.anomaly_count,
            "acknowledged_count": self.acknowledged_count,
        }
        if self.checkpoint is not None:
            data["checkpoint"] = self.checkpoint.as_dict()
        return data


class AuditStream(Iterator[EncounterAudit]):
    """What :func:`iter_audit` returns: the audits, read lazily, and the checkpoint they are
    compared with (``checkpoint``; None without ``against``)."""

    def __init__(self, audits: Iterator[EncounterAudit], checkpoint: CheckpointCheck | None):
        self._audits = audits
        self.checkpoint = checkpoint

    def __iter__(self) -> AuditStream:
        return self

    def __next__(self) -> EncounterAudit:
        return next(self._audits)


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
    against: Any = None,
    root: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    using: str | None = None,
) -> AuditStream:
    """Audit the selected encounters, in ``(created_at, id)`` order, one batch at a time.

    Args:
        definition: only encounters of the definition with this code.
        encounters: only these encounter ids (each must exist, or be ``missing`` from the
            checkpoint ``against``).
        subject: only encounters about this model instance.
        since: only encounters with at least one row *effective* at or after ``since``.
        until: only encounters with at least one row *effective* before ``until`` (with
            ``since``: in ``[since, until)``).
        as_of: business time of ``state_as_of`` (default: now).
        known_at: report ``state_as_of`` as it was known then (rows recorded by then only).
        against: a checkpoint (a file path, or its parsed JSON): each selected encounter in it
            must still extend its checkpointed prefix; encounters of it that are gone are
            reported (``missing``) after the others, whatever the selection but ``encounters``.
        root: with ``against``, the root that was published: the checkpoint's must be it.
        batch_size: encounters per batch.

    Soft-deleted encounters are included: their history is part of the record.

    Arguments, the checkpoint (read and compared with the log here, before the first audit)
    and the encounter ids are checked when this is called; the audits are read lazily.

    Raises:
        ValueError / TypeError: naive or non-datetime times, ``since >= until``, bad ids.
        EncounterError: no definition has the code ``definition``.
        EncounterNotFoundError: an id of ``encounters`` names no encounter.
        CheckpointError: ``against`` cannot be read, is malformed, or its root does not match.
    """
    using = read_alias(using)
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
    if root is not None and against is None:
        raise ValueError("root is the published root of a checkpoint: give against too")
    if as_of is None:
        as_of = timezone.now()

    rules = RulesCache(using)
    ids = None if encounters is None else parse_encounter_ids(encounters)
    selected, _ = select(using, rules, definition, ids)
    narrowed = definition is not None or ids is not None
    if subject is not None:
        if subject.pk is None:
            raise ValueError(f"subject {subject!r} is not saved (it has no primary key)")
        selected = selected.filter(
            subject_content_type=ContentType.objects.db_manager(using).get_for_model(subject),
            subject_id=str(subject.pk),
        )
        narrowed = True
    if since is not None or until is not None:
        selected = effective_between(selected, since, until, using)
        narrowed = True

    absent = absent_encounters(ids, using) if ids is not None else []
    if absent and against is None:
        raise EncounterNotFoundError(absent[0])
    check = None
    if against is not None:
        check = verify_checkpoint(
            against,
            using=using,
            root=root,
            selected=selected if narrowed else None,
            encounters=ids,
            batch_size=max(batch_size, 100),
        )
        gone = {a.encounter_id for a in check.anomalies if a.kind == "missing"}
        absent = [pk for pk in absent if pk not in gone]
        if absent:
            raise EncounterNotFoundError(absent[0])

    page = selected.order_by("created_at", "pk").values_list(
        *GENESIS_COLUMNS, "version", "head_hash", "state", "deleted_at"
    )
    pending: dict[Any, list[Anomaly]] = {}
    for anomaly in check.anomalies if check is not None else []:
        pending.setdefault(anomaly.encounter_id, []).append(anomaly)
    return AuditStream(
        _audit_batches(page, rules, batch_size, using, as_of, known_at, pending), check
    )


def absent_encounters(ids: Iterable[Any], using: str | None = None) -> list[UUID]:
    """The ids (in their order) that name no encounter, soft-deleted ones counting as
    existing."""
    using = read_alias(using)
    wanted = parse_encounter_ids(ids)
    found = set(
        Encounter.all_objects.using(using).filter(pk__in=wanted).values_list("pk", flat=True)
    )
    return [pk for pk in wanted if pk not in found]


def _audit_batches(
    page: Any,
    rules: RulesCache,
    batch_size: int,
    using: str,
    as_of: datetime,
    known_at: datetime | None,
    pending: dict[Any, list[Anomaly]],
) -> Iterator[EncounterAudit]:
    """The audits of the selected encounters, batch by batch; then the encounters of the
    checkpoint that are gone (``pending`` holds the checkpoint's anomalies by encounter)."""
    users = _Usernames(using)
    after: tuple[datetime, Any] | None = None
    while True:
        query = page
        if after is not None:
            created, pk = after
            query = page.filter(Q(created_at__gt=created) | Q(created_at=created, pk__gt=pk))
        batch = list(query[:batch_size])
        if not batch:
            break
        after = (batch[-1][_CREATED], batch[-1][0])
        streams = dict(
            store.iter_streams(
                EncounterTransition.objects.using(using).filter(
                    encounter_id__in=[row[0] for row in batch]
                )
            )
        )
        users.load(row.transitioned_by for stream in streams.values() for row in stream)
        audits = [
            _audit_one(values, streams, rules, users, using, as_of, known_at, pending)
            for values in batch
        ]
        yield from _acknowledged(audits, using)
        if len(batch) < batch_size:
            break
    left = sorted(pending.items(), key=lambda item: str(item[0]))
    for start in range(0, len(left), batch_size):
        audits = [
            EncounterAudit(
                id=encounter_id,
                definition="",
                state_as_of="",
                timeline=[],
                anomalies=anomalies,
                missing=any(a.kind == "missing" for a in anomalies),
            )
            for encounter_id, anomalies in left[start : start + batch_size]
        ]
        yield from _acknowledged(audits, using)


def _audit_one(
    values: tuple,
    streams: dict[Any, list[Any]],
    rules: RulesCache,
    users: _Usernames,
    using: str,
    as_of: datetime,
    known_at: datetime | None,
    pending: dict[Any, list[Anomaly]],
) -> EncounterAudit:
    genesis, stored_genesis = genesis_of(values[: len(GENESIS_COLUMNS)], using)
    version, head_hash, state, deleted_at = values[len(GENESIS_COLUMNS) :]
    stream = list(known_prefix(streams.get(genesis.encounter_id, []), known_at))
    replay = verify_stream(genesis, stored_genesis, stream, rules.rules_of(genesis.definition_id))
    anomalies = list(replay.anomalies)
    if known_at is None:  # the projection is today's: compare it with the whole log
        anomalies += replay.check_head(version, head_hash)
    anomalies += pending.pop(genesis.encounter_id, [])
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
    return EncounterAudit(
        id=genesis.encounter_id,
        definition=rules.code(genesis.definition_id),
        state_as_of=replay.timeline.state_at(as_of),
        timeline=timeline,
        anomalies=anomalies,
        current_state=state,
        deleted=deleted_at is not None,
        genesis=genesis,
    )


def _acknowledged(audits: list[EncounterAudit], using: str) -> list[EncounterAudit]:
    """``audits`` with the acknowledgements of their anomalies filled in (one query, none
    when the batch has no anomaly)."""
    found = acknowledgements_of((a for audit in audits for a in audit.anomalies), using)
    if found:
        for audit in audits:
            for anomaly in audit.anomalies:
                acknowledged = found.get(key_of(anomaly))
                if acknowledged is not None:
                    audit.acknowledged[(anomaly.sequence, anomaly.kind)] = acknowledged
    return audits


def _timeline_key(row: Any) -> tuple:
    return tuple(getattr(row, name) for name in TIMELINE_ORDER)


def audit_encounters(**options: Any) -> AuditReport:
    """``iter_audit(**options)`` collected into an :class:`AuditReport` (``as_of`` defaults to
    now, fixed once for the whole report)."""
    if options.get("as_of") is None:
        options["as_of"] = timezone.now()
    audits = iter_audit(**options)
    report = AuditReport(
        as_of=options["as_of"], known_at=options.get("known_at"), checkpoint=audits.checkpoint
    )
    report.encounters.extend(audits)
    return report


class AnomalyNotReportedError(EncounterError, ValueError):
    """An acknowledgement refused: the audit does not report that anomaly now (``reported``
    lists what it does report for the encounter)."""

    def __init__(self, encounter_id: Any, sequence: int, kind: str, reported: list[Anomaly]):
        self.encounter_id = encounter_id
        self.sequence = sequence
        self.kind = kind
        self.reported = reported
        listed = "; ".join(f"sequence {a.sequence}: {a.kind}" for a in reported) or "none"
        super().__init__(
            f"encounter {encounter_id} has no {kind!r} anomaly at sequence {sequence} to "
            f"acknowledge (its audit reports: {listed})"
        )


def acknowledge_reported_anomaly(
    encounter_id: Any,
    sequence: int,
    kind: str,
    reason: str,
    acknowledged_by: Any = None,
    *,
    against: Any = None,
    root: str | None = None,
    using: str | None = None,
) -> tuple[AnomalyAcknowledgement, Anomaly]:
    """Acknowledge an anomaly that the audit of the encounter reports now (with ``against``:
    compared with that checkpoint too, for ``rewritten``/``truncated``/``missing``); returns
    the acknowledgement recorded and the anomaly it acknowledges.

    Raises:
        ValueError / TypeError: as ``acknowledgements.acknowledge_anomaly``.
        EncounterNotFoundError: no such encounter (and not ``missing`` from ``against``).
        CheckpointError: ``against`` cannot be used.
        AnomalyNotReportedError: the audit does not report that anomaly (nothing written).
    """
    using = write_alias(using)
    encounter_uuid = acknowledgement_arguments(
        encounter_id, sequence, kind, reason, acknowledged_by
    )
    audits = iter_audit(encounters=[encounter_uuid], against=against, root=root, using=using)
    reported = [anomaly for audit in audits for anomaly in audit.anomalies]
    matching = [a for a in reported if (a.sequence, a.kind) == (sequence, kind)]
    if not matching:
        raise AnomalyNotReportedError(encounter_uuid, sequence, kind, reported)
    recorded = acknowledge_anomaly(
        encounter_uuid, sequence, kind, reason, acknowledged_by, using=using
    )
    return recorded, matching[0]


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
