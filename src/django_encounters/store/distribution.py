"""Sharding the store on Citus (distributed PostgreSQL), once: which table goes where, and the
steps that get it there — planned against the database's catalog and applied in one
transaction (``manage.py distribute_encounters``). What the store does differently on a sharded
database at run time is :mod:`.sharding`'s.

Every encounter's stream is independent of every other's, so the store shards by encounter:

* the encounter table is distributed by its primary key;
* the transition log and the anomaly acknowledgements are distributed by ``encounter_id``,
  co-located with the encounters (an encounter's rows live on the shard, hence the worker, of
  the encounter), their primary keys widened to ``(encounter_id, id)`` because Citus requires
  the distribution column in every unique constraint (the ORM still addresses a row by ``id``,
  which stays unique: it is a random UUID);
* the definitions and their versions are reference tables (a copy on every node, joined
  locally by the write path's one lock statement), and so is every table the package's foreign
  keys point to outside the package — the user model's table and ``django_content_type`` —
  because a distributed table may only reference a reference table.

:func:`plan` compares that layout with the database's catalog and returns the steps still
missing (nothing once done: it is idempotent); :func:`apply` runs them in one transaction,
foreign keys dropped first and put back last (Citus refuses to distribute a table that a
local table references). ``manage.py distribute_encounters`` is the command around both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import connections, transaction
from django.db.models import ForeignKey
from django.db.models.fields import AutoFieldMixin

from ..exceptions import DistributionError
from ..models import Encounter
from .schema import APP_LABEL
from .sharding import distribution_of, forget

__all__ = [
    "DistributionError",
    "Plan",
    "Step",
    "apply",
    "citus_version",
    "plan",
]


@dataclass(frozen=True)
class Step:
    """One change of the layout: what it does, in words, and its SQL."""

    description: str
    sql: tuple[str, ...]


@dataclass
class Plan:
    """What :func:`apply` would do on one database, in order."""

    using: str
    citus_version: str
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is already in place

    @property
    def done(self) -> bool:
        return not self.steps


# --- the catalog ------------------------------------------------------------------------------


def citus_version(using: str) -> str | None:
    """The Citus extension's version in database ``using``, or None (not PostgreSQL, or no
    ``CREATE EXTENSION citus``)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
        row = cursor.fetchone()
    return row[0] if row else None


def _foreign_keys(connection: Any, tables: list[str]) -> list[tuple[str, str, str, str]]:
    """``(table, constraint, referenced table, definition)`` of every foreign key from or to
    one of ``tables``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.conrelid::regclass::text, c.conname, c.confrelid::regclass::text, "
            "pg_get_constraintdef(c.oid) FROM pg_constraint c WHERE c.contype = 'f' "
            "AND (c.conrelid = ANY(%s::regclass[]) OR c.confrelid = ANY(%s::regclass[])) "
            "ORDER BY 1, 2",
            [tables, tables],
        )
        return [tuple(row) for row in cursor.fetchall()]  # type: ignore[misc]


def _primary_key(connection: Any, table: str) -> tuple[str, list[str]]:
    """The primary-key constraint's name and columns of ``table``."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.conname, array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c "
            "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
            "WHERE c.conrelid = to_regclass(%s) AND c.contype = 'p' GROUP BY c.conname",
            [connection.ops.quote_name(table)],
        )
        row = cursor.fetchone()
    return (row[0], list(row[1])) if row else ("", [])


# --- the layout -------------------------------------------------------------------------------


def _models() -> tuple[list[Any], list[Any], Any]:
    """``(reference models, co-located models, the encounter model)`` in the order they are
    distributed: the reference tables a referenced table needs come before it."""
    from django.apps import apps

    own = list(apps.get_app_config(APP_LABEL).get_models())
    encounter = Encounter
    colocated = [m for m in own if m is not encounter and _has_field(m, "encounter_id")]
    reference: list[Any] = []

    def add(model: Any) -> None:
        if model in reference or model is encounter or model in colocated:
            return
        for target in _fk_targets(model):
            if target is not model and target not in own:
                add(target)
        reference.append(model)

    for model in own:
        for target in _fk_targets(model):
            if target not in own:
                add(target)
    for model in own:
        if model is not encounter and model not in colocated:
            add(model)
    return reference, colocated, encounter


def _has_field(model: Any, attname: str) -> bool:
    return any(f.attname == attname for f in model._meta.concrete_fields)


def _fk_targets(model: Any) -> list[Any]:
    return [f.related_model for f in model._meta.concrete_fields if isinstance(f, ForeignKey)]


