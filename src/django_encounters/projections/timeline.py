"""The timeline aggregate: the one replay/decide engine of django-encounters.

Plain Python on top of the ``eventsourcing`` library — no Django imports — so it can be tested
without a database. Every state question goes through here: ``transition()`` decides with it,
``get_state_at`` and ``as_of`` use its ordering, rebuild and audit replay fold streams with it.

Vocabulary (DESIGN §2–§3):

* the *stream* of an encounter is its rows in recording order (``sequence`` 1, 2, 3…); the
  aggregate's version is the stream version and the library's version check proves the stream
  gap-free on every replay;
* the *timeline* is the same rows ordered by business time, ``(effective_at, sequence)``;
* the *origin state* is the state the encounter was created in; it holds before the first row;
* the current state is the ``to_state`` of the last row of the timeline.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, OriginatorVersionError, Snapshot
from eventsourcing.utils import get_topic

from ..exceptions import InvalidTransitionError

#: Business-time order of a timeline; queries that pick "the last row at t" order by this too.
TIMELINE_ORDER = ("effective_at", "sequence")
#: Newest-first, for "the last row of the timeline up to t" (``ORDER BY … DESC LIMIT 1``).
TIMELINE_ORDER_DESC = tuple(f"-{name}" for name in TIMELINE_ORDER)

_UTC = timezone.utc


# --------------------------------------------------------------------------------------------
# Rules: the part of a definition the engine needs.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """The state machine of a definition, as plain data."""

    code: str
    states: tuple[str, ...]
    transitions: Mapping[str, tuple[str, ...]]
    final_states: frozenset[str] = frozenset()

    @classmethod
    def from_config(
        cls,
        code: str,
        states: Iterable[str],
        transitions: Mapping[str, Iterable[str]],
        final_states: Iterable[str] = (),
    ) -> Rules:
        return cls(
            code=code,
            states=tuple(states),
            transitions={k: tuple(v) for k, v in (transitions or {}).items()},
            final_states=frozenset(final_states or ()),
        )

    def allowed(self, from_state: str) -> list[str]:
        return list(self.transitions.get(from_state, ()))

    def is_allowed(self, from_state: str, to_state: str) -> bool:
        return to_state in self.transitions.get(from_state, ())

    def is_final(self, state: str) -> bool:
        return state in self.final_states


# --------------------------------------------------------------------------------------------
# Tamper evidence: each row's hash covers its content and the previous row's hash.
# --------------------------------------------------------------------------------------------


def _utc_iso(value: datetime) -> str:
    if value.tzinfo is _UTC:  # already UTC (what the databases hand back): same string
        return value.isoformat(timespec="microseconds")
    return value.astimezone(_UTC).isoformat(timespec="microseconds")


# The hash payload is ``json.dumps([...], sort_keys=True, separators=(",", ":"),
# ensure_ascii=False)``. ``row_hash`` builds the same text piecewise when every item is of the
# usual type (one string escaper call per string instead of a JSON encoder per row: replay,
# rebuild and audit hash every row they read); anything unusual takes the reference path.
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_json_string = json.encoder.encode_basestring  # the escaper JSONEncoder uses for these options


def _json_key(key: Any) -> str:
    """The object key JSON stores for ``key`` (what json.dumps writes for it)."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, float):
        return float.__repr__(key)
    return int.__repr__(key) if isinstance(key, int) else str(key)


