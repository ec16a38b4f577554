"""Plain helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from django.db import connection, transaction

TEST_DB = os.environ.get("ENCOUNTERS_TEST_DB", "sqlite")
#: PostgreSQL, plain or with Citus (the coordinator of a cluster, the tables distributed).
IS_POSTGRES = TEST_DB in ("postgres", "citus")
IS_CITUS = TEST_DB == "citus"

#: Where the browser tests saved their screenshots, printed at the end of the run.
SCREENSHOTS: pytest.StashKey[Any] = pytest.StashKey()

# Transaction-control statements that CaptureQueriesContext may record and that do not count
# as "work" (Django logs savepoints; SQLite in IMMEDIATE mode also logs its BEGIN).
_CONTROL_PREFIXES = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "START TRANSACTION")


def work_queries(captured: Any) -> list[str]:
    """The SQL of a ``CaptureQueriesContext`` without transaction-control statements."""
    sql = [q["sql"] for q in captured.captured_queries]
    return [s for s in sql if not s.lstrip().upper().startswith(_CONTROL_PREFIXES)]


def table(model: Any) -> str:
    return model._meta.db_table


@dataclass(frozen=True)
class Snapshot:
    """Everything a refused write must leave untouched, read fresh from the database."""

    row_count: int
    sequences: tuple[int, ...]
    state: str
    version: int
    origin_state: str
    timeline_end_at: datetime | None
    head_hash: Any
    ended_at: datetime | None
    updated_at: datetime


def snapshot(encounter: Any) -> Snapshot:
    from django_encounters.models import Encounter, EncounterTransition

    fresh = Encounter.all_objects.get(pk=encounter.pk)
    rows = EncounterTransition.objects.filter(encounter_id=encounter.pk).order_by("sequence")
    return Snapshot(
        row_count=rows.count(),
        sequences=tuple(rows.values_list("sequence", flat=True)),
        state=fresh.state,
        version=fresh.version,
        origin_state=fresh.origin_state,
        timeline_end_at=fresh.timeline_end_at,
        head_hash=fresh.head_hash,
        ended_at=fresh.ended_at,
        updated_at=fresh.updated_at,
    )


def reload(instance: Any) -> Any:
    """A fresh copy of ``instance`` from the database (soft-deleted rows included)."""
    model = type(instance)
    manager = getattr(model, "all_objects", model._default_manager)
    return manager.get(pk=instance.pk)


def vendor() -> str:
    return connection.vendor


# ---------------------------------------------------------------------------------------------
# A second connection holding an encounter's row lock (PostgreSQL concurrency tests).
# ---------------------------------------------------------------------------------------------

HOLD_SECONDS = 1.0


class RowLockHolder(threading.Thread):
    """In its own thread (so with its own database connection): lock the encounter row with
    ``select_for_update()``, run ``action(locked_encounter)`` inside the same transaction, set
    ``locked``, then hold the lock until ``release`` is set (at most 15 s) and commit.

    Errors are kept in ``error`` for the main thread; the thread's connection is closed at the
    end.
    """

    def __init__(self, encounter_pk: Any, action: Callable[[Any], Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.encounter_pk = encounter_pk
        self.action = action
        self.locked = threading.Event()
        self.release = threading.Event()
        self.committed_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from django.db import transaction

        from django_encounters.models import Encounter

        try:
            with transaction.atomic():
                locked = Encounter.objects.select_for_update().get(pk=self.encounter_pk)
                if self.action is not None:
                    self.action(locked)
                self.locked.set()
                self.release.wait(15)
                # Stamped just before COMMIT: the lock is released during COMMIT, so a waiter
                # may finish before a stamp taken after it.
                self.committed_at = time.monotonic()
        except BaseException as exc:  # reported to the main thread
            self.error = exc
        finally:
            self.locked.set()
            connection.close()


def run_in_threads(count: int, work: Callable[[int], Any], timeout: float = 60) -> list[Any]:
    """Run ``work(i)`` for i in range(count), each in its own thread (own connection), all
    released at once by a barrier. Returns each thread's result or the exception it raised."""
    barrier = threading.Barrier(count, timeout=timeout)
    results: list[Any] = [None] * count

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} thread(s) still running after {timeout}s"
    return results


