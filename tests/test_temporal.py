"""Temporal queries: ``Encounter.objects.as_of(t, known_at=None)`` agrees with
``get_state_at`` on every encounter, in one SQL statement, and can be filtered and ordered on;
``duration_in_state`` / ``time_in_states`` cut Decimal hours from the business-time timeline."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.utils import timezone

import django_encounters
from django_encounters import services
from django_encounters.models import Encounter
from django_encounters.services import (
    create_encounter,
    duration_in_state,
    get_state_at,
    time_in_states,
    transition,
)
from tests.helpers import recording_moment

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc


def d(day: int, hour: int = 0, minute: int = 0, month: int = 1) -> datetime:
    return datetime(2017, month, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def career(employment_definition, patient):
    """Created 2017-01-01 00:00 in 'hired'; working and on leave twice, then finished:

    hired   01-01 00:00 → 01-02 00:00   24 h (the origin interval)
    working 01-02 00:00 → 01-05 00:00   72 h
    onleave 01-05 00:00 → 01-07 00:00   48 h
    working 01-07 00:00 → 01-08 12:00   36 h
    onleave 01-08 12:00 → 01-09 00:00   12 h
    working 01-09 00:00 → 01-10 00:00   24 h
    finished from 01-10 00:00
    """
    encounter = Encounter.objects.create(
        definition=employment_definition, subject=patient, created_at=d(1)
    )
    for state, when in [
        ("working", d(2)),
        ("onleave", d(5)),
        ("working", d(7)),
        ("finished", d(10)),
        ("onleave", d(8, 12)),  # backdated into the timeline
        ("working", d(9)),  # backdated as well
    ]:
        transition(encounter, state, effective_at=when)
    return encounter


@pytest.fixture
def population(
    career, visit_definition, employment_definition, counter_definition, patient, device
):
    """Encounters with every shape of history, and the recording times between their rows.

    Issue 8: system time is stored at millisecond precision and strictly increases per
    encounter, so each recording time is a ``recording_moment()`` (after every row recorded
    before it, before every row recorded after it), not a bare ``timezone.now()``."""
    recorded = {"start": recording_moment()}
    fresh = create_encounter(visit_definition, patient)
    visit = create_encounter(visit_definition, device)
    transition(visit, "checked_in", effective_at=d(3))
    recorded["after_checked_in"] = recording_moment()
    transition(visit, "in_progress", effective_at=d(3))  # a tie on effective_at: sequence wins
    transition(visit, "cancelled", effective_at=d(6))
    recorded["after_cancelled"] = recording_moment()
    on_shift = Encounter.objects.create(  # created in another state than the initial one
        definition=employment_definition, subject=patient, state="working"
    )
    looping = create_encounter(counter_definition, device)
    for day in (2, 4, 4, 8):
        transition(looping, "open", effective_at=d(day))
    late = create_encounter(visit_definition, patient)
    transition(late, "checked_in", effective_at=d(5))
    recorded["before_backdate"] = recording_moment()
    transition(late, "cancelled", effective_at=d(9))
    recorded["end"] = recording_moment()
    gone = create_encounter(visit_definition, device)
    transition(gone, "cancelled", effective_at=d(4))
    gone.delete()
    return {
        "encounters": [career, fresh, visit, on_shift, looping, late, gone],
        "recorded": recorded,
    }


def _times() -> list[datetime]:
    edges = [d(1), d(2), d(3), d(4), d(5), d(6), d(8, 12), d(9), d(10)]
    return (
        [d(1) - timedelta(days=365)]
        + edges
        + [edge - timedelta(microseconds=1) for edge in edges]
        + [edge + timedelta(hours=5) for edge in edges]
        + [timezone.now() + timedelta(days=1)]
    )


# ---------------------------------------------------------------------------------------------
# as_of
# ---------------------------------------------------------------------------------------------


def test_as_of_agrees_with_get_state_at_on_every_encounter_at_every_time(population):
    encounters = population["encounters"]

    for when in _times():
        bulk = dict(Encounter.all_objects.as_of(when).values_list("pk", "state_at"))
        assert bulk == {e.pk: get_state_at(e, when) for e in encounters}, when


def test_as_known_at_agrees_with_get_state_at(population):
    encounters = population["encounters"]

    for known_at in population["recorded"].values():
        for when in _times():
            bulk = dict(
                Encounter.all_objects.as_of(when, known_at=known_at).values_list("pk", "state_at")
            )
            expected = {e.pk: get_state_at(e, when, known_at=known_at) for e in encounters}
            assert bulk == expected, (when, known_at)


def test_known_at_sees_only_rows_recorded_by_then(population):
    late = population["encounters"][5]
    recorded = population["recorded"]

    def state(known_at):
        return Encounter.objects.as_of(d(10), known_at=known_at).get(pk=late.pk).state_at

    assert state(recorded["start"]) == "scheduled"
    assert state(recorded["before_backdate"]) == "checked_in"
    assert state(recorded["end"]) == "cancelled"


def test_as_of_edge_cases(population):
    career, fresh, visit, on_shift, looping = population["encounters"][:5]

    def state(encounter, when):
        return Encounter.all_objects.as_of(when).get(pk=encounter.pk).state_at

    assert state(career, d(1)) == "hired"  # before the first row: the origin state
    assert state(on_shift, d(1)) == "working"  # ... which is not always the initial state
    assert state(fresh, timezone.now()) == "scheduled"
    assert state(visit, d(3)) == "in_progress"  # same effective_at: the later sequence
    assert state(visit, d(3) - timedelta(microseconds=1)) == "scheduled"
    assert state(career, d(8, 12)) == "onleave"  # a backdated row, by business time
    assert state(looping, d(9)) == "open"


def test_as_of_is_one_sql_statement(population, django_assert_num_queries):
    when, known_at = d(6), population["recorded"]["after_cancelled"]

    with django_assert_num_queries(1):
        rows = list(Encounter.objects.as_of(when).values_list("pk", "state_at"))
    with django_assert_num_queries(1):
        list(Encounter.objects.as_of(when, known_at=known_at).values_list("pk", "state_at"))
    with django_assert_num_queries(1):
        instances = list(Encounter.objects.as_of(when).order_by("state_at"))
    with django_assert_num_queries(0):
        assert {e.pk: e.state_at for e in instances} == dict(rows)


def test_state_at_can_be_filtered_and_ordered_on(population):
    career, fresh, visit, on_shift, looping, late, gone = population["encounters"]
    census = Encounter.objects.as_of(d(6))

    assert set(census.filter(state_at="onleave").values_list("pk", flat=True)) == {career.pk}
    assert set(census.filter(state_at="scheduled").values_list("pk", flat=True)) == {fresh.pk}
    assert set(
        census.filter(state_at__in=["cancelled", "checked_in"]).values_list("pk", flat=True)
    ) == {visit.pk, late.pk}
    assert census.filter(state_at="cancelled").count() == 1  # 'gone' is soft-deleted
    assert Encounter.all_objects.as_of(d(6)).filter(state_at="cancelled").count() == 2
    ordered = list(census.order_by("state_at", "pk").values_list("state_at", flat=True))
    assert ordered == sorted(ordered)
    assert len(ordered) == 6
    by_definition = census.filter(definition__code="EMPLOYMENT").exclude(state_at="working")
    assert list(by_definition.values_list("pk", flat=True)) == [career.pk]


def test_as_of_refuses_naive_times():
    with pytest.raises(ValueError, match="naive"):
        Encounter.objects.as_of(datetime(2017, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        Encounter.objects.as_of(d(1), known_at=datetime(2017, 1, 1))


# ---------------------------------------------------------------------------------------------
# duration_in_state / time_in_states
# ---------------------------------------------------------------------------------------------


def test_time_in_states_adds_up_visits(career):
    totals = time_in_states(career, until=d(20))

    assert totals == {
        "hired": Decimal(24),
        "working": Decimal(72 + 36 + 24),
        "onleave": Decimal(48 + 12),
        "finished": Decimal(240),
    }
    assert all(isinstance(hours, Decimal) for hours in totals.values())
    assert sum(totals.values()) == Decimal((d(20) - d(1)).total_seconds()) / 3600


def test_duration_in_state(career):
    assert duration_in_state(career, "working", until=d(20)) == Decimal(132)
    assert duration_in_state(career, "onleave", until=d(20)) == Decimal(60)
    assert duration_in_state(career, "hired", until=d(20)) == Decimal(24)


def test_until_clips_the_intervals(career):
    assert time_in_states(career, until=d(6)) == {
        "hired": Decimal(24),
        "working": Decimal(72),
        "onleave": Decimal(24),
    }
    assert time_in_states(career, until=d(1, 12)) == {"hired": Decimal(12)}
    assert time_in_states(career, until=d(1)) == {}
    assert time_in_states(career, until=d(1) - timedelta(days=1)) == {}
    assert duration_in_state(career, "onleave", until=d(8, 18)) == Decimal(48 + 6)
    assert duration_in_state(career, "working", until=d(2, 1, 30)) == Decimal("1.5")


def test_never_entered_gives_zero(career, encounter):
    assert duration_in_state(career, "finished", until=d(9)) == Decimal("0")
    assert "finished" not in time_in_states(career, until=d(9))
    assert duration_in_state(encounter, "completed") == Decimal("0")
    assert duration_in_state(career, "no-such-state") == Decimal("0")
    assert isinstance(duration_in_state(career, "finished", until=d(9)), Decimal)


def test_origin_interval_only_when_created_before_the_first_row(employment):
    """An encounter created today with a history imported from 2017: its creation follows the
    first row, so no origin interval is counted."""
    transition(employment, "working", effective_at=d(2))
    transition(employment, "finished", effective_at=d(4))

    totals = time_in_states(employment, until=d(5))

    assert totals == {"working": Decimal(48), "finished": Decimal(24)}
    assert duration_in_state(employment, "hired", until=d(5)) == Decimal("0")


def test_origin_interval_of_an_encounter_without_rows(visit_definition, patient):
    encounter = Encounter.objects.create(
        definition=visit_definition, subject=patient, created_at=d(1)
    )

    assert time_in_states(encounter, until=d(2, 6)) == {"scheduled": Decimal(30)}


def test_open_interval_ends_now_by_default(encounter):
    start = timezone.now() - timedelta(hours=2)
    transition(encounter, "checked_in", effective_at=start)

    before = duration_in_state(encounter, "checked_in")
    assert Decimal("1.99") < before < Decimal("2.1")
    assert duration_in_state(encounter, "checked_in") >= before  # the clock runs on


def test_backdated_rows_count_by_business_time(employment_definition, patient):
    encounter = Encounter.objects.create(
        definition=employment_definition, subject=patient, created_at=d(1)
    )
    transition(encounter, "working", effective_at=d(2))
    transition(encounter, "finished", effective_at=d(10))
    assert duration_in_state(encounter, "working", until=d(11)) == Decimal(192)

    transition(encounter, "onleave", effective_at=d(6))  # backdated

    assert time_in_states(encounter, until=d(11)) == {
        "hired": Decimal(24),
        "working": Decimal(96),
        "onleave": Decimal(96),
        "finished": Decimal(24),
    }


def test_durations_refuse_naive_until(career):
    with pytest.raises(ValueError, match="naive"):
        time_in_states(career, until=datetime(2017, 1, 20))
    with pytest.raises(ValueError, match="naive"):
        duration_in_state(career, "working", until=datetime(2017, 1, 20))


def test_temporal_api_is_exported_from_the_package():
    assert django_encounters.duration_in_state is services.duration_in_state
    assert django_encounters.time_in_states is services.time_in_states
    assert django_encounters.get_state_at is services.get_state_at
    assert {"duration_in_state", "time_in_states", "get_state_at"} <= set(django_encounters.__all__)
