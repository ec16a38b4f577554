"""Errors a newcomer meets in the first hour say what to do (issue 20, item 6 and item 8):

* SQLite in Django's default (deferred) transaction mode, writers racing in threads on a file
  database: ``DatabaseLockedError`` naming ``OPTIONS["transaction_mode"] = "IMMEDIATE"`` (or, on
  Django < 5.1, the backend recipe), not "was changed concurrently"; with either fix every
  transition succeeds;
* ``transaction_mode``/``init_command`` on Django < 5.1 is system check error E011 (``migrate``
  would crash with ``TypeError``), tested on both sides of the boundary by passing the version;
* ``USE_TZ = False`` with the checks skipped: E001's message as ``EncounterConfigurationError``;
* a naive datetime names ``timezone.now()`` and ``timezone.make_aware``;
* every command run before ``migrate`` says "run migrate first" in one line;
* ``migrate django_encounters zero`` on a log with transitions is refused unless
  ``ENCOUNTERS_ALLOW_DROPPING_LOG = True``.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import django
import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import override_settings
from django.utils import timezone

from django_encounters import create_encounter, transition
from django_encounters.checks import check_settings, sqlite_messages
from django_encounters.exceptions import (
    ConcurrentTransitionError,
    DatabaseLockedError,
    EncounterConfigurationError,
    LogDropRefusedError,
)
from django_encounters.management.helpers import EncounterCommand
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.signals import pre_transition
from tests.helpers import IS_CITUS, IS_POSTGRES, run_command

# ---------------------------------------------------------------------------------------------
# SQLite: writers in threads on a file database
# ---------------------------------------------------------------------------------------------

THREADS = 4
#: Each thread moves its own encounter working <-> onleave this many times.
ROUNDS = 8


def _file_copy(tmp_path: Path) -> Path:
    """The in-memory test database (the fixtures' rows included) copied to a file that
    connections of other threads can open."""
    db_file = tmp_path / "writers.sqlite3"
    target = sqlite3.connect(db_file)
    connection.ensure_connection()
    connection.connection.backup(target)
    target.close()
    return db_file


def _race(encounters: list[Encounter]) -> tuple[dict[Any, int], list[BaseException]]:
    """One thread per encounter, started together, each moving its encounter ``ROUNDS`` times
    through its own connection; returns the successes per encounter and every error raised.
    A ``pre_transition`` receiver sleeps 5 ms between the lock statement and the insert, as a
    slower validator would: the writers' transactions overlap."""
    start = threading.Barrier(len(encounters))
    done: dict[Any, int] = {e.pk: 0 for e in encounters}
    errors: list[BaseException] = []

    def slow_receiver(**kwargs: Any) -> None:
        time.sleep(0.005)

    def write(encounter: Encounter) -> None:
        try:
            start.wait(10)
            for _ in range(ROUNDS):
                to_state = "onleave" if encounter.state == "working" else "working"
                try:
                    transition(encounter, to_state)
                    done[encounter.pk] += 1
                except Exception as exc:  # every kind is collected and judged by the test
                    errors.append(exc)
                    encounter.refresh_from_db()
        finally:
            connections["default"].close()

    pre_transition.connect(slow_receiver, sender=Encounter)
    try:
        threads = [threading.Thread(target=write, args=(e,)) for e in encounters]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        pre_transition.disconnect(slow_receiver, sender=Encounter)
    return done, errors


def _rows_in_file(db_file: Path) -> dict[str, int]:
    reader = sqlite3.connect(db_file)
    try:
        found = reader.execute(
            f"SELECT encounter_id, COUNT(*) FROM {EncounterTransition._meta.db_table} "
            "GROUP BY encounter_id"
        ).fetchall()
        versions = dict(
            reader.execute(f"SELECT id, version FROM {Encounter._meta.db_table}").fetchall()
        )
    finally:
        reader.close()
    rows = {str(pk).replace("-", ""): count for pk, count in found}
    assert rows == {k: v for k, v in versions.items() if v}, "projection and log disagree"
    return rows


@pytest.fixture
def hired(employment_definition, patient) -> list[Encounter]:
    encounters = [create_encounter(employment_definition, patient) for _ in range(THREADS)]
    for encounter in encounters:
        transition(encounter, "working")
    return encounters


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's transaction modes")
@pytest.mark.django_db(transaction=True)  # committed rows: the copy to a file reads them
def test_deferred_sqlite_writers_fail_with_database_locked_naming_the_fix(
    hired, tmp_path, monkeypatch
):
    db_file = _file_copy(tmp_path)
    # Connections opened from now on (the threads') use the file, in Django's default mode.
    monkeypatch.setitem(connection.settings_dict, "NAME", str(db_file))
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", {"timeout": 5})

    done, errors = _race(hired)

    assert errors, "no writer met another's lock: the race did not happen"
    assert all(type(e) is DatabaseLockedError for e in errors), [repr(e) for e in errors]
    error = errors[0]
    assert isinstance(error, ConcurrentTransitionError)  # callers' retry handlers still match
    message = str(error)
    assert f"Encounter {error.encounter_id}: nothing was written" in message
    assert "the SQLite database 'default' is locked by another writer" in message
    assert "changed concurrently" not in message
    if django.VERSION >= (5, 1):
        assert 'DATABASES[\'default\']["OPTIONS"]["transaction_mode"] = "IMMEDIATE"' in message
    else:
        assert "BEGIN IMMEDIATE" in message and "Django 5.1+" in message
    assert (error.database, error.transaction_mode, error.timeout) == ("default", "DEFERRED", 5)
    # Nothing half-written: every success is a row (and the projection's version), no more.
    rows = _rows_in_file(db_file)
    assert {pk.hex: rows[pk.hex] - 1 for pk in done} == {pk.hex: n for pk, n in done.items()}
    assert sum(done.values()) + len(errors) == THREADS * ROUNDS


IMMEDIATE_MODES = [
    pytest.param(
        "django.db.backends.sqlite3",
        {"transaction_mode": "IMMEDIATE", "timeout": 20},
        id="transaction_mode",
        marks=pytest.mark.skipif(django.VERSION < (5, 1), reason="Django 5.1+ option"),
    ),
    pytest.param("tests.sqlite_immediate", {"timeout": 20}, id="django-4.2-backend-recipe"),
]


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's transaction modes")
@pytest.mark.django_db(transaction=True)  # committed rows: the copy to a file reads them
@pytest.mark.parametrize(("engine", "options"), IMMEDIATE_MODES)
def test_immediate_sqlite_writers_wait_and_all_succeed(
    hired, tmp_path, monkeypatch, engine, options
):
    db_file = _file_copy(tmp_path)
    monkeypatch.setitem(connection.settings_dict, "NAME", str(db_file))
    monkeypatch.setitem(connection.settings_dict, "ENGINE", engine)
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)

    done, errors = _race(hired)

    assert errors == []
    assert set(done.values()) == {ROUNDS}
    assert set(_rows_in_file(db_file).values()) == {ROUNDS + 1}


