"""The timeline aggregate: the one replay/decide engine.

Vocabulary:

* the *stream* of an encounter is its rows in recording order (``sequence`` 1, 2, 3…); the
  aggregate's version is the stream version, and the ``eventsourcing`` library's version check
  proves the stream gap-free on every replay;
* the *timeline* is the same rows ordered by business time, ``(effective_at, sequence)``;
* the *origin state* is the state the encounter was created in; it holds before the first row;
* the current state is the ``to_state`` of the last row of the timeline;
* the encounter is pinned to the definition version it was created under; each row records the
  version it was decided under, and an *upgrade* row (the state kept, a newer version) moves the
  pin on purpose;
* system time (``transitioned_at``) never decreases along a stream, so "the rows known at
  ``r``" is always a prefix of the stream.

Version 0 is the encounter's creation (the ``Opened`` event, not a row); each ``Transitioned``
event carries one row (:class:`StreamRow`), its ``originator_version`` being the row's
``sequence`` and its ``timestamp`` the row's ``transitioned_at``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple
from uuid import UUID

from eventsourcing.domain import Aggregate, OriginatorIDError, OriginatorVersionError, Snapshot
from eventsourcing.utils import get_topic

from .errors import (
    AnomalyKind,
    EffectiveAtOutOfRangeError,
    InvalidStateError,
    InvalidTransitionError,
    StreamGapError,
    StreamNeeded,
)
from .hashing import row_hash
from .rows import Genesis, StreamRow, stored_precision
from .rules import Rules

#: Business-time order of a timeline; queries that pick "the last row at t" order by this too.
TIMELINE_ORDER = ("effective_at", "sequence")
#: Newest-first, for "the last row of the timeline up to t" (``ORDER BY … DESC LIMIT 1``).
TIMELINE_ORDER_DESC = tuple(f"-{name}" for name in TIMELINE_ORDER)
#: The smallest step of stored system time (see ``stored_precision``).
SYSTEM_TIME_STEP = timedelta(milliseconds=1)
#: The earliest business time a transition may be recorded at. Far enough back for any
#: imported history, and far enough from year 1 that every time zone can express it: a log's
#: times must survive any ``TIME_ZONE`` and any database session's zone.
EARLIEST_EFFECTIVE_AT = datetime(1900, 1, 1, tzinfo=timezone.utc)


class Entry(NamedTuple):
    """One row as the timeline sees it (``upgrade``: the row moved the definition version and
    kept the state). A named tuple (immutable, built by ``tuple.__new__``: every row of every
    replay makes one; a frozen dataclass sets each field through ``object.__setattr__``)."""

    effective_at: datetime
    sequence: int
    from_state: str
    to_state: str
    upgrade: bool = False


def _effective(entry: Entry) -> datetime:
    return entry.effective_at


def known_prefix(rows: Iterable[StreamRow], known_at: datetime | None) -> Iterable[StreamRow]:
    """The rows recorded by ``known_at`` (all with None). System time never decreases along a
    stream, so they are a prefix of it: the first row recorded later ends it."""
    if known_at is None:
        yield from rows
        return
    for row in rows:
        if row.transitioned_at > known_at:
            return
        yield row


class EncounterTimeline(Aggregate):
    """Event-sourced timeline of one encounter (id = the encounter's UUID)."""

    INITIAL_VERSION = 0

    class Opened(Aggregate.Created):
        origin_state: str
        definition_version: int
        genesis_hash: str

        def mutate(self, aggregate: Any) -> Any:
            """Construct the timeline. The library's generic ``Created.mutate`` resolves the
            topic and matches the event's attributes to ``__init__``'s parameters by
            introspection on every call (most of the cost of opening a stream, which a
            rebuild does once per encounter); this event only ever constructs this aggregate,
            with these arguments."""
            assert aggregate is None
            timeline = EncounterTimeline.__new__(EncounterTimeline)
            timeline.__base_init__(self.originator_id, self.originator_version, self.timestamp)
            timeline.__init__(  # type: ignore[misc]
                self.origin_state, self.definition_version, self.genesis_hash
            )
            return timeline

    class Transitioned(Aggregate.Event):
        row: StreamRow

        def mutate(self, aggregate: Any) -> Any:
            """The library's checks (this aggregate's event, the next version: a gap raises
            ``OriginatorVersionError``), then :meth:`apply`; the same as the generic
            ``Event.mutate``, with the id compared by identity first (the replay loops build
            every event with the aggregate's own id object, and ``UUID.__eq__`` is Python)."""
            originator_id = self.originator_id
            if originator_id is not aggregate._id and originator_id != aggregate._id:
                raise OriginatorIDError(originator_id, aggregate._id)
            next_version = aggregate._version + 1
            if self.originator_version != next_version:
                raise OriginatorVersionError(self.originator_version, next_version)
            aggregate._record(self.row)
            aggregate._version = next_version
            aggregate._modified_on = self.timestamp
            return aggregate

        def apply(self, aggregate: Any) -> None:
            aggregate._record(self.row)

    def __init__(self, origin_state: str, definition_version: int, genesis_hash: str) -> None:
        self.origin_state = origin_state
        self.state = origin_state
        self.end_at: datetime | None = None
        self.head_hash = genesis_hash
        self.definition_version = definition_version
        self.recorded_until: datetime | None = None  # the last row's transitioned_at
        # The timeline in business-time order; None when built from a snapshot (tail only).
        self.entries: list[Entry] | None = []

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def open(cls, genesis: Genesis, genesis_hash: str) -> EncounterTimeline:
        """A fresh timeline (version 0) for an encounter created with ``genesis``, its chain
        starting at ``genesis_hash``."""
        # The same event as ``cls.Opened(originator_topic=…, originator_id=…, …)``, built like
        # :meth:`event` without the frozen dataclass's ``__init__`` (a rebuild opens one
        # timeline per encounter), its one check (a UUID id) kept.
        encounter_id = genesis.encounter_id
        if not isinstance(encounter_id, UUID):
            raise TypeError(f"{cls.Opened} was given a non-UUID id: {encounter_id!r}")
        opened = _new_event(cls.Opened)
        opened.__dict__.update(
            originator_topic=_TOPIC,
            originator_id=encounter_id,
            originator_version=cls.INITIAL_VERSION,
            timestamp=genesis.created_at,
            origin_state=genesis.origin_state,
            definition_version=genesis.definition_version,
            genesis_hash=genesis_hash,
        )
        # Not ``_create``: the Opened event is not a row, there is nothing to persist.
        return opened.mutate(None)  # type: ignore[no-any-return]

    @classmethod
    def from_snapshot(
        cls,
        encounter_id: UUID,
        *,
        created_at: datetime,
        version: int,
        entries_known: bool = False,
        **state: Any,
    ) -> EncounterTimeline:
        """Rebuild the aggregate from the encounter's projection row, which doubles as its
        snapshot (``state``: ``origin_state``, ``state``, ``end_at``, ``head_hash``,
        ``definition_version``, ``recorded_until``): enough to decide a transition effective
        at or after ``end_at``."""
        snapshot = Snapshot(
            originator_id=encounter_id,
            originator_version=version,
            timestamp=created_at,
            topic=get_topic(cls),
            state={
                "_created_on": created_at,
                "_modified_on": created_at,
                **state,
                "entries": None if version else [],
            },
        )
        return snapshot.mutate(None)  # type: ignore[return-value]

    @classmethod
    def event(cls, encounter_id: UUID, row: StreamRow) -> EncounterTimeline.Transitioned:
        """The domain event of a stored row: the same event as ``Transitioned(originator_id=…,
        originator_version=row.sequence, timestamp=row.transitioned_at, row=row)``, built
        without the frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field and
        a ``__post_init__``: more than the rest of a row's fold), its one check kept."""
        return cls.events(encounter_id)(row)

    @classmethod
    def events(cls, encounter_id: UUID) -> Callable[[StreamRow], EncounterTimeline.Transitioned]:
        """``row -> event`` for the rows of one encounter: :meth:`event` with its id check
        made once for the stream instead of once per row (the replay loops)."""
        if not isinstance(encounter_id, UUID):
            raise TypeError(f"{cls.Transitioned} was given a non-UUID id: {encounter_id!r}")
        new, kind = _new_event, _TRANSITIONED

        def event(row: StreamRow) -> EncounterTimeline.Transitioned:
            built = new(kind)
            fields = built.__dict__
            fields["originator_id"] = encounter_id
            fields["originator_version"] = row.sequence
            fields["timestamp"] = row.transitioned_at
            fields["row"] = row
            return built  # type: ignore[no-any-return]

        return event

    @classmethod
    def replay(
        cls,
        genesis: Genesis,
        genesis_hash: str,
        rows: Iterable[StreamRow],
        *,
        known_at: datetime | None = None,
    ) -> EncounterTimeline:
        """Fold a stream (in sequence order), or with ``known_at`` the rows recorded by then.
        Raises ``StreamGapError`` on a gap."""
        timeline = cls.open(genesis, genesis_hash)
        event = cls.events(genesis.encounter_id)
        try:
            for row in known_prefix(rows, known_at):  # a plain fold: no Protocol isinstance
                event(row).mutate(timeline)
        except OriginatorVersionError as exc:
            raise StreamGapError(genesis.encounter_id, str(exc)) from exc
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

    def system_time(self, clock: datetime) -> datetime:
        """The ``transitioned_at`` of the next row: the clock at the stored precision, but
        always after the last row's (another application server's clock may run behind this
        one, and two rows recorded within one millisecond must still be told apart by "as
        known at")."""
        now = stored_precision(clock)
        last = self.recorded_until
        return now if last is None or now > last else last + SYSTEM_TIME_STEP

    # -- decide ---------------------------------------------------------------------------

    def check(
        self,
        rules: Rules,
        to_state: str,
        effective_at: datetime,
        *,
        latest_allowed: datetime | None = None,
    ) -> str:
        """Decide whether ``to_state`` effective at ``effective_at`` may be recorded under
        ``rules`` (the encounter's pinned definition version).

        Returns the ``from_state`` (the timeline's state at ``effective_at``) or raises
        ``InvalidTransitionError`` naming the requested edge and the reason: an
        ``effective_at`` before :data:`EARLIEST_EFFECTIVE_AT` or beyond ``latest_allowed``
        (``EffectiveAtOutOfRangeError``, also a ``ValueError``), or the first of
        :func:`violations` (the rules the verifier applies to a recorded row).
        """
        from_state, successor = self.locate(effective_at)
        if effective_at < EARLIEST_EFFECTIVE_AT or (
            latest_allowed is not None and effective_at > latest_allowed
        ):
            raise EffectiveAtOutOfRangeError(
                from_state,
                to_state,
                effective_at,
                EARLIEST_EFFECTIVE_AT,
                latest_allowed,
                encounter_id=self.id,
            )
        found = violations(rules, from_state, to_state, effective_at, successor)
        if found:
            raise InvalidTransitionError(
                from_state, to_state, found[0].reason, encounter_id=self.id
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
        transitioned_by_name: str = "",
    ) -> StreamRow:
        """Check the transition and, if allowed, record it: returns the new row (to insert),
        hashed and already applied to this aggregate. Times are kept at the stored precision;
        ``transitioned_at`` is :meth:`system_time` of it. The row's hash commits to
        ``rules.content_hash`` (the version it is decided under) and to
        ``transitioned_by_name``, the user's name now."""
        effective_at = stored_precision(effective_at)
        from_state = self.check(rules, to_state, effective_at, latest_allowed=latest_allowed)
        return self._append(
            from_state,
            to_state,
            effective_at,
            transitioned_at,
            transitioned_by,
            reason,
            metadata,
            version_hash=rules.content_hash,
            transitioned_by_name=transitioned_by_name,
        )

    def upgrade(
        self,
        rules: Rules,
        *,
        transitioned_at: datetime,
        transitioned_by: Any = None,
        reason: str = "",
        transitioned_by_name: str = "",
    ) -> StreamRow:
        """Move the encounter to the definition version of ``rules`` on purpose: a row that
        keeps the state (effective at the end of the timeline, or now) and records the new
        version. Refused with ``InvalidStateError`` when the state does not exist there."""
        now = self.system_time(transitioned_at)
        effective_at = now if self.end_at is None or now >= self.end_at else self.end_at
        if violations(rules, self.state, self.state, effective_at, None, upgrade=True):
            raise InvalidStateError(
                self.state, f"{rules.code} v{rules.version}", list(rules.states)
            )
        return self._append(
            self.state,
            self.state,
            effective_at,
            now,
            transitioned_by,
            reason,
            {},
            rules.version,
            version_hash=rules.content_hash,
            transitioned_by_name=transitioned_by_name,
        )

    def _append(
        self,
        from_state: str,
        to_state: str,
        effective_at: datetime,
        transitioned_at: datetime,
        transitioned_by: Any,
        reason: str,
        metadata: Any,
        definition_version: int | None = None,
        *,
        version_hash: str = "",
        transitioned_by_name: str = "",
    ) -> StreamRow:
        row = StreamRow(
            sequence=self.version + 1,
            from_state=from_state,
            to_state=to_state,
            effective_at=effective_at,
            transitioned_at=self.system_time(transitioned_at),
            transitioned_by=transitioned_by,
            reason=reason,
            metadata={} if metadata is None else metadata,
            definition_version=(
                self.definition_version if definition_version is None else definition_version
            ),
            hash="",
            transitioned_by_name=transitioned_by_name,
        )
        row.hash = row_hash(self.id, row, self.head_hash, version_hash)
        self.trigger_event(self.Transitioned, timestamp=row.transitioned_at, row=row)
        self.collect_events()  # the row is the event's persisted form
        return row

    # -- evolve ---------------------------------------------------------------------------

    def _record(self, row: StreamRow) -> None:
        effective_at, version = row.effective_at, row.definition_version
        entry = Entry(
            effective_at,
            row.sequence,
            row.from_state,
            row.to_state,
            version != self.definition_version,
        )
        end_at = self.end_at
        if end_at is None or effective_at >= end_at:  # appends at the end
            if self.entries is not None:
                self.entries.append(entry)
            self.state = entry.to_state
            self.end_at = effective_at
        else:
            if self.entries is None:
                raise StreamNeeded(self.id)
            self.entries.insert(bisect_right(self.entries, effective_at, key=_effective), entry)
        self.head_hash = row.hash
        self.definition_version = version
        self.recorded_until = row.transitioned_at


_TOPIC = get_topic(EncounterTimeline)
_TRANSITIONED = EncounterTimeline.Transitioned
_new_event = object.__new__


def follows(rules: Rules, state: str, successor: Entry) -> bool:
    """Whether ``successor`` may follow ``state`` on the timeline: by an allowed edge, or, for an
    upgrade row (which keeps the state), when it keeps this very state."""
    if successor.upgrade:
        return successor.to_state == state
    return rules.is_allowed(state, successor.to_state)


class Violation(NamedTuple):
    """A rule a transition breaks: the anomaly ``kind`` the verifier reports it as, and the
    ``reason`` the write path refuses it with."""

    kind: AnomalyKind
    reason: str


def violations(
    rules: Rules,
    from_state: str,
    to_state: str,
    effective_at: datetime,
    successor: Entry | None,
    *,
    upgrade: bool = False,
) -> list[Violation]:
    """The rules of a definition version, written once for the write path (which refuses with
    the first violation) and the verifier (which reports them all): what is wrong with
    ``from_state -> to_state`` effective at ``effective_at``, decided under ``rules`` and
    placed on the timeline just before ``successor`` (None: at its end). Empty when allowed.

    The edge must be allowed (its target a state of the version); with ``upgrade`` the row
    moves the encounter to ``rules``' version instead, so it must keep its state and the state
    must exist there. Either way the row that follows must still be able to follow it.
    """
    found = []
    if upgrade:
        if from_state != to_state or not rules.is_state(to_state):
            found.append(
                Violation(
                    AnomalyKind.UPGRADE,
                    "an upgrade must keep the state, and the state must exist in the new version",
                )
            )
    elif not rules.is_state(to_state):
        found.append(
            Violation(AnomalyKind.EDGE, f"'{to_state}' is not a state of definition '{rules.code}'")
        )
    elif not rules.is_allowed(from_state, to_state):
        found.append(
            Violation(AnomalyKind.EDGE, f"Allowed transitions: {rules.allowed(from_state)}")
        )
    if successor is not None and not follows(rules, to_state, successor):
        try:  # in the caller's zone, unless that zone cannot express it
            when = successor.effective_at.astimezone(effective_at.tzinfo).isoformat()
        except OverflowError:
            when = successor.effective_at.isoformat()
        found.append(
            Violation(
                AnomalyKind.RECHAIN,
                f"would be followed by '{successor.to_state}' (sequence {successor.sequence}, "
                f"effective {when}); '{to_state}' -> '{successor.to_state}' is not allowed",
            )
        )
    return found
