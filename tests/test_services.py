"""Service tests: create_encounter (8), transition (16), get_encounter_history (4) and
get_state_at (4) from the specification, plus the write path's contract."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.db import transaction as db_transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_encounters.engine import stored_precision
from django_encounters.exceptions import (
    EncounterError,
    EncounterNotFoundError,
    InvalidTransitionError,
    ValidationError,
)
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    run_validators,
    transition,
)
from django_encounters.signals import post_transition, pre_transition
from tests.helpers import (
    HOLD_SECONDS,
    IS_POSTGRES,
    RowLockHolder,
    reload,
    snapshot,
    table,
    work_queries,
)

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------------------------------------
# create_encounter (8)
# ---------------------------------------------------------------------------------------------


def test_create_encounter_basic(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)

    fresh = Encounter.objects.get(pk=encounter.pk)
    assert fresh.definition == visit_definition
    assert fresh.subject == patient
    assert Encounter.objects.count() == 1
    assert EncounterTransition.objects.count() == 0  # creation is not a transition row


def test_create_encounter_initial_state(make_definition, patient):
    definition = make_definition(
        states=["triage", "seen", "done"],
        initial_state="triage",
        final_states=["done"],
        transitions={"triage": ["seen"], "seen": ["done"]},
    )
    encounter = create_encounter(definition, patient)

    assert encounter.state == "triage"
    fresh = reload(encounter)
    assert fresh.state == "triage"
    assert fresh.origin_state == "triage"
    assert fresh.version == 0
    assert get_state_at(fresh, timezone.now()) == "triage"


def test_create_encounter_with_subject(visit_definition, patient, device):
    for_patient = create_encounter(visit_definition, patient)
    for_device = create_encounter(visit_definition, device)

    assert reload(for_patient).subject == patient
    assert reload(for_patient).subject_id == str(patient.pk)
    assert reload(for_device).subject == device
    assert reload(for_device).subject_id == str(device.pk)
    assert for_patient.subject_content_type != for_device.subject_content_type


def test_create_encounter_with_users(visit_definition, patient, user, other_user):
    encounter = create_encounter(visit_definition, patient, created_by=user, assigned_to=other_user)

    fresh = reload(encounter)
    assert fresh.created_by == user
    assert fresh.assigned_to == other_user
    assert list(user.encounters_created.all()) == [encounter]
    assert list(other_user.encounters_assigned.all()) == [encounter]


def test_create_encounter_with_schedule(visit_definition, patient):
    when = timezone.now() + timedelta(days=7, hours=3)
    encounter = create_encounter(visit_definition, patient, scheduled_at=when)

    assert reload(encounter).scheduled_at == when
    assert reload(create_encounter(visit_definition, patient)).scheduled_at is None


def test_create_encounter_with_notes(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient, notes="Bring previous X-rays.")

    assert reload(encounter).notes == "Bring previous X-rays."
    assert reload(create_encounter(visit_definition, patient)).notes == ""


def test_create_encounter_with_metadata(visit_definition, patient):
    metadata = {"source": "portal", "tags": ["new", "urgent"], "score": {"triage": 3}}
    encounter = create_encounter(visit_definition, patient, metadata=metadata)

    assert reload(encounter).metadata == metadata
    assert reload(create_encounter(visit_definition, patient)).metadata == {}


def test_create_encounter_returns_encounter(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)

    assert isinstance(encounter, Encounter)
    assert encounter.pk is not None
    assert not encounter._state.adding
    assert Encounter.objects.filter(pk=encounter.pk).exists()
    assert encounter.version == 0


# ---------------------------------------------------------------------------------------------
# transition (16)
# ---------------------------------------------------------------------------------------------


def test_transition_changes_state(encounter):
    transition(encounter, "checked_in")

    assert encounter.state == "checked_in"  # the caller's instance
    assert reload(encounter).state == "checked_in"  # the database


def test_transition_creates_log(encounter):
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0

    transition(encounter, "checked_in")

    rows = list(EncounterTransition.objects.filter(encounter=encounter))
    assert len(rows) == 1
    assert (rows[0].from_state, rows[0].to_state) == ("scheduled", "checked_in")
    assert rows[0].sequence == 1
    assert rows[0].hash


def test_transition_invalid_raises(encounter):
    before = snapshot(encounter)

    with pytest.raises(InvalidTransitionError) as excinfo:
        transition(encounter, "completed")

    error = excinfo.value
    assert (error.from_state, error.to_state) == ("scheduled", "completed")
    assert str(error).startswith("Cannot transition from 'scheduled' to 'completed': ")
    assert "checked_in" in error.reason  # says what is allowed
    assert isinstance(error, EncounterError)
    assert snapshot(encounter) == before
    assert encounter.state == "scheduled"

    # An unknown state is refused the same way.
    with pytest.raises(InvalidTransitionError):
        transition(encounter, "teleported")
    assert snapshot(encounter) == before


def test_transition_with_reason(encounter):
    row = transition(encounter, "cancelled", reason="Patient called to cancel")

    assert row.reason == "Patient called to cancel"
    assert EncounterTransition.objects.get(pk=row.pk).reason == "Patient called to cancel"
    assert (
        transition(create_encounter(encounter.definition, encounter.subject), "cancelled").reason
        == ""
    )


def test_transition_with_user(encounter, user, other_user):
    first = transition(encounter, "checked_in", transitioned_by=user)
    second = transition(encounter, "in_progress", transitioned_by=other_user)
    third = transition(encounter, "cancelled")

    assert EncounterTransition.objects.get(pk=first.pk).transitioned_by == user
    assert EncounterTransition.objects.get(pk=second.pk).transitioned_by == other_user
    assert EncounterTransition.objects.get(pk=third.pk).transitioned_by is None
    assert list(user.transitions_made.all()) == [first]


def test_transition_with_effective_at(encounter):
    when = timezone.now() - timedelta(hours=2)

    row = transition(encounter, "checked_in", effective_at=when)

    fresh = EncounterTransition.objects.get(pk=row.pk)
    assert fresh.effective_at == stored_precision(when)  # issue 8: milliseconds
    assert fresh.transitioned_at > when + timedelta(hours=1)  # recorded now
    assert get_state_at(encounter, when - timedelta(seconds=1)) == "scheduled"
    assert get_state_at(encounter, when) == "checked_in"
    assert reload(encounter).state == "checked_in"


def test_transition_runs_validators(validated_encounter):
    transition(validated_encounter, "checked_in")
    before = snapshot(validated_encounter)

    # RequiredFieldsValidator: in_progress needs started_at.
    with pytest.raises(ValidationError) as excinfo:
        transition(validated_encounter, "in_progress")
    assert excinfo.value.validator == "RequiredFieldsValidator"
    assert snapshot(validated_encounter) == before

    validated_encounter.started_at = timezone.now()
    validated_encounter.save()
    transition(validated_encounter, "in_progress")
    assert reload(validated_encounter).state == "in_progress"


def test_transition_skip_validation(validated_encounter):
    transition(validated_encounter, "checked_in")
    assert validated_encounter.started_at is None

    row = transition(validated_encounter, "in_progress", skip_validation=True)

    assert row.to_state == "in_progress"
    assert reload(validated_encounter).state == "in_progress"
    # Skipping validators does not skip the state machine.
    with pytest.raises(InvalidTransitionError):
        transition(validated_encounter, "scheduled", skip_validation=True)


class InjectedFailure(Exception):
    pass


def test_transition_atomic(encounter):
    """A failure after the row is inserted (here: the projection UPDATE) rolls back both."""
    transition(encounter, "checked_in")
    before = snapshot(encounter)
    seen: list[str] = []

    def fail_projection_update(execute, sql, params, many, context):
        seen.append(sql)
        if sql.lstrip().upper().startswith("UPDATE") and table(Encounter) in sql:
            raise InjectedFailure("projection update failed")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(fail_projection_update):
        with pytest.raises(InjectedFailure):
            transition(encounter, "in_progress")

    # The row had been inserted before the failure...
    assert any(
        s.lstrip().upper().startswith("INSERT") and table(EncounterTransition) in s for s in seen
    )
    # ...and is gone, with the projection untouched.
    assert snapshot(encounter) == before
    # The encounter is still usable.
    transition(encounter, "in_progress")
    assert snapshot(encounter).sequences == (1, 2)


@pytest.mark.django_db(transaction=IS_POSTGRES)
def test_transition_locks_encounter(encounter):
    """transition() reads the encounter with its definition under a row lock, first thing in
    its transaction. On PostgreSQL, prove the lock with a second connection that holds it."""
    stale = Encounter.objects.get(pk=encounter.pk)  # will be behind by the time it is used

    if connection.vendor == "postgresql":
        holder = RowLockHolder(
            encounter.pk, action=lambda e: transition(e, "checked_in", reason="holder")
        )
        holder.start()
        try:
            assert holder.locked.wait(15), "the holder thread never took the lock"
            assert holder.error is None, holder.error
            release = threading.Timer(HOLD_SECONDS, holder.release.set)
            with connection.cursor() as cursor:  # bound the wait: the test can never hang
                cursor.execute("SET lock_timeout = '20s'")
            started = time.monotonic()
            release.start()
            with CaptureQueriesContext(connection) as captured:
                row = transition(stale, "in_progress", reason="main")
            finished = time.monotonic()
        finally:
            holder.release.set()
            holder.join(20)
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
        assert not holder.is_alive()
        assert holder.error is None, holder.error
        # The main transition waited for the holder's commit...
        assert finished - started >= HOLD_SECONDS * 0.8
        assert holder.committed_at is not None and holder.committed_at <= finished
        # ...and then decided on the committed state: serialized, not lost or clashing.
        assert (row.from_state, row.to_state, row.sequence) == ("checked_in", "in_progress", 2)
        fresh = reload(encounter)
        assert (fresh.state, fresh.version) == ("in_progress", 2)
        assert [(r.sequence, r.reason) for r in get_encounter_history(fresh)] == [
            (1, "holder"),
            (2, "main"),
        ]
        assert (stale.state, stale.version) == ("in_progress", 2)
    else:
        with CaptureQueriesContext(connection) as captured:
            row = transition(stale, "checked_in")

    queries = work_queries(captured)
    first = queries[0]
    assert first.lstrip().upper().startswith("SELECT")
    assert table(Encounter) in first
    assert table(Encounter.definition.field.related_model) in first  # definition joined
    assert "JOIN" in first.upper()
    inserts = [i for i, q in enumerate(queries) if q.lstrip().upper().startswith("INSERT")]
    assert inserts and inserts[0] > 0
    if connection.vendor == "postgresql":
        assert "FOR UPDATE" in first.upper()


def test_transition_to_final_sets_ended_at(encounter, past):
    assert encounter.ended_at is None
    transition(encounter, "checked_in")
    assert reload(encounter).ended_at is None  # not final yet

    row = transition(encounter, "cancelled")

    fresh = reload(encounter)
    assert fresh.ended_at == row.effective_at  # one timestamp for both

    # Backdated completion at the end of the timeline: ended_at is the business time.
    other = create_encounter(encounter.definition, encounter.subject)
    transition(other, "checked_in", effective_at=past(3))
    transition(other, "in_progress", effective_at=past(2))
    transition(other, "completed", effective_at=past(1))
    assert reload(other).ended_at == stored_precision(past(1))  # issue 8: milliseconds


def test_transition_multiple_sequential(encounter, user):
    first = transition(encounter, "checked_in", transitioned_by=user)
    second = transition(encounter, "in_progress")
    third = transition(encounter, "completed")

    assert [(r.from_state, r.to_state) for r in (first, second, third)] == [
        ("scheduled", "checked_in"),
        ("checked_in", "in_progress"),
        ("in_progress", "completed"),
    ]
    assert [r.sequence for r in (first, second, third)] == [1, 2, 3]
    fresh = reload(encounter)
    assert (fresh.state, fresh.version) == ("completed", 3)
    assert fresh.is_final
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 3
    with pytest.raises(InvalidTransitionError):
        transition(encounter, "cancelled")  # no way out of a final state


def test_transition_returns_log(encounter):
    row = transition(encounter, "checked_in", reason="arrived")

    assert isinstance(row, EncounterTransition)
    assert not row._state.adding and row.pk is not None
    assert row == encounter.transitions.get()
    assert row.encounter_id == encounter.pk
    assert (row.from_state, row.to_state, row.reason) == ("scheduled", "checked_in", "arrived")


def test_transition_context_to_metadata(encounter):
    context = {"room": "3B", "vitals": {"bp": [120, 80]}, "interpreter": None}

    row = transition(encounter, "checked_in", context=context)

    assert row.metadata == context
    assert EncounterTransition.objects.get(pk=row.pk).metadata == context
    assert transition(encounter, "in_progress").metadata == {}  # no context: empty dict


def test_transition_from_initial(make_definition, patient):
    definition = make_definition(
        states=["new", "open", "closed"],
        initial_state="new",
        final_states=["closed"],
        transitions={"new": ["open"], "open": ["closed"]},
    )
    encounter = create_encounter(definition, patient)

    row = transition(encounter, "open")

    assert row.from_state == "new" == definition.initial_state
    assert row.sequence == 1
    assert (encounter.state, encounter.version) == ("open", 1)


def test_transition_validator_error(validated_encounter):
    transition(validated_encounter, "checked_in")
    validated_encounter.started_at = timezone.now()
    validated_encounter.save()
    transition(validated_encounter, "in_progress")
    before = snapshot(validated_encounter)

    with pytest.raises(ValidationError) as excinfo:
        transition(validated_encounter, "completed")  # ended_at is required

    error = excinfo.value
    assert error.validator == "RequiredFieldsValidator"
    assert "ended_at" in str(error)
    assert str(error).startswith("Validation failed (RequiredFieldsValidator): ")
    assert isinstance(error, EncounterError)
    assert snapshot(validated_encounter) == before
    assert validated_encounter.state == "in_progress"


# ---------------------------------------------------------------------------------------------
# get_encounter_history (4)
# ---------------------------------------------------------------------------------------------


def test_history_empty_for_new(encounter):
    assert get_encounter_history(encounter) == []


def test_history_ordered_by_time(encounter, past):
    transition(encounter, "checked_in", effective_at=past(3))
    transition(encounter, "in_progress", effective_at=past(2))
    transition(encounter, "completed", effective_at=past(1))

    history = get_encounter_history(encounter)

    assert [r.to_state for r in history] == ["checked_in", "in_progress", "completed"]
    assert [r.sequence for r in history] == [1, 2, 3]
    recorded = [r.transitioned_at for r in history]
    effective = [r.effective_at for r in history]
    assert recorded == sorted(recorded)
    assert effective == sorted(effective)


def test_history_includes_all(encounter, visit_definition, device):
    other = create_encounter(visit_definition, device)
    transition(other, "cancelled")
    for state in ("checked_in", "in_progress", "cancelled"):
        transition(encounter, state)

    history = get_encounter_history(encounter)

    assert len(history) == 3
    assert {r.encounter_id for r in history} == {encounter.pk}
    assert set(history) == set(EncounterTransition.objects.filter(encounter=encounter))
    assert [r.to_state for r in get_encounter_history(other)] == ["cancelled"]


def test_history_returns_list(encounter):
    transition(encounter, "checked_in")

    history = get_encounter_history(encounter)

    assert type(history) is list
    assert len(history) == 1 and isinstance(history[0], EncounterTransition)


# ---------------------------------------------------------------------------------------------
# get_state_at (4)
# ---------------------------------------------------------------------------------------------


def test_state_at_before_first(encounter, past):
    assert get_state_at(encounter, timezone.now()) == "scheduled"  # no rows at all

    transition(encounter, "checked_in", effective_at=past(2))

    assert get_state_at(encounter, past(3)) == "scheduled"
    # Issue 8: the row is effective at past(2) cut to milliseconds; just before that instant
    # the encounter was still in its origin state.
    assert get_state_at(encounter, stored_precision(past(2)) - timedelta(microseconds=1)) == (
        "scheduled"
    )


def test_state_at_after_transition(encounter, past):
    transition(encounter, "checked_in", effective_at=past(2))

    assert get_state_at(encounter, past(2)) == "checked_in"  # inclusive
    assert get_state_at(encounter, past(1)) == "checked_in"


def test_state_at_between_transitions(encounter, past):
    transition(encounter, "checked_in", effective_at=past(5))
    transition(encounter, "in_progress", effective_at=past(3))
    transition(encounter, "completed", effective_at=past(1))

    assert get_state_at(encounter, past(4)) == "checked_in"
    assert get_state_at(encounter, past(2)) == "in_progress"
    assert get_state_at(encounter, past(3)) == "in_progress"
    assert get_state_at(encounter, past(0.5)) == "completed"


def test_state_at_current(encounter, past):
    transition(encounter, "checked_in", effective_at=past(2))
    transition(encounter, "in_progress", effective_at=past(1))

    assert get_state_at(encounter, timezone.now()) == "in_progress" == reload(encounter).state
    transition(encounter, "cancelled")
    assert get_state_at(encounter, timezone.now()) == "cancelled" == reload(encounter).state


# ---------------------------------------------------------------------------------------------
# Write-path contract beyond the specification
# ---------------------------------------------------------------------------------------------


def test_transition_updates_callers_instance(encounter):
    assert (encounter.state, encounter.version) == ("scheduled", 0)

    transition(encounter, "checked_in")
    assert (encounter.state, encounter.version) == ("checked_in", 1)
    transition(encounter, "in_progress")
    assert (encounter.state, encounter.version) == ("in_progress", 2)

    # So a later save() of the same instance is harmless.
    encounter.notes = "seen by Dr. Who"
    encounter.save()
    fresh = reload(encounter)
    assert (fresh.state, fresh.version, fresh.notes) == ("in_progress", 2, "seen by Dr. Who")


def test_transition_projection_columns(encounter, past):
    first = transition(encounter, "checked_in", effective_at=past(2))
    second = transition(encounter, "in_progress", effective_at=past(1))

    fresh = reload(encounter)
    assert fresh.version == 2
    assert fresh.origin_state == "scheduled"
    assert fresh.timeline_end_at == second.effective_at == stored_precision(past(1))  # issue 8
    assert fresh.head_hash == second.hash != first.hash


def test_transition_missing_encounter(visit_definition, patient):
    ghost = Encounter(definition=visit_definition, subject=patient, state="scheduled")
    assert ghost.pk is not None  # UUID assigned, never saved

    with pytest.raises(EncounterNotFoundError) as excinfo:
        transition(ghost, "checked_in")

    assert excinfo.value.encounter_id == ghost.pk
    assert str(ghost.pk) in str(excinfo.value)
    assert EncounterTransition.objects.count() == 0


def test_transition_soft_deleted_encounter(encounter):
    encounter.delete()
    before = snapshot(encounter)

    with pytest.raises(EncounterNotFoundError) as excinfo:
        transition(encounter, "checked_in")

    assert excinfo.value.encounter_id == encounter.pk
    assert snapshot(encounter) == before
    assert before.row_count == 0

    Encounter.all_objects.get(pk=encounter.pk).restore()
    transition(encounter, "checked_in")
    assert snapshot(encounter).state == "checked_in"


def test_transition_query_count(encounter, user):
    transition(encounter, "checked_in")  # warm caches (content types etc.)

    with CaptureQueriesContext(connection) as captured:
        transition(encounter, "in_progress", transitioned_by=user, reason="seen", context={"a": 1})

    queries = work_queries(captured)
    assert len(queries) <= 3, "\n".join(queries)
    assert reload(encounter).state == "in_progress"


def test_transition_validator_bug_becomes_validation_error(make_definition, patient):
    definition = make_definition(validators=["tests.encounter_validators.ExplodingValidator"])
    encounter = create_encounter(definition, patient)
    before = snapshot(encounter)

    with pytest.raises(ValidationError) as excinfo:
        transition(encounter, "checked_in")

    assert "ExplodingValidator" in excinfo.value.validator
    assert "ExplodingValidator" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, ZeroDivisionError)
    assert snapshot(encounter) == before


def test_validators_run_in_order_and_stop_at_first_refusal(make_definition, patient):
    from tests import encounter_validators

    encounter_validators.CALLS.clear()
    definition = make_definition(
        validators=[
            "tests.encounter_validators.RecordingValidator",
            {
                "path": "tests.encounter_validators.RefuseStateValidator",
                "params": {"state": "checked_in"},
            },
            {
                "path": "tests.encounter_validators.RecordingValidator",
                "params": {"label": "second"},
            },
        ]
    )
    encounter = create_encounter(definition, patient)

    with pytest.raises(ValidationError):
        transition(encounter, "checked_in")
    assert len(encounter_validators.CALLS) == 1  # the third never ran

    encounter_validators.CALLS.clear()
    transition(encounter, "checked_in", context={"approved": True})
    assert len(encounter_validators.CALLS) == 2
    encounter_validators.CALLS.clear()


def test_run_validators_service(validated_encounter):
    assert validated_encounter.started_at is None

    with pytest.raises(ValidationError, match="started_at"):
        run_validators(validated_encounter, "checked_in", "in_progress")
    with pytest.raises(ValidationError) as excinfo:
        run_validators(validated_encounter, "completed", "scheduled")
    assert excinfo.value.validator == "FinalStateValidator"

    validated_encounter.started_at = timezone.now()
    assert run_validators(validated_encounter, "checked_in", "in_progress", {"x": 1}) is None
    assert EncounterTransition.objects.count() == 0  # validators only check


def test_encounter_for_uuid_keyed_subject(visit_definition, device, user):
    encounter = create_encounter(visit_definition, device, created_by=user)

    for state in ("checked_in", "in_progress", "completed"):
        transition(encounter, state, transitioned_by=user)

    fresh = Encounter.objects.get(pk=encounter.pk)
    assert fresh.subject == device
    assert fresh.subject_id == str(device.pk)
    assert (fresh.state, fresh.version) == ("completed", 3)
    assert [r.to_state for r in get_encounter_history(fresh)] == [
        "checked_in",
        "in_progress",
        "completed",
    ]


def test_encounter_for_integer_keyed_subject(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "cancelled")

    fresh = Encounter.objects.get(pk=encounter.pk)
    assert fresh.subject == patient
    assert fresh.subject_id == str(patient.pk)
    assert fresh.state == "cancelled"


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def signal_log():
    log: list[tuple[str, dict]] = []

    def on_pre(sender, **kwargs):
        log.append(("pre", {"sender": sender, **kwargs}))

    def on_post(sender, **kwargs):
        log.append(("post", {"sender": sender, **kwargs}))

    pre_transition.connect(on_pre, weak=False, dispatch_uid="test-pre")
    post_transition.connect(on_post, weak=False, dispatch_uid="test-post")
    yield log
    pre_transition.disconnect(dispatch_uid="test-pre")
    post_transition.disconnect(dispatch_uid="test-post")


def test_signals_pre_inside_post_on_commit(
    encounter, signal_log, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        row = transition(encounter, "checked_in")

    # pre_transition was sent during the call; post_transition waits for the commit.
    assert [kind for kind, _ in signal_log] == ["pre"]
    pre = signal_log[0][1]
    assert pre["sender"] is Encounter
    assert pre["encounter"].pk == encounter.pk
    assert (pre["from_state"], pre["to_state"]) == ("scheduled", "checked_in")
    assert pre["transition"].sequence == row.sequence
    assert (pre["transition"].from_state, pre["transition"].to_state) == ("scheduled", "checked_in")

    assert callbacks
    for callback in callbacks:
        callback()
    assert [kind for kind, _ in signal_log] == ["pre", "post"]
    post = signal_log[1][1]
    assert post["sender"] is Encounter
    assert post["encounter"].pk == encounter.pk
    assert post["transition"].pk == row.pk
    assert (post["from_state"], post["to_state"]) == ("scheduled", "checked_in")


def test_signals_not_sent_for_refused_transition(
    encounter, signal_log, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        with pytest.raises(InvalidTransitionError):
            transition(encounter, "completed")

    assert signal_log == []


def test_post_transition_not_sent_when_outer_transaction_rolls_back(
    encounter, signal_log, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(InjectedFailure):
            with db_transaction.atomic():
                transition(encounter, "checked_in")
                raise InjectedFailure

    assert callbacks == []
    assert [kind for kind, _ in signal_log] == ["pre"]
    assert snapshot(encounter).row_count == 0


def test_pre_transition_receiver_can_abort(encounter):
    def veto(sender, **kwargs):
        raise InjectedFailure("vetoed")

    before = snapshot(encounter)
    pre_transition.connect(veto, weak=False, dispatch_uid="test-veto")
    try:
        with pytest.raises(InjectedFailure):
            transition(encounter, "checked_in")
    finally:
        pre_transition.disconnect(dispatch_uid="test-veto")

    assert snapshot(encounter) == before
