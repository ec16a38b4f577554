"""The timeline aggregate: the one replay/decide engine.

Vocabulary:

* the *stream* of an encounter is its rows in recording order (``sequence`` 1, 2, 3…); the
  aggregate's version is the stream version, and the ``eventsourcing`` library's version check
  proves the stream gap-free on every replay;
* the *timeline* is the same rows ordered by business time, ``(effective_at, sequence)``;
* the *origin state* is the state the encounter was created in; it holds before the first row;
* the current state is the ``to_state`` of the last row of the timeline.

Version 0 is the encounter's creation (the ``Opened`` event, not a row); each ``Transitioned``
event carries one row (:class:`StreamRow`), its ``originator_version`` being the row's
``sequence`` and its ``timestamp`` the row's ``transitioned_at``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, OriginatorVersionError, Snapshot
from eventsourcing.utils import get_topic

from .errors import InvalidTransitionError, StreamGapError, StreamNeeded
from .hashing import row_hash
from .rows import StreamRow
from .rules import Rules

#: Business-time order of a timeline; queries that pick "the last row at t" order by this too.
TIMELINE_ORDER = ("effective_at", "sequence")
#: Newest-first, for "the last row of the timeline up to t" (``ORDER BY … DESC LIMIT 1``).
TIMELINE_ORDER_DESC = tuple(f"-{name}" for name in TIMELINE_ORDER)


@dataclass(frozen=True, slots=True)
class Entry:
    """One row as the timeline sees it."""

    effective_at: datetime
    sequence: int
    from_state: str
    to_state: str


def _effective(entry: Entry) -> datetime:
    return entry.effective_at


class EncounterTimeline(Aggregate):
    """Event-sourced timeline of one encounter (id = the encounter's UUID)."""

    INITIAL_VERSION = 0

    class Opened(Aggregate.Created):
        origin_state: str

    class Transitioned(Aggregate.Event):
        row: StreamRow

        def apply(self, aggregate: Any) -> None:
            aggregate._record(self.row)

    def __init__(self, origin_state: str) -> None:
        self.origin_state = origin_state
        self.state = origin_state
        self.end_at: datetime | None = None
        self.head_hash = ""
        # The timeline in business-time order; None when built from a snapshot (tail only).
        self.entries: list[Entry] | None = []

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def open(cls, encounter_id: UUID, origin_state: str, created_at: datetime) -> EncounterTimeline:
        """A fresh timeline (version 0) for an encounter created in ``origin_state``."""
        timeline = cls._create(
            cls.Opened, id=encounter_id, origin_state=origin_state, timestamp=created_at
        )
        timeline.collect_events()  # the Opened event is not a row: nothing to persist
        return timeline

    @classmethod
    def from_snapshot(
        cls,
        encounter_id: UUID,
        *,
        origin_state: str,
        state: str,
        version: int,
        end_at: datetime | None,
        head_hash: str,
        created_at: datetime,
    ) -> EncounterTimeline:
        """Rebuild the aggregate from the encounter's projection row, which doubles as its
        snapshot: enough to decide a transition effective at or after ``end_at``."""
        snapshot = Snapshot(
            originator_id=encounter_id,
            originator_version=version,
            timestamp=created_at,
            topic=get_topic(cls),
            state={
                "_created_on": created_at,
                "_modified_on": created_at,
                "origin_state": origin_state,
                "state": state,
                "end_at": end_at,
                "head_hash": head_hash,
                "entries": None if version else [],
            },
        )
        return snapshot.mutate(None)  # type: ignore[return-value]

    @classmethod
    def event(cls, encounter_id: UUID, row: StreamRow) -> EncounterTimeline.Transitioned:
        """The domain event of a stored row."""
        return cls.Transitioned(  # type: ignore[call-arg]
            originator_id=encounter_id,
            originator_version=row.sequence,
            timestamp=row.transitioned_at,
            row=row,
        )

    @classmethod
    def replay(
        cls,
        encounter_id: UUID,
        origin_state: str,
        created_at: datetime,
        rows: Iterable[StreamRow],
    ) -> EncounterTimeline:
        """Fold a stream (in sequence order). Raises ``StreamGapError`` on a gap."""
        timeline = cls.open(encounter_id, origin_state, created_at)
        try:
            for row in rows:  # a plain fold: no per-event Protocol isinstance check
                cls.event(encounter_id, row).mutate(timeline)
        except OriginatorVersionError as exc:
            raise StreamGapError(encounter_id, str(exc)) from exc
        return timeline

    # -- queries --------------------------------------------------------------------------

    def appends_at_end(self, effective_at: datetime) -> bool:
        """Whether a row effective at ``effective_at`` would become the last of the timeline."""
        return self.end_at is None or effective_at >= self.end_at

    def locate(self, effective_at: datetime) -> tuple[str, Entry | None]:
        """The state of the timeline at ``effective_at`` and the row that follows it, if any."""
        if self.appends_at_end(effective_at):
            return self.state, None
        if self.entries is None:
            raise StreamNeeded(self.id)
        index = bisect_right(self.entries, effective_at, key=_effective)
        before = self.entries[index - 1].to_state if index else self.origin_state
        after = self.entries[index] if index < len(self.entries) else None
        return before, after

    def state_at(self, effective_at: datetime) -> str:
        return self.locate(effective_at)[0]

    # -- decide ---------------------------------------------------------------------------

    def check(
        self,
        rules: Rules,
        to_state: str,
        effective_at: datetime,
        *,
        latest_allowed: datetime | None = None,
    ) -> str:
        """Decide whether ``to_state`` effective at ``effective_at`` may be recorded.

        Returns the ``from_state`` (the timeline's state at ``effective_at``) or raises
        ``InvalidTransitionError`` naming the requested edge and the reason.
        """
        from_state, successor = self.locate(effective_at)

        def refuse(reason: str) -> InvalidTransitionError:
            return InvalidTransitionError(from_state, to_state, reason, encounter_id=self.id)

        if latest_allowed is not None and effective_at > latest_allowed:
            raise refuse(
                f"effective_at {effective_at.isoformat()} lies in the future beyond the allowed "
                f"tolerance (latest allowed {latest_allowed.isoformat()})"
            )
        if not rules.is_state(to_state):
            raise refuse(f"'{to_state}' is not a state of definition '{rules.code}'")
        if not rules.is_allowed(from_state, to_state):
            raise refuse(f"Allowed transitions: {rules.allowed(from_state)}")
        if successor is not None and not rules.is_allowed(to_state, successor.to_state):
            when = successor.effective_at.astimezone(effective_at.tzinfo).isoformat()
            raise refuse(
                f"would be followed by '{successor.to_state}' (sequence {successor.sequence}, "
                f"effective {when}); '{to_state}' -> '{successor.to_state}' is not allowed"
            )
        return from_state

    def decide(
        self,
        rules: Rules,
        to_state: str,
        effective_at: datetime,
        *,
        transitioned_at: datetime,
        transitioned_by: Any = None,
        reason: str = "",
        metadata: Any = None,
        latest_allowed: datetime | None = None,
    ) -> StreamRow:
        """Check the transition and, if allowed, record it: returns the new row (to insert),
        hashed and already applied to this aggregate."""
        from_state = self.check(rules, to_state, effective_at, latest_allowed=latest_allowed)
        row = StreamRow(
            sequence=self.version + 1,
            from_state=from_state,
            to_state=to_state,
            effective_at=effective_at,
            transitioned_at=transitioned_at,
            transitioned_by=transitioned_by,
            reason=reason,
            metadata={} if metadata is None else metadata,
            hash="",
        )
        row.hash = row_hash(self.id, row, self.head_hash)
        self.trigger_event(self.Transitioned, timestamp=transitioned_at, row=row)
        self.collect_events()  # the row is the event's persisted form
        return row

    # -- evolve ---------------------------------------------------------------------------

    def _record(self, row: StreamRow) -> None:
        entry = Entry(row.effective_at, row.sequence, row.from_state, row.to_state)
        if self.appends_at_end(entry.effective_at):
            if self.entries is not None:
                self.entries.append(entry)
            self.state = entry.to_state
            self.end_at = entry.effective_at
        else:
            if self.entries is None:
                raise StreamNeeded(self.id)
            self.entries.insert(
                bisect_right(self.entries, entry.effective_at, key=_effective), entry
            )
        self.head_hash = row.hash
