"""The store at run time on a sharded database (Citus, distributed PostgreSQL): whether the
encounter table is distributed, and how to lock many encounters there. Asked by the rebuild on
every database (one catalog query per session on PostgreSQL, none elsewhere); the one-shot
layout change that shards the tables is :mod:`.distribution`'s.

On a sharded store, a statement that locks rows must stay on one shard: the rebuild claims a
batch (:class:`Claims`) by reading its ids, then locking and reading its rows with one
statement per shard, instead of one multi-shard ``SELECT … FOR UPDATE``.
"""

from __future__ import annotations

import weakref
from typing import Any
from uuid import UUID

from django.db import connections
from django.db.models import QuerySet

from ..models import Encounter
from .converters import column_converters, row_builder, speed_up_cursor
from .statements import forget as forget_statements

__all__ = ["Claims", "distribution_of", "forget", "is_sharded", "shard_groups"]

_SHARDED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
#: Per driver connection: the shard group (a number) of each encounter its last claim locked,
#: so that the batch's write groups them without asking the coordinator again.
_GROUPS: weakref.WeakKeyDictionary[Any, dict[Any, int]] = weakref.WeakKeyDictionary()


def is_sharded(connection: Any) -> bool:
    """Whether the encounter table is a distributed (hash-sharded) Citus table. Asked once per
    database session (one catalog query; none on other databases than PostgreSQL): the answer
    is kept beside the driver's connection, so a reconnection (e.g. after ``CONN_MAX_AGE``)
    asks again and sees tables distributed meanwhile."""
    if connection.vendor != "postgresql":
        return False
    connection.ensure_connection()
    session = connection.connection
    found = _SHARDED.get(session)
    if found is None:
        found = _SHARDED[session] = distribution_of(connection, Encounter._meta.db_table)[0] == "h"
    return found


def forget(connection: Any) -> None:
    """Forget what :func:`is_sharded` found and the statements built (the layout changed)."""
    if connection.connection is not None:
        _SHARDED.pop(connection.connection, None)
    forget_statements(connection)


def shard_groups(using: str, pks: list[Any]) -> list[list[int]]:
    """The positions in ``pks`` (0-based, ascending) of the encounters each shard holds, one
    list per shard holding some of them, in the order of their first positions (one query:
    Citus's own hash function, on the coordinator; none when the connection's last claim,
    :meth:`Claims.claim`, grouped every one of them — the rebuild's write after its claim)."""
    connection = connections[using]
    pk = Encounter._meta.pk
    values = [pk.get_db_prep_value(value, connection) for value in pks]
    if not values:
        return []
    known = _GROUPS.get(connection.connection) if connection.connection is not None else None
    if known is not None and all(value in known for value in values):
        grouped: dict[int, list[int]] = {}
        for position, value in enumerate(values):
            grouped.setdefault(known[value], []).append(position)
        return list(grouped.values())  # (dicts keep insertion order: by first position)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT array_agg(i.n - 1 ORDER BY i.n) "
            f"FROM unnest(%s::{pk.db_type(connection)}[]) WITH ORDINALITY AS i(id, n) "
            "GROUP BY get_shard_id_for_distribution_column(%s, i.id) ORDER BY 1",
            [values, connection.ops.quote_name(Encounter._meta.db_table)],
        )
        return [list(row[0]) for row in cursor.fetchall()]