def test_database_locked_messages_for_each_mode_and_django_release():
    deferred_old = DatabaseLockedError(
        "e1", database="main", transaction_mode="DEFERRED", timeout=None, django_version=(4, 2)
    )
    assert 'Django 4.2 has no OPTIONS["transaction_mode"] (Django 5.1+ has)' in str(deferred_old)
    assert "BEGIN IMMEDIATE" in str(deferred_old)
    deferred_new = DatabaseLockedError(
        "e1", database="main", transaction_mode="DEFERRED", timeout=None, django_version=(5, 2)
    )
    assert 'DATABASES[\'main\']["OPTIONS"]["transaction_mode"] = "IMMEDIATE"' in str(deferred_new)
    waited = DatabaseLockedError(
        "e1", database="main", transaction_mode="IMMEDIATE", timeout=2.5, django_version=(5, 2)
    )
    assert "It waited 2.5 seconds for the write lock" in str(waited)
    assert "raise the timeout" in str(waited)
    assert str(waited).startswith("Encounter e1: nothing was written")


# ---------------------------------------------------------------------------------------------
# System checks: E011 (Django < 5.1 SQLite options), W002 with the recipe, E012
# ---------------------------------------------------------------------------------------------

SQLITE = "django.db.backends.sqlite3"


def _ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


