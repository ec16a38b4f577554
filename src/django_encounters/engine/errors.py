"""The errors of django-encounters that need nothing from Django, and the kinds of anomaly:
what is wrong in stored data, reported (by the verifier, the audit) instead of raised.

Every error the package raises on purpose is an ``EncounterError``; each keeps its context as
attributes and builds its message from them. ``django_encounters.exceptions`` re-exports these
beside the two errors that also subclass a Django exception.

An anomaly kind is a member of :class:`AnomalyKind`, a ``str`` enumeration: a member equals its
text (``AnomalyKind.GAP == "gap"``), hashes like it, and prints, formats and JSON-encodes as
it, so the audit's output and the acknowledgements stored as text are the same whichever a
caller holds. Adding a kind is adding a member.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

__all__ = [
    "ConcurrentTransitionError",
    "EffectiveAtOutOfRangeError",
    "EncounterError",
    "EncounterNotFoundError",
    "InvalidStateError",
    "InvalidTransitionError",
    "ProjectionDriftError",
    "StreamGapError",
    "StreamNeeded",
    "ValidationError",
]


class EncounterError(Exception):
    """Base exception for encounter errors."""


class InvalidTransitionError(EncounterError):
    """Raised when a state transition is not allowed.

    ``from_state``/``to_state`` are the requested edge; ``reason`` says why it was refused;
    ``encounter_id`` (when known) names the encounter.
    """

    def __init__(
        self, from_state: str, to_state: str, reason: str = "", *, encounter_id: Any = None
    ) -> None:
        self.from_state = from_state
        self.to_state = to_state
        self.reason = reason
        self.encounter_id = encounter_id
        message = f"Cannot transition from '{from_state}' to '{to_state}'"
        if reason:
            message += f": {reason}"
        if encounter_id is not None:
            message += f" [encounter {encounter_id}]"
        super().__init__(message)


class EffectiveAtOutOfRangeError(InvalidTransitionError, ValueError):
    """An ``effective_at`` outside the business times a transition may be recorded at: from
    ``earliest`` (1900-01-01 UTC) to ``latest`` (now plus ``ENCOUNTERS_FUTURE_TOLERANCE``).
    Also a ``ValueError``; ``effective_at``, ``earliest`` and ``latest`` are kept."""

    def __init__(
        self,
        from_state: str,
        to_state: str,
        effective_at: datetime,
        earliest: datetime,
        latest: datetime | None,
        *,
        encounter_id: Any = None,
    ) -> None:
        self.effective_at = effective_at
        self.earliest = earliest
        self.latest = latest
        if effective_at < earliest:
            where = "lies before the earliest allowed business time"
        else:
            where = "lies in the future beyond the allowed tolerance"
        allowed = f"allowed from {earliest.isoformat()}"
        if latest is not None:
            allowed += f" to {latest.isoformat()}, now plus ENCOUNTERS_FUTURE_TOLERANCE"
        super().__init__(
            from_state,
            to_state,
            f"effective_at {effective_at.isoformat()} {where} ({allowed})",
            encounter_id=encounter_id,
        )


class ValidationError(EncounterError):
    """Raised when a transition fails validation by a ``StateValidator``."""

    def __init__(self, validator: str, message: str, fields: tuple[str, ...] = ()) -> None:
        self.validator = validator
        self.message = message
        #: The encounter fields the refusal is about (a form can mark them and name them).
        self.fields = tuple(fields)
        super().__init__(f"Validation failed ({validator}): {message}")


class EncounterNotFoundError(EncounterError):
    """Raised when an encounter does not exist or has been soft-deleted."""

    def __init__(self, encounter_id: Any) -> None:
        self.encounter_id = encounter_id
        super().__init__(f"Encounter {encounter_id} not found")


class ConcurrentTransitionError(EncounterError):
    """Raised when the encounter's stream moved on under the caller.

    Either ``expected_version`` did not match the stream version, or another writer appended
    the same sequence number first (the unique constraint on ``(encounter, sequence)``).
    """

    def __init__(
        self,
        encounter_id: Any,
        expected_version: int | None = None,
        actual_version: int | None = None,
        detail: str = "",
    ) -> None:
        self.encounter_id = encounter_id
        self.expected_version = expected_version
        self.actual_version = actual_version
        self.detail = detail
        message = f"Encounter {encounter_id} was changed concurrently"
        if expected_version is not None:
            message += f": expected version {expected_version}, found {actual_version}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class InvalidStateError(EncounterError):
    """Raised when an encounter is created in a state its definition does not declare."""

    def __init__(self, state: Any, definition_code: str, states: list[str]) -> None:
        self.state = state
        self.definition_code = definition_code
        self.states = states
        super().__init__(
            f"{state!r} is not a state of definition '{definition_code}' (states: {states})"
        )


class ProjectionDriftError(EncounterError):
    """The encounter's stored projection disagrees with its transition log (someone wrote the
    projection columns, or deleted rows, behind the library's back). ``transition()`` refuses
    rather than decide from it or write it into the log; nothing was written. ``detail`` names
    what disagrees; run ``manage.py rebuild_encounter_projections`` (and the audit)."""

    def __init__(
        self,
        encounter_id: Any,
        projected_version: int | None = None,
        stream_version: int | None = None,
        *,
        detail: str = "",
    ) -> None:
        self.encounter_id = encounter_id
        self.projected_version = projected_version
        self.stream_version = stream_version
        self.detail = detail
        what = detail or (
            f"the projection says version {projected_version} but the transition log has "
            f"{stream_version} row(s)"
        )
        super().__init__(
            f"Encounter {encounter_id}: its projection disagrees with its transition log "
            f"({what}); nothing was written. Run `manage.py rebuild_encounter_projections "
            f"--encounter {encounter_id}` (and `manage.py audit_encounters --encounter "
            f"{encounter_id}` to see what happened)"
        )


class StreamGapError(EncounterError):
    """An encounter's stream has a sequence gap, so it cannot be replayed to decide anything
    (the audit reports the gap; the rows are never repaired)."""

    def __init__(self, encounter_id: Any, detail: str) -> None:
        self.encounter_id = encounter_id
        self.detail = detail
        super().__init__(
            f"Encounter {encounter_id}: its transition log has a sequence gap ({detail}); "
            f"refusing to replay a damaged stream. Run `manage.py audit_encounters --encounter "
            f"{encounter_id}`"
        )


class StreamNeeded(EncounterError):
    """A timeline restored from a snapshot (the projection row) was asked a question that needs
    its rows: load the stream and ask again. Internal to the write path."""

    def __init__(self, encounter_id: Any) -> None:
        self.encounter_id = encounter_id
        super().__init__(f"Encounter {encounter_id}: this decision needs the stream's rows")


class AnomalyKind(str, enum.Enum):
    """What is wrong, as the audit reports it. Each member has its ``meaning``; ``stream`` is
    true for the kinds the verifying replay of a stream (and the comparison with its
    projection) reports, ``checkpoint`` for the kinds an audit against a checkpoint reports
    (``truncated`` is both)."""

    _value_: str
    meaning: str
    stream: bool
    checkpoint: bool

    def __new__(
        cls, value: str, meaning: str, stream: bool = True, checkpoint: bool = False
    ) -> AnomalyKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.stream = stream
        member.checkpoint = checkpoint
        return member

    GENESIS = (
        "genesis",
        "the encounter's creation facts no longer hash to its stored genesis hash",
    )
    GAP = ("gap", "a sequence number is missing")
    HASH = (
        "hash",
        "a row's content or chain does not match its stored hash (or names no known format)",
    )
    FROM_STATE = (
        "from_state",
        "the recorded from_state is not the timeline's state at the row's effective_at",
    )
    EDGE = (
        "edge",
        "the row's edge is not allowed by the definition version it was decided under",
    )
    RECHAIN = ("rechain", "the row is followed in business time by a state it may not go to")
    VERSION = (
        "version",
        "the row names a definition version that does not exist or is older than before",
    )
    UPGRADE = (
        "upgrade",
        "a row that moves the definition version does not keep a state of the new version",
    )
    CLOCK = ("clock", "the row was recorded (transitioned_at) before the row preceding it")
    TRUNCATED = (
        "truncated",
        "the log is shorter than the projection (or a checkpoint) says: rows were deleted",
        True,
        True,
    )
    HEAD = ("head", "the projection's head hash is not the hash of the row it names")
    DEFINITION = (
        "definition",
        "the definition version the row was decided under (sequence 0: the encounter was "
        "created under) is not what its definition's chain of versions vouches for: the "
        "version was changed or inserted after the fact, or its chain is broken",
    )
    REWRITTEN = (
        "rewritten",
        "the row at a checkpointed version (the genesis at 0) has another hash than the "
        "checkpoint's: the stream was rewritten at or before it",
        False,
        True,
    )
    MISSING = ("missing", "an encounter a checkpoint has is gone", False, True)
    UNRECORDED = (
        "unrecorded",
        "a row the checkpoint does not have (after its version of the encounter, or of an "
        "encounter it does not have) claims to have been recorded before the checkpoint was "
        "taken, less the clock tolerance: it was appended afterwards with an earlier time",
        False,
        True,
    )
    UNCHECKPOINTED = (
        "uncheckpointed",
        "an encounter of the checkpoint's scope claims to have been created before the "
        "checkpoint was taken, less the clock tolerance, but the checkpoint does not have it",
        False,
        True,
    )
    SEAL = (
        "seal",
        "with seal keys configured: a record's seal (a row, the genesis, a definition version "
        "the encounter uses, an acknowledgement) is missing, does not match, or names a key "
        "that is not configured",
    )
    ACKNOWLEDGEMENT = (
        "acknowledgement",
        "an acknowledgement's hash or its chain (per encounter) is broken: it covers nothing",
    )
    SUBJECT_MISSING = (
        "subject_missing",
        "the encounter (not soft-deleted) is about a subject that no longer exists: it was "
        "deleted without the subject guard (protect_subjects), or behind its back",
    )

    def __str__(self) -> str:
        return self._value_

    def __format__(self, format_spec: str) -> str:
        return format(self._value_, format_spec)

    @classmethod
    def stream_kinds(cls) -> tuple[AnomalyKind, ...]:
        """The kinds a stream's verifying replay and its projection check report."""
        return tuple(kind for kind in cls if kind.stream)

    @classmethod
    def checkpoint_kinds(cls) -> tuple[AnomalyKind, ...]:
        """The kinds an audit against a checkpoint reports."""
        return tuple(kind for kind in cls if kind.checkpoint)


#: What each kind a stream's replay reports means, by its text (the audit and the docs list
#: these; the kinds found only against a checkpoint are ``AnomalyKind.checkpoint_kinds()``).
ANOMALY_KINDS: dict[str, str] = {kind.value: kind.meaning for kind in AnomalyKind.stream_kinds()}
