"""Reading many encounters' streams at once, for the rebuild and the audit replay.

Rows are read with one ordered query per batch of encounters — the ORM builds the SQL, a
chunked cursor (server-side on PostgreSQL) streams it — and handed out one encounter at a time
as :class:`~django_encounters.projections.timeline.StreamRow` lists: memory per encounter, not
per run. Values get exactly the conversion the ORM would give them (each field's backend and
field converters), with faster equivalents for the hot columns where the result is provably the
same (SQLite's UTC datetime text, JSON without a custom decoder, the encounter id converted
once per stream instead of once per row). Folding and verification are the timeline engine's
(``verify_stream``); nothing here decides anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from django.db import connections
from django.db.models import QuerySet

from .mapper import EVENT_COLUMNS
from .timeline import Rules, StreamRow

#: Rows fetched from the database per round trip while streaming.
ROW_CHUNK_SIZE = 2000

_UTC = timezone.utc


def parse_encounter_ids(values: Iterable[Any]) -> list[UUID]:
    """UUIDs from strings (any form ``uuid.UUID`` accepts) or UUIDs; ``ValueError`` naming the
    first value that is not one."""
    result = []
    for value in values:
        if isinstance(value, UUID):
            result.append(value)
            continue
        try:
            result.append(UUID(str(value).strip()))
        except ValueError:
            raise ValueError(f"not an encounter id (a UUID): {value!r}") from None
    return result


class RulesCache:
    """``definition_id -> Rules`` (and code), loaded once — soft-deleted definitions included —
    and filled in lazily for definitions created while a long run is going."""

    def __init__(self, using: str) -> None:
        from ..models import EncounterDefinition

        self._model = EncounterDefinition
        self._using = using
        self._rules: dict[Any, Rules] = {}
        self._codes: dict[Any, str] = {}
        for definition in EncounterDefinition.all_objects.using(using):
            self._add(definition)

    def _add(self, definition: Any) -> None:
        self._rules[definition.pk] = definition.rules()
        self._codes[definition.pk] = definition.code

    def _load(self, definition_id: Any) -> None:
        self._add(self._model.all_objects.using(self._using).get(pk=definition_id))

    def rules(self, definition_id: Any) -> Rules:
        if definition_id not in self._rules:
            self._load(definition_id)
        return self._rules[definition_id]

    def code(self, definition_id: Any) -> str:
        if definition_id not in self._codes:
            self._load(definition_id)
        return self._codes[definition_id]

    def ids_for_code(self, code: str) -> list[Any]:
        return [pk for pk, known in self._codes.items() if known == code]


# ---------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------

Converter = Callable[[Any], Any]


def _django_converter(connection: Any, field: Any) -> Converter | None:
    """The ORM's conversion of one selected column, as one function (None: no conversion)."""
    from ..models import EncounterTransition

    expression = field.get_col(EncounterTransition._meta.db_table)
    steps = connection.ops.get_db_converters(expression) + expression.get_db_converters(connection)
    if not steps:
        return None

    def convert(value: Any) -> Any:
        for step in steps:
            value = step(value, expression, connection)
        return value

    return convert


def _fast_converter(connection: Any, field: Any) -> Converter | None | bool:
    """A faster converter with the same result as the ORM's, or False when there is none."""
    internal = field.get_internal_type()
    if internal == "JSONField" and field.decoder is None:
        loads = json.loads

        def load_json(value: Any) -> Any:
            if value == "{}":  # the usual metadata: skip the parser
                return {}
            if value is None or not isinstance(value, (str, bytes, bytearray)):
                return value
            try:
                return loads(value)
            except json.JSONDecodeError:
                return value

        return load_json
    if (
        internal == "DateTimeField"
        and connection.vendor == "sqlite"
        and connection.timezone is _UTC  # USE_TZ and no per-database TIME_ZONE
    ):
        # SQLite stores UTC as naive text 'YYYY-MM-DD HH:MM:SS[.ffffff]'; Django's sqlite3
        # connection already parses declared datetime columns into naive datetimes, and its
        # converter then makes them aware in UTC — which is ``replace(tzinfo=UTC)``.
        parse = datetime.fromisoformat
        slow = _django_converter(connection, field)

        def load_datetime(value: Any) -> Any:
            if type(value) is datetime and value.tzinfo is None:
                return value.replace(tzinfo=_UTC)
            if type(value) is str:
                try:
                    return parse(value).replace(tzinfo=_UTC)
                except ValueError:
                    pass
            return slow(value) if slow is not None else value

        return load_datetime
    return False


def _column_converters(connection: Any) -> tuple[Converter | None, list[Converter | None]]:
    """(converter of ``encounter_id``, converters of ``EVENT_COLUMNS``) for this connection."""
    from ..models import EncounterTransition

    meta = EncounterTransition._meta
    key = _django_converter(connection, meta.get_field("encounter"))
    columns: list[Converter | None] = []
    for attname in EVENT_COLUMNS:
        field = meta.get_field(attname)
        fast = _fast_converter(connection, field)
        columns.append(_django_converter(connection, field) if fast is False else fast)  # type: ignore[arg-type]
    return key, columns


