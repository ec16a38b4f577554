"""The read statements: the state at a time, history, one stream, and many streams at once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timezone
from typing import Any
from uuid import UUID

import django
from django.db import connections
from django.db.models import CharField, F, OuterRef, QuerySet, Subquery, TextField
from django.db.models.functions import Cast, Coalesce

from ..engine import TIMELINE_ORDER_DESC, EncounterTimeline, StreamRow
from ..models import EncounterTransition
from . import cursors
from .converters import column_converters, convert_row, row_builder, speed_up_cursor
from .loading import loader
from .schema import ROW_COLUMNS, field
from .statements import PK, statements

#: Rows fetched from the database per round trip while streaming many encounters.
ROW_CHUNK_SIZE = 2000
#: The row's times (``DateTimeField`` columns).
_TIMES = ("effective_at", "transitioned_at")


def _encounter_param(pk: Any, connection: Any) -> Any:
    return statements(connection).row_adapters["encounter_id"](pk)


def last_state_at(encounter_pk: Any, timestamp: Any, known_at: Any, using: str) -> str | None:
    """``to_state`` of the last row of the timeline with ``effective_at <= timestamp`` (and
    ``transitioned_at <= known_at``), in the engine's ``TIMELINE_ORDER``; one indexed query.
    None when there is no such row."""
    connection = connections[using]
    st = statements(connection)
    adapt = st.row_adapters
    params = {PK: adapt["encounter_id"](encounter_pk), "at": adapt["effective_at"](timestamp)}
    sql = st.state_at_sql
    if known_at is not None:
        params["known_at"] = adapt["transitioned_at"](known_at)
        sql = st.state_at_known_sql
    row = cursors.execute(connection, sql, params, cursors.FETCH_ONE)
    return None if row is None else row[0]


def annotate_state_at(encounters: QuerySet, timestamp: Any, known_at: Any) -> QuerySet:
    """``Encounter.objects.as_of()``: ``encounters`` annotated with ``state_at``, the
    ``to_state`` of the last row of each one's timeline with ``effective_at <= timestamp`` (and
    ``transitioned_at <= known_at``) in the engine's order, else its origin state; one
    correlated subquery, so one statement however many encounters."""
    rows = EncounterTransition.objects.filter(encounter=OuterRef("pk"), effective_at__lte=timestamp)
    if known_at is not None:
        rows = rows.filter(transitioned_at__lte=known_at)
    last = rows.order_by(*TIMELINE_ORDER_DESC).values("to_state")[:1]
    return encounters.annotate(
        state_at=Coalesce(Subquery(last, output_field=CharField()), F("origin_state"))
    )


def history(encounter: Any, using: str) -> list[Any]:
    """The encounter's rows in recording order, as model instances; one query."""
    connection = connections[using]
    st = statements(connection)
    model = EncounterTransition
    relation = field(model, "encounter")
    with connection.cursor() as cursor:
        speed_up_cursor(connection, cursor)
        cursor.execute(st.history_sql, {PK: _encounter_param(encounter.pk, connection)})
        rows = cursor.fetchall()
    load, converters = loader(model, using, st.history_attnames), st.history_converters
    result = []
    for row in rows:
        instance = load(convert_row(row, converters))
        relation.set_cached_value(instance, encounter)
        result.append(instance)
    return result


def load_stream(encounter_pk: Any, using: str) -> list[StreamRow]:
    """The encounter's rows in sequence order, as the engine's rows; one query."""
    connection = connections[using]
    st = statements(connection)
    with connection.cursor() as cursor:
        speed_up_cursor(connection, cursor)
        cursor.execute(st.stream_sql, {PK: _encounter_param(encounter_pk, connection)})
        return [st.stream_row(row) for row in cursor.fetchall()]


