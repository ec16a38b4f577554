"""Business time: backdating, the re-chain check, the future tolerance, naive
datetimes, ties, the origin state and bitemporal ``known_at`` queries."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from django_encounters.engine import stored_precision
from django_encounters.exceptions import InvalidTransitionError
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    transition,
)
from tests.helpers import recording_moment, reload, snapshot

pytestmark = pytest.mark.django_db

PLUS10 = dt_timezone(timedelta(hours=10))


def t(month: int, day: int, hour: int = 9, minute: int = 0, tz=PLUS10) -> datetime:
    """A business time in 2017 (long before the encounter row is created)."""
    return datetime(2017, month, day, hour, minute, tzinfo=tz)


@pytest.fixture
def on_shift(employment_definition, patient):
    """An employment created directly in 'working' (not the initial 'hired')."""
    return Encounter.objects.create(
        definition=employment_definition, subject=patient, state="working"
    )


@pytest.fixture
def with_later_onleave(on_shift):
    """A timeline where sequence 3 is 'onleave' effective
    2017-02-01T12:15:00+10:00, so 'finished' may not be backdated before it."""
    transition(on_shift, "onleave", effective_at=t(1, 5))
    transition(on_shift, "working", effective_at=t(1, 10))
    transition(on_shift, "onleave", effective_at=t(2, 1, 12, 15))
    return on_shift


# ---------------------------------------------------------------------------------------------
# Accepted backdates
# ---------------------------------------------------------------------------------------------


def test_backdated_insert_uses_timeline_state_at_effective_time(employment):
    transition(employment, "working", effective_at=t(1, 2))
    transition(employment, "finished", effective_at=t(2, 20))
    assert employment.state == "finished"

    row = transition(employment, "onleave", effective_at=t(1, 20), reason="late paperwork")

    # from_state is the timeline's state at T, not the current state.
    assert (row.from_state, row.to_state, row.sequence) == ("working", "onleave", 3)
    # Inserted before the end: the projection's state does not move.
    fresh = reload(employment)
    assert (fresh.state, fresh.version) == ("finished", 3)
    assert fresh.timeline_end_at == t(2, 20)
    assert fresh.ended_at == t(2, 20)
    assert (employment.state, employment.version) == ("finished", 3)
    # get_state_at replays it in business time.
    assert get_state_at(employment, t(1, 1)) == "hired"
    assert get_state_at(employment, t(1, 19)) == "working"
    assert get_state_at(employment, t(1, 20)) == "onleave"
    assert get_state_at(employment, t(2, 19)) == "onleave"
    assert get_state_at(employment, t(2, 20)) == "finished"
    # History stays in recording order.
    assert [(r.sequence, r.to_state) for r in get_encounter_history(employment)] == [
        (1, "working"),
        (2, "finished"),
        (3, "onleave"),
    ]
    # The later row keeps the from_state it was recorded with (nothing rewritten).
    assert EncounterTransition.objects.get(encounter=employment, sequence=2).from_state == (
        "working"
    )


def test_import_of_old_history_is_ordinary_backdating(employment):
    """Business time is independent of when the encounter row was created."""
    assert employment.created_at > t(12, 31)

    for state, when in [
        ("working", t(3, 1)),
        ("onleave", t(6, 1)),
        ("working", t(7, 1)),
        ("finished", t(11, 30)),
    ]:
        transition(employment, state, effective_at=when)

    fresh = reload(employment)
    assert (fresh.state, fresh.version, fresh.ended_at) == ("finished", 4, t(11, 30))
    assert get_state_at(employment, t(6, 15)) == "onleave"
    assert get_state_at(employment, t(2, 1)) == "hired"


def test_backdate_tie_in_middle_of_timeline_ordered_after_by_sequence(employment):
    transition(employment, "working", effective_at=t(1, 2))
    transition(employment, "finished", effective_at=t(3, 1))

    # Same effective_at as sequence 1: the new row comes after it in the timeline.
    row = transition(employment, "onleave", effective_at=t(1, 2))

    assert row.from_state == "working"
    assert get_state_at(employment, t(1, 2)) == "onleave"
    assert get_state_at(employment, t(1, 2) - timedelta(microseconds=1)) == "hired"
    assert reload(employment).state == "finished"


def test_ties_on_effective_at_broken_by_sequence(employment):
    when = t(1, 5, 10)

    first = transition(employment, "working", effective_at=when)
    second = transition(employment, "onleave", effective_at=when)
    assert second.from_state == "working"
    assert get_state_at(employment, when) == "onleave"

    third = transition(employment, "working", effective_at=when)
    assert third.from_state == "onleave"
    assert [first.sequence, second.sequence, third.sequence] == [1, 2, 3]
    assert get_state_at(employment, when) == "working"
    assert reload(employment).state == "working"
    assert get_state_at(employment, when - timedelta(microseconds=1)) == "hired"


def test_origin_state_before_first_row(on_shift):
    assert on_shift.origin_state == "working"
    assert get_state_at(on_shift, timezone.now()) == "working"

    transition(on_shift, "finished", effective_at=t(3, 1))

    # Before the first row: the state it was created in, not the definition's initial state.
    assert get_state_at(on_shift, t(2, 1)) == "working"
    assert get_state_at(on_shift, t(3, 1)) == "finished"
    # Backdating before the first row starts from the origin state too.
    row = transition(on_shift, "onleave", effective_at=t(1, 1))  # working -> onleave
    assert row.from_state == "working"
    assert get_state_at(on_shift, t(2, 1)) == "onleave"


# ---------------------------------------------------------------------------------------------
# Refused backdates: the re-chain check
# ---------------------------------------------------------------------------------------------


def test_backdate_refused_when_it_breaks_the_following_row(with_later_onleave):
    before = snapshot(with_later_onleave)

    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(with_later_onleave, "finished", effective_at=t(1, 20))

    error = excinfo.value
    # The requested edge...
    assert (error.from_state, error.to_state) == ("working", "finished")
    assert str(error).startswith("Cannot transition from 'working' to 'finished': ")
    # ...and the later row it would break, its time printed in the request's timezone.
    assert error.reason.startswith("would be followed by 'onleave' (sequence 3, ")
    assert "effective 2017-02-01T12:15:00+10:00" in error.reason
    assert error.reason.endswith("'finished' -> 'onleave' is not allowed")
    assert error.reason == (
        "would be followed by 'onleave' (sequence 3, effective 2017-02-01T12:15:00+10:00); "
        "'finished' -> 'onleave' is not allowed"
    )
    # Nothing written.
    assert snapshot(with_later_onleave) == before


@pytest.mark.parametrize(
    "tz, printed",
    [
        (dt_timezone.utc, "2017-02-01T02:15:00+00:00"),
        (ZoneInfo("Australia/Brisbane"), "2017-02-01T12:15:00+10:00"),
        (dt_timezone(timedelta(hours=-5)), "2017-01-31T21:15:00-05:00"),
    ],
)
def test_backdate_refusal_prints_successor_time_in_request_timezone(
    with_later_onleave, tz, printed
):
    requested = t(1, 20).astimezone(tz)

    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(with_later_onleave, "finished", effective_at=requested)

    assert f"(sequence 3, effective {printed})" in excinfo.value.reason


def test_backdate_before_first_row_refused_by_rechain(employment):
    transition(employment, "working", effective_at=t(1, 10))
    before = snapshot(employment)

    # hired -> working is allowed at T, but then 'working' would be followed by 'working'.
    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(employment, "working", effective_at=t(1, 5))

    assert (excinfo.value.from_state, excinfo.value.to_state) == ("hired", "working")
    assert "would be followed by 'working' (sequence 1" in excinfo.value.reason
    assert snapshot(employment) == before


def test_backdate_refused_when_edge_invalid_at_effective_time(employment):
    transition(employment, "working", effective_at=t(1, 10))
    transition(employment, "onleave", effective_at=t(2, 10))
    before = snapshot(employment)

    # 'onleave' -> 'finished' is allowed now, but at T the timeline was still 'hired'.
    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(employment, "finished", effective_at=t(1, 1))

    assert (excinfo.value.from_state, excinfo.value.to_state) == ("hired", "finished")
    assert snapshot(employment) == before


def test_backdate_into_final_stretch_refused(employment):
    transition(employment, "working", effective_at=t(1, 2))
    transition(employment, "finished", effective_at=t(2, 1))
    before = snapshot(employment)

    # After 'finished' nothing may follow, not even in the past's future.
    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(employment, "onleave", effective_at=t(3, 1))

    assert (excinfo.value.from_state, excinfo.value.to_state) == ("finished", "onleave")
    assert snapshot(employment) == before


# ---------------------------------------------------------------------------------------------
# The future
# ---------------------------------------------------------------------------------------------


def test_future_effective_at_beyond_default_tolerance_refused(encounter):
    before = snapshot(encounter)

    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(encounter, "checked_in", effective_at=timezone.now() + timedelta(minutes=10))

    assert excinfo.value.to_state == "checked_in"
    assert "future" in excinfo.value.reason
    assert snapshot(encounter) == before


def test_future_effective_at_within_default_tolerance_accepted(encounter):
    when = timezone.now() + timedelta(minutes=2)

    row = transition(encounter, "checked_in", effective_at=when)

    assert row.effective_at == stored_precision(when)  # issue 8: milliseconds
    assert reload(encounter).state == "checked_in"


def test_future_tolerance_setting_timedelta(encounter, settings):
    settings.ENCOUNTERS_FUTURE_TOLERANCE = timedelta(hours=1)
    transition(encounter, "checked_in", effective_at=timezone.now() + timedelta(minutes=30))

    settings.ENCOUNTERS_FUTURE_TOLERANCE = timedelta(0)
    before = snapshot(encounter)
    with pytest.raises(InvalidTransitionError):
        transition(encounter, "in_progress", effective_at=timezone.now() + timedelta(hours=2))
    assert snapshot(encounter) == before


def test_future_tolerance_setting_seconds(visit_definition, patient, settings):
    settings.ENCOUNTERS_FUTURE_TOLERANCE = 30
    encounter = create_encounter(visit_definition, patient)
    before = snapshot(encounter)
    with pytest.raises(InvalidTransitionError):
        transition(encounter, "checked_in", effective_at=timezone.now() + timedelta(minutes=1))
    assert snapshot(encounter) == before

    settings.ENCOUNTERS_FUTURE_TOLERANCE = 3600
    transition(encounter, "checked_in", effective_at=timezone.now() + timedelta(minutes=10))
    assert reload(encounter).state == "checked_in"


# ---------------------------------------------------------------------------------------------
# Naive datetimes
# ---------------------------------------------------------------------------------------------


def test_naive_effective_at_refused(encounter):
    before = snapshot(encounter)

    with pytest.raises(ValueError):
        transition(encounter, "checked_in", effective_at=datetime(2017, 1, 1, 9, 0))

    assert snapshot(encounter) == before


def test_naive_timestamps_refused_by_get_state_at(encounter):
    transition(encounter, "checked_in")
    aware = timezone.now()

    with pytest.raises(ValueError):
        get_state_at(encounter, datetime(2017, 1, 1, 9, 0))
    with pytest.raises(ValueError):
        get_state_at(encounter, timestamp=aware, known_at=datetime(2017, 1, 1, 9, 0))
    assert get_state_at(encounter, timestamp=aware, known_at=aware) == "checked_in"


# ---------------------------------------------------------------------------------------------
# Bitemporal: known_at
# ---------------------------------------------------------------------------------------------


def test_known_at_replays_only_rows_recorded_by_then(employment):
    # Issue 8: system time is stored at millisecond precision, so a bare timezone.now() may
    # share its millisecond with the next row; this moment precedes every later row.
    nothing_recorded = recording_moment()
    first = transition(employment, "working", effective_at=t(1, 2))
    second = transition(employment, "finished", effective_at=t(3, 1))
    correction = transition(employment, "onleave", effective_at=t(2, 1))  # backdated later
    assert first.transitioned_at < second.transitioned_at < correction.transitioned_at

    mid_feb = t(2, 15)
    assert get_state_at(employment, mid_feb, known_at=nothing_recorded) == "hired"
    assert get_state_at(employment, mid_feb, known_at=first.transitioned_at) == "working"
    # What the system said before the correction was recorded...
    assert get_state_at(employment, mid_feb, known_at=second.transitioned_at) == "working"
    # ...and after (known_at is inclusive).
    assert get_state_at(employment, mid_feb, known_at=correction.transitioned_at) == "onleave"
    assert get_state_at(employment, mid_feb) == "onleave"
    # The future of that time is the same either way.
    assert get_state_at(employment, t(3, 2), known_at=second.transitioned_at) == "finished"
    assert get_state_at(employment, t(3, 2), known_at=first.transitioned_at) == "working"
