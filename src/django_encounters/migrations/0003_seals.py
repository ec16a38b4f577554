# ruff: noqa: E501 - SQL literals
"""Seals (docs/concepts.md, "Who can do what"): a seal column on every record the audit trusts,
the names of the people as recorded, definition versions' chained content hashes, and what an
acknowledgement was given for.

The append-only triggers of 0002 are re-installed so that the one change a fact may still
receive is its seal (``manage.py seal_encounters`` seals a log written before seals were
configured, and ``--rekey`` re-seals it after a key rotation) and, once, a definition version's
empty ``content_hash``. Every other UPDATE and every DELETE stays refused. A seal the database
role writes is worthless without the key: the audit checks each against the keys in settings.

Django's SQLite schema editor re-creates a table to add a column to it, which drops the table's
triggers: on SQLite the triggers are installed again after the columns are added. The SQL is
frozen here on purpose; do not import it from the package.
"""

from django.db import migrations, models

#: model -> (trigger name stem, what the rows are, INSERT clash condition, {column: only from ''})
APPEND_ONLY = {
    "encountertransition": (
        "encounters_transition",
        "encounter transitions",
        "NEW.id = id OR (NEW.encounter_id = encounter_id AND NEW.sequence = sequence)",
        {"seal": False},
    ),
    "encounterdefinitionversion": (
        "encounters_definition_version",
        "encounter definition versions",
        "NEW.id = id OR (NEW.definition_id = definition_id AND NEW.number = number)",
        {"seal": False, "content_hash": True},
    ),
    "anomalyacknowledgement": (
        "encounters_acknowledgement",
        "anomaly acknowledgements",
        "NEW.id = id",
        {"seal": False},
    ),
}


def _columns(apps, model_name):
    model = apps.get_model("django_encounters", model_name)
    return model._meta.db_table, [f.column for f in model._meta.concrete_fields]


def _sqlite_install(apps):
    statements = []
    for model_name, (stem, what, clash, sealable) in APPEND_ONLY.items():
        table, columns = _columns(apps, model_name)
        fixed = ", ".join(f'"{c}"' for c in columns if c not in sealable)
        statements += [
            f"DROP TRIGGER IF EXISTS {stem}_no_update",
            f"DROP TRIGGER IF EXISTS {stem}_no_delete",
            f"DROP TRIGGER IF EXISTS {stem}_no_replace",
            f"""
            CREATE TRIGGER {stem}_no_update
            BEFORE UPDATE OF {fixed} ON {table}
            BEGIN
                SELECT RAISE(ABORT, 'django_encounters: {what} are append-only; UPDATE refused (record a new one instead; only a seal may be added)');
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
        for column, once in sealable.items():
            if once:
                statements += [
                    f"DROP TRIGGER IF EXISTS {stem}_{column}_once",
                    f"""
                    CREATE TRIGGER {stem}_{column}_once
                    BEFORE UPDATE OF "{column}" ON {table}
                    WHEN OLD."{column}" <> '' AND NEW."{column}" IS NOT OLD."{column}"
                    BEGIN
                        SELECT RAISE(ABORT, 'django_encounters: {what} are append-only; {column} is set once');
                    END
                    """,
                ]
    return statements


def _postgres_install(apps):
    statements = [
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
            -- TG_ARGV[1]: the columns an UPDATE may change (the seal); TG_ARGV[2]: those it
            -- may set only while they are empty.
            sealable text[] := string_to_array(TG_ARGV[1], ',');
            once text[] := string_to_array(TG_ARGV[2], ',');
            column_name text;
        BEGIN
            IF TG_OP = 'UPDATE' AND old_row <> to_jsonb(NEW)
                AND (old_row - sealable) = (to_jsonb(NEW) - sealable) THEN
                FOREACH column_name IN ARRAY once LOOP
                    IF old_row ->> column_name <> ''
                        AND old_row -> column_name IS DISTINCT FROM to_jsonb(NEW) -> column_name THEN
                        RAISE EXCEPTION 'django_encounters: % are append-only; % is set once (%)',
                            TG_ARGV[0], column_name, which
                            USING ERRCODE = 'restrict_violation';
                    END IF;
                END LOOP;
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'django_encounters: % are append-only; % refused (%)',
                TG_ARGV[0], TG_OP, which
                USING ERRCODE = 'restrict_violation',
                      HINT = 'Record a new row instead (only a seal may be added). TRUNCATE is still allowed.';
        END
        $$
        """
    ]
    for model_name, (stem, what, _, sealable) in APPEND_ONLY.items():
        table, _ = _columns(apps, model_name)
        allowed = ",".join(sealable)
        once = ",".join(c for c, only_once in sealable.items() if only_once)
        statements += [
            f"DROP TRIGGER IF EXISTS {stem}_append_only ON {table}",
            f"""
            CREATE TRIGGER {stem}_append_only
            BEFORE UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION encounters_append_only('{what}', '{allowed}', '{once}')
            """,
        ]
    return statements


