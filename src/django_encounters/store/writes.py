"""The write statements: lock, insert, projection update, and the rebuild's batch write; the
translation of database errors into the package's typed errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import IntegrityError, OperationalError, connections, transaction
from django.db.models import signals
from django.utils import timezone

from ..engine import (
    ConcurrentTransitionError,
    EncounterError,
    EncounterNotFoundError,
    EncounterTimeline,
    ProjectionDriftError,
    Rules,
    row_hash,
    stored_precision,
)
from ..exceptions import DatabaseLockedError
from ..models import (
    LAZY_LOCK,
    Encounter,
    EncounterDefinitionVersion,
    materialize_lock,
    recorded_name,
    seal_of,
)
from . import cursors
from .converters import convert_row
from .loading import load
from .mapping import row_of_record
from .reads import load_timeline
from .schema import projection_of
from .sharding import is_sharded, shard_groups
from .statements import PK, projection_write_fields, statements

SEQUENCE_CONSTRAINT = "encounters_transition_unique_sequence"
_ABSENT = object()


@dataclass(frozen=True)
class LogHead:
    """What the log says where the locked projection points: the row at ``sequence =
    version`` (None without one) and the last row of the timeline (None without rows)."""

    hash: str | None
    transitioned_at: datetime | None
    definition_version: int | None
    last_state: str | None
    last_effective_at: datetime | None


def lock_encounter(
    pk: Any,
    using: str,
    *,
    include_deleted: bool = False,
    prove: bool = True,
    connection: Any = None,
) -> Any:
    """``SELECT … FOR UPDATE`` of a live encounter (any encounter with ``include_deleted``)
    joined with its definition and pinned definition version, in one statement; with
    ``prove``, the projection is proven against the log (:func:`prove_projection`). Returns
    the encounter (its ``definition`` and ``machine`` cached on it), or None. ``connection``:
    ``connections[using]`` when the caller holds it already (each lookup goes through asgiref's
    context-local storage)."""
    if connection is None:
        connection = connections[using]
    st = statements(connection)
    sql = st.lock_any_sql if include_deleted else st.lock_sql
    params = {PK: st.encounter_adapters[Encounter._meta.pk.attname](pk)}
    locked, head = _read_locked(connection, st, sql, params, using)
    if locked is None or not prove:
        return locked
    try:
        prove_projection(locked, head)
    except ProjectionDriftError:
        # PostgreSQL, READ COMMITTED: a writer that waited for the row lock gets the locked row
        # as it is now, but the rest of the statement (the log's head) as it was when the
        # statement began — before the writer it waited for committed. Read once more, holding
        # the lock: what still disagrees then really does.
        locked, head = _read_locked(connection, st, sql, params, using)
        if locked is not None:
            prove_projection(locked, head)
    return locked


def _read_locked(
    connection: Any, st: Any, sql: str, params: dict[str, Any], using: str
) -> tuple[Any, LogHead]:
    row = cursors.execute(connection, sql, params, cursors.FETCH_ONE, fast_times=True)
    if row is None:
        return None, LogHead(None, None, None, None, None)
    e, d, v, h = st.lock_slices
    converters = st.lock_converters
    locked = load(
        st.lock_models[0],
        using,
        st.lock_attnames[0],
        convert_row(row[e], converters[e]),
    )
    # The definition and the pinned version stay as read until something asks for them.
    locked.__dict__[LAZY_LOCK] = LockedMachine(st, using, row, locked)
    return locked, LogHead(*convert_row(row[h], converters[h]))


#: Rules per stored machine (the version's columns as read, and the definition's code): a
#: version is immutable, and the same text decodes to the same rules.
_RULES: dict[tuple[Any, ...], Rules] = {}
_RULES_LIMIT = 512


class LockedMachine:
    """What the lock statement read of a locked encounter's definition and pinned version,
    kept as the driver returned it: the version's :class:`Rules` (shared per stored machine),
    its validator entries decoded when asked, and the model instances built only when
    something asks for ``encounter.definition`` or ``encounter.machine``
    (:meth:`materialize`, the same instances the lock built before)."""

    __slots__ = ("_st", "_using", "_row", "definition_id", "number", "exists", "_rules", "done")

    def __init__(self, st: Any, using: str, row: Any, locked: Any) -> None:
        self._st, self._using, self._row = st, using, row
        # The pinned version exists when its primary key was joined.
        self.exists = row[st.lock_slices[2].start] is not None
        # What the definition and the version were joined on.
        self.definition_id = locked.__dict__["definition_id"]
        self.number = locked.__dict__["definition_version"]
        self._rules: Rules | None = None
        self.done = False

    @property
    def rules(self) -> Rules:
        """The pinned version's rules (the version must exist)."""
        rules = self._rules
        if rules is None:
            row, (code, number, content_hash, *machine) = self._row, self._st.lock_machine
            key = (row[code], row[number], row[content_hash], *(row[i] for i in machine))
            try:
                rules = _RULES.get(key)
                cacheable = True
            except TypeError:  # a driver value that is not hashable: decoded each time
                cacheable = False
            if rules is None:
                convert = self._st.lock_converters
                states, initial, finals, transitions = (_convert(convert, i, row) for i in machine)
                rules = Rules.from_config(
                    _convert(convert, code, row),
                    states,
                    transitions,
                    finals,
                    initial,
                    _convert(convert, number, row),
                    _convert(convert, content_hash, row),
                )
                if cacheable:
                    if len(_RULES) >= _RULES_LIMIT:
                        _RULES.clear()
                    _RULES[key] = rules
            self._rules = rules
        return rules

    def validators(self) -> Any:
        """The pinned version's validator entries, decoded now (a fresh list per call)."""
        return _convert(self._st.lock_converters, self._st.lock_validators, self._row)

    def current(self, encounter: Any) -> bool:
        """Whether this still describes ``encounter``'s pinned version (nothing replaced its
        machine, reloaded it from elsewhere or moved its pin)."""
        data = encounter.__dict__
        return (
            "_machine" not in data
            and data.get("definition_id") == self.definition_id
            and data.get("definition_version") == self.number
        )

    def materialize(self, encounter: Any) -> None:
        """Cache the definition and the pinned version on ``encounter`` (once), as
        ``Model.from_db`` builds them; what was set there since is kept."""
        if self.done:
            return
        self.done = True
        st, row = self._st, self._row
        _, d, v, _ = st.lock_slices
        _, d_names, v_names, _ = st.lock_attnames
        _, definition_fk, version_fk = st.lock_models
        converters = st.lock_converters
        if encounter.__dict__.get("definition_id") != self.definition_id:
            return  # reloaded or moved since: not what was locked
        definition = load(
            definition_fk.related_model, self._using, d_names, convert_row(row[d], converters[d])
        )
        if not definition_fk.is_cached(encounter):
            definition_fk.set_cached_value(encounter, definition)
        if self.exists and "_machine" not in encounter.__dict__:
            machine = load(
                version_fk.model, self._using, v_names, convert_row(row[v], converters[v])
            )
            version_fk.set_cached_value(machine, definition)
            encounter._machine = machine


