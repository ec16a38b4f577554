"""Audit replay for compliance reviews.

For a selection of encounters (definition, ids, subject, a business-time period) replay every
stream with the timeline engine (``verify_stream``) and report, per encounter:

* its timeline in business-time order — sequence, from → to, ``effective_at`` (when it
  happened), ``transitioned_at`` (when it was recorded), who, why — with the rows that were
  *backdated* (inserted before an existing row when recorded) and the rows *overtaken* by a
  later-recorded backdated row; with ``known_at``, only the rows recorded by then;
* the anomalies of its stream (``engine.AnomalyKind``: the genesis, gaps, hash chain,
  ``from_state``, edges, re-chains, system time, and the projection's head compared with the
  log's), each naming the sequence;
* its state as of a given time, optionally as it was known at a given time (bitemporal: only
  rows recorded by then), replayed by the engine from the rows it lists;
* with ``against`` (a checkpoint, :mod:`.checkpoints`), whether its log still extends the
  prefix the checkpoint recorded (``rewritten``, ``truncated``), and whether a row or an
  encounter the checkpoint does not have claims to have been recorded before it
  (``unrecorded``, ``uncheckpointed``). The checkpoint is compared whole, whatever the
  selection: an encounter outside the selection with a finding against it is reported after
  the selected ones (``outside_selection``), and encounters of the checkpoint that are gone
  (``missing``) last;
* with seal keys configured (``ENCOUNTERS_SEAL_KEYS``), the seals of its rows, its genesis,
  the definition versions it uses and its acknowledgements (``seal``; without keys the report
  says seals were ``not checked``);
* which anomalies a reviewer acknowledged (who, when, why): they are still listed, marked,
  and no longer counted in ``anomaly_count``. An acknowledgement covers a finding with the
  evidence it was given for only; a broken one covers nothing and is reported.

``iter_audit()`` streams ``EncounterAudit`` objects in batches (memory per batch, whatever the
number of encounters); ``audit_encounters()`` collects them into an ``AuditReport``;
:mod:`.rendering` writes either as a table, CSV or JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db.models import Model
from django.utils import timezone

from .. import conf, store
from ..arguments import encounter_id as as_encounter_id
from ..arguments import require_aware
from ..engine import Anomaly, AnomalyKind, Genesis, evidence_of
from ..exceptions import AnomalyNotReportedError, EncounterNotFoundError
from ..models import AnomalyAcknowledgement, EncounterDefinition, EncounterDefinitionVersion
from .acknowledgements import (
    Acknowledged,
    MarkKey,
    acknowledge_anomaly,
    acknowledgement_arguments,
    mark_key,
)
from .checkpoints import CheckpointCheck, verify_checkpoint
from .output import local_iso
from .replay import Replays, Usernames, Verified, mark_acknowledged, timeline_order
from .seals import seal_status
from .selection import RulesCache, Selection, write_alias

_STATE = store.PROJECTION_FIELDS.index("state")

DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class AuditRow:
    """One row of an encounter's timeline, as an auditor reads it."""

    sequence: int
    from_state: str
    to_state: str
    effective_at: datetime
    transitioned_at: datetime
    #: the user's name as recorded with the row (a row recorded before names were: the user
    #: row's name now), None when no user was recorded
    transitioned_by: str | None
    reason: str
    backdated: bool  # inserted before an existing row of the timeline when recorded
    overtaken: bool  # a later-recorded row was inserted before it
    overtaken_by: int | None = None  # the sequence of that row
    transitioned_by_id: Any = None
    context: Any = None  # the row's context (its metadata), as recorded
    #: the user row's name now, when it is not the name recorded (renamed since); else None
    transitioned_by_now: str | None = None
    #: the definition version the row was decided under (None: not given)
    definition_version: int | None = None

    @property
    def who(self) -> str | None:
        """Who, as a person reads it: the recorded name, and the current one when the user
        was renamed since (``"alice (now: mallory)"``)."""
        if self.transitioned_by_now is None:
            return self.transitioned_by
        return f"{self.transitioned_by} (now: {self.transitioned_by_now})"

    def as_dict(self) -> dict[str, Any]:
        """The row in the audit's JSON (times as ISO-8601 strings with offset)."""
        return {
            "sequence": self.sequence,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "effective_at": local_iso(self.effective_at),
            "transitioned_at": local_iso(self.transitioned_at),
            "transitioned_by": self.transitioned_by,
            "reason": self.reason,
            "backdated": self.backdated,
            "overtaken": self.overtaken,
            **(
                {}
                if self.transitioned_by_now is None
                else {"transitioned_by_now": self.transitioned_by_now}
            ),
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
    #: not selected, reported for its findings against the checkpoint audited against
    outside_selection: bool = False
    #: set when the entry is a definition version's, not an encounter's: ``id`` is the
    #: version's (0: the definition's own, for its version pointer)
    definition_version: int | None = None
    #: (sequence, kind, evidence) -> how that anomaly was acknowledged
    acknowledged: dict[MarkKey, Acknowledged] = field(default_factory=dict)
    #: the facts it was created with (subject, origin state, created_at); None when missing
    genesis: Genesis | None = None

    def acknowledgement(self, anomaly: Anomaly) -> Acknowledged | None:
        """How ``anomaly`` (one of :attr:`anomalies`) was acknowledged, if it was."""
        return self.acknowledged.get(mark_key(anomaly))

    @property
    def unacknowledged(self) -> list[Anomaly]:
        return [a for a in self.anomalies if mark_key(a) not in self.acknowledged]

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
            "evidence": anomaly.evidence,
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
        if self.definition_version is not None:
            data["definition_version"] = self.definition_version
        if self.outside_selection:
            data["outside_selection"] = True
        return data


@dataclass
class AuditReport:
    as_of: datetime
    known_at: datetime | None
    encounters: list[EncounterAudit] = field(default_factory=list)
    checkpoint: CheckpointCheck | None = None  # the checkpoint audited against, if any
    #: "checked", or why seals were not checked (``seals.seal_status``)
    seals: str = "checked"

    @property
    def anomaly_count(self) -> int:
        """Anomalies nobody acknowledged."""
        return sum(e.anomaly_count for e in self.encounters)

    @property
    def acknowledged_count(self) -> int:
        return sum(e.acknowledged_count for e in self.encounters)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seals": self.seals,
            "encounters": [e.as_dict() for e in self.encounters],
            "anomaly_count": self.anomaly_count,
            "acknowledged_count": self.acknowledged_count,
        }
        if self.checkpoint is not None:
            data["checkpoint"] = self.checkpoint.as_dict()
        return data


