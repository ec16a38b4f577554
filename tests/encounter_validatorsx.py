"""A look-alike of ``tests.encounter_validators``: its name starts with that string, but it is not
under that package, so the prefix ``tests.encounter_validators`` must not admit it.

It is a valid validator module, so a refusal can only come from the allow-list.
"""

from __future__ import annotations

from django_encounters.validators import StateValidator


class LookalikeValidator(StateValidator):
    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        return None
