"""Edge cases of the write path: row hashes that survive JSON round trips, a context mutated
after it was hashed, the caller's stale instance, a stale save() that would undelete or
re-point an encounter, and typed errors for damaged streams and unusual inputs."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

import pytest

from django_encounters.exceptions import EncounterError, InputLimitError
from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import (
    create_encounter,
    time_in_states,
    transition,
)
from django_encounters.validators import StateValidator
from tests.helpers import insert_row_raw

pytestmark = pytest.mark.django_db


def _hash_anomalies(encounter: Any) -> list[Any]:
    result = rebuild_projections(check=True, encounters=[encounter.pk])
    return [a for a in result.anomalies if a.kind == "hash"]


# --- F1: hash chain not stable across a DB round trip -------------------------------------------


def test_int_keyed_context_hash_survives_round_trip(encounter: Any) -> None:
    """json.dumps(sort_keys=True) sorts int keys numerically (2 < 10) when hashing at write
    time; after the round trip the keys are strings and sort lexicographically ("10" < "2")."""
    transition(encounter, "checked_in", context={2: "a", 10: "b"})
    assert _hash_anomalies(encounter) == []


@pytest.mark.parametrize("value", [1e16, 1.5e300, -0.0, 1.0, 0.1, 1e-20, 2**70, [1.0, {"k": 3.5}]])
def test_float_context_hash_survives_jsonb_round_trip(encounter: Any, value: float) -> None:
    """PostgreSQL's jsonb stores numbers as numeric: 1e16 comes back as the int
    10000000000000000 and -0.0 as 0; the hash uses the canonical form, so it still matches."""
    transition(encounter, "checked_in", context={"x": value})
    assert _hash_anomalies(encounter) == []


class MutatingValidator(StateValidator):
    """A plausible validator that normalises the context it is given."""

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        if context is not None:
            context["checked_by_validator"] = True


def test_validator_mutating_context_does_not_break_hash(make_definition: Any, patient: Any) -> None:
    definition = make_definition(validators=["tests.test_write_path_edge_cases.MutatingValidator"])
    encounter = create_encounter(definition, patient)
    transition(encounter, "checked_in", context={"note": "x"})
    assert _hash_anomalies(encounter) == []


# --- F2: caller's instance not refreshed when a projection value did not change ----------------


def test_stale_caller_instance_gets_current_state(patient: Any) -> None:
    definition = EncounterDefinition.objects.create(
        name="Loop",
        code="LOOP",
        states=["open", "held"],
        initial_state="open",
        transitions={"open": ["open", "held"], "held": ["held", "open"]},
    )
    stale = create_encounter(definition, patient)
    other = Encounter.objects.get(pk=stale.pk)
    transition(other, "held")
    transition(stale, "held")  # held -> held: 'state' is not in `changes`
    assert stale.version == 2
    assert stale.state == "held"  # the caller's instance shows the new state


# --- F3: stale save() overwrites what transition() wrote / un-deletes --------------------------


def test_stale_save_does_not_undelete(encounter: Any) -> None:
    stale = Encounter.objects.get(pk=encounter.pk)
    Encounter.objects.get(pk=encounter.pk).delete()
    stale.notes = "x"
    stale.save()
    assert Encounter.all_objects.get(pk=encounter.pk).deleted_at is not None


# --- F4: save() can move an encounter with history to another definition ----------------------


def test_save_cannot_change_definition_of_encounter_with_history(
    employment: Any, make_definition: Any, past: Any
) -> None:
    transition(employment, "working", effective_at=past(2))
    employment.definition = make_definition()  # the visit machine; 'working' is not a state
    # Issue 8 reworded the refusal (the subject is pinned by the genesis hash as well).
    with pytest.raises(EncounterError, match="its definition and subject cannot change"):
        employment.save()
    assert Encounter.objects.get(pk=employment.pk).definition.code != employment.definition.code


# --- F5: untyped exceptions escaping the public API --------------------------------------------


def test_time_in_states_on_gapped_stream_raises_typed_error(encounter: Any) -> None:
    transition(encounter, "checked_in")
    insert_row_raw(encounter, sequence=3, from_state="checked_in", to_state="in_progress")
    with pytest.raises(EncounterError, match="sequence gap"):
        time_in_states(encounter)


def test_far_past_effective_at_raises_typed_error(encounter: Any) -> None:
    plus5 = dt_timezone(timedelta(hours=5))
    with pytest.raises(ValueError, match="cannot be expressed in UTC"):
        transition(encounter, "checked_in", effective_at=datetime(1, 1, 1, 1, tzinfo=plus5))
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0


def test_a_receiver_cannot_alter_the_decided_row(encounter: Any) -> None:
    """The row is hashed when decided; a pre_transition receiver that changes it is refused
    rather than store a row its hash does not cover."""
    from django_encounters.signals import pre_transition

    def meddle(transition, **kwargs):
        transition.reason = "rewritten"

    pre_transition.connect(meddle)
    try:
        with pytest.raises(EncounterError, match="changed by a signal receiver"):
            transition(encounter, "checked_in", reason="original")
    finally:
        pre_transition.disconnect(meddle)
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0


@pytest.mark.parametrize("sender", [None, "EncounterTransition"])
def test_a_pre_save_receiver_cannot_alter_the_decided_row(encounter: Any, sender: Any) -> None:
    """The same for ``pre_save`` (``transition()`` sends it as ``save()`` would), connected
    for every model or for the row's model only."""
    from django.db.models.signals import pre_save

    def meddle(instance, **kwargs):
        if isinstance(instance, EncounterTransition):
            instance.to_state = "cancelled"

    model = EncounterTransition if sender else None
    pre_save.connect(meddle, sender=model)
    try:
        with pytest.raises(EncounterError, match="changed by a signal receiver"):
            transition(encounter, "checked_in", reason="original")
    finally:
        pre_save.disconnect(meddle, sender=model)
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0
    assert transition(encounter, "checked_in").to_state == "checked_in"  # none left connected


@pytest.mark.parametrize("allowed", [None, 500])
def test_deeply_nested_context_is_refused_by_the_depth_limit(
    encounter: Any, settings: Any, allowed: int | None
) -> None:
    """5,000 levels (past Python's recursion limit) are refused by ENCOUNTERS_MAX_CONTEXT_DEPTH
    (default 20; at most 500) before any JSON is built: a typed error, nothing written."""
    if allowed is not None:
        settings.ENCOUNTERS_MAX_CONTEXT_DEPTH = allowed
    context: dict = {}
    node = context
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InputLimitError, match="ENCOUNTERS_MAX_CONTEXT_DEPTH") as refused:
        transition(encounter, "checked_in", context=context)
    assert (refused.value.argument, refused.value.limit) == ("context", "depth")
    assert refused.value.maximum == (allowed or 20)
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0