def plan(using: str) -> Plan:
    """The steps that would bring the package's tables on database ``using`` to the sharded
    layout (none when it is there already).

    Raises:
        DistributionError: the database has no Citus extension, a table is already distributed
            in another way, or a table outside the package has a foreign key to a table that
            must be distributed.
    """
    connection = connections[using]
    version = citus_version(using)
    if version is None:
        raise DistributionError(
            f"database {using!r} ({connection.vendor}) has no Citus extension: run "
            "CREATE EXTENSION citus on the coordinator and the workers first (docs/scaling.md)"
        )
    result = Plan(using=using, citus_version=version)
    qn = connection.ops.quote_name
    reference, colocated, encounter = _models()
    encounter_table = encounter._meta.db_table
    distributed = [encounter, *colocated]
    ours = [m._meta.db_table for m in (*reference, *distributed)]
    own_tables = {m._meta.db_table for m in distributed} | {
        m._meta.db_table for m in reference if m._meta.app_label == APP_LABEL
    }

    steps: list[Step] = []
    for model in reference:
        table = model._meta.db_table
        method, replication, _ = distribution_of(connection, table)
        if method == "n" and replication == "t":
            result.notes.append(f"{table}: reference table")
        elif method == "h":
            raise DistributionError(
                f"{table} is a distributed table, but the package's tables reference it: it "
                "must be a reference table (undistribute_table() it first)"
            )
        else:
            sql = [f"SELECT create_reference_table('{qn(table)}')"]
            pk = model._meta.pk
            column = pk.column
            if isinstance(pk, AutoFieldMixin):
                # Citus starts an identity column's sequence afresh when it makes the table a
                # reference table: the next row would reuse the id of the first one already
                # there (``auth_user``'s, for an installation with users).
                sql.append(
                    f"SELECT setval(pg_get_serial_sequence('{qn(table)}', '{column}'), "
                    f"COALESCE(MAX({qn(column)}), 0) + 1, false) FROM {qn(table)}"
                )
            steps.append(
                Step(f"{table}: make a reference table (a copy on every node)", tuple(sql))
            )
    for model in distributed:
        table = model._meta.db_table
        column = model._meta.pk.column if model is encounter else "encounter_id"
        method, _, current = distribution_of(connection, table)
        if method == "h":
            if current != column:
                raise DistributionError(
                    f"{table} is distributed by {current!r}; the store needs it distributed by "
                    f"{column!r} (undistribute_table() it first)"
                )
            result.notes.append(f"{table}: distributed by {column}")
            continue
        if model is not encounter:
            name, columns = _primary_key(connection, table)
            if column not in columns:
                pk = model._meta.pk.column
                steps.append(
                    Step(
                        f"{table}: widen the primary key to ({column}, {pk}) (Citus needs the "
                        "distribution column in every unique constraint)",
                        (
                            f"ALTER TABLE {qn(table)} DROP CONSTRAINT {qn(name)}",
                            f"ALTER TABLE {qn(table)} ADD CONSTRAINT {qn(name)} "
                            f"PRIMARY KEY ({qn(column)}, {qn(pk)})",
                        ),
                    )
                )
        colocate = "" if model is encounter else f", colocate_with => '{qn(encounter_table)}'"
        where = "by its primary key" if model is encounter else f"by {column}, co-located"
        steps.append(
            Step(
                f"{table}: distribute {where} (copies its rows to the shards)",
                (f"SELECT create_distributed_table('{qn(table)}', '{column}'{colocate})",),
            )
        )
    if steps:
        foreign_keys = _foreign_keys(connection, ours)
        for source, name, target, _ in foreign_keys:
            if source not in ours and target in {m._meta.db_table for m in distributed}:
                raise DistributionError(
                    f"the foreign key {name} of {source} references {target}, which is to be "
                    f"distributed: distribute {source} co-located with it, or drop the key, "
                    "first (docs/scaling.md)"
                )
        moved = [fk for fk in foreign_keys if fk[0] in own_tables]
        if moved:
            steps.insert(
                0,
                Step(
                    f"drop the package's {len(moved)} foreign keys for the time of the "
                    "distribution (Citus refuses to distribute a table a local table references)",
                    tuple(f"ALTER TABLE {qn(s)} DROP CONSTRAINT {qn(n)}" for s, n, _, _ in moved),
                ),
            )
            steps.append(
                Step(
                    f"put the {len(moved)} foreign keys back (each distributed table references "
                    "a reference table, or its co-located encounter)",
                    tuple(
                        f"ALTER TABLE {qn(s)} ADD CONSTRAINT {qn(n)} {d}" for s, n, _, d in moved
                    ),
                )
            )
    result.steps = steps
    return result


def apply(layout: Plan) -> None:
    """Run ``layout``'s steps in one transaction (all or nothing). The append-only triggers go
    to every shard with their tables (``citus.enable_unsafe_triggers`` for the transaction:
    they only refuse, they read nothing)."""
    connection = connections[layout.using]
    with transaction.atomic(using=layout.using), connection.cursor() as cursor:
        cursor.execute("SET LOCAL citus.enable_unsafe_triggers TO on")
        for step in layout.steps:
            for sql in step.sql:
                cursor.execute(sql)
    forget(connection)
