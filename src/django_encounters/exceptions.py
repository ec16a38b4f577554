"""Exception hierarchy. Every error raised on purpose by django-encounters is an ``EncounterError``.

Each exception keeps its context as attributes and builds its own message from them.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured


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
