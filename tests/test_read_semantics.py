"""One semantics for reads: the engine, replaying the stored stream (with ``known_at``: the
prefix recorded by then), answers every ``(t, known_at)`` exactly as the compiled reads do —
``get_state_at`` (one SQL query), ``Encounter.objects.as_of`` (one statement for many) and the
audit's ``state_as_of`` — on random histories with backdated rows, on every database."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_encounters import store
from django_encounters.engine import EncounterTimeline
from django_encounters.exceptions import InvalidTransitionError
from django_encounters.models import Encounter
from django_encounters.projections.audit import audit_encounters
from django_encounters.services import create_encounter, get_state_at, transition

pytestmark = pytest.mark.django_db

MS = timedelta(milliseconds=1)

# (target state, hours before now for a backdated row; None: now)
ops = st.lists(
    st.tuples(
        st.sampled_from(["working", "onleave", "finished", "hired"]),
        st.none() | st.integers(min_value=1, max_value=40),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=ops)
def test_the_engine_and_every_compiled_read_agree(employment_definition, patient, steps):
    encounter = create_encounter(employment_definition, patient)
    base = timezone.now()
    for target, hours in steps:
        effective = None if hours is None else base - timedelta(hours=hours)
        try:
            transition(encounter, target, effective_at=effective)
        except InvalidTransitionError:
            continue
    encounter = Encounter.all_objects.get(pk=encounter.pk)
    stream = store.load_stream(encounter.pk, "default")
    genesis, head = encounter.genesis(), encounter.genesis_hash

    recorded = [row.transitioned_at for row in stream]
    knowns: list[Any] = [None, encounter.created_at - MS]
    knowns += [at + delta for at in recorded for delta in (-MS, timedelta(0))]
    effective = [row.effective_at for row in stream] + [encounter.created_at]
    times = sorted({at + delta for at in effective for delta in (-MS, timedelta(0), MS)})
    for known_at in knowns:
        engine = EncounterTimeline.replay(genesis, head, stream, known_at=known_at)
        census = dict(
            Encounter.all_objects.filter(pk=encounter.pk)
            .as_of(times[0], known_at=known_at)
            .values_list("pk", "state_at")
        )
        assert census[encounter.pk] == engine.state_at(times[0])
        for when in times:
            expected = engine.state_at(when)
            assert get_state_at(encounter, when, known_at=known_at) == expected, (when, known_at)
            bulk = Encounter.all_objects.as_of(when, known_at=known_at).get(pk=encounter.pk)
            assert bulk.state_at == expected, (when, known_at)
        when = times[len(times) // 2]
        (audit,) = audit_encounters(
            encounters=[encounter.pk], as_of=when, known_at=known_at
        ).encounters
        assert audit.state_as_of == engine.state_at(when)
        assert audit.anomalies == []
