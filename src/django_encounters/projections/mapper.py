"""Maps ``EncounterTransition`` rows to timeline events and new events to rows.

Persistence is the Django ORM over ``EncounterTransition`` only; the encounter row's projection
columns double as the aggregate's snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .timeline import EncounterTimeline

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Encounter, EncounterTransition

#: Columns a replay needs, in the order ``event_from_values`` expects.
EVENT_COLUMNS = (
    "sequence",
    "from_state",
    "to_state",
    "effective_at",
    "transitioned_at",
    "transitioned_by_id",
    "reason",
    "metadata",
    "hash",
)


def event_from_values(encounter_id: Any, values: tuple) -> EncounterTimeline.Transitioned:
    """A ``Transitioned`` event from a ``values_list(*EVENT_COLUMNS)`` tuple."""
    sequence, from_state, to_state, effective_at, transitioned_at, by, reason, metadata, digest = (
        values
    )
    return EncounterTimeline.Transitioned(  # type: ignore[call-arg]
        originator_id=encounter_id,
        originator_version=sequence,
        timestamp=transitioned_at,
        from_state=from_state,
        to_state=to_state,
        effective_at=effective_at,
        transitioned_by=by,
        reason=reason,
        metadata=metadata,
        hash=digest,
    )


def timeline_from_projection(encounter: Encounter) -> EncounterTimeline:
    """The aggregate from the encounter row alone (its snapshot): no query."""
    return EncounterTimeline.from_snapshot(
        encounter.pk,
        origin_state=encounter.origin_state,
        state=encounter.state,
        version=encounter.version,
        end_at=encounter.timeline_end_at,
        head_hash=encounter.head_hash,
        created_at=encounter.created_at,
    )


def load_timeline(encounter: Encounter, using: str | None = None) -> EncounterTimeline:
    """Replay the encounter's whole stream (one query). Raises the library's
    ``OriginatorVersionError`` if the stream has a gap."""
    from ..models import EncounterTransition

    rows = (
        EncounterTransition.objects.using(using or encounter._state.db or "default")
        .filter(encounter_id=encounter.pk)
        .order_by("sequence")
        .values_list(*EVENT_COLUMNS)
    )
    return EncounterTimeline.replay(
        encounter.pk,
        encounter.origin_state,
        encounter.created_at,
        (event_from_values(encounter.pk, values) for values in rows),
    )


def row_from_event(
    event: EncounterTimeline.Transitioned, *, encounter: Encounter, transitioned_by: Any
) -> EncounterTransition:
    """The unsaved ``EncounterTransition`` row for a newly decided event."""
    from ..models import EncounterTransition

    return EncounterTransition(
        encounter=encounter,
        sequence=event.originator_version,
        from_state=event.from_state,
        to_state=event.to_state,
        transitioned_by=transitioned_by,
        transitioned_at=event.timestamp,
        effective_at=event.effective_at,
        reason=event.reason,
        metadata=event.metadata,
        hash=event.hash,
    )
