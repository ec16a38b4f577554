"""The verifying replay used by rebuild and audit: the timeline's own fold, with what is wrong
in a stream reported as anomalies instead of raised. Rows are facts: nothing is repaired."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from hashlib import sha256
from uuid import UUID

from eventsourcing.domain import OriginatorVersionError

from .errors import ANOMALY_KINDS, AnomalyKind
from .hashing import (
    HashFormat,
    VersionHashes,
    find_hash_format,
    genesis_hash,
    hash_format,
    no_version_hashes,
    row_hash,
)
from .rows import Genesis, StreamRow
from .rules import Rules
from .timeline import EncounterTimeline, Entry, known_prefix, violations

__all__ = [
    "ANOMALY_KINDS",
    "EVIDENCE_MAX_LENGTH",
    "Anomaly",
    "AnomalyKind",
    "Replay",
    "evidence_of",
    "verify_stream",
]

#: The longest evidence stored with an acknowledgement; longer evidence is kept as its digest.
EVIDENCE_MAX_LENGTH = 255


def evidence_of(*parts: str) -> str:
    """An anomaly's evidence from its parts (the stored hash it was found on, what its content
    hashes to when that differs, a seal, a checkpoint's root…), joined by spaces; evidence
    longer than :data:`EVIDENCE_MAX_LENGTH` (a stored value no column bounds, on SQLite) is
    ``"sha256:<hex digest of it>"``."""
    text = " ".join(parts)
    if len(text) <= EVIDENCE_MAX_LENGTH:
        return text
    return "sha256:" + sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, init=False)
class Anomaly:
    """Something wrong in a stream, found by replay (``kind``: an :class:`AnomalyKind`, given
    as a member or its text; ``sequence`` 0 for the encounter itself). ``evidence`` is what it
    was found on — the stored hash of the row (followed by what the row's content hashes to
    when that differs), the genesis hash, the projection's head, a seal, or the root of the
    checkpoint it was found against: an acknowledgement covers a finding with the same
    evidence only (:func:`evidence_of`; "" for a finding that names none).

    Raises:
        ValueError: ``kind`` is no anomaly kind.
    """

    encounter_id: UUID | str
    sequence: int
    kind: AnomalyKind
    detail: str
    evidence: str

    def __init__(
        self,
        encounter_id: UUID | str,
        sequence: int,
        kind: AnomalyKind | str,
        detail: str,
        evidence: str = "",
    ) -> None:
        object.__setattr__(self, "encounter_id", encounter_id)
        object.__setattr__(self, "sequence", sequence)
        if type(kind) is not AnomalyKind:
            # The member whose text ``kind`` is (mypy reads the call as a new member's).
            kind = AnomalyKind(kind)  # type: ignore[call-arg]
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "detail", detail)
        object.__setattr__(self, "evidence", evidence)

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
                    AnomalyKind.TRUNCATED,
                    f"the projection is at version {version} but the log ends at "
                    f"{self.version}: rows {self.version + 1}..{version} are missing",
                    evidence_of(head_hash, self.timeline.head_hash),
                )
            ]
        named = self.hashes.get(version)
        if named != head_hash:
            return [
                Anomaly(
                    encounter_id,
                    version,
                    AnomalyKind.HEAD,
                    f"the projection's head hash {head_hash[:15]!r}… is not the hash of "
                    f"{'the genesis' if version == 0 else f'row {version}'}",
                    evidence_of(head_hash, str(named)),
                )
            ]
        return []


RulesOf = Callable[[int], "Rules | None"]
Hasher = Callable[[StreamRow, str], "str | None"]
#: No registered format's prefix starts with it (a name is letters and digits): the hasher
#: state of a replay before its first row and after a hash in no known format.
_NO_PREFIX = "\x00"


def _no_known_format(row: StreamRow, previous_hash: str) -> None:
    """The hasher of a hash in no registered format: never matches."""
    return None


def verify_stream(
    genesis: Genesis,
    stored_genesis_hash: str,
    rows: Iterable[StreamRow],
    rules: RulesOf | None = None,
    *,
    check_hashes: bool = True,
    known_at: datetime | None = None,
    version_hashes: VersionHashes | None = None,
) -> Replay:
    """Replay a stream in sequence order (with ``known_at``: the rows recorded by then),
    checking the genesis and every row: the hash chain (each stored hash recomputed in the
    registered format its prefix names), the system time, its ``from_state`` against the
    timeline as it stood when the row was recorded, and with ``rules`` (definition version ->
    Rules, None when unknown) its edge or upgrade and the re-chain to the row that follows it;
    a gap-free sequence is the library's version check. A hash that commits to the version it
    was decided under (format ``v3``) is recomputed with ``version_hashes`` (number -> content
    hash; default: each version's ``Rules.content_hash``, recomputed from its chain, so a
    changed version breaks the rows decided under it), and a row (or the genesis) under a
    version whose stored content is not its chain's (``Rules.problem``) is reported
    (``definition``). The projection (``timeline.state``/``version``/…) is computed from the
    rows whatever the anomalies."""
    timeline = EncounterTimeline.open(genesis, stored_genesis_hash)
    result = Replay(timeline, hashes={0: stored_genesis_hash})
    encounter_id = genesis.encounter_id
    anomalies, backdated, hashes = result.anomalies, result.backdated, result.hashes
    encounter_text = str(encounter_id)
    versions = _version_hashes(rules, version_hashes)
    genesis_evidence = stored_genesis_hash
    if check_hashes:
        genesis_format = find_hash_format(stored_genesis_hash)
        facts_hash = (
            None
            if genesis_format is None
            else genesis_format.hash_genesis(genesis, encounter_text, versions)
        )
        if facts_hash != stored_genesis_hash:
            # (in no known format: what the current format makes of the facts)
            now = facts_hash if facts_hash is not None else genesis_hash(genesis)
            genesis_evidence = evidence_of(stored_genesis_hash, now)
            anomalies.append(
                Anomaly(
                    encounter_id,
                    0,
                    AnomalyKind.GENESIS,
                    "the creation facts (definition and version, subject, origin state, "
                    "created_at) do not hash to the stored genesis hash",
                    genesis_evidence,
                )
            )
    if rules is not None:
        origin = rules(genesis.definition_version)
        if origin is not None and origin.problem:
            anomalies.append(
                Anomaly(
                    encounter_id,
                    0,
                    AnomalyKind.DEFINITION,
                    f"created under {origin.name}, which {origin.problem}",
                    evidence_of(stored_genesis_hash, origin.content_hash),
                )
            )
    # Once per stream, not per row: the event builder, the rules of the version last seen, and
    # a hasher per hash format met (the encounter's part of its payload formatted once), the
    # last one used kept with its prefix: a row in the same format costs one prefix check.
    event_of = EncounterTimeline.events(encounter_id)
    rules_version, rules_then = -1, None
    prefix: str = _NO_PREFIX
    hash_row: Hasher = _no_known_format
    hashers: dict[str, Hasher] = {}
    for row in rows if known_at is None else known_prefix(rows, known_at):
        found: list[tuple[AnomalyKind, str]] | None = None
        stored = row.hash
        computed: str | None = stored
        if check_hashes:
            if not stored.startswith(prefix):
                prefix, hash_row = _hasher(stored, encounter_text, hashers, versions)
            computed = hash_row(row, timeline.head_hash)
            if computed != stored:
                found = [_hash_mismatch(stored)]
        recorded_until = timeline.recorded_until
        if recorded_until is not None and row.transitioned_at < recorded_until:
            found = found or []
            found.append(
                (
                    AnomalyKind.CLOCK,
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
        # The usual row (recorded at the end, from the timeline's state, by an allowed edge of
        # its pinned version) needs no more than this; anything else is judged in full.
        if (
            state_then != row.from_state
            or successor is not None
            or rules is None
            or rules_then is None
            or rules_version != timeline.definition_version
            or not rules_then.is_allowed(row.from_state, row.to_state)
            or rules_then.problem
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
            # What the row was found as: its stored hash and, when its content (or chain) no
            # longer hashes to it, what it hashes to now (None: no known format), so an
            # acknowledgement does not cover a later, different change to the same row.
            if computed is None:  # in no known format: what the current format makes of it
                computed = row_hash(encounter_text, row, timeline.head_hash)
            row_evidence = stored if computed == stored else evidence_of(stored, computed)
            anomalies.extend(
                Anomaly(encounter_id, row.sequence, kind, detail, row_evidence)
                for kind, detail in found
            )
    if backdated:  # only a row inserted before a later one can overtake it
        result.overtaken = _overtaken(timeline.entries or [])
    return result


class _Versions(dict):
    """``number -> content hash`` of one stream's definition, each looked up once (a row
    then costs a dictionary lookup, not a call)."""

    def __init__(self, lookup: VersionHashes) -> None:
        super().__init__()
        self.lookup = lookup

    def __missing__(self, number: int) -> str | None:
        found = self[number] = self.lookup(number)
        return found


def _version_hashes(rules: RulesOf | None, given: VersionHashes | None) -> VersionHashes:
    """The stream's version lookup: ``given``, else each version's ``Rules.content_hash``."""
    if given is None:
        if rules is None:
            return no_version_hashes

        def given(number: int) -> str | None:
            found = rules(number)
            return None if found is None else found.content_hash

    return _Versions(given).__getitem__


def _hasher(
    stored: str, encounter_text: str, hashers: dict[str, Hasher], versions: VersionHashes
) -> tuple[str, Hasher]:
    """``(prefix, hasher)`` of the format ``stored`` is in, the hasher built once per stream
    and format (cached in ``hashers``); a hash in no registered format gets one that never
    matches."""
    fmt: HashFormat | None = find_hash_format(stored)
    if fmt is None:
        return _NO_PREFIX, _no_known_format
    hasher = hashers.get(fmt.name)
    if hasher is None:
        hasher = hashers[fmt.name] = partial(fmt.hash_row, fmt.row_head(encounter_text, versions))
    return fmt.prefix, hasher


def _hash_mismatch(stored: str) -> tuple[AnomalyKind, str]:
    if find_hash_format(stored) is None:
        return (
            AnomalyKind.HASH,
            f"the stored hash names no known format ({hash_format(stored)!r})",
        )
    return (AnomalyKind.HASH, "content or chain does not match the stored hash")


def _placement(
    row: StreamRow,
    state_then: str,
    successor: Entry | None,
    timeline: EncounterTimeline,
    rules: Rules | None,
    rules_of: RulesOf | None,
) -> list[tuple[AnomalyKind, str]]:
    """What is wrong with where ``row`` lands on the timeline (in ``state_then``, before
    ``successor``): its recorded ``from_state`` and definition version (facts the write path
    derives instead of checking), then the rules of that version (``rules``, None when
    unknown), as the write path applies them (:func:`violations`): its edge or upgrade and
    the edge to the row that follows it."""
    found = []
    if state_then != row.from_state:
        found.append(
            (
                AnomalyKind.FROM_STATE,
                f"recorded from_state '{row.from_state}' but the timeline was in "
                f"'{state_then}' at {row.effective_at.isoformat()}",
            )
        )
    if rules_of is None:
        return found
    version, pinned = row.definition_version, timeline.definition_version
    if rules is None or version < pinned:
        why = "does not exist" if rules is None else f"is older than the pinned v{pinned}"
        return [
            *found,
            (AnomalyKind.VERSION, f"decided under definition version {version}, which {why}"),
        ]
    if rules.problem:
        found.append((AnomalyKind.DEFINITION, f"decided under {rules.name}, which {rules.problem}"))
    edge = f"'{row.from_state}' -> '{row.to_state}' under {rules.name}"
    found.extend(
        (kind, f"{edge}: {reason}")
        for kind, reason in violations(
            rules,
            row.from_state,
            row.to_state,
            row.effective_at,
            successor,
            upgrade=version != pinned,
        )
    )
    return found


def _gap(
    timeline: EncounterTimeline, event: EncounterTimeline.Transitioned
) -> tuple[AnomalyKind, str]:
    """A sequence gap (the library's version check refused ``event``): reported, and the fold
    goes on from there, so the rest of the stream is still checked and projected."""
    expected = timeline.version + 1
    timeline.version = event.originator_version - 1
    event.mutate(timeline)
    return (AnomalyKind.GAP, f"expected sequence {expected}, found {event.originator_version}")


def _overtaken(entries: list[Entry]) -> dict[int, int]:
    """``sequence -> sequence of the row recorded later but placed just before it``."""
    return {
        entry.sequence: before.sequence
        for before, entry in zip(entries, entries[1:], strict=False)
        if before.sequence > entry.sequence
    }
