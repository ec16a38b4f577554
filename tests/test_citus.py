"""The store on a real Citus cluster (a coordinator and two workers, ``make test-citus``): where
an encounter's rows live, how its statements are routed, and that the append-only guard holds
on the workers' shards themselves, not only through the coordinator.

The whole suite runs on the cluster too (``ENCOUNTERS_TEST_DB=citus``); this module checks what
only a sharded store has. ``distribute_encounters`` itself (plan, ``--check``, idempotence, the
refusals) is tested on every database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.contrib.auth import get_user_model
from django.db import NotSupportedError, connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from django_encounters.models import (
    AnomalyAcknowledgement,
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    transition,
)
from django_encounters.store import distribution, sharding
from tests.conftest import visit_definition_kwargs
from tests.helpers import IS_CITUS, run_command, work_queries

citus_only = pytest.mark.skipif(not IS_CITUS, reason="needs the Citus cluster (make test-citus)")

ENCOUNTERS = Encounter._meta.db_table
TRANSITIONS = EncounterTransition._meta.db_table


def _one(sql: str, params: list[Any] | None = None) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return cursor.fetchall()


def _shard_of(table: str, encounter_id: Any) -> tuple[int, str, int]:
    """``(shard id, worker host, worker port)`` holding ``encounter_id``'s rows of ``table``."""
    [(shard,)] = _one(
        "SELECT get_shard_id_for_distribution_column(%s, %s::uuid)", [table, str(encounter_id)]
    )
    [(host, port)] = _one("SELECT nodename, nodeport FROM citus_shards WHERE shardid = %s", [shard])
    return shard, host, port


def _workers() -> list[tuple[str, int]]:
    return _one(
        "SELECT nodename, nodeport FROM pg_dist_node WHERE groupid > 0 AND noderole = 'primary' "
        "ORDER BY nodeport"
    )


@contextmanager
def _on_worker(host: str, port: int) -> Iterator[Any]:
    """A connection of our own straight to a worker (autocommit), as its administrator has."""
    settings = connection.settings_dict
    with psycopg.connect(
        host=host,
        port=port,
        user=settings["USER"],
        password=settings["PASSWORD"] or None,
        dbname=settings["NAME"],
        autocommit=True,
    ) as worker:
        # Citus hides shard tables from catalog queries of ordinary clients; show them.
        worker.execute("SET citus.override_table_visibility TO off")
        yield worker


# --- the layout -------------------------------------------------------------------------------


@citus_only
@pytest.mark.django_db
def test_the_tables_are_distributed_as_the_store_needs() -> None:
    from django.contrib.auth.models import User
    from django.contrib.contenttypes.models import ContentType

    found = dict(
        _one(
            "SELECT table_name::text, citus_table_type || ':' || distribution_column "
            "FROM citus_tables"
        )
    )
    assert found[ENCOUNTERS] == "distributed:id"
    assert found[TRANSITIONS] == "distributed:encounter_id"
    assert found[AnomalyAcknowledgement._meta.db_table] == "distributed:encounter_id"
    for model in (EncounterDefinition, EncounterDefinitionVersion, User, ContentType):
        assert found[model._meta.db_table] == "reference:<none>", model
    # One colocation group: an encounter's rows are on its shard's node.
    colocations = _one(
        "SELECT DISTINCT colocation_id FROM citus_tables WHERE table_name::text = ANY(%s)",
        [[ENCOUNTERS, TRANSITIONS, AnomalyAcknowledgement._meta.db_table]],
    )
    assert len(colocations) == 1
    assert len(_workers()) == 2


@citus_only
@pytest.mark.django_db
def test_distribute_encounters_is_idempotent_and_check_finds_nothing_left() -> None:
    code, out, err = run_command("distribute_encounters", "--check")
    assert code == 0, err
    assert "nothing to do" in out
    assert "in place: django_encounters_encounter: distributed by id" in out
    assert distribution.plan("default").done
    assert sharding.is_sharded(connections["default"])