def canonical_json(value: Any) -> Any:
    """``value`` as the databases hand a JSON column back, so a row hashes the same before the
    INSERT and after any round trip: object keys become strings; numbers take one form — an
    integral number is an ``int`` (PostgreSQL's ``jsonb`` returns ``1e16`` as
    ``10000000000000000`` and ``-0.0`` as ``0``), any other float stays as it is (its shortest
    repr survives both databases)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value == 0:
            return 0
        if value.is_integer():
            return int(Decimal(repr(value)))
        return value
    if isinstance(value, dict):
        return {_json_key(k): canonical_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_json(v) for v in value]
    return value  # anything else: json.dumps decides (and refuses what it cannot encode)


def _payload_reference(items: list[Any]) -> str:
    return json.dumps(items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_hash(
    *,
    encounter_id: UUID | str,
    sequence: int,
    from_state: str,
    to_state: str,
    effective_at: datetime,
    transitioned_at: datetime,
    transitioned_by: Any,
    reason: str,
    metadata: Any,
    previous_hash: str,
) -> str:
    """SHA-256 (hex) of a row's content chained to the previous row of its stream."""
    by = "" if transitioned_by is None else str(transitioned_by)
    reason = reason or ""
    metadata = metadata if metadata is not None else {}
    previous_hash = previous_hash or ""
    if (
        type(sequence) is int
        and type(from_state) is str
        and type(to_state) is str
        and type(reason) is str
        and type(previous_hash) is str
    ):
        payload = "".join(
            (
                "[",
                _json_string(str(encounter_id)),
                ",",
                repr(sequence),
                ",",
                _json_string(from_state),
                ",",
                _json_string(to_state),
                ",",
                _json_string(_utc_iso(effective_at)),
                ",",
                _json_string(_utc_iso(transitioned_at)),
                ",",
                _json_string(by),
                ",",
                _json_string(reason),
                ",",
                "{}"
                if type(metadata) is dict and not metadata
                else _JSON.encode(canonical_json(metadata)),
                ",",
                _json_string(previous_hash),
                "]",
            )
        )
    else:
        payload = _payload_reference(
            [
                str(encounter_id),
                sequence,
                from_state,
                to_state,
                _utc_iso(effective_at),
                _utc_iso(transitioned_at),
                by,
                reason,
                canonical_json(metadata),
                previous_hash,
            ]
        )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# The aggregate.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One row as the timeline sees it."""

    effective_at: datetime
    sequence: int
    from_state: str
    to_state: str


def _effective(entry: Entry) -> datetime:
    return entry.effective_at


class StreamNeeded(Exception):
    """The aggregate was loaded from a snapshot but the decision needs the rows."""