def insert_row_raw(encounter, **fields):
    """Insert a transition row with plain SQL, below the library: no numbering check and no
    projection update (what a careless import script or another client would do). Unless the
    fields say otherwise the row is what the library would have stored — times at the stored
    precision, the encounter's pinned definition version, hashed against the previous row's
    hash (row 1: the genesis hash) — so only what the test means to break is broken."""
    from django_encounters.engine import stored_precision
    from django_encounters.models import Encounter, EncounterTransition

    fresh = Encounter.all_objects.get(pk=encounter.pk)
    meta = EncounterTransition._meta
    qn = connection.ops.quote_name
    row = EncounterTransition(encounter=fresh, **fields)
    row.effective_at = stored_precision(row.effective_at)
    row.transitioned_at = stored_precision(row.transitioned_at)
    if not row.definition_version:
        row.definition_version = fresh.definition_version
    if not row.hash:
        previous = (
            EncounterTransition.objects.filter(encounter=fresh, sequence=row.sequence - 1)
            .values_list("hash", flat=True)
            .first()
        )
        row.hash = row.compute_hash(previous if row.sequence > 1 else fresh.genesis_hash)
    columns = list(meta.concrete_fields)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})",
            [f.get_db_prep_save(getattr(row, f.attname), connection) for f in columns],
        )
    return row


def run_command(name: str, *args: str) -> tuple[int, str, str]:
    """Run a management command; (exit status, stdout, stderr) as the shell would see them."""
    import io

    from django.core.management import call_command
    from django.core.management.base import CommandError

    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(name, *args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        code = exc.returncode
        err.write(f"CommandError: {exc}\n")
    return code, out.getvalue(), err.getvalue()


def write_machine_raw(definition: Any, **fields: Any) -> None:
    """Write machine fields (``states``, ``transitions``, ``validators``, …) of ``definition``
    with plain SQL, around ``clean()`` and the versioning, as a migration or someone with
    database rights could: both the definition row and its latest version row, so that the
    encounters pinned to that version are decided and validated by what was written.

    Issue 8: rules and validators come from the encounter's pinned, immutable definition
    version (its queryset refuses ``update()`` and database triggers refuse an UPDATE), so a
    raw UPDATE of the definition alone no longer changes them; the version table's triggers
    are set aside for this one statement (rolled back with the test anyway)."""
    from django_encounters.models import EncounterDefinition, EncounterDefinitionVersion

    qn = connection.ops.quote_name
    number = (
        EncounterDefinition.all_objects.filter(pk=definition.pk)
        .values_list("version", flat=True)
        .get()
    )
    targets = [
        (EncounterDefinition, [("id", definition.pk)]),
        (EncounterDefinitionVersion, [("definition", definition.pk), ("number", number)]),
    ]
    for model, keys in targets:
        meta = model._meta
        columns = [meta.get_field(name) for name in fields]
        where = [meta.get_field(name) for name, _ in keys]
        append_only = model is EncounterDefinitionVersion  # the definition row has no triggers
        with triggers_off(meta.db_table) if append_only else connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {qn(meta.db_table)} "
                f"SET {', '.join(f'{qn(f.column)} = %s' for f in columns)} "
                f"WHERE {' AND '.join(f'{qn(f.column)} = %s' for f in where)}",
                [f.get_db_prep_save(fields[f.name], connection) for f in columns]
                + [
                    f.get_db_prep_value(value, connection)
                    for f, (_, value) in zip(where, keys, strict=True)
                ],
            )
            assert cursor.rowcount == 1, (model, keys)
    for name, value in fields.items():  # the caller's instance shows what was written
        setattr(definition, name, value)


def recording_moment() -> datetime:
    """A system time between the rows recorded so far and the rows recorded from now on.

    Issue 8 stores ``transitioned_at`` at millisecond precision and makes it strictly
    increasing per encounter (``max(clock, previous + 1 ms)``), so a bare ``timezone.now()``
    taken between two transitions may be earlier than the row before it, or not earlier than
    the row after it. This returns the latest of now and every stored ``transitioned_at``,
    then waits until the clock has passed that millisecond, so every later row is recorded
    after it."""
    from datetime import timedelta

    from django.db.models import Max
    from django.utils import timezone

    from django_encounters.engine import stored_precision
    from django_encounters.models import EncounterTransition

    latest = EncounterTransition.objects.aggregate(latest=Max("transitioned_at"))["latest"]
    moment = timezone.now() if latest is None else max(timezone.now(), latest)
    assert moment - timezone.now() < timedelta(seconds=1), f"a row is recorded at {latest}"
    while stored_precision(timezone.now()) <= moment:
        time.sleep(0.0005)
    return moment


