"""Reviewers acknowledge anomalies they have examined (who, when, why; append-only).
Acknowledged anomalies are still reported, marked, but no longer fail an exit status."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS

from ..arguments import require_text, require_user
from ..engine import ANOMALY_KINDS, Anomaly
from ..models import AnomalyAcknowledgement

#: Kinds an audit against a checkpoint reports, besides the stream's own.
CHECKPOINT_KINDS = ("rewritten", "missing")


def acknowledge_anomaly(
    encounter_id: Any,
    sequence: int,
    kind: str,
    reason: str,
    acknowledged_by: Any = None,
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> AnomalyAcknowledgement:
    """Record that the anomaly ``kind`` at ``sequence`` of ``encounter_id`` was examined.

    Raises:
        ValueError / TypeError: not an encounter id, an unknown kind, a negative sequence, an
            empty reason, or a user of the wrong type.
    """
    try:
        encounter_uuid = encounter_id if isinstance(encounter_id, UUID) else UUID(str(encounter_id))
    except ValueError:
        raise ValueError(f"not an encounter id (a UUID): {encounter_id!r}") from None
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise ValueError(f"sequence must be a non-negative integer, not {sequence!r}")
    known = (*ANOMALY_KINDS, *CHECKPOINT_KINDS)
    if kind not in known:
        raise ValueError(f"unknown anomaly kind {kind!r} (known: {', '.join(known)})")
    require_text(reason, "reason")
    if not reason.strip():
        raise ValueError("an acknowledgement needs a reason")
    require_user(acknowledged_by, "acknowledged_by")
    return AnomalyAcknowledgement.objects.using(using).create(
        encounter_id=encounter_uuid,
        sequence=sequence,
        kind=kind,
        reason=reason,
        acknowledged_by=acknowledged_by,
    )


class Acknowledgements:
    """The acknowledgements of a set of encounters, loaded once per batch."""

    def __init__(self, using: str = DEFAULT_DB_ALIAS) -> None:
        self.using = using
        self._found: dict[tuple[Any, int, str], AnomalyAcknowledgement] = {}

    def load(self, encounter_ids: Iterable[Any]) -> None:
        for ack in AnomalyAcknowledgement.objects.using(self.using).filter(
            encounter_id__in=list(encounter_ids)
        ):
            self._found.setdefault((ack.encounter_id, ack.sequence, ack.kind), ack)

    def of(self, anomaly: Anomaly) -> AnomalyAcknowledgement | None:
        """The (first) acknowledgement of ``anomaly``, if any."""
        key = anomaly.encounter_id
        if not isinstance(key, UUID):
            key = UUID(str(key))
        return self._found.get((key, anomaly.sequence, anomaly.kind))
