# ruff: noqa: E501 - SQL literals
"""Append-only transition log, enforced by the database.

Triggers refuse every UPDATE and DELETE of ``django_encounters_encountertransition`` rows, from
any client: the ORM, raw SQL, ``psql`` or the ``sqlite3`` shell. Both raise an integrity error
(SQLite ``RAISE(ABORT)``, PostgreSQL SQLSTATE 23001 ``restrict_violation``), which Django
surfaces as ``django.db.IntegrityError``.

* PostgreSQL: one row-level ``BEFORE UPDATE OR DELETE`` trigger. ``TRUNCATE`` does not fire
  row triggers, so Django's ``flush`` (and test teardown) keep working.
* SQLite has no ``TRUNCATE``: Django's ``flush`` issues ``DELETE FROM``. The DELETE trigger
  therefore stands aside only while ``encounters_flush_in_progress()`` returns 1. That SQL
  function exists only on connections opened by Django with this app installed (registered by
  ``DjangoEncountersConfig.ready()``), and returns 1 only inside Django's
  ``connection.ops.execute_sql_flush()``. From any other client the function does not exist,
  so a DELETE fails to compile and is refused all the same ("no such function:
  encounters_flush_in_progress").

The SQL below is frozen with this migration on purpose; do not import it from the package.
Note for future migrations: Django's SQLite schema editor re-creates a table to alter it, which
drops its triggers. A migration that alters ``EncounterTransition`` on SQLite must re-run the
SQLite part of this one afterwards.
"""

from django.db import migrations

TABLE = "django_encounters_encountertransition"

SQLITE_INSTALL = [
    f"""
    CREATE TRIGGER encounters_transition_no_update
    BEFORE UPDATE ON {TABLE}
    BEGIN
        SELECT RAISE(ABORT, 'django_encounters: encounter transitions are append-only; UPDATE refused (record a new transition instead)');
    END
    """,
    f"""
    CREATE TRIGGER encounters_transition_no_delete
    BEFORE DELETE ON {TABLE}
    WHEN encounters_flush_in_progress() IS NOT 1
    BEGIN
        SELECT RAISE(ABORT, 'django_encounters: encounter transitions are append-only; DELETE refused');
    END
    """,
]
SQLITE_REMOVE = [
    "DROP TRIGGER IF EXISTS encounters_transition_no_update",
    "DROP TRIGGER IF EXISTS encounters_transition_no_delete",
]

POSTGRES_INSTALL = [
    """
    CREATE OR REPLACE FUNCTION encounters_transition_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION
            'django_encounters: encounter transitions are append-only; % refused (encounter %, sequence %)',
            TG_OP, OLD.encounter_id, OLD.sequence
            USING ERRCODE = 'restrict_violation',
                  HINT = 'Record a new transition instead. TRUNCATE is still allowed.';
    END
    $$
    """,
    f"""
    CREATE TRIGGER encounters_transition_append_only
    BEFORE UPDATE OR DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION encounters_transition_append_only()
    """,
]
POSTGRES_REMOVE = [
    f"DROP TRIGGER IF EXISTS encounters_transition_append_only ON {TABLE}",
    "DROP FUNCTION IF EXISTS encounters_transition_append_only()",
]

STATEMENTS = {
    "sqlite": (SQLITE_INSTALL, SQLITE_REMOVE),
    "postgresql": (POSTGRES_INSTALL, POSTGRES_REMOVE),
}


def _run(schema_editor, index):
    statements = STATEMENTS.get(schema_editor.connection.vendor)
    if statements is None:  # other databases: the ORM guards only
        return
    for sql in statements[index]:
        schema_editor.execute(sql, params=None)


def install(apps, schema_editor):
    _run(schema_editor, 0)


def remove(apps, schema_editor):
    _run(schema_editor, 1)


class Migration(migrations.Migration):
    dependencies = [
        ("django_encounters", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(install, remove, elidable=False),
    ]
