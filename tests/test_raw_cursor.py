"""The store's statements on the driver's cursor (``store/cursors.py``), and the lazily built
definition of a locked encounter.

When nothing can observe a statement, ``transition()`` and ``get_state_at()`` run it on the
driver's cursor instead of Django's wrapper. Whatever could observe it still sees every
statement (``CaptureQueriesContext``, ``DEBUG``'s ``connection.queries``, an
``execute_wrapper``), and a database error is still Django's class, so the typed errors
(``ConcurrentTransitionError``, ``DatabaseLockedError``) are raised as before. Each test
checks which way the statements went, so that it fails if the wrong one were taken.
"""

from __future__ import annotations

import copy
import pickle
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import (
    DatabaseError,
    IntegrityError,
    OperationalError,
    connection,
    connections,
    reset_queries,
)
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from django_encounters.exceptions import ConcurrentTransitionError, DatabaseLockedError
from django_encounters.models import (
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.services import get_state_at, transition
from django_encounters.signals import pre_transition
from django_encounters.validators import StateValidator
from tests.helpers import work_queries

pytestmark = pytest.mark.django_db

WORK = ("SELECT", "INSERT", "UPDATE")


def _kinds(statements: list[str]) -> list[str]:
    return [s.lstrip().split(None, 1)[0].upper() for s in statements]


def _recording(wrapper: Any, seen: list[str]) -> Any:
    """Django's cursor ``wrapper``, its work statements appended to ``seen`` as they run."""
    execute = wrapper.execute

    def recording(sql: str, params: Any = None) -> Any:
        if sql.lstrip().upper().startswith(WORK):
            seen.append(sql)
        return execute(sql, params)

    wrapper.execute = recording
    return wrapper


@contextmanager
def django_cursor_statements():
    """The statements that go through Django's cursor wrapper (``connection.cursor()``) while
    the block runs, as a list of SQL texts (work statements only: no transaction control).
    The backend's class is patched, not the connection: a ``cursor`` set on the connection
    itself is how django-debug-toolbar instruments it, which the store treats as observed."""
    seen: list[str] = []
    backend = type(connections["default"])
    own = backend.__dict__.get("cursor")
    real = backend.cursor

    def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _recording(real(self, *args, **kwargs), seen)

    backend.cursor = cursor
    try:
        yield seen
    finally:
        if own is None:
            del backend.cursor
        else:
            backend.cursor = own


@contextmanager
def receiver(signal: Any, fn: Any):
    signal.connect(fn, sender=Encounter, weak=False)
    try:
        yield
    finally:
        signal.disconnect(fn, sender=Encounter)


class _FailingDriver:
    """The driver connection, whose cursors raise ``error`` (the driver's own exception) for
    statements starting with ``prefix`` on the transition table."""

    def __init__(self, real: Any, prefix: str, error: BaseException) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_error", error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return _FailingCursor(self._real.cursor(*args, **kwargs), self._prefix, self._error)


class _FailingCursor:
    def __init__(self, cursor: Any, prefix: str, error: BaseException) -> None:
        self._cursor, self._prefix, self._error = cursor, prefix, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __iter__(self) -> Any:
        return iter(self._cursor)

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        table = EncounterTransition._meta.db_table
        if sql.lstrip().upper().startswith(self._prefix) and table in sql:
            raise self._error
        return self._cursor.execute(sql, *args, **kwargs)


@contextmanager
def failing_driver(prefix: str, error: BaseException):
    connection.ensure_connection()
    real = connection.connection
    connection.connection = _FailingDriver(real, prefix, error)
    try:
        yield
    finally:
        connection.connection = real


# -- nobody looking: the driver's cursor --------------------------------------------------------


def test_unobserved_statements_skip_djangos_cursor(encounter):
    with django_cursor_statements() as through_django:
        transition(encounter, "checked_in")
        state = get_state_at(encounter, timezone.now())
    assert state == "checked_in"
    assert through_django == []  # the lock, INSERT, UPDATE and the read went to the driver
    stored = Encounter.objects.get(pk=encounter.pk)
    assert (stored.state, stored.version) == ("checked_in", 1)
    assert get_state_at(encounter, encounter.created_at) == "scheduled"


# -- somebody looking: Django's cursor, every statement seen as before --------------------------


def test_captured_queries_see_the_same_statements(encounter):
    with django_cursor_statements() as through_django:
        with CaptureQueriesContext(connection) as captured:
            transition(encounter, "checked_in")
        transition_queries = work_queries(captured)
        with CaptureQueriesContext(connection) as captured:
            get_state_at(encounter, timezone.now())
        read_queries = work_queries(captured)
    assert _kinds(transition_queries) == ["SELECT", "INSERT", "UPDATE"], transition_queries
    assert _kinds(read_queries) == ["SELECT"], read_queries
    assert "encounterdefinition" in transition_queries[0].lower()
    assert _kinds(through_django) == ["SELECT", "INSERT", "UPDATE", "SELECT"]


def test_debug_records_the_statements_in_connection_queries(encounter):
    with override_settings(DEBUG=True):
        reset_queries()
        transition(encounter, "checked_in")
        get_state_at(encounter, timezone.now())
        logged = [q["sql"] for q in connection.queries]
    work = [sql for sql in logged if sql.lstrip().upper().startswith(WORK)]
    assert _kinds(work) == ["SELECT", "INSERT", "UPDATE", "SELECT"], logged
    # The statements as Django's cursor shows them: parameters interpolated, not ":name".
    assert not any(":pk" in sql for sql in work), work


def test_an_execute_wrapper_sees_every_statement(encounter):
    seen: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        transition(encounter, "checked_in")
        get_state_at(encounter, timezone.now())
    work = [sql for sql in seen if sql.lstrip().upper().startswith(WORK)]
    assert _kinds(work) == ["SELECT", "INSERT", "UPDATE", "SELECT"], seen


# -- database errors on the driver's cursor are still Django's, and still typed ----------------


def test_a_sequence_clash_on_the_driver_cursor_is_a_concurrent_transition_error(encounter):
    """A receiver slips in a row with the same sequence: the library's INSERT, run on the
    driver's cursor, clashes; Django's IntegrityError (the driver's as its cause) becomes
    ConcurrentTransitionError, and nothing stays written."""

    def intrude(transition: Any, **kwargs: Any) -> None:
        EncounterTransition(
            encounter_id=transition.encounter_id,
            sequence=transition.sequence,
            from_state="scheduled",
            to_state="cancelled",
        ).save()

    with django_cursor_statements() as through_django:
        with receiver(pre_transition, intrude), pytest.raises(ConcurrentTransitionError) as info:
            transition(encounter, "checked_in")
    assert not any(sql.lstrip().upper().startswith("INSERT") for sql in through_django)
    cause = info.value.__cause__
    assert type(cause) is IntegrityError  # Django's class, not the driver's
    assert isinstance(cause.__cause__, connection.Database.IntegrityError)
    assert "sequence 1 is already in the log" in str(info.value)
    assert Encounter.objects.get(pk=encounter.pk).version == 0
    assert not EncounterTransition.objects.filter(encounter=encounter).exists()


def test_a_locked_sqlite_database_on_the_driver_cursor_is_a_database_locked_error(encounter):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's 'database is locked'")
    import sqlite3

    with failing_driver("INSERT", sqlite3.OperationalError("database is locked")):
        with pytest.raises(DatabaseLockedError) as info:
            transition(encounter, "checked_in")
    assert type(info.value.__cause__) is OperationalError  # Django's, translated
    assert Encounter.objects.get(pk=encounter.pk).version == 0
    transition(encounter, "checked_in")  # the connection is usable again


def test_a_failing_read_on_the_driver_cursor_raises_djangos_error(encounter):
    driver_error = connection.Database.OperationalError("the read failed")
    with failing_driver("SELECT", driver_error), pytest.raises(OperationalError) as info:
        get_state_at(encounter, timezone.now())
    assert info.value.__cause__ is driver_error
    assert get_state_at(encounter, timezone.now()) == "scheduled"


def test_a_statement_in_a_broken_transaction_is_refused_as_by_djangos_cursor(encounter):
    """After a database error inside ``atomic()``, Django's cursor refuses any statement
    (``TransactionManagementError``); so does the driver's cursor path."""
    from django.db import transaction
    from django.db.transaction import TransactionManagementError

    with transaction.atomic():
        with pytest.raises(DatabaseError), transaction.atomic(savepoint=False):
            with connection.cursor() as cursor:
                cursor.execute("SELECT no_such_column FROM no_such_table_for_encounters")
        assert connection.needs_rollback
        with pytest.raises(TransactionManagementError):
            get_state_at(encounter, timezone.now())
        with pytest.raises(TransactionManagementError):
            transition(encounter, "checked_in")
        transaction.set_rollback(True)


# -- the locked encounter's definition and pinned version, built when asked --------------------


class _Inspecting(StateValidator):
    """Records what a validator sees of the locked encounter."""

    seen: list[Any] = []

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        _Inspecting.seen.append(
            (
                encounter.definition.code,
                encounter.definition.states,
                encounter.machine.number,
                encounter.machine.transitions,
                encounter.machine.definition is encounter.definition,
            )
        )


def test_a_validator_sees_the_definition_and_version_without_a_query(visit_definition, patient):
    from django_encounters.services import create_encounter

    visit_definition.validators = ["tests.test_raw_cursor._Inspecting"]
    visit_definition.save()
    encounter = create_encounter(visit_definition, patient)
    _Inspecting.seen.clear()
    with CaptureQueriesContext(connection) as captured:
        transition(encounter, "checked_in")
    assert len(work_queries(captured)) == 3
    version = EncounterDefinitionVersion.objects.get(definition=visit_definition, number=2)
    assert _Inspecting.seen == [
        (visit_definition.code, visit_definition.states, 2, version.transitions, True)
    ]


def test_the_locked_encounter_is_whole_once_copied_or_pickled(encounter):
    """The row's ``encounter`` is the locked instance: a copy or a pickle of it carries its
    definition and pinned version as before (built then), and nothing of the lazy state."""
    record = transition(encounter, "checked_in")
    locked = record.encounter
    for other in (copy.copy(locked), pickle.loads(pickle.dumps(locked))):
        assert "_lazy_lock" not in other.__dict__
        assert other._state.fields_cache["definition"].pk == encounter.definition_id
        assert other._machine.number == locked.definition_version
        assert other.definition.code == encounter.definition.code
    assert isinstance(locked.definition, EncounterDefinition)
    assert locked.machine.rules().is_allowed("checked_in", "in_progress")


def test_a_definition_set_on_the_locked_encounter_is_kept(encounter, visit_definition):
    seen: list[Any] = []
    other = EncounterDefinition(name="Other", code="OTHER")

    def swap(encounter: Any, **kwargs: Any) -> None:
        encounter.definition_id  # noqa: B018 - read, not changed
        encounter.__class__.definition.field.set_cached_value(encounter, other)
        seen.append(encounter.definition)

    with receiver(pre_transition, swap):
        transition(encounter, "checked_in")
    assert seen == [other]


def test_the_final_state_validator_reads_the_locked_rules_without_building_the_version(
    visit_definition, patient
):
    from django_encounters.exceptions import ValidationError
    from django_encounters.services import create_encounter

    visit_definition.validators = ["django_encounters.validators.FinalStateValidator"]
    # An exit from the final state the machine allows: only the validator refuses it.
    visit_definition.transitions = {**visit_definition.transitions, "cancelled": ["scheduled"]}
    visit_definition.save()
    encounter = create_encounter(visit_definition, patient)
    record = transition(encounter, "cancelled")
    locked = record.encounter
    assert "_machine" not in locked.__dict__  # nothing asked for the version's instance
    assert "definition" not in locked._state.fields_cache
    assert locked.machine_rules() is locked.machine_rules()  # the lock's, shared
    assert locked.machine_rules() == locked.machine.rules()  # the same rules as the version's
    with pytest.raises(ValidationError, match="Cannot transition from final state 'cancelled'"):
        transition(encounter, "scheduled", effective_at=encounter.timeline_end_at)


def test_a_cursor_set_on_the_connection_sees_every_statement(visit_definition, patient):
    """django-debug-toolbar's SQL panel (and Django's SimpleTestCase refusal) replace the
    connection's own ``cursor()``: the store's statements then go through it."""
    from django_encounters.services import create_encounter

    encounter = create_encounter(visit_definition, patient)
    seen: list[str] = []
    real = connection.cursor

    def cursor(*args: Any, **kwargs: Any) -> Any:
        return _recording(real(*args, **kwargs), seen)

    connection.cursor = cursor
    try:
        transition(encounter, "checked_in")
        get_state_at(encounter, timezone.now())
    finally:
        del connection.cursor
    assert _kinds(seen) == [
        "SELECT",
        "INSERT",
        "UPDATE",
        "SELECT",
    ]


def test_an_instrumented_cursor_wrapper_sees_every_statement(
    visit_definition, patient, monkeypatch
):
    """APM agents (Sentry's Django integration, ...) replace ``CursorWrapper.execute``: the
    store's statements then go through Django's cursor, and so through the agent."""
    from django.db.backends.utils import CursorWrapper

    from django_encounters.services import create_encounter

    encounter = create_encounter(visit_definition, patient)
    seen: list[str] = []
    real = CursorWrapper.execute

    def execute(self: Any, sql: str, params: Any = None) -> Any:
        seen.append(sql)
        return real(self, sql, params)

    monkeypatch.setattr(CursorWrapper, "execute", execute)
    transition(encounter, "checked_in")
    get_state_at(encounter, timezone.now())
    monkeypatch.undo()
    assert _kinds([s for s in seen if s.lstrip().upper().startswith(WORK)]) == [
        "SELECT",
        "INSERT",
        "UPDATE",
        "SELECT",
    ]