class EncounterTimeline(Aggregate):
    """Event-sourced timeline of one encounter (id = the encounter's UUID).

    Version 0 is the encounter's creation (``Opened``, not a row); each ``Transitioned`` event
    mirrors one ``EncounterTransition`` row, its ``originator_version`` being the row's
    ``sequence`` and its ``timestamp`` the row's ``transitioned_at``.
    """

    INITIAL_VERSION = 0

    class Opened(Aggregate.Created):
        origin_state: str

    class Transitioned(Aggregate.Event):
        from_state: str
        to_state: str
        effective_at: datetime
        transitioned_by: Any
        reason: str
        metadata: Any
        hash: str

        def apply(self, aggregate: Any) -> None:
            aggregate._record(self)

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
    def replay(
        cls,
        encounter_id: UUID,
        origin_state: str,
        created_at: datetime,
        events: Iterable[EncounterTimeline.Transitioned],
    ) -> EncounterTimeline:
        """Fold a stream (in sequence order). Raises ``OriginatorVersionError`` on a gap."""
        timeline = cls.open(encounter_id, origin_state, created_at)
        for event in events:  # a plain fold: no per-event Protocol isinstance check
            event.mutate(timeline)
        return timeline

    # -- queries --------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """True when the whole timeline is loaded (not only the snapshot's tail)."""
        return self.entries is not None

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
        if latest_allowed is not None and effective_at > latest_allowed:
            raise InvalidTransitionError(
                from_state,
                to_state,
                f"effective_at {effective_at.isoformat()} lies in the future beyond the allowed "
                f"tolerance (latest allowed {latest_allowed.isoformat()})",
                encounter_id=self.id,
            )
        if to_state not in rules.states:
            raise InvalidTransitionError(
                from_state,
                to_state,
                f"'{to_state}' is not a state of definition '{rules.code}'",
                encounter_id=self.id,
            )
        if not rules.is_allowed(from_state, to_state):
            raise InvalidTransitionError(
                from_state,
                to_state,
                f"Allowed transitions: {rules.allowed(from_state)}",
                encounter_id=self.id,
            )
        if successor is not None and not rules.is_allowed(to_state, successor.to_state):
            when = successor.effective_at.astimezone(effective_at.tzinfo).isoformat()
            raise InvalidTransitionError(
                from_state,
                to_state,
                f"would be followed by '{successor.to_state}' (sequence {successor.sequence}, "
                f"effective {when}); '{to_state}' -> '{successor.to_state}' is not allowed",
                encounter_id=self.id,
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
    ) -> EncounterTimeline.Transitioned:
        """Check the transition and, if allowed, record it: returns the new event (the row to
        insert), already applied to this aggregate."""
        from_state = self.check(rules, to_state, effective_at, latest_allowed=latest_allowed)
        metadata = {} if metadata is None else metadata
        digest = row_hash(
            encounter_id=self.id,
            sequence=self.version + 1,
            from_state=from_state,
            to_state=to_state,
            effective_at=effective_at,
            transitioned_at=transitioned_at,
            transitioned_by=transitioned_by,
            reason=reason,
            metadata=metadata,
            previous_hash=self.head_hash,
        )
        self.trigger_event(
            self.Transitioned,
            timestamp=transitioned_at,
            from_state=from_state,
            to_state=to_state,
            effective_at=effective_at,
            transitioned_by=transitioned_by,
            reason=reason,
            metadata=metadata,
            hash=digest,
        )
        (event,) = self.collect_events()
        return event  # type: ignore[return-value]

    # -- evolve ---------------------------------------------------------------------------

    def _record(self, event: EncounterTimeline.Transitioned) -> None:
        entry = Entry(
            event.effective_at, event.originator_version, event.from_state, event.to_state
        )
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
        self.head_hash = event.hash


# --------------------------------------------------------------------------------------------
# Verifying replay (rebuild, audit): same fold, anomalies reported instead of raised.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anomaly:
    """Something wrong in a stream, found by replay. Never repaired by editing rows."""

    encounter_id: UUID | str
    sequence: int
    kind: str  # "gap", "from_state", "edge", "rechain", "hash"
    detail: str

    def __str__(self) -> str:
        return f"encounter {self.encounter_id} sequence {self.sequence}: {self.kind}: {self.detail}"


