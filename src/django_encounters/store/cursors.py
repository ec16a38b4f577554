"""Running the store's own statements: through Django's cursor when anything can observe it, on
the driver's cursor otherwise.

Django's cursor wrapper adds, per statement, what a user can see — the statement in
``connection.queries`` and in ``CaptureQueriesContext`` (``DEBUG``, or a forced debug cursor),
``connection.execute_wrapper()`` hooks — and what keeps the connection sound: a usable
connection (``ensure_connection``, the health check), the thread-sharing check, no statement in
a transaction that must roll back, and the driver's errors as Django's classes. On SQLite it
also rewrites ``%(name)s`` into the driver's ``:name`` on every execution.

:func:`execute` keeps all of it: when the statement can be observed it goes through Django's
cursor exactly as before; when it cannot, it runs on the driver's cursor with the same checks
and the same error translation (``wrap_database_errors``: an ``IntegrityError`` is Django's,
with the driver's error as ``__cause__``), and on SQLite in the driver's own parameter style,
converted once per statement text (:func:`native`). Only the wrapper's per-call bookkeeping —
nobody could have seen it — is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.backends.utils import CursorWrapper

from .converters import speed_up_cursor

#: Where Django defines its cursor wrapper's ``execute`` (replaced: somebody instruments it).
_DJANGO_CURSORS = "django.db.backends.utils"

__all__ = ["FETCH_ALL", "FETCH_ONE", "NOTHING", "ROWCOUNT", "execute", "native", "observed"]


def FETCH_ONE(cursor: Any) -> Any:  # noqa: N802 - named like the constants they are
    return cursor.fetchone()


def FETCH_ALL(cursor: Any) -> Any:  # noqa: N802
    return cursor.fetchall()


def ROWCOUNT(cursor: Any) -> Any:  # noqa: N802
    return cursor.rowcount


def NOTHING(cursor: Any) -> Any:  # noqa: N802
    return None


class _Named:
    """``%(name)s`` → ``:name``, for ``sql % _Named()`` (``%%`` becomes ``%`` as Django's
    conversion makes it)."""

    def __getitem__(self, name: str) -> str:
        return ":" + name


_NAMED = _Named()
#: Per statement text (the ``Statements`` cache's own strings), its SQLite form.
_NATIVE: dict[str, str] = {}


def native(sql: str) -> str:
    """``sql`` (named parameters, ``%(name)s``) as SQLite's driver takes it (``:name``): what
    Django's SQLite cursor makes of it on every execution, made once."""
    found = _NATIVE.get(sql)
    if found is None:
        found = _NATIVE[sql] = sql % _NAMED
    return found


def observed(connection: Any) -> bool:
    """Whether a statement run on ``connection`` now could be seen by anyone: recorded
    (``DEBUG``, ``CaptureQueriesContext``, ``assertNumQueries``), passed to an
    ``execute_wrapper()``, or instrumented by a tool that patches Django's cursor: the
    connection's own ``cursor()`` replaced (django-debug-toolbar's SQL panel; Django's
    ``SimpleTestCase``, which refuses queries that way) or ``CursorWrapper.execute`` replaced
    (APM agents such as Sentry's Django integration)."""
    return bool(
        connection.queries_logged
        or connection.execute_wrappers
        or "cursor" in connection.__dict__
        or CursorWrapper.execute.__module__ != _DJANGO_CURSORS
    )


def execute(
    connection: Any,
    sql: str,
    params: dict[str, Any],
    result: Callable[[Any], Any] = NOTHING,
    *,
    fast_times: bool = False,
) -> Any:
    """Run ``sql`` (named parameters) with ``params`` on ``connection`` (a Django
    ``DatabaseWrapper``) and return ``result(cursor)`` (``FETCH_ONE``, ``FETCH_ALL``,
    ``ROWCOUNT``, ``NOTHING``). ``fast_times``: read ``timestamptz`` columns with psycopg's C
    loader (:func:`~.converters.speed_up_cursor`)."""
    if observed(connection):
        with connection.cursor() as cursor:
            if fast_times:
                speed_up_cursor(connection, cursor)
            cursor.execute(sql, params)
            return result(cursor)
    # What Django's cursor() and execute() check, in their order.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    connection.validate_no_broken_transaction()
    with connection.wrap_database_errors:
        if connection.vendor == "sqlite":
            cursor = connection.connection.cursor()
            sql = native(sql)
        else:
            cursor = connection.create_cursor()
            if fast_times:
                speed_up_cursor(connection, cursor)
        try:
            cursor.execute(sql, params)
            return result(cursor)
        finally:
            cursor.close()