@pytest.mark.parametrize(
    "options",
    [{"transaction_mode": "IMMEDIATE"}, {"init_command": "PRAGMA journal_mode=WAL"}],
    ids=["transaction_mode", "init_command"],
)
def test_sqlite_options_of_django_5_1_are_an_error_before_it(options):
    databases = {"default": {"ENGINE": SQLITE, "NAME": "x.sqlite3", "OPTIONS": options}}

    [error] = sqlite_messages(databases, (4, 2, 20, "final", 0))

    assert error.id == "django_encounters.E011"
    assert error.obj == "DATABASES['default']"
    [name] = options
    assert f'sets OPTIONS["{name}"], which Django 4.2 does not know' in error.msg
    assert "migrate) fails with TypeError" in error.msg
    assert f'Remove OPTIONS["{name}"]' in error.hint and "BEGIN IMMEDIATE" in error.hint
    # From 5.1 on, Django knows both options: no error (init_command alone is still W002).
    expected = [] if "transaction_mode" in options else ["django_encounters.W002"]
    assert _ids(sqlite_messages(databases, (5, 1, 0, "final", 0))) == expected


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_the_running_django_gets_e011_only_before_5_1():
    databases = {"default": {"ENGINE": SQLITE, "OPTIONS": {"transaction_mode": "IMMEDIATE"}}}
    expected = [] if django.VERSION >= (5, 1) else ["django_encounters.E011"]
    with override_settings(DATABASES=databases):
        from django_encounters.checks import check_sqlite_transaction_mode

        assert _ids(check_sqlite_transaction_mode(None)) == expected


@pytest.mark.parametrize("version", [(4, 2), (6, 0)])
def test_the_backend_recipe_silences_w002_and_deferred_mode_warns(version):
    databases = {
        "recipe": {"ENGINE": "tests.sqlite_immediate"},
        "plain": {"ENGINE": SQLITE},
    }
    [warning] = sqlite_messages(databases, version)
    assert (warning.id, warning.obj) == ("django_encounters.W002", "DATABASES['plain']")
    if version < (5, 1):
        assert "Django 4.2 has no OPTIONS['transaction_mode']" in warning.hint
        assert "BEGIN IMMEDIATE" in warning.hint
    else:
        assert '"transaction_mode": "IMMEDIATE"' in warning.hint


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_allow_dropping_log_must_be_a_bool(value):
    with override_settings(ENCOUNTERS_ALLOW_DROPPING_LOG=value):
        [error] = check_settings(None)
    assert (error.id, error.obj) == ("django_encounters.E012", "ENCOUNTERS_ALLOW_DROPPING_LOG")
    assert repr(value) in error.msg


@pytest.mark.parametrize("value", [True, False])
def test_allow_dropping_log_is_a_known_setting(value):
    with override_settings(ENCOUNTERS_ALLOW_DROPPING_LOG=value):
        assert check_settings(None) == []


# ---------------------------------------------------------------------------------------------
# USE_TZ off at run time, naive datetimes
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_use_tz_off_is_refused_with_the_e001_message(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)
    with override_settings(USE_TZ=False):
        with pytest.raises(EncounterConfigurationError, match=r"^USE_TZ is off") as created:
            create_encounter(visit_definition, patient)
        with pytest.raises(EncounterConfigurationError, match=r"^USE_TZ is off") as moved:
            transition(encounter, "checked_in")
        with pytest.raises(EncounterConfigurationError, match=r"^USE_TZ is off"):
            EncounterTransition.objects.create(
                encounter=encounter, from_state="scheduled", to_state="checked_in"
            )
    for refused in (created.value, moved.value):
        assert "Set USE_TZ = True" in str(refused)
        assert "django_encounters.E001" in str(refused)
        assert "nothing was written" in str(refused)
    assert Encounter.objects.count() == 1
    assert EncounterTransition.objects.count() == 0
    encounter.refresh_from_db()
    assert (encounter.state, encounter.version) == ("scheduled", 0)


@pytest.mark.django_db
def test_a_naive_datetime_error_names_the_fix(visit_definition, patient):
    naive = datetime(2026, 1, 5, 9, 30)
    with pytest.raises(ValueError) as refused:
        create_encounter(visit_definition, patient, scheduled_at=naive)
    message = str(refused.value)
    assert message.startswith("scheduled_at must be timezone-aware, got naive datetime")
    assert "django.utils.timezone.now()" in message
    assert "django.utils.timezone.make_aware(value)" in message
    # The fix it names works.
    create_encounter(visit_definition, patient, scheduled_at=timezone.make_aware(naive))


# ---------------------------------------------------------------------------------------------
# migrate zero, and commands before migrate
# ---------------------------------------------------------------------------------------------


