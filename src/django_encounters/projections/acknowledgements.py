"""Reviewers acknowledge anomalies they have examined (who, when, why; append-only).
Acknowledged anomalies are still reported, marked, but no longer fail an exit status.

An acknowledgement is bound to its anomaly's *evidence* (``Anomaly.evidence``: the stored hash
the anomaly was found on, or the root of the checkpoint it was found against): it covers a
finding of the same encounter, sequence and kind **with the same evidence** only
(:func:`mark_key`), so a later, different change to the same row, or a rewrite found against
another checkpoint, is reported again.

Acknowledgements are hashed and chained per encounter (:func:`acknowledgement_hash`; in
``(acknowledged_at, id)`` order, each over the previous one's hash) and, with
``ENCOUNTERS_SEAL_KEYS`` configured, sealed (tag ``acknowledgement``) in the same INSERT. One
whose hash or chain is broken, or (with keys) whose seal is missing or wrong, covers nothing
and is reported (kinds ``acknowledgement`` and ``seal``). One recorded before acknowledgements
were bound to evidence (no hash) covers nothing either; it is not reported.

:func:`acknowledge_anomaly` records one without looking at the log;
``projections.audit.acknowledge_reported_anomaly`` (and ``manage.py acknowledge_anomaly``) first
checks that the audit reports that anomaly now, and records its evidence, so nobody
acknowledges in advance."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from hashlib import sha256
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, transaction
from django.utils import timezone

from .. import conf
from ..arguments import encounter_id as as_encounter_id
from ..arguments import require_text, require_user
from ..engine import Anomaly, AnomalyKind, evidence_of, stored_precision
from ..engine.hashing import epoch_microseconds
from ..engine.seals import Sealer
from ..engine.verify import EVIDENCE_MAX_LENGTH
from ..models import AnomalyAcknowledgement, Encounter
from .output import local_iso
from .selection import write_alias

#: The prefix of an acknowledgement's hash (its layout: :func:`acknowledgement_hash`).
ACKNOWLEDGEMENT_HASH_PREFIX = "ack1:"
_MILLISECOND = timedelta(milliseconds=1)


def acknowledgement_hash(
    encounter_id: Any,
    sequence: int,
    kind: str,
    evidence: str,
    reason: str,
    acknowledged_by_name: str,
    acknowledged_at: datetime,
    previous_hash: str,
) -> str:
    """An acknowledgement's hash: ``"ack1:"`` + the SHA-256 (hex) of the UTF-8 JSON array
    (no spaces, non-ASCII as is) ``["django-encounters/acknowledgement/1", "<encounter id>",
    sequence, "<kind>", "<evidence>", "<reason>", "<reviewer's name>", <acknowledged_at in
    microseconds since the epoch, UTC>, "<previous acknowledgement's hash, '' for the first>"]``
    (docs/operations.md)."""
    payload = [
        "django-encounters/acknowledgement/1",
        str(encounter_id),
        int(sequence),
        str(kind),
        evidence,
        reason,
        acknowledged_by_name,
        epoch_microseconds(acknowledged_at),
        previous_hash,
    ]
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return ACKNOWLEDGEMENT_HASH_PREFIX + sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def acknowledgement_arguments(
    encounter_id: Any, sequence: Any, kind: Any, reason: Any, acknowledged_by: Any
) -> UUID:
    """Check the arguments of an acknowledgement (before anything is read or written); returns
    the encounter id as a UUID.

    Raises:
        ValueError / TypeError: not an encounter id, an unknown kind, a negative sequence, an
            empty reason, or a user of the wrong type.
    """
    encounter_uuid = as_encounter_id(encounter_id)
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 2**31:
        raise ValueError(f"sequence must be a non-negative integer, not {sequence!r}")
    known = tuple(member.value for member in AnomalyKind)
    if kind not in known:
        raise ValueError(f"unknown anomaly kind {kind!r} (known: {', '.join(known)})")
    require_text(reason, "reason")
    if not reason.strip():
        raise ValueError("an acknowledgement needs a reason")
    require_user(acknowledged_by, "acknowledged_by")
    return encounter_uuid


def acknowledge_anomaly(
    encounter_id: Any,
    sequence: int,
    kind: str,
    reason: str,
    acknowledged_by: Any = None,
    *,
    evidence: str = "",
    using: str | None = None,
) -> AnomalyAcknowledgement:
    """Record that the anomaly ``kind`` at ``sequence`` of ``encounter_id``, found on
    ``evidence`` (its ``Anomaly.evidence``), was examined — without checking that it is
    reported (see ``audit.acknowledge_reported_anomaly``, which records the evidence it
    found). It covers only a finding with that evidence: with the default ``""``, none.

    The record carries the reviewer's name as it is now, its hash chained to the encounter's
    previous acknowledgement (the encounter's row is locked meanwhile, when it exists) and,
    with seal keys configured, its seal; ``acknowledged_at`` is later than the previous one's.

    Raises:
        ValueError / TypeError: not an encounter id, an unknown kind, a negative sequence, an
            empty reason, a user of the wrong type, or evidence that is not text of at most
            255 characters.
        EncounterConfigurationError: the seal keys are misconfigured (nothing written).
    """
    using = write_alias(using)
    encounter_uuid = acknowledgement_arguments(
        encounter_id, sequence, kind, reason, acknowledged_by
    )
    require_text(evidence, "evidence")
    if len(evidence) > EVIDENCE_MAX_LENGTH:
        raise ValueError(f"evidence is longer than {EVIDENCE_MAX_LENGTH} characters")
    sealer = conf.sealer()
    name = "" if acknowledged_by is None else username_of(acknowledged_by)
    with transaction.atomic(using=using):
        # Acknowledgements of one encounter chain in order: one at a time.
        list(
            Encounter.all_objects.using(using)
            .select_for_update()
            .filter(pk=encounter_uuid)
            .values_list("pk", flat=True)
        )
        last = (
            AnomalyAcknowledgement.objects.using(using)
            .filter(encounter_id=encounter_uuid)
            .exclude(hash="")
            .order_by("-acknowledged_at", "-pk")
            .values_list("acknowledged_at", "hash")
            .first()
        )
        # At the precision every backup format keeps (a dump and load keeps the hash valid).
        at = stored_precision(timezone.now())
        previous = ""
        if last is not None:
            last_at, previous = last
            at = max(at, stored_precision(last_at) + _MILLISECOND)
        digest = acknowledgement_hash(
            encounter_uuid, sequence, kind, evidence, reason, name, at, previous
        )
        return AnomalyAcknowledgement.objects.using(using).create(
            encounter_id=encounter_uuid,
            sequence=sequence,
            kind=kind,
            reason=reason,
            acknowledged_by=acknowledged_by,
            acknowledged_at=at,
            acknowledged_by_name=name,
            evidence=evidence,
            hash=digest,
            seal=sealer.seal("acknowledgement", digest) if sealer is not None else "",
        )


def username_of(user: Any) -> str:
    """The user's name (``USERNAME_FIELD``) as text."""
    return str(getattr(user, get_user_model().USERNAME_FIELD))


@dataclass(frozen=True)
class Acknowledged:
    """How an anomaly was acknowledged: by whom (the reviewer's name as recorded — followed by
    the user's name now, in parentheses, when it changed since; None when no user was
    recorded), when, and why."""

    by: str | None
    at: datetime
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"by": self.by, "at": local_iso(self.at), "reason": self.reason}

    def __str__(self) -> str:
        who = self.by if self.by is not None else "nobody recorded"
        return f"acknowledged by {who} at {local_iso(self.at)}: {self.reason}"


