"""Prepared statements for the write path of ``transition()``.

The three statements of an ordinary transition (lock+read, insert, projection update) are built
once per database connection from the models' metadata — table and column names, the backend's
quoting, locking clause and value adapters/converters — and then executed directly. This keeps
the ORM's per-call query compilation (most of a transition's cost on SQLite) off the hot path
while values still go through each field's own ``get_db_prep_save`` and ``from_db`` conversion,
so every backend Django supports stores and reads exactly what the ORM would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import Field, Model, signals

from .exceptions import EncounterError
from .models import Encounter, EncounterDefinition, EncounterTransition
from .projections.timeline import TIMELINE_ORDER


def _field(model: type[Model], name: str) -> Any:
    """A concrete field by name (``_meta.get_field`` may also return reverse relations)."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return field


@dataclass
class _Statements:
    """Every statement of the hot paths, built once per connection by :func:`_build`."""

    lock_sql: str
    encounter_attnames: list[str]
    definition_attnames: list[str]
    lock_converters: list  # per selected column: (converter functions, expression)
    insert_sql: str
    insert_fields: list
    state_at_sql: str
    state_at_known_sql: str
    history_sql: str
    history_attnames: list[str]
    history_converters: list


def _converters(connection: Any, fields: list, alias: str) -> list:
    result = []
    for field in fields:
        expression = field.get_col(alias)
        result.append(
            (
                connection.ops.get_db_converters(expression)
                + expression.get_db_converters(connection),
                expression,
            )
        )
    return result


def _convert(row: Any, converters: list, connection: Any) -> list:
    """Apply each column's backend and field converters, as the ORM's compiler does."""
    values = list(row)
    for index, (convs, expression) in enumerate(converters):
        if convs:
            value = values[index]
            for converter in convs:
                value = converter(value, expression, connection)
            values[index] = value
    return values


def _build(connection: Any) -> _Statements:
    qn = connection.ops.quote_name
    enc_meta, def_meta, row_meta = (
        Encounter._meta,
        EncounterDefinition._meta,
        EncounterTransition._meta,
    )
    encounter_fields = list(enc_meta.concrete_fields)
    definition_fields = list(def_meta.concrete_fields)
    columns = [f"{qn('e')}.{qn(f.column)}" for f in encounter_fields] + [
        f"{qn('d')}.{qn(f.column)}" for f in definition_fields
    ]
    lock_sql = (
        f"SELECT {', '.join(columns)} FROM {qn(enc_meta.db_table)} {qn('e')} "
        f"INNER JOIN {qn(def_meta.db_table)} {qn('d')} "
        f"ON {qn('d')}.{qn(def_meta.pk.column)} = "
        f"{qn('e')}.{qn(_field(Encounter, 'definition').column)} "
        f"WHERE {qn('e')}.{qn(enc_meta.pk.column)} = %s "
        f"AND {qn('e')}.{qn(_field(Encounter, 'deleted_at').column)} IS NULL"
    )
    features = connection.features
    if features.has_select_for_update:
        # Lock only the encounter row: concurrent transitions of other encounters of the same
        # definition must not queue behind each other.
        lock_sql += (
            f" FOR UPDATE OF {qn('e')}" if features.has_select_for_update_of else " FOR UPDATE"
        )
    insert_fields = list(row_meta.concrete_fields)
    insert_sql = (
        f"INSERT INTO {qn(row_meta.db_table)} ({', '.join(qn(f.column) for f in insert_fields)}) "
        f"VALUES ({', '.join(['%s'] * len(insert_fields))})"
    )

    def col(name: str) -> str:
        return qn(_field(EncounterTransition, name).column)

    # "The last row of the timeline up to t": ordered by the engine's TIMELINE_ORDER.
    state_at_sql = (
        f"SELECT {col('to_state')} FROM {qn(row_meta.db_table)} "
        f"WHERE {col('encounter')} = %s AND {col('effective_at')} <= %s"
    )
    order = f" ORDER BY {', '.join(f'{col(name)} DESC' for name in TIMELINE_ORDER)} LIMIT 1"
    history_sql = (
        f"SELECT {', '.join(qn(f.column) for f in insert_fields)} FROM {qn(row_meta.db_table)} "
        f"WHERE {col('encounter')} = %s ORDER BY {col('sequence')}"
    )
    return _Statements(
        lock_sql=lock_sql,
        encounter_attnames=[f.attname for f in encounter_fields],
        definition_attnames=[f.attname for f in definition_fields],
        lock_converters=_converters(connection, encounter_fields, enc_meta.db_table)
        + _converters(connection, definition_fields, def_meta.db_table),
        insert_sql=insert_sql,
        insert_fields=insert_fields,
        state_at_sql=state_at_sql + order,
        state_at_known_sql=state_at_sql + f" AND {col('transitioned_at')} <= %s" + order,
        history_sql=history_sql,
        history_attnames=[f.attname for f in insert_fields],
        history_converters=_converters(connection, insert_fields, row_meta.db_table),
    )