def _convert(converters: Any, index: int, row: Any) -> Any:
    convert = converters[index]
    return row[index] if convert is None else convert(row[index])


def locked_machine(locked: Any) -> LockedMachine | None:
    """What the lock read of ``locked``'s pinned version, while it still describes it (else
    None: ask ``locked.machine``)."""
    lazy = locked.__dict__.get(LAZY_LOCK)
    return lazy if lazy is not None and lazy.current(locked) else None


def prove_projection(locked: Any, head: LogHead) -> None:
    """Refuse (``ProjectionDriftError``, nothing written) a projection that disagrees with the
    log: the row at ``sequence = version`` must exist and carry the stored head hash, system
    time and definition version; the stored state and timeline end must be the last timeline
    row's (with no rows: the origin, the genesis hash as head). A projection edited behind the
    library's back is never decided from, or written into the log."""

    # The locked instance is the store's own, every column loaded, nothing pending on it: its
    # __dict__ holds what its attributes return.
    data = locked.__dict__

    def differs(name: str, expected: Any) -> str | None:
        stored = data[name]
        return None if stored == expected else f"{name} {stored!r}, the log says {expected!r}"

    if locked.version == 0:
        checks = [
            None if head.last_state is None else "rows exist though the version is 0",
            differs("head_hash", locked.genesis_hash),
            differs("state", locked.origin_state),
            differs("timeline_end_at", None),
            differs("definition_version", locked.origin_version),
            differs("last_transitioned_at", None),
        ]
    elif head.hash is None:
        checks = [f"no row {locked.version} in the log (deleted, or the version was raised)"]
    else:
        checks = [
            differs("head_hash", head.hash),
            differs("state", head.last_state),
            differs("timeline_end_at", head.last_effective_at),
            differs("definition_version", head.definition_version),
            differs("last_transitioned_at", head.transitioned_at),
        ]
    lazy = locked.__dict__.get(LAZY_LOCK)
    if not (lazy.exists if lazy is not None else getattr(locked, "_machine", None) is not None):
        checks.append(f"its pinned definition version {locked.definition_version} does not exist")
    found = [check for check in checks if check]
    if found:
        raise ProjectionDriftError(locked.pk, locked.version, detail="; ".join(found))


