"""A sub-module of ``tests.encounter_validators`` (admitted by that prefix)."""

from __future__ import annotations

from django_encounters.validators import StateValidator


class ClinicalValidator(StateValidator):
    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        return None
