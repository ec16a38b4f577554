"""The transition log is append-only: in the ORM, and in the database itself (migration 0002's
triggers on SQLite and PostgreSQL), while Django's own flush keeps working."""

from __future__ import annotations

import sqlite3

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError
from django.test.utils import override_settings

from django_encounters.basemodels import HardDeleteRefusedError
from django_encounters.exceptions import EncounterError
from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.services import create_encounter, transition
from tests.helpers import IS_POSTGRES

TABLE = EncounterTransition._meta.db_table


def _row_values(pk):
    return (
        EncounterTransition.objects.filter(pk=pk)
        .values(
            "sequence",
            "from_state",
            "to_state",
            "reason",
            "effective_at",
            "transitioned_at",
            "hash",
        )
        .get()
    )


def _raw(sql, params=None):
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)


def _installed_triggers():
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = %s", [TABLE]
            )
        else:
            cursor.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
                [TABLE],
            )
        return sorted(name for (name,) in cursor.fetchall())


EXPECTED_TRIGGERS = (
    ["encounters_transition_append_only"]
    if IS_POSTGRES
    else [
        "encounters_transition_no_delete",
        "encounters_transition_no_replace",
        "encounters_transition_no_update",
    ]
)


# ---------------------------------------------------------------------------------------------
# Database triggers
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_migration_installs_the_triggers():
    assert _installed_triggers() == EXPECTED_TRIGGERS


@pytest.mark.django_db
@pytest.mark.parametrize(
    "sql",
    [
        f"UPDATE {TABLE} SET reason = 'rewritten'",
        f"UPDATE {TABLE} SET to_state = 'cancelled', hash = ''",
        f"DELETE FROM {TABLE}",
    ],
    ids=["update-reason", "update-state-and-hash", "delete"],
)
def test_raw_sql_cannot_update_or_delete_transitions(encounter, user, sql):
    row = transition(encounter, "checked_in", transitioned_by=user, reason="arrived")
    before = _row_values(row.pk)

    with pytest.raises(IntegrityError, match="append-only"):
        _raw(sql)

    assert _row_values(row.pk) == before
    assert EncounterTransition.objects.count() == 1


@pytest.mark.django_db
def test_raw_sql_refusal_names_the_operation(encounter):
    transition(encounter, "checked_in")

    with pytest.raises(IntegrityError) as update:
        _raw(f"UPDATE {TABLE} SET reason = 'x' WHERE encounter_id = %s", [encounter.pk.hex])
    with pytest.raises(IntegrityError) as delete:
        _raw(f"DELETE FROM {TABLE} WHERE encounter_id = %s", [encounter.pk.hex])

    assert "UPDATE refused" in str(update.value)
    assert "DELETE refused" in str(delete.value)
    if IS_POSTGRES:  # the row-level trigger names the row
        assert f"encounter {encounter.pk}, sequence 1" in str(update.value)


@pytest.mark.django_db
def test_statements_touching_no_row_are_harmless(encounter):
    """The triggers refuse changes to rows, not statements that change nothing."""
    transition(encounter, "checked_in")

    _raw(f"UPDATE {TABLE} SET reason = 'x' WHERE 1 = 0")
    _raw(f"DELETE FROM {TABLE} WHERE 1 = 0")

    assert EncounterTransition.objects.get().reason == ""


@pytest.mark.django_db
def test_inserts_still_work_through_the_triggers(encounter):
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")

    assert list(
        EncounterTransition.objects.filter(encounter=encounter)
        .order_by("sequence")
        .values_list("sequence", flat=True)
    ) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_django_flush_still_empties_the_log(visit_definition, patient):
    """``manage.py flush`` (and every ``transaction=True`` test's teardown) must keep working:
    TRUNCATE on PostgreSQL, the guarded ``DELETE FROM`` on SQLite."""
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")

    call_command("flush", interactive=False, verbosity=0)

    assert EncounterTransition.objects.count() == 0
    assert Encounter.all_objects.count() == 0
    # ... and the log is protected again afterwards.
    definition = EncounterDefinition.objects.create(
        name="After flush",
        code="AFTER",
        states=["a", "b"],
        initial_state="a",
        transitions={"a": ["b"]},
    )
    again = create_encounter(definition, patient.__class__.objects.create(name="Grace"))
    transition(again, "b")
    with pytest.raises(IntegrityError, match="append-only"):
        _raw(f"DELETE FROM {TABLE}")
    assert EncounterTransition.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not IS_POSTGRES, reason="PostgreSQL: TRUNCATE")