@dataclass
class StreamRow:
    """A row's content as the verifying replay needs it (the mapper builds these)."""

    sequence: int
    from_state: str
    to_state: str
    effective_at: datetime
    transitioned_at: datetime
    transitioned_by: Any
    reason: str
    metadata: Any
    hash: str


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
    """Replay a stream in sequence order, checking it as DESIGN §7 says.

    Checks: gap-free sequence (the library's version check), each row's ``from_state`` against
    the timeline as it stood when the row was recorded, edges allowed by ``rules``, the re-chain
    to the following row, and the hash chain. The projection (``timeline.state``/``version``)
    is computed from the rows whatever the anomalies.
    """
    timeline = EncounterTimeline.open(encounter_id, origin_state, created_at)
    result = Replay(timeline)
    add = result.anomalies.append
    hashed_id = str(encounter_id)  # once per stream, not per row
    for row in rows:
        sequence = row.sequence
        event = EncounterTimeline.Transitioned(  # type: ignore[call-arg]
            originator_id=encounter_id,
            originator_version=sequence,
            timestamp=row.transitioned_at,
            from_state=row.from_state,
            to_state=row.to_state,
            effective_at=row.effective_at,
            transitioned_by=row.transitioned_by,
            reason=row.reason,
            metadata=row.metadata,
            hash=row.hash,
        )
        if check_hashes:
            expected = row_hash(
                encounter_id=hashed_id,
                sequence=sequence,
                from_state=row.from_state,
                to_state=row.to_state,
                effective_at=row.effective_at,
                transitioned_at=row.transitioned_at,
                transitioned_by=row.transitioned_by,
                reason=row.reason,
                metadata=row.metadata,
                previous_hash=timeline.head_hash,
            )
            if expected != row.hash:
                add(
                    Anomaly(
                        encounter_id,
                        sequence,
                        "hash",
                        "content or chain does not match the stored hash",
                    )
                )
        state_then, successor = timeline.locate(row.effective_at)
        if not timeline.appends_at_end(row.effective_at):
            result.backdated.add(sequence)
        if state_then != row.from_state:
            add(
                Anomaly(
                    encounter_id,
                    sequence,
                    "from_state",
                    f"recorded from_state '{row.from_state}' but the timeline was in "
                    f"'{state_then}' at {row.effective_at.isoformat()}",
                )
            )
        if rules is not None:
            if not rules.is_allowed(row.from_state, row.to_state):
                add(
                    Anomaly(
                        encounter_id,
                        sequence,
                        "edge",
                        f"'{row.from_state}' -> '{row.to_state}' is not allowed by "
                        f"definition '{rules.code}'",
                    )
                )
            if successor is not None and not rules.is_allowed(row.to_state, successor.to_state):
                add(
                    Anomaly(
                        encounter_id,
                        sequence,
                        "rechain",
                        f"followed by '{successor.to_state}' (sequence {successor.sequence}); "
                        f"'{row.to_state}' -> '{successor.to_state}' is not allowed",
                    )
                )
        try:
            event.mutate(timeline)
        except OriginatorVersionError:
            add(
                Anomaly(
                    encounter_id,
                    sequence,
                    "gap",
                    f"expected sequence {timeline.version + 1}, found {sequence}",
                )
            )
            # Keep folding so the rest of the stream is still checked and projected.
            timeline.version = sequence - 1
            event.mutate(timeline)
    entries = timeline.entries or []
    for before, entry in zip(entries, entries[1:], strict=False):
        if before.sequence > entry.sequence:
            result.overtaken[entry.sequence] = before.sequence
    return result


# --------------------------------------------------------------------------------------------
# Time in state.
# --------------------------------------------------------------------------------------------

_HOUR = Decimal(3600)


def _hours(delta: timedelta) -> Decimal:
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return Decimal(micros) / Decimal(1_000_000) / _HOUR


def intervals(
    origin_state: str,
    created_at: datetime | None,
    entries: Sequence[Entry],
    until: datetime,
) -> list[tuple[str, datetime, datetime]]:
    """The business-time intervals ``(state, start, end)`` of a timeline, clipped at ``until``.

    The origin state's interval starts at ``created_at`` when that precedes the first row
    (otherwise it is not counted); the last interval is open and ends at ``until``.
    """
    spans: list[tuple[str, datetime, datetime]] = []
    if created_at is not None:
        first = entries[0].effective_at if entries else until
        if created_at < first:
            spans.append((origin_state, created_at, first))
    for index, entry in enumerate(entries):
        end = entries[index + 1].effective_at if index + 1 < len(entries) else until
        spans.append((entry.to_state, entry.effective_at, end))
    clipped = []
    for state, start, end in spans:
        end = min(end, until)
        if end > start:
            clipped.append((state, start, end))
    return clipped


def time_in_states(
    origin_state: str,
    created_at: datetime | None,
    entries: Sequence[Entry],
    until: datetime,
) -> dict[str, Decimal]:
    """Hours spent in each state entered (several visits add up)."""
    totals: dict[str, Decimal] = {}
    for state, start, end in intervals(origin_state, created_at, entries, until):
        totals[state] = totals.get(state, Decimal(0)) + _hours(end - start)
    return totals
