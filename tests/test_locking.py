"""Concurrency: optimistic (``expected_version``, the unique ``(encounter, sequence)``) and
pessimistic (the row lock) guards, and stale instances. Tests with real concurrent
connections need PostgreSQL (SQLite ignores ``select_for_update``) and are skipped on SQLite."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.db import IntegrityError, connection
from django.test.utils import CaptureQueriesContext

from django_encounters.exceptions import (
    ConcurrentTransitionError,
    EncounterError,
    InvalidTransitionError,
    ProjectionDriftError,
)
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    transition,
)
from django_encounters.signals import pre_transition
from tests.helpers import (
    HOLD_SECONDS,
    RowLockHolder,
    insert_row_raw,
    raw_update,
    reload,
    run_in_threads,
    snapshot,
    work_queries,
)

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------------------------------------
# expected_version
# ---------------------------------------------------------------------------------------------


def test_expected_version_current_passes(encounter):
    transition(encounter, "checked_in", expected_version=0)
    row = transition(encounter, "in_progress", expected_version=1)

    assert row.sequence == 2
    assert reload(encounter).version == 2


def test_expected_version_stale_refused(encounter):
    transition(encounter, "checked_in")
    before = snapshot(encounter)

    with pytest.raises(ConcurrentTransitionError) as excinfo:
        transition(encounter, "in_progress", expected_version=0)

    error = excinfo.value
    assert isinstance(error, EncounterError)
    assert error.encounter_id == encounter.pk
    assert (error.expected_version, error.actual_version) == (0, 1)
    assert str(encounter.pk) in str(error)
    assert snapshot(encounter) == before


def test_expected_version_ahead_refused(encounter):
    with pytest.raises(ConcurrentTransitionError) as excinfo:
        transition(encounter, "checked_in", expected_version=5)

    assert (excinfo.value.expected_version, excinfo.value.actual_version) == (5, 0)
    assert snapshot(encounter).row_count == 0


def test_expected_version_compared_before_anything_else(validated_encounter):
    transition(validated_encounter, "checked_in")
    before = snapshot(validated_encounter)

    # Invalid edge, unknown state, validator refusal, far future: the stale version wins.
    for to_state, kwargs in [
        ("completed", {}),  # checked_in -> completed is not an allowed edge
        ("teleported", {}),
        ("in_progress", {}),  # RequiredFieldsValidator would refuse (no started_at)
    ]:
        with pytest.raises(ConcurrentTransitionError):
            transition(validated_encounter, to_state, expected_version=0, **kwargs)
    assert snapshot(validated_encounter) == before

    # With the right version the real reasons come through.
    with pytest.raises(InvalidTransitionError):
        transition(validated_encounter, "completed", expected_version=1)


def test_expected_version_with_stale_instance(encounter):
    """A UI that loaded the encounter at version 0 acts after someone else moved it."""
    page = Encounter.objects.get(pk=encounter.pk)
    transition(encounter, "cancelled")

    with pytest.raises(ConcurrentTransitionError):
        transition(page, "checked_in", expected_version=page.version)
    assert reload(encounter).state == "cancelled"


# ---------------------------------------------------------------------------------------------
# The unique (encounter, sequence) guard
# ---------------------------------------------------------------------------------------------


def test_low_level_append_moves_the_projection_and_transition_continues(encounter):
    """EncounterTransition.objects.create() (the original low-level API) numbers and chains the
    row and replays the stream into the projection, so transition() continues from it."""
    EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in"
    )
    fresh = reload(encounter)
    assert (fresh.state, fresh.version) == ("checked_in", 1)
    assert fresh.head_hash == EncounterTransition.objects.get(encounter=encounter).hash

    row = transition(encounter, "in_progress")  # the caller's instance is stale: no matter

    assert (row.sequence, row.from_state) == (2, "checked_in")
    assert reload(encounter).version == 2


def test_low_level_append_refuses_a_sequence_gap(encounter):
    before = snapshot(encounter)
    with pytest.raises(EncounterError, match="would leave a gap"):
        EncounterTransition.objects.create(
            encounter=encounter, from_state="scheduled", to_state="checked_in", sequence=3
        )
    assert snapshot(encounter) == before


def test_rows_inserted_below_the_library_give_concurrent_transition_error(encounter):
    """A row inserted with raw SQL (no projection update): the next transition() refuses and
    says so, naming the way out. Since issue 8 the lock statement proves the projection against
    the log, so a projection at version 0 while rows exist is a ProjectionDriftError (an
    EncounterError, like ConcurrentTransitionError was), raised before any INSERT is tried."""
    insert_row_raw(encounter, sequence=1, from_state="scheduled", to_state="checked_in")
    before = snapshot(encounter)
    assert (before.version, before.row_count) == (0, 1)

    with pytest.raises(ProjectionDriftError, match="rebuild_encounter_projections") as exc:
        transition(encounter, "checked_in")

    assert exc.value.encounter_id == encounter.pk
    assert "rows exist though the version is 0" in str(exc.value)
    assert snapshot(encounter) == before  # nothing written

    # The way out it names: a rebuild derives the projection from the log; then it continues.
    assert rebuild_projections(encounters=[encounter.pk]).projections_fixed == 1
    row = transition(encounter, "in_progress")
    assert (row.sequence, row.from_state) == (2, "checked_in")


def test_a_row_below_the_library_dated_before_the_timeline_end_clashes_on_insert(encounter):
    """A raw row at ``version + 1`` dated before the timeline's end leaves the log's head as the
    projection says (the row at ``sequence = version`` and the last timeline row are unchanged):
    the lock's proof passes, and the new row's INSERT clashes with it on ``(encounter,
    sequence)``: ConcurrentTransitionError naming the rebuild, nothing written. (Issue 23 took
    the guard off the projection UPDATE; this is the error it gives, as before.)"""
    transition(encounter, "checked_in")
    earlier = reload(encounter).timeline_end_at - timedelta(hours=1)
    insert_row_raw(
        encounter, sequence=2, from_state="scheduled", to_state="cancelled", effective_at=earlier
    )
    before = snapshot(encounter)
    assert (before.version, before.row_count) == (1, 2)

    with CaptureQueriesContext(connection) as captured:
        with pytest.raises(ConcurrentTransitionError, match="sequence 2") as exc:
            transition(encounter, "in_progress")

    assert not isinstance(exc.value, ProjectionDriftError)
    assert "rebuild_encounter_projections" in str(exc.value)
    assert [q.split(None, 1)[0].upper() for q in work_queries(captured)] == ["SELECT", "INSERT"]
    assert snapshot(encounter) == before


def test_sequence_clash_becomes_concurrent_transition_error(encounter):
    """A writer that appends the same sequence after transition() checked the log (possible on
    SQLite without IMMEDIATE transactions, or for a writer bypassing the lock): the unique
    constraint clash is translated, never a raw IntegrityError."""
    before = snapshot(encounter)

    def racing_writer(sender, encounter, transition, **kwargs):
        EncounterTransition.objects.create(
            encounter=encounter,
            from_state="scheduled",
            to_state="cancelled",
            sequence=transition.sequence,
        )

    pre_transition.connect(racing_writer)
    try:
        with pytest.raises(ConcurrentTransitionError, match="sequence 1") as excinfo:
            transition(encounter, "checked_in")
    finally:
        pre_transition.disconnect(racing_writer)

    assert not isinstance(excinfo.value, IntegrityError)
    assert isinstance(excinfo.value.__cause__, IntegrityError)
    assert excinfo.value.encounter_id == encounter.pk
    # Nothing written, not even the racing row (same transaction); the connection still works.
    assert snapshot(encounter) == before
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0
    transition(encounter, "checked_in")
    assert reload(encounter).version == 1


def test_projection_ahead_of_the_log_is_refused(encounter):
    """A projection whose version was raised behind the library's back would make transition()
    append a gap: refused with ProjectionDriftError, nothing written. Since issue 8 the ORM
    refuses to update the version (raw SQL does it), and the lock statement finds no row at the
    stored version."""
    with pytest.raises(EncounterError, match="derived from the transition log"):
        Encounter.objects.filter(pk=encounter.pk).update(version=5)
    raw_update(Encounter, encounter.pk, version=5)
    before = snapshot(encounter)
    assert before.version == 5

    with pytest.raises(ProjectionDriftError) as excinfo:
        transition(encounter, "checked_in")

    assert excinfo.value.projected_version == 5
    assert excinfo.value.encounter_id == encounter.pk
    assert "no row 5 in the log" in str(excinfo.value)
    assert "rebuild_encounter_projections" in str(excinfo.value)
    assert snapshot(encounter) == before


def test_sequence_is_unique_per_encounter_not_globally(encounter, visit_definition, device):
    other = create_encounter(visit_definition, device)

    first = transition(encounter, "checked_in")
    second = transition(other, "checked_in")

    assert first.sequence == second.sequence == 1


# ---------------------------------------------------------------------------------------------
# Stale instances
# ---------------------------------------------------------------------------------------------


def test_stale_instance_save_does_not_overwrite_projection(encounter):
    mover = Encounter.objects.get(pk=encounter.pk)
    stale = Encounter.objects.get(pk=encounter.pk)

    transition(mover, "checked_in")
    transition(mover, "in_progress")
    assert (stale.state, stale.version) == ("scheduled", 0)
    stale.notes = "edited on an old page"
    stale.save()

    fresh = reload(encounter)
    assert (fresh.state, fresh.version) == ("in_progress", 2)
    assert fresh.timeline_end_at == mover.timeline_end_at
    assert fresh.head_hash == mover.head_hash
    assert fresh.origin_state == "scheduled"
    assert fresh.notes == "edited on an old page"
    assert get_state_at(fresh, fresh.timeline_end_at) == "in_progress"


def test_stale_instance_can_still_transition_from_current_state(encounter):
    stale = Encounter.objects.get(pk=encounter.pk)
    transition(encounter, "checked_in")

    # The decision is made on the locked, fresh row, not on the caller's stale copy.
    row = transition(stale, "in_progress")

    assert (row.from_state, row.sequence) == ("checked_in", 2)
    assert (stale.state, stale.version) == ("in_progress", 2)


# ---------------------------------------------------------------------------------------------
# Real concurrent connections (PostgreSQL)
# ---------------------------------------------------------------------------------------------


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_are_serialized(encounter):
    """Two writers race for scheduled -> cancelled: one wins, the other then sees 'cancelled'
    (final, no exits) and is refused; one row."""

    def work(_: int):
        return transition(Encounter.objects.get(pk=encounter.pk), "cancelled")

    results = run_in_threads(2, work)

    rows = [r for r in results if isinstance(r, EncounterTransition)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(rows) == 1, results
    assert len(errors) == 1 and isinstance(errors[0], InvalidTransitionError), results
    assert errors[0].from_state == "cancelled"
    fresh = reload(encounter)
    assert (fresh.state, fresh.version) == ("cancelled", 1)
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 1


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_concurrent_expected_version_only_one_wins(counter_definition, patient):
    encounter = create_encounter(counter_definition, patient)

    def work(_: int):
        return transition(Encounter.objects.get(pk=encounter.pk), "open", expected_version=0)

    results = run_in_threads(4, work)

    winners = [r for r in results if isinstance(r, EncounterTransition)]
    losers = [r for r in results if isinstance(r, ConcurrentTransitionError)]
    assert len(winners) == 1 and len(losers) == 3, results
    assert all((e.expected_version, e.actual_version) == (0, 1) for e in losers)
    assert reload(encounter).version == 1


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_many_writers_append_gap_free_stream(counter_definition, patient):
    encounter = create_encounter(counter_definition, patient)
    threads, per_thread = 6, 5

    def work(i: int):
        for n in range(per_thread):
            transition(Encounter.objects.get(pk=encounter.pk), "open", reason=f"writer {i} #{n}")
        return True

    results = run_in_threads(threads, work)

    assert results == [True] * threads, results
    history = get_encounter_history(encounter)
    assert [r.sequence for r in history] == list(range(1, threads * per_thread + 1))
    assert len({r.reason for r in history}) == threads * per_thread
    fresh = reload(encounter)
    assert fresh.version == threads * per_thread
    assert fresh.head_hash == history[-1].hash
    assert fresh.state == "open"


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_readers_do_not_wait_for_the_row_lock(encounter):
    transition(encounter, "checked_in")
    holder = RowLockHolder(encounter.pk, action=lambda e: transition(e, "in_progress"))
    holder.start()
    try:
        assert holder.locked.wait(15) and holder.error is None, holder.error
        started = time.monotonic()
        # Plain reads see the last committed state, without blocking.
        assert get_state_at(encounter, encounter.timeline_end_at) == "checked_in"
        assert [r.sequence for r in get_encounter_history(encounter)] == [1]
        assert Encounter.objects.get(pk=encounter.pk).state == "checked_in"
        elapsed = time.monotonic() - started
    finally:
        holder.release.set()
        holder.join(20)
    # The holder keeps its lock until released (up to 15 s): a blocked read would show here.
    assert elapsed < 5
    assert holder.error is None, holder.error
    assert reload(encounter).state == "in_progress"


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_backdated_transition_also_waits_for_the_lock(employment):
    """A backdated write reads the stream under the same lock: it sees the holder's row."""
    t0 = datetime(2017, 1, 1, tzinfo=timezone.utc)
    transition(employment, "working", effective_at=t0)
    holder = RowLockHolder(
        employment.pk,
        action=lambda e: transition(e, "onleave", effective_at=t0 + timedelta(days=30)),
    )
    holder.start()
    try:
        assert holder.locked.wait(15) and holder.error is None, holder.error
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '20s'")
        threading.Timer(HOLD_SECONDS, holder.release.set).start()
        started = time.monotonic()
        # 'finished' on day 10 would be followed by the holder's 'onleave' on day 30: refused,
        # which it can only know if it waited for the holder's commit.
        with pytest.raises(InvalidTransitionError) as excinfo:
            transition(employment, "finished", effective_at=t0 + timedelta(days=10))
        waited = time.monotonic() - started
    finally:
        holder.release.set()
        holder.join(20)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert holder.error is None, holder.error
    assert waited >= HOLD_SECONDS * 0.8
    assert "would be followed by 'onleave' (sequence 2" in excinfo.value.reason
    assert reload(employment).version == 2
