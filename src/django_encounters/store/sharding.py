"""The store at run time on a sharded database (Citus, distributed PostgreSQL): whether the
encounter table is distributed, and how to lock many encounters there. Asked by the rebuild on
every database (one catalog query per session on PostgreSQL, none elsewhere); the one-shot
layout change that shards the tables is :mod:`.distribution`'s.

On a sharded store, a statement that locks rows must stay on one shard: the rebuild locks a
batch with one statement per shard (:func:`lock_each`) instead of one multi-shard
``SELECT … FOR UPDATE``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from django.db import connections

from ..models import Encounter
from .statements import forget as forget_statements

__all__ = ["distribution_of", "forget", "is_sharded", "lock_each", "shard_groups"]

_SHARDED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


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


def lock_each(using: str, pks: Iterable[Any]) -> None:
    """``SELECT … FOR UPDATE`` the encounters ``pks`` with one statement per shard holding some
    of them, each routed to that shard alone (Citus refuses a lock over several shards). The
    ids are grouped by shard first, by Citus's own hash function, on the coordinator."""
    connection = connections[using]
    model = Encounter
    qn = connection.ops.quote_name
    pk = model._meta.pk
    table = qn(model._meta.db_table)
    cast = pk.db_type(connection)
    values = [pk.get_db_prep_value(value, connection) for value in pks]
    if not values:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT array_agg(i.id ORDER BY i.id) FROM unnest(%s::{cast}[]) AS i(id) "
            "GROUP BY get_shard_id_for_distribution_column(%s, i.id) ORDER BY 1",
            [values, table],
        )
        groups = [row[0] for row in cursor.fetchall()]
        cursor.executemany(
            f"SELECT 1 FROM {table} WHERE {qn(pk.column)} = ANY(%s::{cast}[]) FOR UPDATE",
            [(group,) for group in groups],
        )


def shard_groups(using: str, pks: list[Any]) -> list[list[int]]:
    """The positions in ``pks`` (0-based, ascending) of the encounters each shard holds, one
    list per shard holding some of them (one query: Citus's own hash function, on the
    coordinator)."""
    connection = connections[using]
    pk = Encounter._meta.pk
    values = [pk.get_db_prep_value(value, connection) for value in pks]
    if not values:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT array_agg(i.n - 1 ORDER BY i.n) "
            f"FROM unnest(%s::{pk.db_type(connection)}[]) WITH ORDINALITY AS i(id, n) "
            "GROUP BY get_shard_id_for_distribution_column(%s, i.id) ORDER BY 1",
            [values, connection.ops.quote_name(Encounter._meta.db_table)],
        )
        return [list(row[0]) for row in cursor.fetchall()]


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
