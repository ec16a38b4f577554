"""Exception hierarchy. Every error raised on purpose by django-encounters is an ``EncounterError``.

Each exception keeps its context as attributes and builds its own message from them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.models.deletion import ProtectedError


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


class ValidationError(EncounterError):
    """Raised when a transition fails validation by a ``StateValidator``."""

    def __init__(self, validator: str, message: str) -> None:
        self.validator = validator
        self.message = message
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


class ValidatorConfigurationError(EncounterError, ImproperlyConfigured):
    """Raised when a validator entry cannot be used: unimportable, not allowed by
    ``ENCOUNTERS_VALIDATOR_MODULES``, not a ``StateValidator`` subclass, or bad params."""

    def __init__(self, validator_path: Any, reason: str) -> None:
        self.validator_path = validator_path
        self.reason = reason
        super().__init__(f"Validator {validator_path!r} cannot be used: {reason}")


class InvalidStateError(EncounterError):
    """Raised when an encounter is created in a state its definition does not declare."""

    def __init__(self, state: Any, definition_code: str, states: list[str]) -> None:
        self.state = state
        self.definition_code = definition_code
        self.states = states
        super().__init__(
            f"{state!r} is not a state of definition '{definition_code}' (states: {states})"
        )


class HardDeleteRefusedError(EncounterError, ProtectedError):
    """A hard delete refused because other rows still point at the ones being deleted through
    ``PROTECT`` foreign keys (e.g. an encounter's append-only transitions). Nothing was deleted.

    Both an ``EncounterError`` and Django's ``ProtectedError`` (``protected_objects`` is kept).
    """

    def __init__(self, model: Any, error: ProtectedError) -> None:
        counts = Counter(type(obj)._meta.verbose_name for obj in error.protected_objects)
        referrers = ", ".join(f"{n} {name}(s)" for name, n in sorted(counts.items()))
        message = (
            f"{model._meta.verbose_name_plural} cannot be hard-deleted: still referenced through "
            f"protected foreign keys by {referrers}. "
        )
        if "encounter transition" in counts:
            message += "Transitions are the append-only audit trail and are never deleted; "
        message += "soft-delete with delete() instead."
        ProtectedError.__init__(self, message, error.protected_objects)

    def __str__(self) -> str:
        return str(self.args[0])


class ProjectionDriftError(EncounterError):
    """The encounter's stored projection says its stream is at a version the log does not have
    (someone wrote the projection columns behind the library's back). ``transition()`` refuses
    rather than append a row with a gap; run ``manage.py rebuild_encounter_projections``."""

    def __init__(self, encounter_id: Any, projected_version: int, stream_version: int) -> None:
        self.encounter_id = encounter_id
        self.projected_version = projected_version
        self.stream_version = stream_version
        super().__init__(
            f"Encounter {encounter_id}: the projection says version {projected_version} but the "
            f"transition log has {stream_version} row(s); run `manage.py "
            f"rebuild_encounter_projections --encounter {encounter_id}`"
        )