# ---------------------------------------------------------------------------------------------
# What someone with write access to the database does behind the library: raw SQL, triggers set
# aside (all of it rolled back with the test).
# ---------------------------------------------------------------------------------------------


def raw_update(model: Any, pk: Any, **columns: Any) -> None:
    """UPDATE the row of ``model`` whose primary key is ``pk`` with raw SQL, behind the ORM
    (which refuses the projection and genesis columns since issue 8): what psql or a script
    with write access does. The table's triggers still fire; see ``triggers_off``."""
    qn = connection.ops.quote_name
    meta = model._meta
    fields = [meta.get_field(name) for name in columns]
    assignments = ", ".join(f"{qn(f.column)} = %s" for f in fields)
    params = [f.get_db_prep_save(columns[f.name], connection) for f in fields]
    params.append(meta.pk.get_db_prep_value(pk, connection))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {qn(meta.db_table)} SET {assignments} WHERE {qn(meta.pk.column)} = %s",
            params,
        )


@contextmanager
def triggers_off(table: str | None = None) -> Iterator[Any]:
    """A cursor with the user triggers of ``table`` (default: the transition log) out of the
    way, as an attacker with DDL rights sets them aside first; they are back on exit.

    Citus: ``session_replication_role = replica`` for the transaction, on every node.
    PostgreSQL: ``SET CONSTRAINTS ALL IMMEDIATE`` (ALTER TABLE refuses a table with pending
    deferred trigger events, such as the foreign-key checks of the test's own inserts), then
    ``ALTER TABLE … DISABLE TRIGGER USER``; on exit ``ENABLE TRIGGER USER`` and ``SET
    CONSTRAINTS ALL DEFERRED``, so Django's foreign keys (DEFERRABLE INITIALLY DEFERRED) are
    deferred again for the rest of the transaction.
    SQLite: the table's triggers are read from ``sqlite_master`` (there must be some) and
    dropped; on exit they are re-created from their SQL."""
    from django_encounters.models import EncounterTransition

    table = table or EncounterTransition._meta.db_table
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        if IS_CITUS:
            # The shards' deferred foreign-key events live in the workers' sessions, where
            # ALTER TABLE would refuse them: set the user triggers aside for this transaction
            # with session_replication_role instead, on every node it touches (a transaction
            # of its own in autocommit mode, where SET LOCAL would not last).
            with transaction.atomic():
                cursor.execute("SET LOCAL citus.propagate_set_commands TO 'local'")
                cursor.execute("SET LOCAL session_replication_role TO replica")
                try:
                    yield cursor
                finally:
                    cursor.execute("SET LOCAL session_replication_role TO origin")
        elif connection.vendor == "postgresql":
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute(f"ALTER TABLE {qn(table)} DISABLE TRIGGER USER")
            try:
                yield cursor
            finally:
                cursor.execute(f"ALTER TABLE {qn(table)} ENABLE TRIGGER USER")
                cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        else:
            cursor.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = %s",
                [table],
            )
            saved = cursor.fetchall()
            assert saved, f"no triggers on {table}"
            for name, _ in saved:
                cursor.execute(f"DROP TRIGGER {qn(name)}")
            try:
                yield cursor
            finally:
                for _, sql in saved:
                    cursor.execute(sql)


def _row_pk(encounter: Any, sequence: int) -> Any:
    from django_encounters.models import EncounterTransition

    return EncounterTransition.objects.get(encounter_id=encounter.pk, sequence=sequence).pk


def rewrite_row(encounter: Any, sequence: int, **columns: Any) -> None:
    """UPDATE the content of the encounter's row ``sequence`` behind the triggers (its stored
    hash is left as it was unless ``columns`` sets it)."""
    from django_encounters.models import EncounterTransition

    with triggers_off():
        raw_update(EncounterTransition, _row_pk(encounter, sequence), **columns)


def version_hash_of(encounter: Any, number: int | None = None) -> str:
    """The stored content hash of version ``number`` (default: the one the encounter was
    created under) of the encounter's definition: what its v3 hashes commit to."""
    from django_encounters.models import EncounterDefinitionVersion

    number = encounter.origin_version if number is None else number
    return (
        EncounterDefinitionVersion.objects.filter(
            definition_id=encounter.definition_id, number=number
        )
        .values_list("content_hash", flat=True)
        .get()
    )


