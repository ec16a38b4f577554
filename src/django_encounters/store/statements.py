"""Every hand-written SQL statement of the package, built once per database connection from the
models' metadata (table and column names, the backend's quoting and locking clause) and kept in
a cache beside — not on — Django's connection object.

Executing these directly keeps the ORM's per-call query compilation (most of a transition's
cost on SQLite) off the hot paths, while values still go through each field's own
``get_db_prep_save`` and the ORM's converters, so every backend Django supports stores and reads
exactly what the ORM would.

The statements take *named* parameters (``%(pk)s`` with a dict), which every backend accepts
through Django's cursor. On SQLite this matters: Django rewrites a positional statement's
``%s`` into ``?`` with a regular expression over the whole text on every execution (tens of
microseconds for the lock statement), while a named one is converted by one ``%`` formatting.
The encounter id is passed once however often the statement uses it.
"""

from __future__ import annotations

import keyword
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any

from ..engine import TIMELINE_ORDER, StreamRow
from ..models import (
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from .converters import (
    Adapter,
    Converter,
    column_converter,
    column_converters,
    row_builder,
    value_adapter,
)
from .schema import PROJECTION_FIELDS, ROW_COLUMNS
from .schema import field as model_field


@dataclass
class Statements:
    """The statements and column conversions of one connection."""

    connection: Any
    lock_sql: str  # one live encounter joined with its definition, locked
    lock_any_sql: str  # the same, soft-deleted encounters included
    lock_fields: list[Any]  # encounter, definition, version, log head (see _lock_sql)
    lock_converters: list[Converter | None]
    lock_slices: tuple[slice, ...]  # where each of the four groups lies in a selected row
    lock_attnames: tuple[list[str], ...]  # the attnames of each group
    lock_models: tuple[Any, Any, Any]  # the encounter model, its and the version's definition fk
    #: Where the lock's row holds the definition's code, the version's number and content hash,
    #: then its states, initial state, final states and transitions (``Rules``' inputs)
    lock_machine: tuple[int, ...]
    lock_validators: int  # where it holds the version's validators
    insert_sql: str
    insert_fields: list[Any]
    insert_adapters: list[Adapter]  # each insert field's get_db_prep_save (converters.py)
    insert_params: Any  # record -> the INSERT's parameters (:func:`_insert_params`)
    encounter_adapters: dict[str, Adapter]  # the same for the encounter's fields, by attname
    row_adapters: dict[str, Adapter]  # the same for the transition's fields, by attname
    state_at_sql: str
    state_at_known_sql: str
    history_sql: str  # every column of an encounter's rows, in sequence order
    history_attnames: list[str]
    history_converters: list[Converter | None]
    stream_sql: str  # ROW_COLUMNS of an encounter's rows, in sequence order
    stream_row: Any  # (ROW_COLUMNS values) -> StreamRow
    keyed_stream_row: Any  # (encounter id, *ROW_COLUMNS values) -> StreamRow
    encounter_key: Converter | None  # conversion of a selected encounter id
    projections_sql: str  # the rebuild's batch write of projections (see store.writes)
    _updates: dict[tuple[str, ...], str] = field(default_factory=dict)

    def quote(self, name: str) -> str:
        return str(self.connection.ops.quote_name(name))

    def update_sql(self, columns: Sequence[str]) -> str:
        """``UPDATE encounter SET <columns> WHERE pk = %s``, built once per column set."""
        key = tuple(columns)
        sql = self._updates.get(key)
        if sql is None:
            sql = self._updates[key] = _update_sql(self, columns)
        return sql


_CACHE: weakref.WeakKeyDictionary[Any, Statements] = weakref.WeakKeyDictionary()


def statements(connection: Any) -> Statements:
    """The statements of ``connection`` (a Django ``DatabaseWrapper``), built on first use."""
    found = _CACHE.get(connection)
    if found is None:
        found = _CACHE[connection] = _build(connection)
    return found


def forget(connection: Any) -> None:
    """Drop the statements of ``connection`` (built again on next use)."""
    _CACHE.pop(connection, None)


#: What the lock statement reads of the log, after the encounter, definition and version
#: columns: the row at ``sequence = version`` (its hash, system time and definition version)
#: and the last row of the timeline (its ``to_state`` and ``effective_at``).
LOG_HEAD = ("hash", "transitioned_at", "definition_version", "to_state", "effective_at")


#: The parameter names of the statements (see the module's docstring).
PK = "pk"


def _lock_sql(connection: Any) -> tuple[str, list[Any], list[int]]:
    """``SELECT`` the encounter, its definition and its pinned definition version, and what the
    write path needs to prove the projection against the log, in one statement. Returns the
    SQL (without the live filter and the locking clause), the selected fields and the offsets
    where the definition, the version and the log head start. The statement takes the
    encounter id as the parameter ``PK``."""
    qn = connection.ops.quote_name
    encounter, definition, version = Encounter, EncounterDefinition, EncounterDefinitionVersion
    transition = EncounterTransition
    groups = [
        ("e", list(encounter._meta.concrete_fields)),
        ("d", list(definition._meta.concrete_fields)),
        ("v", list(version._meta.concrete_fields)),
        ("r", [model_field(transition, name) for name in LOG_HEAD[:3]]),
    ]
    # (SQLite, UTC: datetime columns as text, parsed once by their converter; see
    # :func:`_selected_column`.)
    selected = _selected_column(connection)
    columns = [selected(f, alias) for alias, fields in groups for f in fields]
    fields = [f for _, fields in groups for f in fields]
    offsets = [len(groups[0][1])]
    for _, group in groups[1:]:
        offsets.append(offsets[-1] + len(group))

    def col(alias: str, model: Any, name: str) -> str:
        return f"{qn(alias)}.{qn(model_field(model, name).column)}"

    def selected_col(alias: str, model: Any, name: str) -> str:
        return selected(model_field(model, name), alias)

    table = qn(transition._meta.db_table)
    last = " DESC, ".join(col("t", transition, name) for name in TIMELINE_ORDER) + " DESC"
    # The last timeline row is filtered on the encounter id given as a parameter (not
    # correlated with the outer row): on a sharded database (Citus) every table of the
    # statement then has an equality filter on its distribution column, and the whole
    # statement, lock included, is routed to the one shard that holds the encounter.
    last_row = f"FROM {table} {qn('t')} WHERE {col('t', transition, 'encounter')} = %({PK})s"
    lateral = ""
    if connection.vendor == "postgresql":
        # PostgreSQL: one LATERAL subquery reads both columns of that row, one reference to the
        # log where two scalar subqueries made two. Under Django's default client-side binding
        # the statement is planned on every call; this form plans about 6 % faster (issue 23,
        # measured with EXPLAIN (SUMMARY)), the same plan: one backward index scan.
        names = ", ".join(col("t", transition, name) for name in LOG_HEAD[3:])
        lateral = (
            f" LEFT JOIN LATERAL (SELECT {names} {last_row} ORDER BY {last} LIMIT 1) "
            f"{qn('l')} ON TRUE"
        )
        columns.extend(selected_col("l", transition, name) for name in LOG_HEAD[3:])
    else:
        # SQLite has no LATERAL: a scalar subquery per column.
        columns.extend(
            f"(SELECT {selected_col('t', transition, name)} {last_row} ORDER BY {last} LIMIT 1)"
            for name in LOG_HEAD[3:]
        )
    fields.extend(model_field(transition, name) for name in LOG_HEAD[3:])
    sql = (
        f"SELECT {', '.join(columns)} FROM {qn(encounter._meta.db_table)} {qn('e')} "
        f"INNER JOIN {qn(definition._meta.db_table)} {qn('d')} "
        f"ON {qn('d')}.{qn(definition._meta.pk.column)} = {col('e', encounter, 'definition')} "
        f"LEFT JOIN {qn(version._meta.db_table)} {qn('v')} "
        f"ON {col('v', version, 'definition')} = {col('e', encounter, 'definition')} "
        f"AND {col('v', version, 'number')} = {col('e', encounter, 'definition_version')} "
        f"LEFT JOIN {table} {qn('r')} "
        f"ON {col('r', transition, 'encounter')} = {qn('e')}.{qn(encounter._meta.pk.column)} "
        f"AND {col('r', transition, 'sequence')} = {col('e', encounter, 'version')}"
        f"{lateral} WHERE {qn('e')}.{qn(encounter._meta.pk.column)} = %({PK})s"
    )
    return sql, fields, offsets


def _build(connection: Any) -> Statements:
    qn = connection.ops.quote_name
    encounter, transition = Encounter, EncounterTransition
    row_meta = transition._meta
    lock_any_sql, lock_fields, lock_offsets = _lock_sql(connection)
    # The encounter, the definition, the version, the log head (its row and last row).
    bounds = [0, *lock_offsets[:3], len(lock_fields)]
    lock_sql = lock_any_sql + (
        f" AND {qn('e')}.{qn(model_field(encounter, 'deleted_at').column)} IS NULL"
    )
    features = connection.features
    locking = ""
    if features.has_select_for_update:
        # Lock only the encounter row: concurrent transitions of other encounters of the same
        # definition must not queue behind each other.
        locking = (
            f" FOR UPDATE OF {qn('e')}" if features.has_select_for_update_of else " FOR UPDATE"
        )

    def col(name: str) -> str:
        return str(qn(model_field(transition, name).column))

    table = qn(row_meta.db_table)
    insert_fields = list(row_meta.concrete_fields)
    selected = _selected_column(connection)
    # Each transition field's adapter, built once: by attname, and in INSERT order.
    row_adapters = {f.attname: value_adapter(connection, f) for f in insert_fields}
    insert_adapters = [row_adapters[f.attname] for f in insert_fields]
    stream_fields = [row_meta.get_field(name) for name in ROW_COLUMNS]
    # "The last row of the timeline up to t": ordered by the engine's TIMELINE_ORDER.
    state_at_sql = (
        f"SELECT {col('to_state')} FROM {table} "
        f"WHERE {col('encounter')} = %({PK})s AND {col('effective_at')} <= %(at)s"
    )
    order = f" ORDER BY {', '.join(f'{col(name)} DESC' for name in TIMELINE_ORDER)} LIMIT 1"
    of_encounter = f"FROM {table} WHERE {col('encounter')} = %({PK})s"
    stream_converters = column_converters(connection, stream_fields)
    return Statements(
        connection=connection,
        lock_sql=lock_sql + locking,
        lock_any_sql=lock_any_sql + locking,
        lock_fields=lock_fields,
        lock_converters=column_converters(connection, lock_fields),
        lock_slices=tuple(slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)),
        lock_attnames=tuple(
            [f.attname for f in lock_fields[a:b]] for a, b in zip(bounds, bounds[1:], strict=False)
        ),
        lock_machine=(
            _position(lock_fields, bounds[1], bounds[2], "code"),
            *(
                _position(lock_fields, bounds[2], bounds[3], name)
                for name in (
                    "number",
                    "content_hash",
                    "states",
                    "initial_state",
                    "final_states",
                    "transitions",
                )
            ),
        ),
        lock_validators=_position(lock_fields, bounds[2], bounds[3], "validators"),
        lock_models=(
            encounter,
            model_field(encounter, "definition"),
            model_field(EncounterDefinitionVersion, "definition"),
        ),
        insert_sql=(
            f"INSERT INTO {table} ({', '.join(qn(f.column) for f in insert_fields)}) "
            f"VALUES ({', '.join(f'%({f.attname})s' for f in insert_fields)})"
        ),
        insert_fields=insert_fields,
        insert_adapters=insert_adapters,
        insert_params=_insert_params(insert_fields, insert_adapters),
        encounter_adapters={
            f.attname: value_adapter(connection, f) for f in encounter._meta.concrete_fields
        },
        row_adapters=row_adapters,
        state_at_sql=state_at_sql + order,
        state_at_known_sql=state_at_sql + f" AND {col('transitioned_at')} <= %(known_at)s" + order,
        history_sql=(
            f"SELECT {', '.join(selected(f) for f in insert_fields)} {of_encounter} "
            f"ORDER BY {col('sequence')}"
        ),
        history_attnames=[f.attname for f in insert_fields],
        history_converters=column_converters(connection, insert_fields),
        stream_sql=(
            f"SELECT {', '.join(selected(f) for f in stream_fields)} {of_encounter} "
            f"ORDER BY {col('sequence')}"
        ),
        stream_row=row_builder(StreamRow, stream_converters),
        keyed_stream_row=row_builder(StreamRow, stream_converters, skip=1),
        encounter_key=column_converter(connection, model_field(transition, "encounter")),
        projections_sql=_projections_sql(connection),
    )