def _migrate(target: list[tuple[str, str | None]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(target)


def _restore() -> None:
    """Every migration applied again (and the tables distributed again on Citus)."""
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    if IS_CITUS:
        call_command("distribute_encounters", verbosity=0)


def _applied() -> set[tuple[str, str]]:
    return {
        key
        for key in MigrationExecutor(connection).loader.applied_migrations
        if key[0] == "django_encounters"
    }


@pytest.mark.django_db(transaction=True)
def test_migrate_zero_on_a_log_with_transitions_is_refused(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")
    applied = _applied()
    try:
        for target in ("zero", "0001_initial", "0003_seals"):
            with pytest.raises(LogDropRefusedError) as refused:
                call_command(
                    "migrate", "django_encounters", target, verbosity=0, stdout=io.StringIO()
                )
            message = str(refused.value)
            assert "on database 'default': it holds 2 transitions" in message
            assert "ENCOUNTERS_ALLOW_DROPPING_LOG = True" in message
            assert "tamper-evident log" in message and "Nothing was changed" in message
            assert (refused.value.database, refused.value.transitions) == ("default", 2)
            assert _applied() == applied
        with override_settings(ENCOUNTERS_ALLOW_DROPPING_LOG="yes"):  # not a bool: refused too
            with pytest.raises(EncounterConfigurationError, match="must be True or False"):
                call_command("migrate", "django_encounters", "zero", verbosity=0)
        assert _applied() == applied
        assert EncounterTransition.objects.count() == 2
    finally:
        if _applied() != applied:
            _restore()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_commands_before_migrate_say_run_migrate_first(visit_definition, patient, tmp_path):
    """The log dropped on purpose (the setting allows it), then every command of the package on
    the unmigrated database: one line naming the missing migrations and ``migrate``, exit 2."""
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    bundle = tmp_path / "bundle.json"
    bundle.write_text('{"resourceType": "Bundle", "type": "collection", "entry": []}')
    commands = [
        ["acknowledge_anomaly", str(encounter.pk), "1", "hash", "--reason", "examined"],
        ["audit_encounters"],
        ["check_encounter_definitions"],
        ["checkpoint_encounters", "--output", str(tmp_path / "checkpoint.json")],
        ["encounter_graph", "VISIT"],
        ["export_encounter_log", "--format", "csv"],
        ["import_fhir_encounters", str(bundle), "--definition", "VISIT"],
        ["rebuild_encounter_projections"],
        ["seal_encounters"],  # run with a seal key (without one it refuses before reading)
    ]
    try:
        with override_settings(ENCOUNTERS_ALLOW_DROPPING_LOG=True):
            call_command("migrate", "django_encounters", "zero", verbosity=0)
        assert _applied() == set()
        assert EncounterTransition._meta.db_table not in connection.introspection.table_names()
        for args in commands:
            with override_settings(ENCOUNTERS_SEAL_KEYS={"k1": "s" * 40}):
                code, out, err = run_command(*args)
            assert code == 2, (args, out, err)
            assert err.count("\n") == 1, err  # one line, no traceback
            assert "database 'default' lacks django_encounters' migrations (0001_initial, " in err
            assert "run `python manage.py migrate` first" in err
    finally:
        _restore()
    assert len(_applied()) >= 4


class _BrokenQuery(EncounterCommand):
    def handle(self, *args: Any, **options: Any) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT no_such_column FROM no_such_table_of_anyone")


@pytest.mark.django_db(transaction=True)
def test_a_database_error_of_a_migrated_database_is_not_hidden():
    from django.db import DatabaseError

    with pytest.raises(DatabaseError, match="no_such"):
        call_command(_BrokenQuery(), stdout=io.StringIO(), stderr=io.StringIO())


def _while_locked(db_file: Path, request: Any, prepare: Any = None) -> Any:
    """In a thread whose connection opens ``db_file`` (deferred mode, a 0.2 s busy timeout):
    ``prepare()`` (e.g. a login, which writes), then ``request(prepared)`` while another
    connection holds the database's write lock; returns what ``request`` returned."""
    ready, locked = threading.Event(), threading.Event()
    answers: list[Any] = []

    def run() -> None:
        try:
            prepared = prepare() if prepare else None
            ready.set()
            locked.wait(30)
            answers.append(request(prepared))
        finally:
            ready.set()
            connections["default"].close()

    thread = threading.Thread(target=run)
    thread.start()
    ready.wait(30)
    holder = sqlite3.connect(db_file, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held by another connection
        locked.set()
        thread.join(60)
    finally:
        holder.rollback()
        holder.close()
    [answer] = answers
    return answer


@pytest.fixture
def locked_clinic(visit_definition, patient, tmp_path, monkeypatch) -> tuple[Encounter, Any, Path]:
    """An encounter and a staff user with every permission, committed and copied to a file
    database that connections opened from now on use (deferred mode, 0.2 s timeout)."""
    from django.contrib.auth.models import User

    encounter = create_encounter(visit_definition, patient)
    user = User.objects.create_superuser("nurse", "nurse@example.com", "pw")
    db_file = _file_copy(tmp_path)
    monkeypatch.setitem(connection.settings_dict, "NAME", str(db_file))
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", {"timeout": 0.2})
    return encounter, user, db_file


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's transaction modes")
@pytest.mark.django_db(transaction=True)
def test_the_rest_api_answers_a_locked_database_with_503(locked_clinic, caplog):
    """Another connection holds the write lock past the writer's timeout: the REST API answers
    503 ``database-locked`` with ``Retry-After`` (the fix goes to the log), nothing written."""
    from rest_framework.test import APIClient

    encounter, user, db_file = locked_clinic

    def post(_: Any) -> Any:
        client = APIClient()
        client.force_authenticate(user)
        return client.post(
            f"/api/encounters/{encounter.pk}/transition/", {"to_state": "checked_in"}
        )

    response = _while_locked(db_file, post)

    assert response.status_code == 503, response.content
    assert response["Retry-After"] == "1"
    body = response.json()
    assert body["type"] == "urn:django-encounters:problem:database-locked"
    assert body["encounter"] == str(encounter.pk)
    assert "transaction_mode" not in body["detail"]
    assert "transaction_mode" in caplog.text  # the operator's part, in the log
    assert _rows_in_file(db_file) == {}


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's transaction modes")
@pytest.mark.django_db(transaction=True)
def test_the_admin_says_the_database_was_locked_not_that_the_page_was_stale(locked_clinic):
    encounter, user, db_file = locked_clinic

    message = _admin_refusal_while_locked(
        db_file, user, encounter, {"to_state": "checked_in", "expected_version": 0}
    )

    assert "out of date" not in message
    assert _rows_in_file(db_file) == {}


def _admin_refusal_while_locked(db_file: Path, user: Any, encounter: Any, data: dict) -> str:
    """The admin's transition form posted with ``data`` (logged in as ``user`` before the lock
    is taken) while another connection holds the write lock: its one message, checked to be
    the locked database's refusal."""
    from django.test import Client
    from django.urls import reverse

    def login() -> Client:
        client = Client()
        client.force_login(user)  # writes last_login: before the lock is taken
        return client

    def post(client: Client) -> Any:
        return client.post(
            reverse("admin:django_encounters_encounter_transition", args=[encounter.pk]),
            {"reason": "", "effective_at": "", **data},
            follow=True,
        )

    with override_settings(SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies"):
        page = _while_locked(db_file, post, login)

    assert page.status_code == 200
    [message] = [str(m) for m in page.context["messages"]]
    assert message.startswith("Refused, nothing was changed (")
    assert "locked by another writer" in message and "transaction_mode" in message
    return message


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's transaction modes")
@pytest.mark.django_db(transaction=True)
def test_the_admin_says_the_database_was_locked_when_a_same_step_field_is_saved_first(
    visit_definition_with_validators, patient, tmp_path, monkeypatch
):
    """The transition form that also sets a field the target state requires saves that field
    before ``transition()`` locks the row: a locked database there is the same typed refusal
    (not a raw ``OperationalError`` and a server error), and neither the field nor a row is
    written."""
    from django.contrib.auth.models import User

    encounter = create_encounter(visit_definition_with_validators, patient)
    transition(encounter, "checked_in")
    user = User.objects.create_superuser("doctor", "doctor@example.com", "pw")
    db_file = _file_copy(tmp_path)
    monkeypatch.setitem(connection.settings_dict, "NAME", str(db_file))
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", {"timeout": 0.2})
    started = timezone.localtime(timezone.now().replace(microsecond=0))

    _admin_refusal_while_locked(
        db_file,
        user,
        encounter,
        {
            "to_state": "in_progress",
            "expected_version": 1,
            "set_started_at_0": started.strftime("%Y-%m-%d"),
            "set_started_at_1": started.strftime("%H:%M:%S"),
        },
    )

    assert _rows_in_file(db_file) == {encounter.pk.hex: 1}
    reader = sqlite3.connect(db_file)
    try:
        [(stored,)] = reader.execute(
            f"SELECT started_at FROM {Encounter._meta.db_table} WHERE id = ?", [encounter.pk.hex]
        ).fetchall()
    finally:
        reader.close()
    assert stored is None