def rehash_from(encounter: Any, sequence: int) -> None:
    """Recompute the stored hash of every row from ``sequence`` on, each chained to the one
    before (row 1 to the stored genesis hash), behind the triggers."""
    from django_encounters import store
    from django_encounters.engine import row_hash
    from django_encounters.models import Encounter, EncounterTransition

    fresh = Encounter.all_objects.get(pk=encounter.pk)
    rows = store.load_stream(encounter.pk, "default")
    previous = fresh.genesis_hash if sequence == 1 else rows[sequence - 2].hash
    with triggers_off():
        for row in rows[sequence - 1 :]:
            version = version_hash_of(fresh, row.definition_version)
            previous = row_hash(str(encounter.pk), row, previous, version)
            raw_update(EncounterTransition, _row_pk(encounter, row.sequence), hash=previous)


def forge_projection(encounter: Any) -> None:
    """Set every projection column to what the log (as it now is) replays to."""
    from django_encounters import store
    from django_encounters.models import Encounter

    fresh = Encounter.all_objects.get(pk=encounter.pk)
    timeline = store.load_timeline(fresh, "default")
    raw_update(Encounter, encounter.pk, **store.projection_of(timeline))


def delete_rows(encounter: Any, *sequences: int) -> None:
    """DELETE the encounter's rows ``sequences`` from the log behind the triggers."""
    from django_encounters.models import EncounterTransition

    meta = EncounterTransition._meta
    key = meta.get_field("encounter").get_db_prep_value(encounter.pk, connection)
    qn = connection.ops.quote_name
    with triggers_off() as cursor:
        for sequence in sequences:
            cursor.execute(
                f"DELETE FROM {qn(meta.db_table)} WHERE {qn('encounter_id')} = %s "
                f"AND {qn('sequence')} = %s",
                [key, sequence],
            )


def delete_encounter(encounter: Any) -> None:
    """Delete an encounter and its whole log behind the triggers."""
    from django_encounters.models import Encounter, EncounterTransition

    rows = EncounterTransition.objects.filter(encounter_id=encounter.pk)
    delete_rows(encounter, *rows.values_list("sequence", flat=True))
    meta = Encounter._meta
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {qn(meta.db_table)} WHERE {qn(meta.pk.column)} = %s",
            [meta.pk.get_db_prep_value(encounter.pk, connection)],
        )