class Claims:
    """The batches of a rebuild on a sharded store, claimed one after another in primary-key
    order (keyset pagination), each locked for the caller's transaction. A claim is

    1. the batch's ids: the next ``batch_size`` after the last claimed. A multi-shard
       ``ORDER BY id LIMIT n`` makes every shard send its first ``n`` ids (32 shards: 32 times
       the batch); once a batch has shown how dense the ids are, the read is also bounded
       above by an id guessed from that density to leave a little more than a batch below it
       (a tenth more, and three standard deviations of that count), so that each shard sends
       about its share. When the guess was short, the rest is read past it (a second query):
       the batch is exactly the next ``batch_size`` ids either way, whatever the ids'
       distribution (UUIDs: compared as PostgreSQL does, as 128-bit integers);
    2. the ids grouped by shard (one query on the coordinator, Citus's own hash function);
    3. one ``SELECT <columns> … WHERE id = ANY(<the shard's ids>) FOR UPDATE`` per shard, each
       routed to that shard alone (Citus refuses a lock over several shards), sent as one
       pipeline: the rows are locked and read by the same statement. An encounter created
       since its ids were read is not in the batch, as with one locking statement.

    Args:
        query: the encounters' ``values_list()`` (its filters, in primary-key order); the
            selected columns are the ones read, by primary key.
        batch_size: encounters per batch.
    """

    #: How much wider than the last batch's density predicts the bounded id read looks.
    MARGIN = 1.1

    def __init__(self, query: QuerySet, batch_size: int) -> None:
        self.query = query
        self.batch_size = batch_size
        self.using = query.db
        self.density: float | None = None  # encounters per unit of id (UUIDs as integers)
        self._statement: tuple[str, Any] | None = None

    def claim(self, after: Any) -> list[tuple]:
        """The next batch after primary key ``after`` (None: from the first), locked; rows in
        primary-key order."""
        pks = self._ids(after)
        if not pks:
            return []
        return self._lock_and_read(pks)

    def _ids(self, after: Any) -> list[Any]:
        size = self.batch_size
        ids = self.query.values_list("pk", flat=True).order_by("pk")
        if after is not None:
            ids = ids.filter(pk__gt=after)
        if not isinstance(after, UUID) or not self.density:
            found = list(ids[:size])
        else:
            # The ids below the bound: about a Poisson count, so a margin of three of its
            # standard deviations besides the tenth (small batches need them).
            width = int((size + 3 * size**0.5 + 1) * self.MARGIN / self.density) + 1
            bound = UUID(int=min(after.int + width, _LAST_UUID))
            found = list(ids.filter(pk__lte=bound)[:size])
            if len(found) < size and bound.int < _LAST_UUID:
                found += ids.filter(pk__gt=bound)[: size - len(found)]
        if isinstance(after, UUID) and found and isinstance(found[-1], UUID):
            span = found[-1].int - after.int
            self.density = len(found) / span if span > 0 else None
        elif after is None and len(found) > 1 and isinstance(found[-1], UUID):
            span = found[-1].int - found[0].int
            self.density = (len(found) - 1) / span if span > 0 else None
        return found

    def _locking(self) -> tuple[str, Any]:
        """The statement that locks and reads one shard's encounters (its ids as the one
        parameter) and the builder of its rows: the caller's columns, in its order (a column
        named twice is read twice), by primary key only — the ids were read through the
        caller's filters already, which name columns a batch does not change."""
        if self._statement is None:
            connection = connections[self.using]
            model = self.query.model
            table = model._meta.db_table
            compiler = self.query.query.get_compiler(self.using)
            compiler.as_sql()  # (fills compiler.select)
            fields = [expression.target for expression, _, _ in compiler.select]
            if any(field.model._meta.db_table != table for field in fields):
                raise ValueError("a claim reads the encounter table's own columns only")
            qn = connection.ops.quote_name
            pk = model._meta.pk
            columns = ", ".join(f"{qn(table)}.{qn(field.column)}" for field in fields)
            sql = (
                f"SELECT {columns} FROM {qn(table)} WHERE {qn(table)}.{qn(pk.column)} "
                f"= ANY(%s::{pk.db_type(connection)}[]) FOR UPDATE"
            )
            self._statement = (sql, row_builder(_as_tuple, column_converters(connection, fields)))
        return self._statement

    def _lock_and_read(self, pks: list[Any]) -> list[tuple]:
        connection = connections[self.using]
        model = self.query.model
        pk = model._meta.pk
        values = [pk.get_db_prep_value(value, connection) for value in pks]
        groups = [[values[i] for i in positions] for positions in shard_groups(self.using, pks)]
        _GROUPS[connection.connection] = {
            value: number for number, group in enumerate(groups) for value in group
        }
        sql, build = self._locking()
        rows: list[tuple] = []
        with connection.cursor() as cursor:
            speed_up_cursor(connection, cursor)
            driver = cursor.cursor
            # Through Django's cursor (logged as one "N times:" statement, seen by
            # execute_wrappers), each statement's rows kept (psycopg's returning=True).
            cursor.cursor = _Returning(driver)
            try:
                cursor.executemany(sql, [(group,) for group in groups])
            finally:
                cursor.cursor = driver
            while True:
                rows.extend(build(values) for values in driver.fetchall())
                if not driver.nextset():
                    break
        rows.sort(key=_first)
        return rows


_LAST_UUID = (1 << 128) - 1


def _as_tuple(*values: Any) -> tuple:
    return values


def _first(row: tuple) -> Any:
    return row[0]


class _Returning:
    """A psycopg cursor whose ``executemany`` keeps every statement's result
    (``returning=True``, read with ``fetchall()`` and ``nextset()``)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def executemany(self, sql: Any, params: Any) -> Any:
        return self._cursor.executemany(sql, params, returning=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def distribution_of(connection: Any, table: str) -> tuple[str | None, str | None, str | None]:
    """``(partmethod, repmodel, distribution column)`` of ``table`` in Citus's metadata;
    ``(None, None, None)`` for a plain table or without Citus. ``h``: hash-distributed;
    ``n`` with ``t``: a reference table; ``n`` with ``s``: a Citus local table."""
    if connection.vendor != "postgresql":
        return None, None, None
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return None, None, None
        cursor.execute(
            "SELECT partmethod, repmodel, column_to_column_name(logicalrelid, partkey) "
            "FROM pg_dist_partition WHERE logicalrelid = to_regclass(%s)",
            [connection.ops.quote_name(table)],
        )
        row = cursor.fetchone()
    return (row[0], row[1], row[2]) if row else (None, None, None)