def test_postgres_truncate_stays_allowed(encounter):
    transition(encounter, "checked_in")  # committed: TRUNCATE refuses pending FK checks

    _raw(f"TRUNCATE {TABLE}")

    assert EncounterTransition.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.skipif(IS_POSTGRES, reason="SQLite: the flush guard function")
def test_sqlite_flush_guard_is_off_outside_flush():
    with connection.cursor() as cursor:
        cursor.execute("SELECT encounters_flush_in_progress()")
        assert cursor.fetchone() == (0,)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(IS_POSTGRES, reason="SQLite: a client other than Django")
def test_sqlite_other_clients_are_refused_too(encounter, tmp_path):
    """Outside Django (the sqlite3 shell, another program) the flush guard function does not
    exist, so DELETE is refused as well — only with SQLite's own wording."""
    transition(encounter, "checked_in")
    path = tmp_path / "copy.sqlite3"
    target = sqlite3.connect(path)
    connection.ensure_connection()
    connection.connection.backup(target)
    target.close()

    other = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute(f"UPDATE {TABLE} SET reason = 'x'")
        with pytest.raises(sqlite3.OperationalError, match="encounters_flush_in_progress"):
            other.execute(f"DELETE FROM {TABLE}")
        other.rollback()
        assert other.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone() == (1,)
        # Not even a guard function registered by hand gets past it unless it says "flushing".
        other.create_function("encounters_flush_in_progress", 0, lambda: 0)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            other.execute(f"DELETE FROM {TABLE}")
    finally:
        other.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(IS_POSTGRES, reason="SQLite: a client other than Django")
def test_sqlite_any_client_that_can_write_the_file_can_delete_and_update(encounter, tmp_path):
    """The triggers are no barrier to whoever can write the file: a client registers the guard
    function returning 1 and deletes, or drops the triggers and updates. What is left to catch
    it is outside the file: seals (a key the file does not hold) and checkpoints."""
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")
    path = tmp_path / "copy.sqlite3"
    target = sqlite3.connect(path)
    connection.ensure_connection()
    connection.connection.backup(target)
    target.close()

    other = sqlite3.connect(path)
    try:
        other.create_function("encounters_flush_in_progress", 0, lambda: 1)
        other.execute(f"DELETE FROM {TABLE} WHERE sequence = 2")
        other.commit()
        assert other.execute(f"SELECT sequence FROM {TABLE}").fetchall() == [(1,)]
        for (name,) in other.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", [TABLE]
        ).fetchall():
            other.execute(f'DROP TRIGGER "{name}"')
        other.execute(f"UPDATE {TABLE} SET reason = 'rewritten'")
        other.commit()
        assert other.execute(f"SELECT reason FROM {TABLE}").fetchall() == [("rewritten",)]
    finally:
        other.close()