#: What an acknowledgement covers: the encounter, the sequence, the kind and the evidence.
AckKey = tuple[UUID, int, str, str]
#: An anomaly as an encounter's marks are keyed: sequence, kind, evidence.
MarkKey = tuple[int, str, str]


def key_of(anomaly: Anomaly) -> AckKey:
    """What an acknowledgement matches: the encounter, the sequence, the kind, the evidence."""
    return as_encounter_id(anomaly.encounter_id), *mark_key(anomaly)


def mark_key(anomaly: Anomaly) -> MarkKey:
    """An anomaly's key among its encounter's acknowledged ones."""
    return anomaly.sequence, anomaly.kind, anomaly.evidence


@dataclass
class AcknowledgementCheck:
    """The acknowledgements of some encounters, checked: the valid ones (the first of each
    key) and the broken ones, reported as anomalies of their encounter."""

    marks: dict[AckKey, Acknowledged] = field(default_factory=dict)
    problems: dict[UUID, list[Anomaly]] = field(default_factory=dict)


_COLUMNS = (
    "encounter_id",
    "sequence",
    "kind",
    "evidence",
    "reason",
    "acknowledged_by_id",
    "acknowledged_by_name",
    "acknowledged_at",
    "hash",
    "seal",
)


def check_acknowledgements(
    encounter_ids: Iterable[Any], using: str = DEFAULT_DB_ALIAS, sealer: Sealer | None = None
) -> AcknowledgementCheck:
    """Read and check the acknowledgements of ``encounter_ids`` (one query, none for no ids):
    each one's hash over its fields and the previous one's hash (per encounter, in
    ``(acknowledged_at, id)`` order) and, with ``sealer``, its seal."""
    ids = {as_encounter_id(pk) for pk in encounter_ids}
    result = AcknowledgementCheck()
    if not ids:
        return result
    username = get_user_model().USERNAME_FIELD
    query = (
        AnomalyAcknowledgement.objects.using(using)
        .filter(encounter_id__in=ids)
        .order_by("acknowledged_at", "pk")
        .values_list(*_COLUMNS, f"acknowledged_by__{username}")
    )
    previous: dict[UUID, str] = {}
    for (
        encounter_id,
        sequence,
        kind,
        evidence,
        reason,
        user_id,
        name,
        at,
        digest,
        seal,
        current_name,
    ) in query:
        if not digest:  # recorded before acknowledgements had evidence: covers nothing
            continue
        expected = acknowledgement_hash(
            encounter_id, sequence, kind, evidence, reason, name, at, previous.get(encounter_id, "")
        )
        previous[encounter_id] = digest
        problem: tuple[AnomalyKind, str] | None = None
        if expected != digest:
            problem = (
                AnomalyKind.ACKNOWLEDGEMENT,
                "its hash does not match its content and the previous acknowledgement's hash "
                "(changed, forged, or one before it was deleted)",
            )
        elif sealer is not None:
            wrong = sealer.problem("acknowledgement", digest, seal)
            if wrong is not None:
                problem = (AnomalyKind.SEAL, wrong)
        who = None if user_id is None else _who(name, current_name)
        if problem is None:
            result.marks.setdefault(
                (encounter_id, sequence, kind, evidence), Acknowledged(by=who, at=at, reason=reason)
            )
            continue
        found_kind, detail = problem
        result.problems.setdefault(encounter_id, []).append(
            Anomaly(
                encounter_id,
                sequence,
                found_kind,
                f"the acknowledgement of {kind!r} at sequence {sequence} by "
                f"{who or 'nobody recorded'} at {local_iso(at)} covers nothing: {detail}",
                evidence_of(digest, seal or "unsealed"),
            )
        )
    return result


def _who(recorded: str, current: Any) -> str:
    """The reviewer's name as recorded; the user's name now beside it when it changed."""
    now = "" if current is None else str(current)
    if not recorded:
        return now
    return recorded if now in ("", recorded) else f"{recorded} (now {now})"