def _statements(connection: Any) -> _Statements:
    statements = getattr(connection, "_django_encounters_statements", None)
    if statements is None:
        statements = _build(connection)
        connection._django_encounters_statements = statements
    return statements


def lock_encounter(pk: Any, using: str) -> Encounter | None:
    """``SELECT … FOR UPDATE`` of a live encounter joined with its definition, in one
    statement. Returns the encounter (its ``definition`` cached on it), or None."""
    connection = connections[using]
    st = _statements(connection)
    pk_param = Encounter._meta.pk.get_db_prep_value(pk, connection)
    with connection.cursor() as cursor:
        cursor.execute(st.lock_sql, [pk_param])
        row = cursor.fetchone()
    if row is None:
        return None
    values = _convert(row, st.lock_converters, connection)
    split = len(st.encounter_attnames)
    encounter = Encounter.from_db(using, st.encounter_attnames, values[:split])
    definition = EncounterDefinition.from_db(using, st.definition_attnames, values[split:])
    _field(Encounter, "definition").set_cached_value(encounter, definition)
    return encounter


def insert_transition(record: EncounterTransition, using: str, *, previous_hash: str) -> None:
    """INSERT one new transition row; ``pre_save``/``post_save`` are sent as ``save()`` would.

    The row was decided and hashed before the signals ran: a receiver that changed its content
    is refused (``EncounterError``) rather than store a row its hash does not cover.
    """
    connection = connections[using]
    st = _statements(connection)
    signals.pre_save.send(
        sender=EncounterTransition, instance=record, raw=False, using=using, update_fields=None
    )
    if record.compute_hash(previous_hash) != record.hash:
        raise EncounterError(
            f"Transition {record.sequence} of encounter {record.encounter_id} was changed by a "
            "signal receiver after it was decided; rows cannot be altered before insert"
        )
    params = [f.get_db_prep_save(f.pre_save(record, True), connection) for f in st.insert_fields]
    with connection.cursor() as cursor:
        cursor.execute(st.insert_sql, params)
    record._state.adding = False
    record._state.db = using
    signals.post_save.send(
        sender=EncounterTransition,
        instance=record,
        created=True,
        update_fields=None,
        raw=False,
        using=using,
    )


def update_columns(
    model: type[Model],
    pk: Any,
    changes: dict[str, Any],
    using: str,
    *,
    after_row: tuple[Any, int] | None = None,
) -> int:
    """``UPDATE … SET <only these columns> WHERE pk = …``; returns the number of rows updated.

    ``after_row=(encounter_pk, sequence)`` adds ``AND EXISTS`` that transition row: the
    projection update of a new row ``n`` only happens when row ``n - 1`` is in the log. It runs
    after the INSERT, so (unlike anything read with the row lock) it sees every committed row.
    """
    connection = connections[using]
    qn = connection.ops.quote_name
    meta = model._meta
    assignments, params = [], []
    for name, value in changes.items():
        field = _field(model, name)
        assignments.append(f"{qn(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    params.append(meta.pk.get_db_prep_value(pk, connection))
    sql = f"UPDATE {qn(meta.db_table)} SET {', '.join(assignments)} WHERE {qn(meta.pk.column)} = %s"
    if after_row is not None:
        row_meta = EncounterTransition._meta
        encounter_field = _field(EncounterTransition, "encounter")
        sql += (
            f" AND EXISTS (SELECT 1 FROM {qn(row_meta.db_table)} "
            f"WHERE {qn(encounter_field.column)} = %s "
            f"AND {qn(_field(EncounterTransition, 'sequence').column)} = %s)"
        )
        params += [encounter_field.get_db_prep_value(after_row[0], connection), after_row[1]]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


# -- read path -----------------------------------------------------------------------------------


def last_state_at(encounter_pk: Any, timestamp: Any, known_at: Any, using: str) -> str | None:
    """``to_state`` of the last row of the timeline with ``effective_at <= timestamp`` (and
    ``transitioned_at <= known_at``), ordered by the engine's ``TIMELINE_ORDER``; one indexed
    query. None when there is no such row."""
    connection = connections[using]
    st = _statements(connection)
    params = [
        _field(EncounterTransition, "encounter").get_db_prep_value(encounter_pk, connection),
        _field(EncounterTransition, "effective_at").get_db_prep_value(timestamp, connection),
    ]
    sql = st.state_at_sql
    if known_at is not None:
        params.append(
            _field(EncounterTransition, "transitioned_at").get_db_prep_value(known_at, connection)
        )
        sql = st.state_at_known_sql
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def history(encounter: Encounter, using: str) -> list[EncounterTransition]:
    """The encounter's rows in recording order, as model instances; one query."""
    connection = connections[using]
    st = _statements(connection)
    relation = _field(EncounterTransition, "encounter")
    with connection.cursor() as cursor:
        cursor.execute(st.history_sql, [relation.get_db_prep_value(encounter.pk, connection)])
        rows = cursor.fetchall()
    result = []
    for row in rows:
        instance = EncounterTransition.from_db(
            using, st.history_attnames, _convert(row, st.history_converters, connection)
        )
        relation.set_cached_value(instance, encounter)
        result.append(instance)
    return result