@pytest.mark.skipif(IS_CITUS, reason="the refusal without Citus")
@pytest.mark.django_db
def test_distribute_encounters_refuses_a_database_without_citus() -> None:
    code, out, err = run_command("distribute_encounters", "--check")
    assert code == 2
    assert "has no Citus extension" in err
    assert "CREATE EXTENSION citus" in err
    with pytest.raises(distribution.DistributionError, match="no Citus extension"):
        distribution.plan("default")
    assert not sharding.is_sharded(connections["default"])


# --- where the rows live -----------------------------------------------------------------------


@citus_only
@pytest.mark.django_db(transaction=True)
def test_an_encounters_rows_live_on_one_shard_on_the_worker_that_owns_it(
    visit_definition: Any, patient: Any
) -> None:
    encounters = [create_encounter(visit_definition, patient) for _ in range(12)]
    for encounter in encounters:
        transition(encounter, "checked_in")
        transition(encounter, "in_progress")
    owners = set()
    for encounter in encounters:
        shard, host, port = _shard_of(ENCOUNTERS, encounter.pk)
        row_shard, row_host, row_port = _shard_of(TRANSITIONS, encounter.pk)
        assert (row_host, row_port) == (host, port)
        owners.add(port)
        for worker_host, worker_port in _workers():
            with _on_worker(worker_host, worker_port) as worker:
                [(here,)] = (
                    worker.execute(
                        f"SELECT count(*) FROM {TRANSITIONS}_{row_shard} WHERE encounter_id = %s",
                        [encounter.pk],
                    ).fetchall()
                    if worker_port == row_port
                    else [(None,)]
                )
                elsewhere = worker.execute(
                    "SELECT count(*) FROM pg_class WHERE relname = %s",
                    [f"{TRANSITIONS}_{row_shard}"],
                ).fetchone()[0]
            if worker_port == row_port:
                assert here == 2  # both rows, on the shard named for the encounter
                assert elsewhere == 1
            else:
                assert elsewhere == 0  # the shard is not on the other worker at all
    assert len(owners) == 2, "12 encounters over 2 workers: both hold some"


# --- how statements are routed ------------------------------------------------------------------


def _tasks(sql: str) -> int:
    """The number of tasks Citus plans for ``sql`` (EXPLAIN, not run)."""
    plan = "\n".join(row[0] for row in _one(f"EXPLAIN {sql}"))
    counts = [line.split(":")[1].strip() for line in plan.splitlines() if "Task Count" in line]
    assert counts, plan
    return max(int(c) for c in counts)


@citus_only
@pytest.mark.django_db
def test_a_transition_is_three_single_shard_statements(visit_definition: Any, patient: Any) -> None:
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    with CaptureQueriesContext(connection) as captured:
        transition(encounter, "in_progress", reason="routed")
    statements = work_queries(captured)
    assert len(statements) == 3  # lock, insert, projection update
    assert statements[0].lstrip().startswith("SELECT")
    assert statements[1].lstrip().startswith("INSERT")
    assert statements[2].lstrip().startswith("UPDATE")
    for sql in statements:
        assert _tasks(sql) == 1, sql


@citus_only
@pytest.mark.django_db
def test_reads_of_one_encounter_are_single_shard(visit_definition: Any, patient: Any) -> None:
    from django.utils import timezone

    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    for read in (
        lambda: get_state_at(encounter, timezone.now()),
        lambda: get_state_at(encounter, timezone.now(), known_at=timezone.now()),
        lambda: list(get_encounter_history(encounter)),
    ):
        with CaptureQueriesContext(connection) as captured:
            read()
        [sql] = work_queries(captured)
        assert _tasks(sql) == 1, sql


# --- the guard on the shards themselves -----------------------------------------------------------