def _row_builder(converters: list[Converter | None]) -> Callable[[tuple], StreamRow]:
    """``values -> StreamRow`` applying the column converters (``values[0]`` is the encounter
    id). Generated like ``dataclasses``/``namedtuple`` do: one call per row, no loop."""
    namespace: dict[str, Any] = {"StreamRow": StreamRow}
    arguments = []
    for index, convert in enumerate(converters):
        if convert is None:
            arguments.append(f"values[{index + 1}]")
        else:
            namespace[f"convert_{index}"] = convert
            arguments.append(f"convert_{index}(values[{index + 1}])")
    source = f"def build(values):\n    return StreamRow({', '.join(arguments)})\n"
    exec(source, namespace)  # noqa: S102 - generated from column positions only
    return namespace["build"]  # type: ignore[no-any-return]


def _utc_timestamptz_loader() -> Any:
    """psycopg 3: a ``timestamptz`` loader giving the same values as Django's (aware, UTC)
    through psycopg's C loader. Django's own loader subclasses psycopg's pure-Python one and
    costs several times more per value; streams read two per row. None without psycopg 3."""
    try:
        import psycopg
        from psycopg.adapt import Loader
        from psycopg.pq import Format
    except ImportError:  # pragma: no cover - psycopg2
        return None
    oid = psycopg.postgres.types["timestamptz"].oid
    base: Any = psycopg.adapters.get_loader(oid, Format.TEXT)
    if base is None:  # pragma: no cover
        return None

    class UTCTimestamptzLoader(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._load = base(oid, context).load

        def load(self, data: Any) -> Any:
            value = self._load(data)
            return value if value.tzinfo is _UTC else value.astimezone(_UTC)

    return UTCTimestamptzLoader


_PG_LOADER: Any = False


def _speed_up_cursor(connection: Any, cursor: Any) -> None:
    global _PG_LOADER
    if connection.vendor != "postgresql":
        return
    adapters = getattr(getattr(cursor, "cursor", None), "adapters", None)
    if adapters is None:  # psycopg2
        return
    if _PG_LOADER is False:
        _PG_LOADER = _utc_timestamptz_loader()
    if _PG_LOADER is not None:
        adapters.register_loader("timestamptz", _PG_LOADER)


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def rows_query(transitions: QuerySet) -> QuerySet:
    """``(encounter_id, *EVENT_COLUMNS)`` in ``(encounter, sequence)`` order."""
    return transitions.order_by("encounter_id", "sequence").values_list(
        "encounter_id", *EVENT_COLUMNS
    )


def iter_streams(transitions: QuerySet) -> Iterator[tuple[UUID, list[StreamRow]]]:
    """``(encounter_id, rows in sequence order)`` for every encounter with rows in
    ``transitions`` (an ``EncounterTransition`` queryset), streamed in encounter-id order."""
    query = rows_query(transitions)
    connection = connections[query.db]
    convert_key, converters = _column_converters(connection)
    build = _row_builder(converters)
    sql, params = query.query.sql_with_params()
    # A server-side cursor where the database has one, unless the settings rule them out
    # (transaction-pooling PgBouncer), exactly as QuerySet.iterator() decides.
    if connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        cursor = connection.cursor()
    else:
        cursor = connection.chunked_cursor()
    try:
        _speed_up_cursor(connection, cursor)
        cursor.execute(sql, params)
        current: Any = None
        bucket: list[StreamRow] = []
        while True:
            chunk = cursor.fetchmany(ROW_CHUNK_SIZE)
            if not chunk:
                break
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


def select(
    using: str, rules: RulesCache, definition: str | None, encounters: Iterable[Any] | None
) -> tuple[Any, Any]:
    """The encounters selected by definition code and/or ids, and their transitions
    (querysets on ``using``), as rebuild and audit select them.

    Raises:
        EncounterError: no definition has the code ``definition``.
        ValueError: an encounter id that is not a UUID.
    """
    from ..exceptions import EncounterError
    from ..models import Encounter, EncounterTransition

    selected = Encounter.all_objects.using(using)
    transitions = EncounterTransition.objects.using(using)
    if definition is not None:
        definition_ids = rules.ids_for_code(definition)
        if not definition_ids:
            raise EncounterError(f"no encounter definition has the code {definition!r}")
        selected = selected.filter(definition_id__in=definition_ids)
        transitions = transitions.filter(encounter__definition_id__in=definition_ids)
    if encounters is not None:
        ids = parse_encounter_ids(encounters)
        selected = selected.filter(pk__in=ids)
        transitions = transitions.filter(encounter_id__in=ids)
    return selected, transitions
