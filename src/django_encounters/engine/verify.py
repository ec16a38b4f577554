"""The verifying replay used by rebuild and audit: the timeline's own fold, with what is wrong
in a stream reported as anomalies instead of raised. Rows are facts: nothing is repaired."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import OriginatorVersionError

from .hashing import row_hash
from .rules import Rules
from .timeline import EncounterTimeline, Entry, StreamRow


@dataclass(frozen=True)
class Anomaly:
    """Something wrong in a stream, found by replay.

    ``kind`` is one of ``gap`` (a sequence number skipped), ``from_state`` (the recorded
    ``from_state`` is not the timeline's state at the row's ``effective_at``), ``edge`` (the
    definition does not allow the row's edge), ``rechain`` (the row is followed in business
    time by a state its ``to_state`` may not go to) or ``hash`` (content or chain changed).
    """

    encounter_id: UUID | str
    sequence: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"encounter {self.encounter_id} sequence {self.sequence}: {self.kind}: {self.detail}"


@dataclass
class Replay:
    """Result of a verifying replay of one stream."""

    timeline: EncounterTimeline
    anomalies: list[Anomaly] = field(default_factory=list)
    backdated: set[int] = field(default_factory=set)  # inserted before an existing row
    overtaken: dict[int, int] = field(default_factory=dict)  # sequence -> overtaking sequence

    @property
    def state(self) -> str:
        return self.timeline.state

    @property
    def version(self) -> int:
        return self.timeline.version


def verify_stream(
    encounter_id: UUID,
    origin_state: str,
    created_at: datetime,
    rows: Iterable[StreamRow],
    rules: Rules | None = None,
    *,
    check_hashes: bool = True,
) -> Replay:
    """Replay a stream in sequence order, checking every row: the hash chain, its
    ``from_state`` against the timeline as it stood when the row was recorded, its edge and the
    re-chain to the row that follows it (with ``rules``), and a gap-free sequence (the
    library's version check). The projection (``timeline.state``/``version``/…) is computed
    from the rows whatever the anomalies."""
    timeline = EncounterTimeline.open(encounter_id, origin_state, created_at)
    result = Replay(timeline)
    hashed_id = str(encounter_id)  # once per stream, not per row
    for row in rows:
        found = []
        if check_hashes and row_hash(hashed_id, row, timeline.head_hash) != row.hash:
            found.append(("hash", "content or chain does not match the stored hash"))
        if not timeline.appends_at_end(row.effective_at):
            result.backdated.add(row.sequence)
        found.extend(_placement(timeline, row, rules))
        found.extend(_append(timeline, EncounterTimeline.event(encounter_id, row)))
        result.anomalies.extend(
            Anomaly(encounter_id, row.sequence, kind, detail) for kind, detail in found
        )
    result.overtaken = _overtaken(timeline.entries or [])
    return result


def _placement(
    timeline: EncounterTimeline, row: StreamRow, rules: Rules | None
) -> list[tuple[str, str]]:
    """What is wrong with where ``row`` lands on the timeline: its ``from_state``, its edge and
    the edge to the row that follows it."""
    found = []
    state_then, successor = timeline.locate(row.effective_at)
    if state_then != row.from_state:
        found.append(
            (
                "from_state",
                f"recorded from_state '{row.from_state}' but the timeline was in "
                f"'{state_then}' at {row.effective_at.isoformat()}",
            )
        )
    if rules is None:
        return found
    if not rules.is_allowed(row.from_state, row.to_state):
        found.append(
            (
                "edge",
                f"'{row.from_state}' -> '{row.to_state}' is not allowed by definition "
                f"'{rules.code}'",
            )
        )
    if successor is not None and not rules.is_allowed(row.to_state, successor.to_state):
        found.append(
            (
                "rechain",
                f"followed by '{successor.to_state}' (sequence {successor.sequence}); "
                f"'{row.to_state}' -> '{successor.to_state}' is not allowed",
            )
        )
    return found


def _append(
    timeline: EncounterTimeline, event: EncounterTimeline.Transitioned
) -> list[tuple[str, str]]:
    """Fold one event; a sequence gap is reported and the fold goes on from there, so the rest
    of the stream is still checked and projected."""
    try:
        event.mutate(timeline)
        return []
    except OriginatorVersionError:
        expected = timeline.version + 1
        timeline.version = event.originator_version - 1
        event.mutate(timeline)
        return [("gap", f"expected sequence {expected}, found {event.originator_version}")]


def _overtaken(entries: list[Entry]) -> dict[int, int]:
    """``sequence -> sequence of the row recorded later but placed just before it``."""
    return {
        entry.sequence: before.sequence
        for before, entry in zip(entries, entries[1:], strict=False)
        if before.sequence > entry.sequence
    }
