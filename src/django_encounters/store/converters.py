"""Turning the values a database driver returns into what the ORM would hand back.

Each selected column gets exactly the ORM's conversion (the backend's and the field's
converters), with faster equivalents where the result is provably the same: SQLite's UTC
datetime text, JSON without a custom decoder, psycopg 3's C ``timestamptz`` loader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any
from uuid import UUID

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
    from django.utils.dateparse import parse_datetime

    parse = datetime.fromisoformat

    def load_datetime(value: Any) -> Any:
        if type(value) is datetime and value.tzinfo is None:
            return value.replace(tzinfo=_UTC)
        if type(value) is str:  # selected as text (``reads.iter_streams``)
            try:
                # Parsed aware at once: ``replace(tzinfo=…)`` costs several times the parse.
                parsed = parse(value + "+00:00")
                if parsed.tzinfo is not None:  # (a date alone reads "+00:00" as its time)
                    return parsed
            except ValueError:
                pass
            try:
                parsed = parse(value)
            except ValueError:
                pass
            else:
                # Naive text is UTC (Django's make_aware); text with an offset keeps it, as
                # Django's converter keeps an aware value.
                return parsed.replace(tzinfo=_UTC) if parsed.tzinfo is None else parsed
            # What the driver's declared-type converter (Django's ``parse_datetime``) would
            # have made of the column: None for text that is no time, its error for a bad one.
            value = parse_datetime(value)
        return slow(value) if slow is not None else value

    return load_datetime


def _uuid_field_class() -> type:
    from django.db.models import UUIDField

    return UUIDField


def _sqlite_uuid(slow: Converter | None) -> Converter:
    # SQLite stores a UUID as its 32 hex digits; Django's converter is ``uuid.UUID(value)``,
    # which for 32 characters without braces or hyphens is ``UUID(int=int(value, 16))``. A
    # column read row after row often repeats its value (a stream's encounter id): the last
    # one is kept (a UUID is immutable).
    # (One tuple, replaced whole: a connection may be shared between threads.)
    last: list[tuple[Any, Any]] = [(None, None)]

    def load_uuid(value: Any) -> Any:
        if type(value) is str and len(value) == 32:
            seen, converted = last[0]
            if value == seen:
                return converted
            try:
                result = UUID(int=int(value, 16))
            except ValueError:
                pass
            else:
                last[0] = (value, result)
                return result
        return slow(value) if slow is not None else value

    return load_uuid


def column_converter(connection: Any, field: Any) -> Converter | None:
    """The conversion of one selected column of ``field`` (None: the value is used as is)."""
    internal = field.get_internal_type()
    if internal == "JSONField" and field.decoder is None:
        return _load_json
    slow = _django_converter(connection, field)
    if (
        type(field.target_field if field.is_relation else field) is _uuid_field_class()
        and connection.vendor == "sqlite"
        and not hasattr(field, "from_db_value")
    ):
        return _sqlite_uuid(slow)
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


#: PostgreSQL's ISO text of a ``timestamptz`` in the session's zone: ``2024-03-31
#: 15:59:59.25+02``, ``0001-12-31 19:03:58-04:56:02 BC``, ``10000-01-01 13:00:00+14``.
_PG_TIMESTAMPTZ = re.compile(
    rb"(\d+)-(\d+)-(\d+)[ T](\d+):(\d+):(\d+)(?:\.(\d+))?"
    rb"([-+])(\d+)(?::(\d+))?(?::(\d+))?( BC)?"
)
#: The Gregorian calendar repeats every 400 years, which are exactly this many days.
_GREGORIAN_CYCLE_YEARS = 400
_GREGORIAN_CYCLE = timedelta(days=146097)


def parse_pg_timestamptz(data: Any) -> datetime:
    """PostgreSQL's text of a ``timestamptz`` (``DateStyle`` ISO), whatever the session's
    zone, as an aware datetime in UTC — the instant the text names, also where that zone puts
    it before year 1 (``… BC``) or after year 9999, which Python cannot hold as local times.

    Raises:
        ValueError: not such a text, or an instant outside Python's years 1 to 9999 in UTC.
    """
    text = bytes(data)
    found = _PG_TIMESTAMPTZ.fullmatch(text)
    if found is None:
        raise ValueError(f"not a timestamptz in ISO style: {text!r}")
    year, month, day, hour, minute, second, fraction, sign, oh, om, os_, bc = found.groups()
    number = 1 - int(year) if bc else int(year)  # 1 BC is year 0
    # Move the local time into years Python has by whole 400-year cycles, and back after.
    cycles = 0
    if number < 1:
        cycles = (1 - number + _GREGORIAN_CYCLE_YEARS - 1) // _GREGORIAN_CYCLE_YEARS
    elif number > 9999:
        cycles = -((number - 9999 + _GREGORIAN_CYCLE_YEARS - 1) // _GREGORIAN_CYCLE_YEARS)
    micros = int((fraction or b"0").ljust(6, b"0")[:6])
    offset = timedelta(hours=int(oh), minutes=int(om or 0), seconds=int(os_ or 0))
    try:
        local = datetime(
            number + _GREGORIAN_CYCLE_YEARS * cycles,
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            micros,
            tzinfo=_UTC,
        )
        return (local - offset if sign == b"+" else local + offset) - _GREGORIAN_CYCLE * cycles
    except OverflowError:
        raise ValueError(
            f"timestamptz {text.decode('ascii', 'replace')!r} lies outside the years 1 to 9999 "
            "(UTC) that Python can represent"
        ) from None


def _utc_timestamptz_loader() -> Any:
    """psycopg 3: a ``timestamptz`` loader giving aware datetimes in UTC — Django's values —
    through psycopg's C loader, whatever the session's time zone.

    Django's own loader subclasses psycopg's pure-Python one, costs several times more per
    value (streams read two per row), and assumes the session is in UTC: in a session some
    statement moved to another zone (``SET TIME ZONE``, a pooler's shared session) it labels
    local times as UTC, and a stored time that zone shows before year 1 or after 9999 fails
    to load (``DataError``). This one reads the instant the text names, in any zone (the C
    loader, or :func:`parse_pg_timestamptz` for the years it cannot hold). None without
    psycopg 3."""
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
    data_error = psycopg.DataError

    class UTCTimestamptzLoader(Loader):
        #: The zone of the values; Django's cursors keep a loader whose ``timezone`` is the
        #: connection's (UTC) instead of registering their own.
        timezone = _UTC

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._load = base(oid, context).load
            info = getattr(self.connection, "info", None)
            if info is not None and info.timezone is _UTC:
                # A UTC session: the C loader's values are already aware in UTC; reading
                # through it directly spares a Python call per value (the rebuild reads two).
                self.load = self._load  # type: ignore[method-assign]

        def load(self, data: Any) -> Any:
            try:
                value = self._load(data)
            except data_error:
                try:
                    return parse_pg_timestamptz(data)
                except ValueError as exc:
                    raise data_error(str(exc)) from None
            return value if value.tzinfo is _UTC else value.astimezone(_UTC)

    return UTCTimestamptzLoader


_PG_LOADER: Any = False


def _pg_loader() -> Any:
    global _PG_LOADER
    if _PG_LOADER is False:
        _PG_LOADER = _utc_timestamptz_loader()
    return _PG_LOADER


def read_times_in_utc(sender: Any, connection: Any, **kwargs: Any) -> None:
    """On every new PostgreSQL connection (psycopg 3, ``USE_TZ``): read ``timestamptz``
    columns — the ORM's reads included — with the loader of :func:`_utc_timestamptz_loader`,
    so that a session moved to another time zone neither shifts the times read nor fails on
    one that zone cannot express. In a UTC session (what Django sets) the values are the
    same as Django's own."""
    if connection.vendor != "postgresql" or connection.timezone is not _UTC:
        return
    adapters = getattr(connection.connection, "adapters", None)
    if adapters is not None and _pg_loader() is not None:  # (psycopg2: no adapters)
        adapters.register_loader("timestamptz", _pg_loader())


def speed_up_cursor(connection: Any, cursor: Any) -> None:
    """On psycopg 3, give ``cursor`` the C ``timestamptz`` loader (same values as Django's)."""
    if connection.vendor != "postgresql" or connection.timezone is not _UTC:
        return  # (Django's loader gives naive or other-zone times then)
    # Django's cursor wrapper (its driver cursor as ``cursor``), or a driver cursor.
    adapters = getattr(getattr(cursor, "cursor", cursor), "adapters", None)
    if adapters is None:  # psycopg2
        return
    if _pg_loader() is not None:
        adapters.register_loader("timestamptz", _pg_loader())


# -- the other direction: Python values to what the driver is sent ----------------------------

Adapter = Callable[[Any], Any]


def value_adapter(connection: Any, field: Any) -> Adapter:
    """``value -> field.get_db_prep_save(value, connection)``, with a shortcut for the value
    types the write path sends, on the backends and field classes where the result is known to
    be the same (the tests compare both on every backend): a ``str`` for a ``CharField`` or
    ``TextField`` and an ``int`` for an integer field as they are, a ``UUID`` as it is or as its
    hex text (SQLite), an aware UTC ``datetime`` as it is (PostgreSQL) or as SQLite's naive UTC
    text. Anything else — None, expressions, other types, subclassed fields, other backends —
    goes through the field."""
    slow: Adapter = partial(field.get_db_prep_save, connection=connection)
    # A foreign key's value is prepared by its target field (None and "" aside, which take
    # the slow way).
    kind, shortcut = _shortcut(connection, field.target_field if field.is_relation else field)
    if kind is None:
        return slow

    def adapt(value: Any) -> Any:
        if type(value) is kind:
            result = shortcut(value)
            if result is not _NO_SHORTCUT:
                return result
        return slow(value)

    if shortcut is _as_is:
        # What generated code may inline: a value of this type is sent as it is.
        adapt.as_is_type = kind  # type: ignore[attr-defined]
    return adapt


_NO_SHORTCUT = object()


def _as_is(value: Any) -> Any:
    return value


def _shortcut(connection: Any, field: Any) -> tuple[type | None, Adapter]:  # noqa: PLR0911
    """The value type with a shortcut for ``field`` on ``connection``, and the shortcut (which
    may still answer ``_NO_SHORTCUT``)."""
    from django.db import models
    from django.db.backends.base.operations import BaseDatabaseOperations

    no = (None, _as_is)
    vendor = connection.vendor
    if vendor not in ("sqlite", "postgresql"):
        return no
    kind = type(field)
    if kind in (models.CharField, models.TextField):
        return str, _as_is
    if kind in (
        models.IntegerField,
        models.PositiveIntegerField,
        models.BigIntegerField,
        models.AutoField,
        models.BigAutoField,
    ):
        # Unless the backend adapts integers itself (psycopg 3 sends typed Int4/Int8).
        name = "adapt_integerfield_value"
        plain = getattr(type(connection.ops), name, None) is getattr(
            BaseDatabaseOperations, name, None
        )
        return (int, _as_is) if plain else no

    if kind is models.JSONField:
        # SQLite: Django sends ``connection.ops.adapt_json_value(value, encoder)``, the base
        # class's ``json.dumps(value, cls=encoder)``; for a dict and no encoder, that text.
        name = "adapt_json_value"
        plain = getattr(type(connection.ops), name, None) is getattr(
            BaseDatabaseOperations, name, None
        )
        if vendor == "sqlite" and field.encoder is None and plain:
            return dict, _json_text
        return no
    if kind is models.UUIDField:
        return UUID, (_as_is if connection.features.has_native_uuid_field else _uuid_hex)
    # (auto_now and auto_now_add act in pre_save, which the adapter does not replace.)
    if kind is models.DateTimeField:
        if vendor == "postgresql":
            return datetime, _aware_as_is
        if connection.timezone is _UTC:  # USE_TZ, no per-database TIME_ZONE
            return datetime, _sqlite_utc_text
    return no


def _json_text(value: dict) -> str:
    return "{}" if not value else json.dumps(value)


def _uuid_hex(value: UUID) -> str:
    return value.hex


def _aware_as_is(value: datetime) -> Any:
    return value if value.tzinfo is not None else _NO_SHORTCUT


def _sqlite_utc_text(value: datetime) -> Any:
    # Django: make_naive(value, UTC), then str(); for a value already in UTC that is dropping
    # the tzinfo: its ISO text without the "+00:00" that UTC's offset always writes (no copy of
    # the datetime made for it).
    return value.isoformat(" ")[:-6] if value.tzinfo is _UTC else _NO_SHORTCUT