def _sqlite_restore(apps):
    """0002's triggers (every UPDATE refused, naming no column, so the columns can go)."""
    statements = []
    for model_name, (stem, what, _clash, sealable) in APPEND_ONLY.items():
        table, _ = _columns(apps, model_name)
        statements += [f"DROP TRIGGER IF EXISTS {stem}_{column}_once" for column in sealable] + [
            f"DROP TRIGGER IF EXISTS {stem}_no_update",
            f"""
            CREATE TRIGGER {stem}_no_update
            BEFORE UPDATE ON {table}
            BEGIN
                SELECT RAISE(ABORT, 'django_encounters: {what} are append-only; UPDATE refused (record a new one instead)');
            END
            """,
        ]
    return statements


def _postgres_restore(apps):
    """0002's triggers: every UPDATE refused."""
    statements = []
    for model_name, (stem, what, _, _) in APPEND_ONLY.items():
        table, _ = _columns(apps, model_name)
        statements += [
            f"DROP TRIGGER IF EXISTS {stem}_append_only ON {table}",
            f"""
            CREATE TRIGGER {stem}_append_only
            BEFORE UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION encounters_append_only('{what}', '', '')
            """,
        ]
    return statements


def _execute(schema_editor, statements):
    if schema_editor.connection.vendor == "postgresql":
        # As in 0002: on Citus, trigger DDL reaches the shards only with these settings.
        schema_editor.execute(
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN "
            "SET LOCAL citus.enable_unsafe_triggers TO on; "
            "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'; END IF; END $$",
            params=None,
        )
    for sql in statements:
        schema_editor.execute(sql, params=None)


def citus_sequential(apps, schema_editor):
    """On Citus (distributed tables: docs/scaling.md), before the columns are added: a
    transaction that changed distributed tables in parallel may not create a function
    afterwards (the trigger function below), so their DDL runs shard by shard here."""
    if schema_editor.connection.vendor == "postgresql":
        _execute(schema_editor, [])


def install(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        _execute(schema_editor, _sqlite_install(apps))
    elif vendor == "postgresql":
        _execute(schema_editor, _postgres_install(apps))


def remove(apps, schema_editor):
    # Backwards, this runs before the columns are removed: 0002's triggers come back first (on
    # SQLite they name no column, so the columns can be dropped under them).
    vendor = schema_editor.connection.vendor
    if vendor == "sqlite":
        _execute(schema_editor, _sqlite_restore(apps))
    elif vendor == "postgresql":
        _execute(schema_editor, _postgres_restore(apps))


def field(max_length):
    return models.CharField(blank=True, default="", editable=False, max_length=max_length)


class Migration(migrations.Migration):
    dependencies = [
        ("django_encounters", "0002_append_only_triggers"),
    ]

    operations = [
        migrations.RunPython(citus_sequential, citus_sequential, elidable=False),
        migrations.AddField("anomalyacknowledgement", "acknowledged_by_name", field(255)),
        migrations.AddField("anomalyacknowledgement", "evidence", field(255)),
        migrations.AddField("anomalyacknowledgement", "hash", field(100)),
        migrations.AddField("anomalyacknowledgement", "seal", field(100)),
        migrations.AddField("encounter", "genesis_seal", field(100)),
        migrations.AddField("encounterdefinitionversion", "content_hash", field(100)),
        migrations.AddField("encounterdefinitionversion", "seal", field(100)),
        migrations.AddField("encountertransition", "seal", field(100)),
        migrations.AddField("encountertransition", "transitioned_by_name", field(255)),
        migrations.RunPython(install, remove, elidable=False),
    ]