def load_timeline(encounter: Any, using: str, *, known_at: Any = None) -> EncounterTimeline:
    """Replay the encounter's whole stream, or the rows recorded by ``known_at`` (one query).
    ``StreamGapError`` if it has a gap."""
    return EncounterTimeline.replay(
        encounter.genesis(),
        encounter.genesis_hash,
        load_stream(encounter.pk, using),
        known_at=known_at,
    )


def values_rows(query: QuerySet) -> list[tuple]:
    """``list(query)`` of a ``values_list()`` queryset of model fields (no expressions): the
    same statement (its filters, slice and ``select_for_update()``), the same values, each
    column converted by the store's converters (:mod:`.converters`) in one generated call per
    row instead of the ORM's converter loop; one query."""
    using = query.db
    connection = connections[using]
    compiler = query.query.get_compiler(using)
    sql, params = compiler.as_sql()
    fields = [expression.target for expression, _, _ in compiler.select]
    build = row_builder(_as_tuple, column_converters(connection, fields))
    with connection.cursor() as cursor:
        speed_up_cursor(connection, cursor)
        cursor.execute(sql, params)
        return [build(values) for values in cursor.fetchall()]


def _as_tuple(*values: Any) -> tuple:
    return values


def iter_streams(transitions: QuerySet) -> Iterator[tuple[UUID, list[StreamRow]]]:
    """``(encounter_id, rows in sequence order)`` for every encounter with rows in
    ``transitions`` (an ``EncounterTransition`` queryset), streamed in encounter-id order with
    one query: memory per encounter, not per run."""
    connection = connections[transitions.db]
    columns: list[Any] = list(ROW_COLUMNS)
    # Django before 5.2 puts annotations after the fields in the SELECT whatever the order
    # values_list() names them in, and the row builder reads columns by position: there the
    # times are selected as the columns themselves.
    if (
        connection.vendor == "sqlite"
        and connection.timezone is timezone.utc
        and django.VERSION >= (5, 2)
    ):
        # SQLite stores UTC times as text; selected as the column, Django's driver-level
        # converter parses each one into a naive datetime (two Python calls) before the row
        # builder's converter makes it aware. Selected as text (an expression has no declared
        # type, so no driver converter), the builder's converter parses it once
        # (``converters._sqlite_utc_datetime``): the same values.
        texts = {f"{name}__text": Cast(name, TextField()) for name in _TIMES}
        transitions = transitions.annotate(**texts)
        columns = [f"{name}__text" if name in _TIMES else name for name in columns]
    st = statements(connection)
    build, convert_key = st.keyed_stream_row, st.encounter_key
    key = "encounter_id"
    if connection.vendor == "postgresql" and django.VERSION >= (5, 2):
        # The driver makes a UUID of every row's encounter id (a Python constructor per row);
        # selected as text, the rows are grouped by the text and one UUID is made per stream
        # (psycopg's loader makes the same UUID from the same text).
        transitions = transitions.annotate(encounter_id__text=Cast("encounter_id", TextField()))
        key, convert_key = "encounter_id__text", UUID
    query = transitions.order_by("encounter_id", "sequence").values_list(key, *columns)
    sql, params = query.query.get_compiler(transitions.db).as_sql()
    # A server-side cursor where the database has one, unless the settings rule them out
    # (transaction-pooling PgBouncer), exactly as QuerySet.iterator() decides.
    if connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        cursor = connection.cursor()
    else:
        cursor = connection.chunked_cursor()
    try:
        speed_up_cursor(connection, cursor)
        cursor.execute(sql, params)
        current: Any = None
        bucket: list[StreamRow] = []
        while chunk := cursor.fetchmany(ROW_CHUNK_SIZE):
            for values in chunk:
                key = values[0]
                if key != current:
                    if bucket:
                        yield (convert_key(current) if convert_key else current), bucket
                    current, bucket = key, []
                bucket.append(build(values))
        if bucket:
            yield (convert_key(current) if convert_key else current), bucket
    finally:
        cursor.close()