class AuditStream(Iterator[EncounterAudit]):
    """What :func:`iter_audit` returns: the audits, read lazily, the checkpoint they are
    compared with (``checkpoint``; None without ``against``) and whether seals are checked
    (``seals``: ``"checked"`` or why not)."""

    def __init__(
        self,
        audits: Iterator[EncounterAudit],
        checkpoint: CheckpointCheck | None,
        seals: str = "checked",
    ):
        self._audits = audits
        self.checkpoint = checkpoint
        self.seals = seals

    def __iter__(self) -> AuditStream:
        return self

    def __next__(self) -> EncounterAudit:
        return next(self._audits)


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
    verify_key: Any = None,
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
        against: a checkpoint (a file path, or its parsed JSON), compared whole whatever the
            selection (``verify_checkpoint``): the selected encounters' findings are in their
            audits; an encounter outside the selection with a finding is audited after them
            (``outside_selection``), and encounters of it that are gone (``missing``) last.
        root: with ``against``, the root that was published: the checkpoint's must be it.
        verify_key: with ``against``, an Ed25519 public key (a PEM file's path, its bytes, or
            the key object): the checkpoint must be signed with it.
        batch_size: encounters per batch.

    Soft-deleted encounters are included: their history is part of the record.

    Arguments, the checkpoint (read and compared with the log here, before the first audit)
    and the encounter ids are checked when this is called; the audits are read lazily.

    Raises:
        ValueError / TypeError: naive or non-datetime times, ``since >= until``, bad ids.
        EncounterError: no definition has the code ``definition``.
        EncounterNotFoundError: an id of ``encounters`` names no encounter.
        CheckpointError: ``against`` cannot be read, is malformed, its root does not match,
            or (with ``verify_key``) it is unsigned or its signature does not verify.
    """
    require_aware(as_of, "as_of", optional=True)
    selection = Selection.of(
        definition=definition,
        encounters=encounters,
        subject=subject,
        since=since,
        until=until,
        known_at=known_at,
        batch_size=batch_size,
        using=using,
    )
    if root is not None and against is None:
        raise ValueError("root is the published root of a checkpoint: give against too")
    if verify_key is not None and against is None:
        raise ValueError("verify_key checks a checkpoint's signature: give against too")
    if as_of is None:
        as_of = timezone.now()

    absent = selection.absent()
    if absent and against is None:
        raise EncounterNotFoundError(absent[0])
    check = None
    pending: dict[Any, list[Anomaly]] = {}
    if against is not None:
        check = verify_checkpoint(
            against,
            using=selection.using,
            root=root,
            verify_key=verify_key,
            batch_size=max(batch_size, 100),
        )
        gone = {a.encounter_id for a in check.anomalies if a.kind == AnomalyKind.MISSING}
        absent = [pk for pk in absent if pk not in gone]
        if absent:
            raise EncounterNotFoundError(absent[0])
        for anomaly in check.anomalies:
            pending.setdefault(anomaly.encounter_id, []).append(anomaly)
    replays = Replays(selection, order="created", extra=("deleted_at",), users=True, added=pending)
    return AuditStream(_audits(replays, as_of, pending), check, seal_status(replays.sealer))


def _audits(
    replays: Replays, as_of: datetime, pending: dict[Any, list[Anomaly]]
) -> Iterator[EncounterAudit]:
    """The audits of the selected encounters, in the reader's order; then those of the
    encounters outside the selection with a finding against the checkpoint, and the
    encounters of the checkpoint that are gone (``pending``: the checkpoint's anomalies not
    yet added to an encounter that was read)."""
    for verified in replays:
        yield _audit_of(verified, replays.rules, replays.users, as_of)
    selection = replays.selection
    batch_size = selection.batch_size
    outside = sorted(
        (
            pk
            for pk, found in pending.items()
            if not any(a.kind == AnomalyKind.MISSING for a in found)
        ),
        key=str,
    )
    for start in range(0, len(outside), batch_size):
        more = Replays(
            Selection.of(
                encounters=outside[start : start + batch_size],
                known_at=selection.known_at,
                batch_size=batch_size,
                using=selection.using,
            ),
            order="created",
            extra=("deleted_at",),
            users=True,
            rules=replays.rules,
            added=pending,
        )
        for verified in more:
            audit = _audit_of(verified, more.rules, more.users, as_of)
            yield dataclasses.replace(audit, outside_selection=True)
    yield from _definition_audits(replays)
    left = sorted(pending.items(), key=lambda item: str(item[0]))
    for start in range(0, len(left), batch_size):
        audits = [
            EncounterAudit(
                id=encounter_id,
                definition="",
                state_as_of="",
                timeline=[],
                anomalies=anomalies,
                missing=any(a.kind == AnomalyKind.MISSING for a in anomalies),
            )
            for encounter_id, anomalies in left[start : start + batch_size]
        ]
        mark_acknowledged(
            ((a.id, a.anomalies, a.acknowledged) for a in audits), replays.using, replays.sealer
        )
        yield from audits


def definition_findings(
    rules: RulesCache, using: str, definition_ids: Iterable[Any] | None = None
) -> list[tuple[str, Anomaly]]:
    """What is wrong with the definitions' versions themselves (``rules.problems()``: a
    version whose stored content is not its chain's — edited, or inserted behind the
    library's back —, a definition whose version pointer was moved), each as the definition's
    code and an anomaly of kind ``definition`` on the version (its id, its number; evidence:
    the stored content hash and what its content hashes to now) or, for the pointer, on the
    definition (number 0). Reported once per version, besides the ``definition`` finding on
    every encounter and row decided under it."""
    problems = rules.problems()
    if definition_ids is not None:
        wanted = set(definition_ids)
        problems = [p for p in problems if p[0] in wanted]
    if not problems:
        return []
    versions = {
        (definition_id, number): (pk, content_hash)
        for definition_id, number, pk, content_hash in EncounterDefinitionVersion.objects.using(
            using
        )
        .filter(definition_id__in={p[0] for p in problems})
        .values_list("definition_id", "number", "pk", "content_hash")
    }
    found = []
    for definition_id, number, why in problems:
        if number:  # evidence: the stored content hash, then what the content hashes to now
            pk, stored = versions[(definition_id, number)]
            now = rules.rules_of(definition_id)(number)
            evidence = evidence_of(stored, now.content_hash if now is not None else "")
        else:  # the pointer: what it and the chain say
            pk, evidence = definition_id, evidence_of(why)
        found.append(
            (rules.code(definition_id), Anomaly(pk, number, AnomalyKind.DEFINITION, why, evidence))
        )
    return found


def _definition_audits(replays: Replays) -> Iterator[EncounterAudit]:
    """An entry per definition version (or version pointer) found wrong, when the selection
    names no encounter ids: after the encounters."""
    selection = replays.selection
    if selection.encounters is not None or replays.rules is None:
        return
    yield from definition_audits(
        replays.rules, replays.using, selection.definition_ids, replays.sealer
    )


def definition_audits(
    rules: RulesCache, using: str, definition_ids: Iterable[Any] | None, sealer: Any
) -> list[EncounterAudit]:
    """:func:`definition_findings` as audit entries (``definition_version`` set), with the
    acknowledgements they have."""
    audits = [
        EncounterAudit(
            id=as_encounter_id(anomaly.encounter_id),
            definition=code,
            state_as_of="",
            timeline=[],
            anomalies=[anomaly],
            definition_version=anomaly.sequence,
        )
        for code, anomaly in definition_findings(rules, using, definition_ids)
    ]
    mark_acknowledged(((a.id, a.anomalies, a.acknowledged) for a in audits), using, sealer)
    return audits


def _audit_of(
    verified: Verified, rules: Any, users: Usernames | None, as_of: datetime
) -> EncounterAudit:
    replay = verified.replay
    name = users.name if users is not None else _str_or_none
    backdated, overtaken = replay.backdated, replay.overtaken
    # (name recorded, user id) -> (who, the name now when renamed): once per user, not per row
    who: dict[tuple[str, Any], tuple[str | None, str | None]] = {}
    timeline = []
    for row in timeline_order(verified.stream):
        recorded, by = row.transitioned_by_name, row.transitioned_by
        names = who.get((recorded, by))
        if names is None:
            now = name(by)
            names = who[(recorded, by)] = (recorded or now, _renamed(recorded, now))
        sequence = row.sequence
        timeline.append(
            AuditRow(
                sequence=sequence,
                from_state=row.from_state,
                to_state=row.to_state,
                effective_at=row.effective_at,
                transitioned_at=row.transitioned_at,
                transitioned_by=names[0],
                transitioned_by_now=names[1],
                reason=row.reason,
                backdated=sequence in backdated,
                overtaken=sequence in overtaken,
                overtaken_by=overtaken.get(sequence),
                transitioned_by_id=by,
                context=row.metadata,
                definition_version=row.definition_version,
            )
        )
    (deleted_at,) = verified.extra
    return EncounterAudit(
        id=verified.id,
        definition=rules.code(verified.genesis.definition_id),
        state_as_of=replay.timeline.state_at(as_of),
        timeline=timeline,
        anomalies=verified.anomalies,
        current_state=verified.projection[_STATE],
        deleted=deleted_at is not None,
        acknowledged=verified.acknowledged,
        genesis=verified.genesis,
    )


def _str_or_none(pk: Any) -> str | None:
    return None if pk is None else str(pk)


def _renamed(recorded: str, now: str | None) -> str | None:
    """The user's name now when the row recorded another one (None: the same, or no name was
    recorded)."""
    return None if not recorded or now is None or now == recorded else now


def audit_encounters(**options: Any) -> AuditReport:
    """``iter_audit(**options)`` collected into an :class:`AuditReport` (``as_of`` defaults to
    now, fixed once for the whole report)."""
    if options.get("as_of") is None:
        options["as_of"] = timezone.now()
    audits = iter_audit(**options)
    report = AuditReport(
        as_of=options["as_of"],
        known_at=options.get("known_at"),
        checkpoint=audits.checkpoint,
        seals=audits.seals,
    )
    report.encounters.extend(audits)
    return report


def encounter_timeline(
    encounter: Any, known_at: datetime | None = None, *, using: str | None = None
) -> EncounterAudit:
    """One encounter's audit, as a person reading its page sees it: its rows in business-time
    order (who, when, why, the context recorded, the backdated and overtaken marks) and the
    anomalies of its stream, acknowledged ones marked — a damaged log is shown, never hidden.
    With ``known_at``, the rows recorded by then. The admin's encounter page and the REST
    API's ``history`` both show this.

    Raises:
        EncounterNotFoundError: the encounter is not in the database (soft-deleted ones are).
        TypeError / ValueError: ``known_at`` is not an aware datetime.
    """
    (audit,) = iter_audit(encounters=[encounter.pk], known_at=known_at, using=using)
    return audit


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
    compared with that checkpoint too, for ``rewritten``/``truncated``/``missing``), bound to
    the evidence it was found on; returns the acknowledgement recorded and the anomaly it
    acknowledges (the first, when the audit reports several of that kind at that sequence:
    each is acknowledged, see :func:`acknowledge_reported_anomalies`).

    Raises:
        ValueError / TypeError: as ``acknowledgements.acknowledge_anomaly``.
        EncounterNotFoundError: no such encounter (and not ``missing`` from ``against``).
        CheckpointError: ``against`` cannot be used.
        AnomalyNotReportedError: the audit does not report that anomaly (nothing written).
    """
    return acknowledge_reported_anomalies(
        encounter_id,
        sequence,
        kind,
        reason,
        acknowledged_by,
        against=against,
        root=root,
        using=using,
    )[0]