def _insert_params(fields: list[Any], adapters: list[Adapter]) -> Any:
    """``record -> {attname: adapter(field.pre_save(record, True))}`` for the INSERT, generated
    as one function (like ``converters.row_builder``): a field whose ``pre_save`` is Django's
    plain one (the attribute's value; a date or time field without ``auto_now``/``auto_now_add``
    too) is read as the attribute, any other through its ``pre_save``."""
    from django.db.models import DateField, DateTimeField
    from django.db.models import Field as ModelField

    namespace: dict[str, Any] = {}
    items = []
    for index, (f, adapt) in enumerate(zip(fields, adapters, strict=True)):
        namespace[f"adapt_{index}"] = adapt
        pre_save = type(f).pre_save
        plain = pre_save is ModelField.pre_save or (
            pre_save in (DateField.pre_save, DateTimeField.pre_save)
            and not (f.auto_now or f.auto_now_add)
        )
        if plain and f.attname.isidentifier() and not keyword.iskeyword(f.attname):
            value = f"record.{f.attname}"
        else:
            namespace[f"field_{index}"] = f
            value = f"field_{index}.pre_save(record, True)"
        as_is = getattr(adapt, "as_is_type", None)
        if as_is is None:
            items.append(f"{f.attname!r}: adapt_{index}({value})")
        else:  # the adapter's own shortcut, inlined: a value of its type as it is
            namespace[f"type_{index}"] = as_is
            items.append(
                f"{f.attname!r}: (v if type(v := {value}) is type_{index} else adapt_{index}(v))"
            )
    source = f"def params(record):\n    return {{{', '.join(items)}}}\n"
    exec(source, namespace)  # noqa: S102 - generated from the model's field names only
    return namespace["params"]


