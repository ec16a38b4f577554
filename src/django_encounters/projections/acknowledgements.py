"""Reviewers acknowledge anomalies they have examined (who, when, why; append-only).
Acknowledged anomalies are still reported, marked, but no longer fail an exit status.

An acknowledgement matches an anomaly by encounter, sequence and kind (:func:`key_of`): the
same kind of anomaly at the same row stays acknowledged, whatever its detail says later.
:func:`acknowledge_anomaly` records one without looking at the log;
``projections.audit.acknowledge_reported_anomaly`` (and ``manage.py acknowledge_anomaly``) first
checks that the audit reports that anomaly now, so nobody acknowledges in advance."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS

from ..arguments import encounter_id as as_encounter_id
from ..arguments import require_text, require_user
from ..engine import Anomaly, AnomalyKind
from ..models import AnomalyAcknowledgement
from .output import local_iso
from .selection import write_alias


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
    using: str | None = None,
) -> AnomalyAcknowledgement:
    """Record that the anomaly ``kind`` at ``sequence`` of ``encounter_id`` was examined
    (without checking that it is reported: see ``audit.acknowledge_reported_anomaly``).

    Raises:
        ValueError / TypeError: not an encounter id, an unknown kind, a negative sequence, an
            empty reason, or a user of the wrong type.
    """
    using = write_alias(using)
    encounter_uuid = acknowledgement_arguments(
        encounter_id, sequence, kind, reason, acknowledged_by
    )
    return AnomalyAcknowledgement.objects.using(using).create(
        encounter_id=encounter_uuid,
        sequence=sequence,
        kind=kind,
        reason=reason,
        acknowledged_by=acknowledged_by,
    )


@dataclass(frozen=True)
class Acknowledged:
    """How an anomaly was acknowledged: by whom (the username, None when no user was
    recorded), when, and why."""

    by: str | None
    at: datetime
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"by": self.by, "at": local_iso(self.at), "reason": self.reason}

    def __str__(self) -> str:
        who = self.by if self.by is not None else "nobody recorded"
        return f"acknowledged by {who} at {local_iso(self.at)}: {self.reason}"


AckKey = tuple[UUID, int, str]


def key_of(anomaly: Anomaly) -> AckKey:
    """What an acknowledgement matches: the encounter, the sequence and the kind."""
    return as_encounter_id(anomaly.encounter_id), anomaly.sequence, anomaly.kind


def acknowledgements_of(
    anomalies: Iterable[Anomaly], using: str = DEFAULT_DB_ALIAS
) -> dict[AckKey, Acknowledged]:
    """The (first) acknowledgement of each of ``anomalies`` that has one, by :func:`key_of`;
    one query, none when there are no anomalies."""
    wanted = {key_of(anomaly) for anomaly in anomalies}
    if not wanted:
        return {}
    username = get_user_model().USERNAME_FIELD
    found: dict[AckKey, Acknowledged] = {}
    query = (
        AnomalyAcknowledgement.objects.using(using)
        .filter(encounter_id__in={key[0] for key in wanted})
        .select_related("acknowledged_by")
        .order_by("acknowledged_at", "pk")
    )
    for ack in query:
        key = (ack.encounter_id, ack.sequence, ack.kind)
        if key in wanted and key not in found:
            user = ack.acknowledged_by
            found[key] = Acknowledged(
                by=None if user is None else str(getattr(user, username)),
                at=ack.acknowledged_at,
                reason=ack.reason,
            )
    return found