@citus_only
@pytest.mark.django_db(transaction=True)
def test_the_append_only_triggers_refuse_changes_on_a_workers_shard(
    visit_definition: Any, patient: Any
) -> None:
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", reason="arrived")
    shard, host, port = _shard_of(TRANSITIONS, encounter.pk)
    shard_table = f"{TRANSITIONS}_{shard}"
    with _on_worker(host, port) as worker:
        for sql in (
            f"UPDATE {shard_table} SET reason = 'rewritten' WHERE encounter_id = %s",
            f"DELETE FROM {shard_table} WHERE encounter_id = %s",
        ):
            with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
                worker.execute(sql, [encounter.pk])
        [(reason,)] = worker.execute(
            f"SELECT reason FROM {shard_table} WHERE encounter_id = %s", [encounter.pk]
        ).fetchall()
    assert reason == "arrived"
    [row] = get_encounter_history(encounter)
    assert row.reason == "arrived"


@citus_only
@pytest.mark.django_db(transaction=True)
def test_a_rebuild_locks_each_encounter_on_its_own_shard(
    visit_definition: Any, patient: Any
) -> None:
    """A multi-shard ``SELECT … FOR UPDATE`` is refused by Citus: the rebuild locks a batch
    with one statement per shard, each routed to that shard."""
    from django_encounters.projections.rebuild import rebuild_projections

    encounters = [create_encounter(visit_definition, patient) for _ in range(8)]
    for encounter in encounters:
        transition(encounter, "checked_in")
    with CaptureQueriesContext(connection) as captured:
        result = rebuild_projections(batch_size=10)
    assert result.ok and result.encounters_scanned == 8
    [lock] = [q["sql"] for q in captured.captured_queries if "FOR UPDATE" in q["sql"]]
    # One executemany (logged as "N times: <sql>"): one statement per shard holding some of
    # the batch's encounters, each routed to that shard alone.
    times, sql = lock.split(" times: ", 1)
    shards: dict[int, list[str]] = {}
    for encounter in encounters:
        shards.setdefault(_shard_of(ENCOUNTERS, encounter.pk)[0], []).append(str(encounter.pk))
    assert int(times) == len(shards) > 1
    for ids in shards.values():
        assert _tasks(sql.replace("%s", f"ARRAY{ids}")) == 1
    # What it avoids: the same lock over encounters of several shards is refused.
    everyone = [str(e.pk) for e in encounters]
    with pytest.raises(NotSupportedError, match="FOR UPDATE"), transaction.atomic():
        _one(sql.replace("%s", f"ARRAY{everyone}"))


# --- distribute_encounters from scratch, on a database of its own ------------------------------


@citus_only
@pytest.mark.django_db(databases=["default", "replica"])
def test_distribute_encounters_from_scratch_refuses_a_foreign_table_then_distributes() -> None:
    """The ``replica`` alias is a plain database on the coordinator (migrated, not distributed).
    Inside this test's transaction, rolled back at the end: Citus is enabled there with the
    coordinator as its only node; a table of the user's app referencing the encounters makes the
    plan refuse, naming the key; without it, the plan distributes everything, and then there is
    nothing left to do."""
    replica = connections["replica"]
    try:
        _distribute_from_scratch(replica)
    finally:  # rolled back with the test: what was learnt of the layout no longer holds
        sharding.forget(replica)