@pytest.mark.django_db
@pytest.mark.skipif(IS_POSTGRES, reason="SQLite: the flush guard function")
def test_sqlite_a_delete_through_the_guard_function_is_caught_by_a_checkpoint(encounter, tmp_path):
    """Django's own connection, the guard function re-registered by a client's code: the last
    row goes, the projection is put back to match, the chain agrees with itself — and the
    audit against a checkpoint taken before reports the encounter truncated."""
    from django_encounters.apps import _install_sqlite_flush_guard
    from tests.helpers import forge_projection, run_command

    transition(encounter, "checked_in")
    transition(encounter, "in_progress")
    checkpoint = tmp_path / "before.json"
    assert run_command("checkpoint_encounters", "--output", str(checkpoint))[0] == 0
    connection.connection.create_function("encounters_flush_in_progress", 0, lambda: 1)
    try:
        _raw(f"DELETE FROM {TABLE} WHERE sequence = 2")
    finally:
        _install_sqlite_flush_guard(None, connection)  # the app's guard back
    forge_projection(encounter)
    assert run_command("audit_encounters")[0] == 0  # the log agrees with itself
    code, out, _ = run_command("audit_encounters", "--against", str(checkpoint))
    assert code == 1
    assert "truncated" in out


@pytest.mark.django_db(transaction=True)
def test_migration_is_reversible():
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    try:
        # Going back drops the log's protections: allowed on purpose (an empty log here).
        with override_settings(ENCOUNTERS_ALLOW_DROPPING_LOG=True):
            executor.migrate([("django_encounters", "0001_initial")])
        assert _installed_triggers() == []
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert _installed_triggers() == EXPECTED_TRIGGERS


# ---------------------------------------------------------------------------------------------
# ORM guards
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_orm_refuses_every_way_of_changing_a_row(encounter):
    row = transition(encounter, "checked_in", reason="arrived")
    qs = EncounterTransition.objects.filter(pk=row.pk)

    attempts = {
        "queryset update": lambda: qs.update(reason="changed"),
        "queryset delete": lambda: qs.delete(),
        "bulk_update": lambda: EncounterTransition.objects.bulk_update([row], ["reason"]),
        "update_or_create": lambda: EncounterTransition.objects.update_or_create(
            pk=row.pk, defaults={"reason": "changed"}
        ),
        "instance delete": lambda: row.delete(),
        "instance save": lambda: EncounterTransition.objects.get(pk=row.pk).save(),
        "related manager update": lambda: encounter.transitions.update(reason="changed"),
    }
    for name, attempt in attempts.items():
        with pytest.raises(EncounterError):
            with transaction.atomic():
                attempt()
            pytest.fail(f"{name} was not refused")

    assert EncounterTransition.objects.get(pk=row.pk).reason == "arrived"


@pytest.mark.django_db
def test_hard_delete_of_encounter_with_transitions_is_refused(encounter):
    transition(encounter, "checked_in")

    with pytest.raises(EncounterError, match="cannot be hard-deleted"):
        with transaction.atomic():
            Encounter.all_objects.get(pk=encounter.pk).hard_delete()

    assert Encounter.all_objects.filter(pk=encounter.pk).exists()
    assert EncounterTransition.objects.filter(encounter_id=encounter.pk).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("manager", ["objects", "all_objects"])
def test_queryset_hard_delete_of_encounters_with_transitions_is_refused(
    visit_definition, patient, manager
):
    bare = create_encounter(visit_definition, patient)
    used = create_encounter(visit_definition, patient)
    transition(used, "checked_in")
    transition(used, "in_progress")

    with pytest.raises(HardDeleteRefusedError) as refused:
        with transaction.atomic():
            getattr(Encounter, manager).all().hard_delete()

    error = refused.value
    assert isinstance(error, EncounterError)
    assert isinstance(error, ProtectedError)  # code catching Django's error keeps working
    assert "cannot be hard-deleted" in str(error)
    assert "2 encounter transition(s)" in str(error)
    assert "append-only" in str(error)
    assert "delete()" in str(error)  # says what to do instead
    assert {obj.pk for obj in error.protected_objects} == set(
        EncounterTransition.objects.values_list("pk", flat=True)
    )
    # Nothing was deleted, not even the encounter without transitions.
    assert set(Encounter.all_objects.values_list("pk", flat=True)) == {bare.pk, used.pk}
    assert EncounterTransition.objects.count() == 2


