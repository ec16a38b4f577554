"""Turning the values a database driver returns into what the ORM would hand back.

Each selected column gets exactly the ORM's conversion (the backend's and the field's
converters), with faster equivalents where the result is provably the same: SQLite's UTC
datetime text, JSON without a custom decoder, psycopg 3's C ``timestamptz`` loader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

Converter = Callable[[Any], Any]

_UTC = timezone.utc


def _django_converter(connection: Any, field: Any) -> Converter | None:
    """The ORM's conversion of one selected column, as one function (None: no conversion)."""
    expression = field.get_col(field.model._meta.db_table)
    steps = connection.ops.get_db_converters(expression) + expression.get_db_converters(connection)
    if not steps:
        return None

    def convert(value: Any) -> Any:
        for step in steps:
            value = step(value, expression, connection)
        return value

    return convert


def _load_json(value: Any) -> Any:
    if value == "{}":  # the usual metadata: skip the parser
        return {}
    if value is None or not isinstance(value, (str, bytes, bytearray)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _sqlite_utc_datetime(slow: Converter | None) -> Converter:
    # SQLite stores UTC as naive text 'YYYY-MM-DD HH:MM:SS[.ffffff]'; Django's sqlite3
    # connection already parses declared datetime columns into naive datetimes, and its
    # converter then makes them aware in UTC — which is ``replace(tzinfo=UTC)``.
    parse = datetime.fromisoformat

    def load_datetime(value: Any) -> Any:
        if type(value) is datetime and value.tzinfo is None:
            return value.replace(tzinfo=_UTC)
        if type(value) is str:  # selected as text (``reads.iter_streams``)
            try:
                # Parsed aware at once: ``replace(tzinfo=…)`` costs several times the parse.
                return parse(value + "+00:00")
            except ValueError:
                pass
            try:
                return parse(value).replace(tzinfo=_UTC)
            except ValueError:
                pass
        return slow(value) if slow is not None else value

    return load_datetime


def column_converter(connection: Any, field: Any) -> Converter | None:
    """The conversion of one selected column of ``field`` (None: the value is used as is)."""
    internal = field.get_internal_type()
    if internal == "JSONField" and field.decoder is None:
        return _load_json
    slow = _django_converter(connection, field)
    if (
        internal == "DateTimeField"
        and connection.vendor == "sqlite"
        and connection.timezone is _UTC  # USE_TZ and no per-database TIME_ZONE
    ):
        return _sqlite_utc_datetime(slow)
    return slow


def column_converters(connection: Any, fields: Sequence[Any]) -> list[Converter | None]:
    return [column_converter(connection, field) for field in fields]


def convert_row(row: Sequence[Any], converters: Sequence[Converter | None]) -> list[Any]:
    """``row`` with each column's converter applied."""
    return [
        value if convert is None else convert(value)
        for value, convert in zip(row, converters, strict=True)
    ]


def row_builder(
    target: Callable[..., Any], converters: Sequence[Converter | None], *, skip: int = 0
) -> Callable[[Sequence[Any]], Any]:
    """``values -> target(*converted values[skip:])``, generated like ``dataclasses`` and
    ``namedtuple`` do: one call per row, no loop (the streams of a rebuild are read with it)."""
    namespace: dict[str, Any] = {"target": target}
    arguments = []
    for index, convert in enumerate(converters):
        if convert is None:
            arguments.append(f"values[{index + skip}]")
        else:
            namespace[f"convert_{index}"] = convert
            arguments.append(f"convert_{index}(values[{index + skip}])")
    source = f"def build(values):\n    return target({', '.join(arguments)})\n"
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
            info = getattr(self.connection, "info", None)
            if info is not None and info.timezone is _UTC:
                # A UTC session: the C loader's values are already aware in UTC; reading
                # through it directly spares a Python call per value (the rebuild reads two).
                self.load = self._load  # type: ignore[method-assign]

        def load(self, data: Any) -> Any:
            value = self._load(data)
            return value if value.tzinfo is _UTC else value.astimezone(_UTC)

    return UTCTimestamptzLoader


_PG_LOADER: Any = False


def speed_up_cursor(connection: Any, cursor: Any) -> None:
    """On psycopg 3, give ``cursor`` the C ``timestamptz`` loader (same values as Django's)."""
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