def _distribute_from_scratch(replica: Any) -> None:
    settings = replica.settings_dict
    with replica.cursor() as cursor:
        cursor.execute("CREATE EXTENSION IF NOT EXISTS citus")
        node = [settings["HOST"] or "127.0.0.1", int(settings["PORT"])]
        cursor.execute("SELECT citus_set_coordinator_host(%s, %s)", node)
        # No workers in this database: the coordinator holds the shards itself.
        cursor.execute("SELECT citus_set_node_property(%s, %s, 'shouldhaveshards', true)", node)
        cursor.execute(
            f"CREATE TABLE my_follow_ups (id serial PRIMARY KEY, "
            f"encounter_id uuid CONSTRAINT my_follow_ups_encounter REFERENCES {ENCOUNTERS}(id))"
        )
    with pytest.raises(distribution.DistributionError, match="my_follow_ups_encounter"):
        distribution.plan("replica")
    with replica.cursor() as cursor:
        cursor.execute("DROP TABLE my_follow_ups")
    # An installation that already has users and definitions: after the move they get new ones.
    users = get_user_model().objects.db_manager("replica")
    users.create(username="before-the-move")
    EncounterDefinition.objects.using("replica").create(
        **visit_definition_kwargs(name="Before", code="BEFORE")
    )
    with replica.cursor() as cursor:  # the deferred foreign key checks, before any ALTER TABLE
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

    layout = distribution.plan("replica")
    assert not layout.done
    descriptions = [step.description for step in layout.steps]
    assert descriptions[0].startswith("drop the package's")
    assert descriptions[-1].startswith("put the")
    assert any("widen the primary key" in d for d in descriptions)
    distribution.apply(layout)
    assert distribution.plan("replica").done
    assert sharding.is_sharded(replica)
    with replica.cursor() as cursor:
        cursor.execute(
            "SELECT logicalrelid::text, partmethod FROM pg_dist_partition "
            "WHERE logicalrelid::text = ANY(%s)",
            [[ENCOUNTERS, TRANSITIONS]],
        )
        found = dict(cursor.fetchall())
    assert found == {ENCOUNTERS: "h", TRANSITIONS: "h"}
    # The reference tables' own id sequences go on after the rows they already hold.
    users.create(username="after-the-move")
    EncounterDefinition.objects.using("replica").create(
        **visit_definition_kwargs(name="After", code="AFTER")
    )
    assert sorted(users.values_list("username", flat=True)) == [
        "after-the-move",
        "before-the-move",
    ]


@citus_only
@pytest.mark.django_db(transaction=True)
def test_a_rebuild_writes_each_shards_projections_with_one_routed_statement(
    visit_definition: Any, patient: Any
) -> None:
    """The batch write is one ``UPDATE`` per shard (one pipeline), each pruned to its shard by
    the list of its ids, not one multi-shard ``UPDATE … FROM unnest()``."""
    from django_encounters.projections.rebuild import rebuild_projections

    encounters = [create_encounter(visit_definition, patient) for _ in range(12)]
    for encounter in encounters:
        transition(encounter, "checked_in")
    with connection.cursor() as cursor:  # every projection drifted
        cursor.execute(f"UPDATE {ENCOUNTERS} SET state = 'cancelled'")
    shards: dict[int, set[str]] = {}
    for encounter in encounters:
        shards.setdefault(_shard_of(ENCOUNTERS, encounter.pk)[0], set()).add(str(encounter.pk))
    # Every position once, each group on one shard.
    pks = [e.pk for e in encounters]
    groups = sharding.shard_groups("default", pks)
    assert sorted(i for group in groups for i in group) == list(range(len(pks)))
    assert sorted(map(sorted, ({str(pks[i]) for i in g} for g in groups))) == sorted(
        map(sorted, shards.values())
    )
    with CaptureQueriesContext(connection) as captured:
        result = rebuild_projections(batch_size=20)
    assert result.ok and result.projections_fixed == 12
    table = connection.ops.quote_name(ENCOUNTERS)
    [write] = [q["sql"] for q in captured.captured_queries if f"UPDATE {table}" in q["sql"]]
    times, sql = write.split(" times: ", 1)
    assert int(times) == len(shards) > 1 and "= ANY(" in sql
    assert set(Encounter.all_objects.values_list("state", flat=True)) == {"checked_in"}
    assert rebuild_projections(check=True).projections_drifted == 0