def child_env(db_file: Any = None) -> dict[str, str]:
    """The environment of a child process (``python -m django …``) that uses the test
    database: the PostgreSQL test database, or the SQLite file ``db_file``."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), DJANGO_SETTINGS_MODULE="tests.settings")
    if IS_POSTGRES:
        env.update(ENCOUNTERS_TEST_DB=TEST_DB, PGDATABASE=connection.settings_dict["NAME"])
    else:
        env.update(ENCOUNTERS_TEST_DB="sqlite", ENCOUNTERS_SQLITE_PATH=str(db_file))
    return env


# ---------------------------------------------------------------------------------------------
# Hash format v2, written again from its documentation (engine/hashing.py, docs/concepts.md)
# and not from the engine's code: the property tests compare the two.
# ---------------------------------------------------------------------------------------------


def _reference_text(value: Any) -> str:
    text = str(value)
    return f"{len(text)}:{text}"


def _reference_micros(value: datetime) -> int:
    import calendar

    return calendar.timegm(value.utctimetuple()) * 1_000_000 + value.microsecond


def _reference_digest(fields: list[Any]) -> str:
    import hashlib

    payload = "|".join(str(f) for f in fields)
    return "v2:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def reference_row_hash(
    encounter_id: Any,
    sequence: int,
    from_state: str,
    to_state: str,
    effective_at: datetime,
    transitioned_at: datetime,
    transitioned_by: Any,
    reason: str | None,
    metadata: Any,
    definition_version: int,
    previous_hash: str | None,
) -> str:
    import json

    from django_encounters.engine import canonical_json

    meta = json.dumps(
        canonical_json({} if metadata is None else metadata),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return _reference_digest(
        [
            "v2",
            "row",
            _reference_text(encounter_id),
            int(sequence),
            _reference_text(from_state),
            _reference_text(to_state),
            _reference_micros(effective_at),
            _reference_micros(transitioned_at),
            _reference_text("" if transitioned_by is None else transitioned_by),
            _reference_text(reason or ""),
            _reference_text(meta),
            int(definition_version),
            _reference_text(previous_hash or ""),
        ]
    )


def reference_genesis_hash(
    encounter_id: Any,
    definition_id: Any,
    definition_version: int,
    subject_type: str,
    subject_id: Any,
    origin_state: str,
    created_at: datetime,
) -> str:
    return _reference_digest(
        [
            "v2",
            "genesis",
            _reference_text(encounter_id),
            _reference_text(definition_id),
            int(definition_version),
            _reference_text(subject_type),
            _reference_text(subject_id),
            _reference_text(origin_state),
            _reference_micros(created_at),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Seals (issue 19)
# ---------------------------------------------------------------------------------------------

#: Seal keys for the tests (each secret 40 bytes).
SEAL_KEYS = {"k1": "k1-secret-" + "x" * 30, "k2": "k2-secret-" + "y" * 30}


def seal_everything(using: str = "default") -> None:
    """Seal every transition row, genesis, definition version and acknowledgement that has a
    hash under the configured current key, with raw ``UPDATE … SET seal`` (which the
    append-only triggers allow), re-sealing what is sealed otherwise; a version with no content
    hash gets a stand-in one first (its empty ``content_hash`` may be set once). Unlike
    ``manage.py seal_encounters`` it verifies nothing first: the tests that check seals use it
    to seal a log in a known state, tampered or not."""
    from django.db import connections

    from django_encounters import conf
    from django_encounters.models import (
        AnomalyAcknowledgement,
        Encounter,
        EncounterDefinitionVersion,
        EncounterTransition,
    )

    sealer = conf.sealer()
    assert sealer is not None and sealer.sealing, "configure ENCOUNTERS_SEAL_KEYS first"
    db = connections[using]
    qn = db.ops.quote_name
    records = (
        (EncounterTransition, "row", "hash", "seal"),
        (Encounter, "genesis", "genesis_hash", "genesis_seal"),
        (EncounterDefinitionVersion, "version", "content_hash", "seal"),
        (AnomalyAcknowledgement, "acknowledgement", "hash", "seal"),
    )
    with db.cursor() as cursor:
        for model, tag, hashed, sealed in records:
            table, pk = qn(model._meta.db_table), model._meta.pk
            rows = model._base_manager.using(using).values_list("pk", hashed, sealed)
            for key, digest, seal in rows:
                where = pk.get_db_prep_value(key, db)
                if not digest and model is EncounterDefinitionVersion:
                    digest = f"test:{key}"
                    cursor.execute(
                        f"UPDATE {table} SET {qn(hashed)} = %s WHERE {qn(pk.column)} = %s",
                        [digest, where],
                    )
                # (only when it changes: PostgreSQL's trigger refuses a no-op UPDATE)
                if digest and sealer.seal(tag, digest) != seal:
                    cursor.execute(
                        f"UPDATE {table} SET {qn(sealed)} = %s WHERE {qn(pk.column)} = %s",
                        [sealer.seal(tag, digest), where],
                    )


def plain_audit_is_clean() -> bool:
    """What the hash chain alone says: no anomaly in any stream, no drift."""
    from django_encounters.projections.audit import audit_encounters
    from django_encounters.projections.rebuild import rebuild_projections

    report = audit_encounters()
    check = rebuild_projections(check=True)
    return report.anomaly_count == 0 and check.ok and check.projections_drifted == 0


def audit_against(path: Any, *args: str) -> tuple[int, dict, str]:
    """``audit_encounters --against PATH --format json ARGS``: (exit status, the report, stderr)."""
    import json

    code, out, err = run_command(
        "audit_encounters", "--against", str(path), "--format", "json", *args
    )
    return code, (json.loads(out) if out else {}), err


# ---------------------------------------------------------------------------------------------
# The admin's pages, as the test client reaches them
# ---------------------------------------------------------------------------------------------


def change_url(encounter: Any) -> str:
    from django.urls import reverse

    return reverse("admin:django_encounters_encounter_change", args=[encounter.pk])


def transition_url(encounter: Any) -> str:
    from django.urls import reverse

    return reverse("admin:django_encounters_encounter_transition", args=[encounter.pk])


def changelist_url() -> str:
    from django.urls import reverse

    return reverse("admin:django_encounters_encounter_changelist")


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []
