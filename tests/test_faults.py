"""Fault injection: whatever breaks in the middle of ``transition()``,
nothing is half-written — no row without its projection update, no projection update without
its row — and the next transition works.

Faults: a validator raising (after it wrote something itself), a ``pre_transition`` receiver
raising, a receiver executing invalid SQL, the row INSERT failing (sequence taken, column too
long), a deferred foreign key failing at COMMIT (after the insert and the update ran), an outer
``atomic()`` rolled back after a successful ``transition()``, a post-commit receiver raising,
and (PostgreSQL) a worker process SIGKILLed while holding the row lock with its row inserted.

The caller's instance follows its transaction: when an *outer* transaction (or savepoint) rolls
back after a successful ``transition()``, the instance no longer claims the rolled-back state
and version — it shows what it showed before the call; and a ``transition()`` from a stale
instance still decides on the fresh locked row.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager

import pytest
from benchmarks import soak
from django.db import DatabaseError, IntegrityError, InternalError, connection, transaction
from django.utils import timezone

from django_encounters.exceptions import (
    ConcurrentTransitionError,
    ValidationError,
)
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.services import create_encounter, get_encounter_history, transition
from django_encounters.signals import post_transition, pre_transition
from django_encounters.validators import StateValidator
from tests.helpers import IS_CITUS, reload, snapshot, write_machine_raw

pytestmark = pytest.mark.django_db


class Boom(Exception):
    pass


class WritesThenRaisesValidator(StateValidator):
    """Scribbles on the encounter row (same transaction), then blows up."""

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        Encounter.all_objects.filter(pk=encounter.pk).update(notes="written by a validator")
        raise RuntimeError("validator crashed after writing")


class RefusesAfterWritingValidator(StateValidator):
    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        Encounter.all_objects.filter(pk=encounter.pk).update(notes="written by a validator")
        raise ValidationError("RefusesAfterWritingValidator", "no")


@contextmanager
def receiver(signal_, fn):
    signal_.connect(fn, weak=False, dispatch_uid="test_faults")
    try:
        yield
    finally:
        signal_.disconnect(dispatch_uid="test_faults")


def assert_intact(enc, before) -> None:
    after = snapshot(enc)
    assert after == before, (before, after)


def assert_next_transition_works(enc, to_state: str = "checked_in") -> None:
    version = reload(enc).version
    record = transition(enc, to_state, expected_version=version)
    assert record.sequence == version + 1
    fresh = reload(enc)
    assert (fresh.state, fresh.version) == (to_state, version + 1)
    assert [r.sequence for r in get_encounter_history(fresh)] == list(range(1, version + 2))


# --- validators ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("tests.test_faults.WritesThenRaisesValidator", ValidationError),
        ("tests.test_faults.RefusesAfterWritingValidator", ValidationError),
    ],
)
def test_validator_raising_mid_transaction_leaves_nothing(encounter, path, error):
    # Issue 8: validators come from the encounter's pinned definition version, so the raw
    # write (a definition changed around its versioning) covers that version row too.
    write_machine_raw(encounter.definition, validators=[path])
    before = snapshot(encounter)

    with pytest.raises(error):
        transition(encounter, "checked_in")

    assert_intact(encounter, before)
    assert reload(encounter).notes == ""  # the validator's own write was rolled back too
    write_machine_raw(encounter.definition, validators=[])
    assert_next_transition_works(encounter)


# --- signals and the insert ----------------------------------------------------------------


def test_pre_transition_receiver_raising_leaves_nothing(encounter):
    before = snapshot(encounter)

    def explode(**kwargs):
        raise Boom("receiver refused")

    with receiver(pre_transition, explode), pytest.raises(Boom):
        transition(encounter, "checked_in")

    assert_intact(encounter, before)
    assert (encounter.state, encounter.version) == ("scheduled", 0)
    assert_next_transition_works(encounter)


def test_receiver_executing_invalid_sql_leaves_nothing(encounter):
    before = snapshot(encounter)

    def bad_sql(**kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SELECT no_such_column FROM no_such_table_for_encounters")

    with receiver(pre_transition, bad_sql), pytest.raises(DatabaseError):
        transition(encounter, "checked_in")

    assert_intact(encounter, before)
    assert_next_transition_works(encounter)


def test_insert_clashing_on_sequence_becomes_concurrent_error_and_leaves_nothing(encounter):
    """A receiver slips a row with the same sequence in first (same transaction): the real
    INSERT fails on the unique constraint, the caller gets ConcurrentTransitionError, and the
    intruding row is rolled back with everything else."""
    before = snapshot(encounter)

    def intrude(transition, **kwargs):
        EncounterTransition(
            encounter_id=transition.encounter_id,
            sequence=transition.sequence,
            from_state="scheduled",
            to_state="cancelled",
            hash="0" * 64,
        ).save()

    with receiver(pre_transition, intrude), pytest.raises(ConcurrentTransitionError) as info:
        transition(encounter, "checked_in")

    assert "sequence 1 is already in the log" in str(info.value)
    assert isinstance(info.value.__cause__, IntegrityError)
    assert_intact(encounter, before)
    assert_next_transition_works(encounter)


def test_insert_failing_in_the_database_leaves_nothing(encounter, is_postgres):
    """The row INSERT itself fails (a value the column cannot hold)."""
    if not is_postgres:
        pytest.skip("SQLite does not enforce varchar lengths; covered by the FK case below")
    before = snapshot(encounter)

    table = EncounterTransition._meta.db_table

    def overflow(execute, sql, params, many, context):
        # The decided row is immutable to receivers (its hash covers it); corrupt the INSERT on
        # its way to the database instead: a value the varchar(50) column cannot hold.
        if sql.lstrip().upper().startswith("INSERT") and table in sql:
            params = {k: ("x" * 500 if v == "checked_in" else v) for k, v in params.items()}
        return execute(sql, params, many, context)

    with connection.execute_wrapper(overflow), pytest.raises(DatabaseError):
        transition(encounter, "checked_in")

    assert_intact(encounter, before)
    assert_next_transition_works(encounter)


@pytest.mark.django_db(transaction=True)
def test_failure_at_commit_after_insert_and_update_leaves_nothing(visit_definition, patient):
    """A deferred foreign key (Django creates them DEFERRABLE INITIALLY DEFERRED on both
    databases) fails only at COMMIT — after the INSERT and the projection UPDATE ran. The
    database keeps neither, and ``post_transition`` is not sent."""
    enc = create_encounter(visit_definition, patient)
    before = snapshot(enc)
    announced = []

    def dangling_user(encounter, **kwargs):
        # The row itself cannot be altered after the decision (its hash covers it): make the
        # transaction carry a dangling FK in the same transaction instead.
        Encounter.objects.filter(pk=encounter.pk).update(created_by_id=987654321)  # no such user

    with receiver(pre_transition, dangling_user):
        post_transition.connect(
            lambda **kw: announced.append(kw), weak=False, dispatch_uid="tf-post"
        )
        try:
            # Citus checks the deferred key on the worker at its PREPARE and reports the failed
            # commit as an InternalError naming the shard; PostgreSQL as an IntegrityError.
            with pytest.raises(InternalError if IS_CITUS else IntegrityError):
                transition(enc, "checked_in")
        finally:
            post_transition.disconnect(dispatch_uid="tf-post")

    assert announced == []
    assert_intact(enc, before)
    assert_next_transition_works(enc)


# --- transactions around transition() ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_outer_atomic_rolled_back_after_a_successful_transition(visit_definition, patient):
    enc = create_encounter(visit_definition, patient)
    before = snapshot(enc)
    announced = []
    post_transition.connect(lambda **kw: announced.append(kw), weak=False, dispatch_uid="tf-post")
    try:
        with pytest.raises(Boom):
            with transaction.atomic():
                record = transition(enc, "checked_in", reason="rolled back")
                assert reload(enc).state == "checked_in"  # visible inside the transaction
                raise Boom
    finally:
        post_transition.disconnect(dispatch_uid="tf-post")

    # Nothing stays in the database, and nobody was told it happened.
    assert_intact(enc, before)
    assert not EncounterTransition.objects.filter(pk=record.pk).exists()
    assert announced == []
    # The caller's instance no longer claims the rolled-back state (see the module docstring)...
    assert (enc.state, enc.version, enc.head_hash) == ("scheduled", 0, before.head_hash)
    enc.refresh_projection()
    assert (enc.state, enc.version) == ("scheduled", 0)
    # ...and a stale instance cannot do harm: transition() decides on the locked row.
    stale = Encounter.objects.get(pk=enc.pk)
    stale.state, stale.version = "in_progress", 7  # as wrong as an in-memory copy can get
    assert transition(stale, "checked_in").sequence == 1
    assert_next_transition_works(enc, "in_progress")


def test_savepoint_rolled_back_inside_a_larger_transaction(encounter):
    """A transition in a nested atomic() that is rolled back disappears; one made after it in
    the same outer transaction gets the same sequence number."""
    with pytest.raises(Boom), transaction.atomic():
        transition(encounter, "checked_in")
        assert (encounter.state, encounter.version) == ("checked_in", 1)
        raise Boom
    assert reload(encounter).version == 0
    assert (encounter.state, encounter.version) == ("scheduled", 0)
    record = transition(encounter, "cancelled")
    assert record.sequence == 1 and record.from_state == "scheduled"


@pytest.mark.django_db(transaction=True)
def test_post_commit_receiver_raising_cannot_undo_the_transition(visit_definition, patient, caplog):
    """``post_transition`` runs after COMMIT: a receiver that fails cannot take the committed
    row back, and must not make the caller think the transition failed (a retry would append
    it twice): transition() returns normally and the failure is logged."""
    enc = create_encounter(visit_definition, patient)

    def explode(**kwargs):
        raise Boom("post-commit receiver failed")

    post_transition.connect(explode, weak=False, dispatch_uid="tf-post")
    try:
        with caplog.at_level("ERROR", logger="django_encounters"):
            row = transition(enc, "checked_in")
    finally:
        post_transition.disconnect(dispatch_uid="tf-post")

    assert row.sequence == 1
    assert any(
        "post_transition receiver" in r.getMessage()
        and "committed" in r.getMessage()
        and r.exc_info
        and r.exc_info[0] is Boom
        for r in caplog.records
    ), caplog.records
    fresh = reload(enc)
    assert (fresh.state, fresh.version) == ("checked_in", 1)
    assert [r.sequence for r in get_encounter_history(fresh)] == [1]
    assert_next_transition_works(enc, "in_progress")


# --- a process killed while holding the row lock (PostgreSQL) -----------------------------


def _database() -> dict:
    s = connection.settings_dict
    return {k: s[k] for k in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")}


def _row_is_locked(pk) -> bool:
    try:
        with transaction.atomic():
            list(Encounter.all_objects.select_for_update(nowait=True).filter(pk=pk))
        return False
    except DatabaseError:
        return True


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_worker_killed_while_holding_the_row_lock(visit_definition, patient):
    enc = create_encounter(visit_definition, patient)
    transition(enc, "checked_in")
    before = snapshot(enc)

    proc = soak.spawn(
        "hold", {"database": _database(), "encounter": str(enc.pk), "to_state": "in_progress"}
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the row is inserted and the lock held
        assert line, proc.stderr.read() if proc.stderr else ""
        assert json.loads(line) == {"holding": True, "sequence": 2}
        # The worker's row and projection update exist only in its open transaction.
        assert _row_is_locked(enc.pk)
        assert_intact(enc, before)

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # The server notices the dead client and rolls its transaction back, releasing the lock.
    deadline = time.monotonic() + 20
    while _row_is_locked(enc.pk):
        assert time.monotonic() < deadline, "the killed worker's row lock was never released"
        time.sleep(0.1)
    assert_intact(enc, before)

    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '10s'")
    try:
        record = transition(enc, "in_progress", expected_version=1)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert (record.sequence, record.from_state) == (2, "checked_in")
    fresh = reload(enc)
    assert (fresh.state, fresh.version) == ("in_progress", 2)
    assert fresh.timeline_end_at <= timezone.now()
    assert [r.sequence for r in get_encounter_history(fresh)] == [1, 2]


def test_soak_module_runs_from_this_interpreter():
    """The worker processes above run ``sys.executable -m benchmarks.soak``."""
    assert soak.worker_command()[0] == sys.executable


@pytest.mark.django_db(transaction=True)
def test_the_caller_instance_follows_a_commit_and_two_rolled_back_calls(visit_definition, patient):
    """Two transitions rolled back together restore the state from before the first; a
    committed one stays; the instance still pickles (the pending marker holds a connection)."""
    import pickle

    enc = create_encounter(visit_definition, patient)
    transition(enc, "checked_in")  # committed
    with pytest.raises(Boom), transaction.atomic():
        transition(enc, "in_progress", skip_validation=True)
        transition(enc, "cancelled", skip_validation=True)
        assert (enc.state, enc.version) == ("cancelled", 3)
        raise Boom
    assert (enc.state, enc.version) == ("checked_in", 1)
    assert pickle.loads(pickle.dumps(enc)).state == "checked_in"
    transition(enc, "in_progress", skip_validation=True)
    assert (enc.state, enc.version) == ("in_progress", 2)
    assert pickle.loads(pickle.dumps(enc)).version == 2
