# ruff: noqa: E501 - SQL literals
"""Append-only tables, enforced by the database.

Triggers refuse every UPDATE and DELETE of the rows that are facts — the transition log, the
definition versions and the anomaly acknowledgements — from any client: the ORM, raw SQL,
``psql`` or the ``sqlite3`` shell. Both raise an integrity error (SQLite ``RAISE(ABORT)``,
PostgreSQL SQLSTATE 23001 ``restrict_violation``), which Django surfaces as
``django.db.IntegrityError``.

* PostgreSQL: one row-level ``BEFORE UPDATE OR DELETE`` trigger per table. ``TRUNCATE`` does
  not fire row triggers, so Django's ``flush`` (and test teardown) keep working. ``INSERT … ON
  CONFLICT DO UPDATE`` is an UPDATE and is refused.
* SQLite has no ``TRUNCATE``: Django's ``flush`` issues ``DELETE FROM``. The DELETE triggers
  therefore stand aside only while ``encounters_flush_in_progress()`` returns 1. That SQL
  function exists only on connections opened by Django with this app installed (registered by
  ``DjangoEncountersConfig.ready()``), and returns 1 only inside Django's
  ``connection.ops.execute_sql_flush()``. From any other client the function does not exist,
  so a DELETE fails to compile and is refused all the same ("no such function:
  encounters_flush_in_progress").
* SQLite's ``INSERT OR REPLACE`` / ``REPLACE INTO`` deletes the clashing row without firing
  DELETE triggers: a ``BEFORE INSERT`` trigger refuses any insert that would clash with an
  existing row (same id, or for transitions the same encounter and sequence), so the REPLACE
  never gets to delete.

The SQL below is frozen with this migration on purpose; do not import it from the package.
Note for future migrations: Django's SQLite schema editor re-creates a table to alter it, which
drops its triggers. A migration that alters one of these tables on SQLite must re-run the
SQLite part of this one afterwards.
"""

from django.db import migrations

TRANSITIONS = "django_encounters_encountertransition"
#: table -> (trigger name stem, what the rows are, the columns an INSERT must not clash on)
TABLES = {
    TRANSITIONS: (
        "encounters_transition",
        "encounter transitions",
        "NEW.id = id OR (NEW.encounter_id = encounter_id AND NEW.sequence = sequence)",
    ),
    "django_encounters_encounterdefinitionversion": (
        "encounters_definition_version",
        "encounter definition versions",
        "NEW.id = id OR (NEW.definition_id = definition_id AND NEW.number = number)",
    ),
    "django_encounters_anomalyacknowledgement": (
        "encounters_acknowledgement",
        "anomaly acknowledgements",
        "NEW.id = id",
    ),
}


def _sqlite_install(table, stem, what, clash):
    return [
        f"""
        CREATE TRIGGER {stem}_no_update
        BEFORE UPDATE ON {table}
        BEGIN
            SELECT RAISE(ABORT, 'django_encounters: {what} are append-only; UPDATE refused (record a new one instead)');
        END
        """,
        f"""
        CREATE TRIGGER {stem}_no_delete
        BEFORE DELETE ON {table}
        WHEN encounters_flush_in_progress() IS NOT 1
        BEGIN
            SELECT RAISE(ABORT, 'django_encounters: {what} are append-only; DELETE refused');
        END
        """,
        f"""
        CREATE TRIGGER {stem}_no_replace
        BEFORE INSERT ON {table}
        WHEN EXISTS (SELECT 1 FROM {table} WHERE {clash})
        BEGIN
            SELECT RAISE(ABORT, 'django_encounters: {what} are append-only; an INSERT clashing with an existing row (UNIQUE id, or encounter and sequence) refused, REPLACE included');
        END
        """,
    ]


SQLITE_INSTALL = [sql for table, spec in TABLES.items() for sql in _sqlite_install(table, *spec)]
SQLITE_REMOVE = [
    f"DROP TRIGGER IF EXISTS {stem}_{kind}"
    for stem, _, _ in TABLES.values()
    for kind in ("no_update", "no_delete", "no_replace")
]

POSTGRES_INSTALL = [
    """
    CREATE OR REPLACE FUNCTION encounters_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        old_row jsonb := to_jsonb(OLD);
        which text := CASE
            WHEN old_row ? 'sequence' THEN format(
                'encounter %s, sequence %s', old_row ->> 'encounter_id', old_row ->> 'sequence')
            ELSE format('row %s', old_row ->> 'id')
        END;
    BEGIN
        RAISE EXCEPTION 'django_encounters: % are append-only; % refused (%)',
            TG_ARGV[0], TG_OP, which
            USING ERRCODE = 'restrict_violation',
                  HINT = 'Record a new row instead. TRUNCATE is still allowed.';
    END
    $$
    """,
    *(
        f"""
        CREATE TRIGGER {stem}_append_only
        BEFORE UPDATE OR DELETE ON {table}
        FOR EACH ROW EXECUTE FUNCTION encounters_append_only('{what}')
        """
        for table, (stem, what, _) in TABLES.items()
    ),
]
POSTGRES_REMOVE = [
    *(f"DROP TRIGGER IF EXISTS {stem}_append_only ON {table}" for table, (stem, _, _) in TABLES.items()),
    "DROP FUNCTION IF EXISTS encounters_append_only()",
]

STATEMENTS = {
    "sqlite": (SQLITE_INSTALL, SQLITE_REMOVE),
    "postgresql": (POSTGRES_INSTALL, POSTGRES_REMOVE),
}


def _run(schema_editor, index):
    statements = STATEMENTS.get(schema_editor.connection.vendor)
    if statements is None:  # other databases: the ORM guards only
        return
    if schema_editor.connection.vendor == "postgresql":
        # On Citus (distributed tables: docs/scaling.md), trigger DDL reaches the shards only
        # with citus.enable_unsafe_triggers (these triggers only refuse, they read nothing), and
        # the trigger function can be dropped after the triggers in one transaction only when
        # the shards were changed over one connection per node.
        schema_editor.execute(
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN "
            "SET LOCAL citus.enable_unsafe_triggers TO on; "
            "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'; END IF; END $$",
            params=None,
        )
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