@citus_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("guess", ["learnt", "far too narrow", "far too wide"])
def test_a_rebuild_claims_exactly_the_next_batch_whatever_its_guess_of_the_ids(
    visit_definition: Any, patient: Any, guess: str
) -> None:
    """The claim bounds its read of a batch's ids above by an id guessed from how dense the
    ids were so far. Whether the guess leaves too few ids (the rest is read past it) or far too
    many (the limit cuts), each batch is exactly the next ``batch_size`` encounters in primary-key
    order, their rows as the ORM reads them, and locked (one routed statement per shard)."""
    encounters = [create_encounter(visit_definition, patient) for _ in range(23)]
    transition(encounters[0], "checked_in")
    columns = ("id", "state", "version", "head_hash", "created_at", "deleted_at")
    query = Encounter.all_objects.order_by("pk").values_list(*columns)
    expected = list(query)
    batches: list[list[tuple]] = []
    with transaction.atomic():
        claims = sharding.Claims(query, 5)
        after = None
        while True:
            if guess == "far too narrow" and claims.density:
                claims.density *= 1e6  # a bound just above the last id: nearly nothing in it
            elif guess == "far too wide" and claims.density:
                claims.density /= 1e6  # every id below the bound: the limit cuts
            with CaptureQueriesContext(connection) as captured:
                batch = claims.claim(after)
            if not batch:
                break
            batches.append(batch)
            after = batch[-1][0]
            [lock] = [q["sql"] for q in captured.captured_queries if "FOR UPDATE" in q["sql"]]
            assert int(lock.split(" times: ", 1)[0]) == len(
                {_shard_of(ENCOUNTERS, row[0])[0] for row in batch}
            )
            reads = [q["sql"] for q in captured.captured_queries if '"pk" FROM' in q["sql"]]
            if len(batches) > 1:
                assert "<=" in reads[0]  # bounded by the guess
            if len(batches) > 1 and guess == "far too narrow" and len(batch) == 5:
                assert len(reads) == 2  # the rest read past the bound
    assert [len(batch) for batch in batches] == [5, 5, 5, 5, 3]
    assert [row for batch in batches for row in batch] == expected


@citus_only
@pytest.mark.django_db(transaction=True)
def test_a_rebuild_groups_each_batch_by_shard_once(visit_definition: Any, patient: Any) -> None:
    """The batch's write reuses the shard groups of its claim: Citus's hash function is asked
    once per batch, by the claim."""
    from django_encounters.projections.rebuild import rebuild_projections

    encounters = [create_encounter(visit_definition, patient) for _ in range(9)]
    for encounter in encounters:
        transition(encounter, "checked_in")
    with connection.cursor() as cursor:  # every projection drifted
        cursor.execute(f"UPDATE {ENCOUNTERS} SET state = 'cancelled'")
    with CaptureQueriesContext(connection) as captured:
        result = rebuild_projections(batch_size=4)
    assert result.ok and result.projections_fixed == 9
    sqls = [q["sql"] for q in captured.captured_queries]
    grouping = [sql for sql in sqls if "get_shard_id_for_distribution_column" in sql]
    writes = [sql for sql in sqls if sql.split(" times: ")[-1].startswith("UPDATE")]
    assert len(grouping) == len(writes) == 3  # ceil(9 / 4) batches
    assert rebuild_projections(check=True).projections_drifted == 0


@citus_only
@pytest.mark.django_db(transaction=True)
def test_a_claimed_batch_is_locked_until_its_transaction_ends(
    visit_definition: Any, patient: Any
) -> None:
    """The claim's per-shard reads lock the batch's rows (``FOR UPDATE``): another session's
    lock on one of them (what ``transition()`` takes first) waits until the claim's transaction
    ends; an encounter past the batch is free."""
    encounters = [create_encounter(visit_definition, patient) for _ in range(6)]
    ids = sorted(e.pk for e in encounters)
    query = Encounter.all_objects.order_by("pk").values_list("id", "state")
    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"],
        port=settings["PORT"],
        user=settings["USER"],
        password=settings["PASSWORD"] or None,
        dbname=settings["NAME"],
        autocommit=True,
    ) as other:
        # NOWAIT (routed to the shard with the statement): a lock_timeout would stay on the
        # coordinator, and the worker would wait for this test's own transaction.
        lock = f"SELECT 1 FROM {ENCOUNTERS} WHERE id = %s FOR UPDATE NOWAIT"
        with transaction.atomic():
            batch = sharding.Claims(query, 4).claim(None)
            assert [row[0] for row in batch] == ids[:4]
            for pk in ids[:4]:
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    other.execute(lock, [pk])
            other.execute(lock, [ids[4]])  # not claimed: not locked
        for pk in ids[:4]:  # the claim's transaction ended: free again
            other.execute(lock, [pk])