@pytest.mark.django_db
def test_queryset_hard_delete_without_transitions_works(visit_definition, patient):
    keep = create_encounter(visit_definition, patient)
    transition(keep, "checked_in")
    gone = create_encounter(visit_definition, patient)

    deleted, _ = Encounter.objects.filter(pk=gone.pk).hard_delete()

    assert deleted == 1
    assert not Encounter.all_objects.filter(pk=gone.pk).exists()
    assert Encounter.all_objects.filter(pk=keep.pk).exists()


@pytest.mark.django_db
def test_hard_delete_of_definition_in_use_is_refused_clearly(encounter):
    definition = encounter.definition

    with pytest.raises(HardDeleteRefusedError, match="1 encounter\\(s\\)"):
        with transaction.atomic():
            definition.hard_delete()
    with pytest.raises(HardDeleteRefusedError):
        with transaction.atomic():
            EncounterDefinition.objects.filter(pk=definition.pk).hard_delete()

    assert EncounterDefinition.all_objects.filter(pk=definition.pk).exists()


@pytest.mark.django_db
def test_soft_delete_keeps_encounter_and_trail(encounter):
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")

    encounter.delete()
    Encounter.objects.filter(pk=encounter.pk).delete()  # queryset soft delete: a no-op now

    assert not Encounter.objects.filter(pk=encounter.pk).exists()
    fresh = Encounter.all_objects.get(pk=encounter.pk)
    assert fresh.is_deleted
    assert fresh.state == "in_progress" and fresh.version == 2
    assert EncounterTransition.objects.filter(encounter_id=encounter.pk).count() == 2

    fresh.restore()
    assert Encounter.objects.filter(pk=encounter.pk).exists()


@pytest.mark.django_db
def test_queryset_soft_delete_keeps_trail(visit_definition, patient):
    encounters = [create_encounter(visit_definition, patient) for _ in range(3)]
    for encounter in encounters:
        transition(encounter, "checked_in")

    Encounter.objects.all().delete()

    assert Encounter.objects.count() == 0
    assert Encounter.all_objects.count() == 3
    assert EncounterTransition.objects.count() == 3


# ---------------------------------------------------------------------------------------------
# Migration 0003: the one change a fact may still receive is its seal
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_only_a_seal_may_be_added_to_a_fact(encounter):
    row = transition(encounter, "checked_in", reason="arrived")
    seal = "k1:" + "ab" * 32
    _raw(
        f"UPDATE {TABLE} SET seal = %s WHERE id = %s",
        [seal, row.pk.hex if not IS_POSTGRES else row.pk],
    )
    assert EncounterTransition.objects.get(pk=row.pk).seal == seal
    for sql, params in (
        (f"UPDATE {TABLE} SET reason = %s WHERE id = %s", ["changed"]),
        (f"UPDATE {TABLE} SET seal = %s, reason = %s WHERE id = %s", ["", "changed"]),
        (f"UPDATE {TABLE} SET transitioned_by_name = %s WHERE id = %s", ["mallory"]),
    ):
        with pytest.raises(IntegrityError, match="append-only"):
            _raw(sql, [*params, row.pk.hex if not IS_POSTGRES else row.pk])
    assert EncounterTransition.objects.get(pk=row.pk).reason == "arrived"


@pytest.mark.django_db(transaction=True)
def test_a_version_content_hash_is_set_once(visit_definition):
    from django_encounters.models import EncounterDefinitionVersion

    version = EncounterDefinitionVersion.objects.filter(definition=visit_definition).first()
    table = EncounterDefinitionVersion._meta.db_table
    pk = version.pk.hex if not IS_POSTGRES else version.pk
    _raw(f"UPDATE {table} SET content_hash = %s WHERE id = %s AND content_hash = ''", ["v3:x", pk])
    with pytest.raises(IntegrityError, match="set once|append-only"):
        _raw(f"UPDATE {table} SET content_hash = %s WHERE id = %s", ["v3:y", pk])
    with pytest.raises(IntegrityError, match="append-only"):
        _raw(f"UPDATE {table} SET number = 7 WHERE id = %s", [pk])