def _position(fields: list[Any], start: int, stop: int, name: str) -> int:
    """Where the field ``name`` lies among ``fields[start:stop]`` (one model's group)."""
    return start + [f.name for f in fields[start:stop]].index(name)


def _selected_column(connection: Any) -> Any:
    """``(field, table alias or None) -> what a SELECT of its column says``: the quoted column,
    except for a ``DateTimeField`` on SQLite with UTC times, which is selected as text. SQLite
    stores those as UTC text; selected as the column, the driver parses each into a naive
    datetime (its declared-type converter) before the ORM's converter makes it aware; an
    expression has no declared type, and the column's converter
    (``converters._sqlite_utc_datetime``) parses the text once, aware: the same values (the
    history, the streams and, issue 23, the write path's lock: about 2 µs less per datetime)."""
    qn = connection.ops.quote_name
    as_text = connection.vendor == "sqlite" and connection.timezone is timezone.utc

    def selected(f: Any, alias: str | None = None) -> str:
        column = str(qn(f.column)) if alias is None else f"{qn(alias)}.{qn(f.column)}"
        if as_text and f.get_internal_type() == "DateTimeField":
            return f"CAST({column} AS TEXT)"
        return column

    return selected


def _update_sql(st: Statements, columns: Sequence[str]) -> str:
    encounter = Encounter
    qn = st.quote
    assignments = ", ".join(
        f"{qn(model_field(encounter, name).column)} = %({name})s" for name in columns
    )
    meta = encounter._meta
    return f"UPDATE {qn(meta.db_table)} SET {assignments} WHERE {qn(meta.pk.column)} = %({PK})s"


