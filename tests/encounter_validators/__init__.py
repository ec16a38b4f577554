"""Validators used by the tests (a package, so ``ENCOUNTERS_VALIDATOR_MODULES`` prefixes can be
tested against a sub-module, ``clinical``, and a look-alike sibling, ``encounter_validatorsx``)."""

from __future__ import annotations

from typing import Any

from django_encounters.exceptions import ValidationError
from django_encounters.validators import StateValidator

# Every call of a RecordingValidator, as (encounter pk, encounter state, from, to, context).
CALLS: list[tuple[Any, str, str, str, Any]] = []


class RecordingValidator(StateValidator):
    """Accepts everything and records what it was called with."""

    def __init__(self, label: str = "recording") -> None:
        self.label = label

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        CALLS.append((encounter.pk, encounter.state, from_state, to_state, context))


class RefuseStateValidator(StateValidator):
    """Refuses any transition into ``state`` unless the context says ``{"approved": True}``."""

    def __init__(self, state: str) -> None:
        self.state = state

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        if to_state == self.state and not (context or {}).get("approved"):
            raise ValidationError(type(self).__name__, f"'{to_state}' needs approval")


class ExplodingValidator(StateValidator):
    """A buggy validator: raises something that is not an EncounterError."""

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("validator bug")


class NotAValidator:
    """Has a ``validate`` method but is not a StateValidator subclass."""

    def validate(self, *args: Any, **kwargs: Any) -> None:
        CALLS.append(("NotAValidator", "", "", "", None))


def not_a_validator_function(*args: Any, **kwargs: Any) -> None:
    CALLS.append(("function", "", "", "", None))