def _names_a_definition(pk: UUID, using: str) -> bool:
    return (
        EncounterDefinitionVersion.objects.using(using).filter(pk=pk).exists()
        or EncounterDefinition.all_objects.using(using).filter(pk=pk).exists()
    )


def acknowledge_reported_anomalies(
    encounter_id: Any,
    sequence: int,
    kind: str,
    reason: str,
    acknowledged_by: Any = None,
    *,
    against: Any = None,
    root: str | None = None,
    using: str | None = None,
) -> list[tuple[AnomalyAcknowledgement, Anomaly]]:
    """Acknowledge every anomaly of ``kind`` at ``sequence`` that the audit of the encounter
    reports now and nobody acknowledged yet (several when they were found on different
    evidence: say, the seals of the genesis and of the definition version it was created
    under, both at sequence 0), each bound to its evidence; returns what was recorded, in the
    audit's order. Raises as :func:`acknowledge_reported_anomaly`."""
    using = write_alias(using)
    encounter_uuid = acknowledgement_arguments(
        encounter_id, sequence, kind, reason, acknowledged_by
    )
    if _names_a_definition(encounter_uuid, using):
        # A definition version's (or pointer's) finding: the id is the version's.
        audits = [
            audit
            for audit in definition_audits(RulesCache(using), using, None, conf.sealer())
            if audit.id == encounter_uuid
        ]
    else:
        audits = list(
            iter_audit(encounters=[encounter_uuid], against=against, root=root, using=using)
        )
    reported = [a for audit in audits if audit.id == encounter_uuid for a in audit.anomalies]
    matching = [a for a in reported if (a.sequence, a.kind) == (sequence, kind)]
    if not matching:
        raise AnomalyNotReportedError(encounter_uuid, sequence, kind, reported)
    open_ = {mark_key(a): a for audit in audits for a in audit.unacknowledged if a in matching}
    recorded = []
    for anomaly in list(open_.values()) or matching[:1]:
        ack = acknowledge_anomaly(
            encounter_uuid,
            sequence,
            kind,
            reason,
            acknowledged_by,
            evidence=anomaly.evidence,
            using=using,
        )
        recorded.append((ack, anomaly))
    return recorded