def insert_row(
    record: Any,
    using: str,
    *,
    previous_hash: str | None = None,
    version_hash: str | None = None,
    seen_by_others: bool = True,
    connection: Any = None,
) -> None:
    """INSERT one new transition row; ``pre_save``/``post_save`` are sent as ``save()`` would.

    With ``previous_hash`` (and ``version_hash``, the content hash of the version it was
    decided under), the row was decided and hashed before the signals ran: a receiver
    that changed its content is refused (``EncounterError``) rather than store a row its hash
    does not cover. The hash is computed again to find out only when some code outside the
    package could have changed the record: a ``pre_save`` receiver, or (``seen_by_others``,
    the caller knows) one of its own signals' receivers. A clash on ``(encounter, sequence)``
    raises ``ConcurrentTransitionError``. ``connection``: ``connections[using]``, when the
    caller holds it.
    """
    if connection is None:
        connection = connections[using]
    st = statements(connection)
    model = type(record)
    signals.pre_save.send(sender=model, instance=record, raw=False, using=using, update_fields=None)
    if (
        previous_hash is not None
        and (seen_by_others or signals.pre_save.has_listeners(model))
        and row_hash(record.encounter_id, row_of_record(record), previous_hash, version_hash)
        != record.hash
    ):
        raise EncounterError(
            f"Transition {record.sequence} of encounter {record.encounter_id} was changed by a "
            "signal receiver after it was decided; rows cannot be altered before insert"
        )
    try:
        cursors.execute(connection, st.insert_sql, st.insert_params(record))
    except IntegrityError as exc:
        if _is_sequence_clash(exc):
            raise ConcurrentTransitionError(
                record.encounter_id,
                detail=f"sequence {record.sequence} is already in the log: another writer "
                "appended it (retry), or rows were inserted below the library and the "
                "projection is behind (run `manage.py rebuild_encounter_projections "
                f"--encounter {record.encounter_id}`)",
            ) from exc
        raise
    record._state.adding = False
    record._state.db = using
    signals.post_save.send(
        sender=model, instance=record, created=True, update_fields=None, raw=False, using=using
    )


def update_projection(
    locked: Any, values: dict[str, Any], using: str, *, connection: Any = None
) -> None:
    """Write the columns of ``values`` that differ from the locked instance's, in one UPDATE.

    The statement has no guard of its own: the new row's predecessor (the row the projection
    points at) was proven in the log under the row lock before anything
    was decided — by :func:`prove_projection` in ``transition()`` and ``upgrade_encounter()``,
    by replaying the whole stream in :func:`append_record` — and rows are never deleted (the
    append-only triggers; a ``TRUNCATE`` waits for this transaction). A row inserted below the
    library at the new row's sequence makes the INSERT before this UPDATE fail
    (``ConcurrentTransitionError``). Issue 23 dropped the ``AND EXISTS`` on the predecessor row
    this UPDATE carried before the lock proved the log's head: it re-checked what was proven, at
    a cost on every transition. ``connection``: ``connections[using]``, when the caller holds
    it.
    """
    if connection is None:
        connection = connections[using]
    # The locked instance is the store's own (no pending projection on it): its __dict__ is read
    # directly, not through the projection columns' descriptors (a column it lacks counts as
    # changed).
    stored = locked.__dict__
    changes = {name: value for name, value in values.items() if stored.get(name, _ABSENT) != value}
    if not changes:
        return
    st = statements(connection)
    adapters = st.encounter_adapters
    params = {name: adapters[name](v) for name, v in changes.items()}
    params[PK] = adapters[type(locked)._meta.pk.attname](locked.pk)
    cursors.execute(connection, st.update_sql(tuple(changes)), params)