def projection_write_fields() -> list[Any]:
    """The fields a rebuild writes per encounter: pk, the projection, ``updated_at``."""
    encounter = Encounter
    return [
        encounter._meta.pk,
        *(model_field(encounter, name) for name in PROJECTION_FIELDS),
        model_field(encounter, "updated_at"),
    ]


def _projections_sql(connection: Any) -> str:
    """PostgreSQL: one ``UPDATE … FROM unnest(arrays)`` per batch, whatever its size, the new
    values travelling as one array per column and ``updated_at`` as one parameter. Elsewhere:
    ``UPDATE … SET projection, updated_at WHERE pk = %s``, run with ``executemany``."""
    qn = connection.ops.quote_name
    pk, *projection, updated_at = projection_write_fields()
    table = qn(pk.model._meta.db_table)
    if connection.vendor == "postgresql":
        names = [qn(f.column) for f in (pk, *projection)]
        arrays = ", ".join(f"%s::{f.db_type(connection)}[]" for f in (pk, *projection))
        assignments = ", ".join(f"{name} = v.{name}" for name in names[1:])
        return (
            f"UPDATE {table} AS e SET {assignments}, {qn(updated_at.column)} = %s "
            f"FROM unnest({arrays}) AS v({', '.join(names)}) "
            f"WHERE e.{names[0]} = v.{names[0]}"
        )
    assignments = ", ".join(f"{qn(f.column)} = %s" for f in (*projection, updated_at))
    return f"UPDATE {table} SET {assignments} WHERE {qn(pk.column)} = %s"
