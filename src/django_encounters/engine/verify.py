"""The verifying replay used by rebuild and audit: the timeline's own fold, with what is wrong
in a stream reported as anomalies instead of raised. Rows are facts: nothing is repaired."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import OriginatorVersionError

from .hashing import HASH_FORMAT, hash_format, stream_hashes
from .rows import Genesis, StreamRow
from .rules import Rules
from .timeline import EncounterTimeline, Entry, follows, known_prefix

#: What each anomaly kind means (the audit and the docs list these).
ANOMALY_KINDS = {
    "genesis": "the encounter's creation facts no longer hash to its stored genesis hash",
    "gap": "a sequence number is missing",
    "hash": "a row's content or chain does not match its stored hash (or names no known format)",
    "from_state": "the recorded from_state is not the timeline's state at the row's effective_at",
    "edge": "the row's edge is not allowed by the definition version it was decided under",
    "rechain": "the row is followed in business time by a state it may not go to",
    "version": "the row names a definition version that does not exist or is older than before",
    "upgrade": "a row that moves the definition version does not keep a state of the new version",
    "clock": "the row was recorded (transitioned_at) before the row preceding it",
    "truncated": "the log is shorter than the projection says: rows were deleted",
    "head": "the projection's head hash is not the hash of the row it names",
}


@dataclass(frozen=True)
class Anomaly:
    """Something wrong in a stream, found by replay (``kind``: one of ``ANOMALY_KINDS``;
    ``sequence`` 0 for the encounter itself)."""

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
    hashes: dict[int, str] = field(default_factory=dict)  # sequence -> stored hash (0: genesis)

    @property
    def state(self) -> str:
        return self.timeline.state

    @property
    def version(self) -> int:
        return self.timeline.version

    def check_head(self, version: int, head_hash: str) -> list[Anomaly]:
        """Compare a stored projection's head (``version``, ``head_hash``) with this replay: a
        projection ahead of the log means rows were deleted (``truncated``); a head hash that is
        not the hash of the row it names is ``head``. Both are evidence, never "fixed"."""
        encounter_id = self.timeline.id
        if version > self.version:
            return [
                Anomaly(
                    encounter_id,
                    version,
                    "truncated",
                    f"the projection is at version {version} but the log ends at "
                    f"{self.version}: rows {self.version + 1}..{version} are missing",
                )
            ]
        if self.hashes.get(version) != head_hash:
            return [
                Anomaly(
                    encounter_id,
                    version,
                    "head",
                    f"the projection's head hash {head_hash[:15]!r}… is not the hash of "
                    f"{'the genesis' if version == 0 else f'row {version}'}",
                )
            ]
        return []


RulesOf = Callable[[int], "Rules | None"]
_PREFIX = HASH_FORMAT + ":"


def verify_stream(
    genesis: Genesis,
    stored_genesis_hash: str,
    rows: Iterable[StreamRow],
    rules: RulesOf | None = None,
    *,
    check_hashes: bool = True,
    known_at: datetime | None = None,
) -> Replay:
    """Replay a stream in sequence order (with ``known_at``: the rows recorded by then),
    checking the genesis and every row: the hash chain, the system time, its ``from_state``
    against the timeline as it stood when the row was recorded, and with ``rules`` (definition
    version -> Rules, None when unknown) its edge or upgrade and the re-chain to the row that
    follows it; a gap-free sequence is the library's version check. The projection
    (``timeline.state``/``version``/…) is computed from the rows whatever the anomalies."""
    timeline = EncounterTimeline.open(genesis, stored_genesis_hash)
    result = Replay(timeline, hashes={0: stored_genesis_hash})
    encounter_id = genesis.encounter_id
    anomalies, backdated, hashes = result.anomalies, result.backdated, result.hashes
    hash_row = None
    if check_hashes:
        # Once per stream, not per row: the hasher (the encounter's part of the payload
        # formatted), the event builder, the rules of the version last seen.
        computed_genesis, hash_row = stream_hashes(genesis)
        if computed_genesis != stored_genesis_hash:
            anomalies.append(
                Anomaly(
                    encounter_id,
                    0,
                    "genesis",
                    "the creation facts (definition and version, subject, origin state, "
                    "created_at) do not hash to the stored genesis hash",
                )
            )
    event_of = EncounterTimeline.events(encounter_id)
    rules_version, rules_then = -1, None
    for row in rows if known_at is None else known_prefix(rows, known_at):
        found: list[tuple[str, str]] | None = None
        if hash_row is not None:
            stored = row.hash
            if not stored.startswith(_PREFIX):
                named = hash_format(stored)
                found = [("hash", f"the stored hash names no known format ({named!r})")]
            elif hash_row(row, timeline.head_hash) != stored:
                found = [("hash", "content or chain does not match the stored hash")]
        recorded_until = timeline.recorded_until
        if recorded_until is not None and row.transitioned_at < recorded_until:
            found = found or []
            found.append(
                (
                    "clock",
                    f"recorded at {row.transitioned_at.isoformat()}, before the previous row "
                    f"({recorded_until.isoformat()})",
                )
            )
        end_at = timeline.end_at
        if end_at is None or row.effective_at >= end_at:  # appends at the end: the usual row
            state_then, successor = timeline.state, None
        else:
            backdated.add(row.sequence)
            state_then, successor = timeline.locate(row.effective_at)
        if rules is not None and row.definition_version != rules_version:
            rules_version = row.definition_version
            rules_then = rules(rules_version)
        if (
            state_then != row.from_state
            or successor is not None
            or rules is None
            or rules_then is None
            or rules_version != timeline.definition_version
            or not rules_then.is_allowed(row.from_state, row.to_state)
        ):
            placed = _placement(row, state_then, successor, timeline, rules_then, rules)
            if placed:
                found = found or []
                found.extend(placed)
        event = event_of(row)
        try:
            event.mutate(timeline)
        except OriginatorVersionError:
            found = found or []
            found.append(_gap(timeline, event))
        hashes[row.sequence] = row.hash
        if found:
            anomalies.extend(
                Anomaly(encounter_id, row.sequence, kind, detail) for kind, detail in found
            )
    if backdated:  # only a row inserted before a later one can overtake it
        result.overtaken = _overtaken(timeline.entries or [])
    return result


def _placement(
    row: StreamRow,
    state_then: str,
    successor: Entry | None,
    timeline: EncounterTimeline,
    rules: Rules | None,
    rules_of: RulesOf | None,
) -> list[tuple[str, str]]:
    """What is wrong with where ``row`` lands on the timeline (in ``state_then``, before
    ``successor``): its ``from_state``, its edge (or upgrade, under ``rules``: the rules of
    its definition version, None when unknown) and the edge to the row that follows it."""
    found = []
    if state_then != row.from_state:
        found.append(
            (
                "from_state",
                f"recorded from_state '{row.from_state}' but the timeline was in "
                f"'{state_then}' at {row.effective_at.isoformat()}",
            )
        )
    if rules_of is None:
        return found
    version, pinned = row.definition_version, timeline.definition_version
    if rules is None or version < pinned:
        why = "does not exist" if rules is None else f"is older than the pinned v{pinned}"
        return [*found, ("version", f"decided under definition version {version}, which {why}")]
    if version != pinned:
        if row.from_state != row.to_state or not rules.is_state(row.to_state):
            found.append(
                (
                    "upgrade",
                    f"moves to {rules.name} but does not keep a state of it "
                    f"('{row.from_state}' -> '{row.to_state}')",
                )
            )
    elif not rules.is_allowed(row.from_state, row.to_state):
        found.append(
            (
                "edge",
                f"'{row.from_state}' -> '{row.to_state}' is not allowed by definition {rules.name}",
            )
        )
    if successor is not None and not follows(rules, row.to_state, successor):
        found.append(
            (
                "rechain",
                f"followed by '{successor.to_state}' (sequence {successor.sequence}); "
                f"'{row.to_state}' -> '{successor.to_state}' is not allowed",
            )
        )
    return found


def _gap(timeline: EncounterTimeline, event: EncounterTimeline.Transitioned) -> tuple[str, str]:
    """A sequence gap (the library's version check refused ``event``): reported, and the fold
    goes on from there, so the rest of the stream is still checked and projected."""
    expected = timeline.version + 1
    timeline.version = event.originator_version - 1
    event.mutate(timeline)
    return ("gap", f"expected sequence {expected}, found {event.originator_version}")


def _overtaken(entries: list[Entry]) -> dict[int, int]:
    """``sequence -> sequence of the row recorded later but placed just before it``."""
    return {
        entry.sequence: before.sequence
        for before, entry in zip(entries, entries[1:], strict=False)
        if before.sequence > entry.sequence
    }