def append_record(record: Any, using: str) -> None:
    """The low-level append behind ``EncounterTransition.save()``, inside the caller's
    transaction: lock the encounter (soft-deleted ones too), number the row (``sequence``
    defaults to the next one; a gap is refused) and chain it (``hash`` defaults to the hash
    over the previous row's), insert it, and move the projection to the replay of the stream.
    No state-machine checks: the audit reports what this lets through."""
    locked = lock_encounter(record.encounter_id, using, include_deleted=True, prove=False)
    if locked is None:
        raise EncounterNotFoundError(record.encounter_id)
    timeline = load_timeline(locked, using)
    record.effective_at = stored_precision(record.effective_at)
    if getattr(record, "_system_time_given", True):
        record.transitioned_at = stored_precision(record.transitioned_at)
    else:
        record.transitioned_at = timeline.system_time(timezone.now())
    if timeline.recorded_until is not None and record.transitioned_at < timeline.recorded_until:
        raise EncounterError(
            f"Encounter {locked.pk}: transitioned_at {record.transitioned_at.isoformat()} is "
            f"before the previous row's ({timeline.recorded_until.isoformat()}); system time "
            "never decreases along a stream"
        )
    if not record.definition_version:
        record.definition_version = timeline.definition_version
    if record.sequence is None:
        record.sequence = timeline.version + 1
    if isinstance(record.sequence, bool) or not isinstance(record.sequence, int):
        raise TypeError(f"sequence must be an int, not {record.sequence!r}")
    if record.sequence < 1:
        raise EncounterError(
            f"Encounter {locked.pk}: sequence {record.sequence} is not a row number (rows are "
            "numbered from 1)"
        )
    if record.sequence > timeline.version + 1:
        raise EncounterError(
            f"Encounter {locked.pk}: sequence {record.sequence} would leave a gap (the log is at "
            f"version {timeline.version})"
        )
    previous_hash = version_hash = None
    if not record.transitioned_by_name and record.transitioned_by_id is not None:
        record.transitioned_by_name = recorded_name(record.transitioned_by)
    if not record.hash:
        previous_hash = timeline.head_hash
        version_hash = _version_hash(locked, record.definition_version, using)
        record.hash = row_hash(locked.pk, row_of_record(record), previous_hash, version_hash)
        if not record.seal:
            record.seal = seal_of("row", record.hash)
    # an older sequence clashes here
    insert_row(record, using, previous_hash=previous_hash, version_hash=version_hash)
    EncounterTimeline.event(locked.pk, row_of_record(record)).mutate(timeline)
    projection = projection_of(timeline)
    projection["updated_at"] = timezone.now()
    update_projection(locked, projection, using)


def _version_hash(locked: Any, number: int, using: str) -> str:
    """The stored content hash of version ``number`` of the locked encounter's definition (the
    pinned version is joined to the lock; another one costs a query)."""
    materialize_lock(locked)
    machine = getattr(locked, "_machine", None)
    if machine is not None and machine.number == number:
        return str(machine.content_hash)
    found = (
        EncounterDefinitionVersion.objects.using(using)
        .filter(definition_id=locked.definition_id, number=number)
        .values_list("content_hash", flat=True)
        .first()
    )
    return found or ""


def save_record(record: Any, using: str) -> None:
    """``EncounterTransition.save()``: :func:`append_record` in a transaction of its own (a
    savepoint inside the caller's), SQLite's "database is locked" translated."""
    with writer_errors(record.encounter_id, using), transaction.atomic(using=using):
        append_record(record, using)


def write_projections(using: str, fixes: list[tuple], now: datetime) -> None:
    """Write replayed projections — ``(pk, *PROJECTION_FIELDS values)`` each — and stamp
    ``updated_at``: one statement per batch on PostgreSQL, one per shard on Citus (one
    pipeline), ``executemany`` elsewhere."""
    connection = connections[using]
    st = statements(connection)
    sql = st.projections_sql
    fields = projection_write_fields()
    stamp = fields[-1].get_db_prep_save(now, connection)
    if connection.vendor == "postgresql" and is_sharded(connection):
        # Citus: one UPDATE per shard, its ids also given as a list the planner prunes with, so
        # that each runs on its shard alone (a multi-shard UPDATE … FROM unnest() is planned by
        # broadcasting the values to every shard, several times slower); sent as one pipeline.
        pk = fields[0]
        routed = (
            f"{sql} AND e.{connection.ops.quote_name(pk.column)} "
            f"= ANY(%s::{pk.db_type(connection)}[])"
        )
        params = []
        for positions in shard_groups(using, [fix[0] for fix in fixes]):
            group = [fixes[i] for i in positions]
            columns = [_pg_array(column) for column in zip(*group, strict=True)]
            params.append([stamp, *columns, columns[0]])
        with connection.cursor() as cursor:
            cursor.executemany(routed, params)
        return
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # The replayed values are already what psycopg adapts natively (UUID, str, int,
            # aware datetime, None): no per-value field preparation; each column travels as one
            # array literal (:func:`_pg_array`).
            cursor.execute(
                sql, [stamp, *(_pg_array(column) for column in zip(*fixes, strict=True))]
            )
            return
        pk, *projection = (st.encounter_adapters[f.attname] for f in fields[:-1])
        cursor.executemany(
            sql,
            [
                [*(p(v) for p, v in zip(projection, fix[1:], strict=True)), stamp, pk(fix[0])]
                for fix in fixes
            ],
        )


def _pg_array_element(value: Any) -> str | None:
    """``value`` as an element of a PostgreSQL array literal (None: a type not handled here)."""
    kind = type(value)
    if kind is str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind is int:
        return str(value)
    if kind is UUID:
        return str(value)
    if kind is datetime and value.tzinfo is not None:
        return '"' + value.isoformat() + '"'
    if value is None:
        return "NULL"
    return None


def _pg_array(values: tuple) -> Any:
    """A column of the batch write as one array literal (``{"a","b",NULL}``, cast by the
    statement to the column's array type): one string for the driver instead of a list it
    adapts value by value (psycopg's list dumper runs a regular expression per value, which
    cost more than the ``UPDATE`` it feeds). Falls back to the list for any other type."""
    elements = [_pg_array_element(value) for value in values]
    if None in elements:
        return list(values)
    return "{" + ",".join(elements) + "}"  # type: ignore[arg-type]


@contextmanager
def writer_errors(encounter_pk: Any, using: str) -> Iterator[None]:
    """SQLite's "database is locked" as a :class:`DatabaseLockedError` naming the fix (not a
    raw ``OperationalError``). In deferred mode (Django's default before 5.1's
    ``transaction_mode``) a writer that read first cannot upgrade its lock while another writer
    holds it, and SQLite refuses at once; in ``IMMEDIATE`` mode the writer waited its
    ``timeout`` out. Either way nothing was written."""
    try:
        yield
    except OperationalError as exc:
        if "database is locked" not in str(exc):
            raise
        connection = connections[using]
        options = connection.settings_dict.get("OPTIONS") or {}
        mode = str(options.get("transaction_mode") or "DEFERRED").upper()
        if getattr(connection, "begins_immediate", False):  # the Django 4.2 recipe's backend
            mode = "IMMEDIATE"
        raise DatabaseLockedError(
            encounter_pk,
            database=using,
            transaction_mode=mode,
            timeout=options.get("timeout"),
            detail=str(exc),
        ) from exc


def _is_sequence_clash(exc: IntegrityError) -> bool:
    constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
    if constraint:
        return bool(constraint == SEQUENCE_CONSTRAINT)
    text = str(exc).lower()
    return "unique" in text and "sequence" in text
