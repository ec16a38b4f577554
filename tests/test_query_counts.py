"""Statement budgets of the hot paths: three statements for an ordinary ``transition()``, one
for each read.

Counted with ``CaptureQueriesContext``; transaction control (BEGIN/COMMIT/SAVEPOINT/RELEASE) is
not work and is filtered out by ``tests.helpers.work_queries``. The ``transaction=True`` variants
run outside pytest-django's wrapping transaction, so ``transition()``'s ``atomic()`` is a real
transaction there (what production sees), not a savepoint.
"""

from __future__ import annotations

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_encounters.exceptions import ConcurrentTransitionError, InvalidTransitionError
from django_encounters.models import Encounter
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    transition,
)
from tests.helpers import IS_CITUS, work_queries

pytestmark = pytest.mark.django_db


def _kinds(statements: list[str]) -> list[str]:
    return [s.lstrip().split(None, 1)[0].upper() for s in statements]


def _count(fn, *args, **kwargs):
    with CaptureQueriesContext(connection) as captured:
        result = fn(*args, **kwargs)
    return result, work_queries(captured), captured


def test_ordinary_transition_is_three_statements(encounter, user):
    _, queries, _ = _count(transition, encounter, "checked_in", transitioned_by=user)
    assert _kinds(queries) == ["SELECT", "INSERT", "UPDATE"], queries
    # The SELECT is the lock with the definition joined in (one query, not two).
    if connection.features.has_select_for_update:
        assert "FOR UPDATE" in queries[0].upper()
    assert "encounterdefinition" in queries[0].lower()


def test_every_ordinary_transition_of_a_stream_is_three_statements(encounter):
    encounter.started_at = timezone.now()
    encounter.ended_at = timezone.now()
    encounter.save()
    for state in ("checked_in", "in_progress", "completed"):
        _, queries, _ = _count(transition, encounter, state)
        assert len(queries) <= 3, (state, queries)
        # The UPDATE writes the projection and reads nothing: what it relies on (the new row's
        # predecessor in the log) the lock statement proved under the row lock (issue 23).
        assert "encountertransition" not in queries[-1].lower(), queries[-1]
    assert Encounter.objects.get(pk=encounter.pk).version == 3


def test_validated_transition_is_still_three_statements(validated_encounter):
    """Validators run on the locked instance; its definition is already joined in."""
    validated_encounter.started_at = timezone.now()
    validated_encounter.save()
    transition(validated_encounter, "checked_in")
    _, queries, _ = _count(transition, validated_encounter, "in_progress")
    assert len(queries) == 3, queries


def test_expected_version_and_keyword_arguments_cost_nothing_extra(encounter, user):
    _, queries, _ = _count(
        transition,
        encounter,
        "checked_in",
        transitioned_by=user,
        reason="arrived",
        context={"desk": 3},
        expected_version=0,
    )
    assert len(queries) == 3, queries


def test_stale_expected_version_stops_after_the_lock(encounter):
    transition(encounter, "checked_in")
    with CaptureQueriesContext(connection) as captured:
        with pytest.raises(ConcurrentTransitionError):
            transition(encounter, "in_progress", expected_version=0)
    assert _kinds(work_queries(captured)) == ["SELECT"]


def test_refused_edge_stops_after_the_lock(encounter):
    with CaptureQueriesContext(connection) as captured:
        with pytest.raises(InvalidTransitionError):
            transition(encounter, "completed")
    assert _kinds(work_queries(captured)) == ["SELECT"]


def test_transition_at_the_end_of_a_backdated_timeline_is_three_statements(employment, past):
    """Past-dated but after the timeline's last row: still decided from the snapshot."""
    transition(employment, "working", effective_at=past(10))
    transition(employment, "onleave", effective_at=past(5))
    _, queries, _ = _count(transition, employment, "finished", effective_at=past(1))
    assert len(queries) == 3, queries


def test_backdated_into_the_middle_loads_the_stream_once(counter_definition, patient, past):
    enc = create_encounter(counter_definition, patient)
    for hours in (10, 5, 1):
        transition(enc, "open", effective_at=past(hours))
    _, queries, _ = _count(transition, enc, "open", effective_at=past(7))
    # Lock, load the stream (one query however long it is), insert, update.
    assert _kinds(queries) == ["SELECT", "SELECT", "INSERT", "UPDATE"], queries
    assert Encounter.objects.get(pk=enc.pk).version == 4


def test_get_state_at_is_one_query(employment, past):
    transition(employment, "working", effective_at=past(10))
    transition(employment, "onleave", effective_at=past(5))
    for at, expected in ((past(20), "hired"), (past(7), "working"), (past(1), "onleave")):
        state, queries, _ = _count(get_state_at, employment, at)
        assert state == expected
        assert len(queries) == 1, queries
    state, queries, _ = _count(get_state_at, employment, past(1), known_at=timezone.now())
    assert state == "onleave" and len(queries) == 1


def test_get_encounter_history_is_one_query(encounter):
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")
    rows, queries, _ = _count(get_encounter_history, encounter)
    assert [r.sequence for r in rows] == [1, 2]
    assert len(queries) == 1, queries


def test_as_of_evaluation_is_one_query(visit_definition, patient, device):
    first = create_encounter(visit_definition, patient)
    create_encounter(visit_definition, device)
    transition(first, "checked_in")
    at = timezone.now()

    def evaluate():
        return list(Encounter.objects.as_of(at).values_list("pk", "state_at"))

    rows, queries, _ = _count(evaluate)
    assert dict(rows)[first.pk] == "checked_in"
    assert len(rows) == 2 and len(queries) == 1, queries

    def census():
        return list(Encounter.objects.as_of(at, known_at=at).filter(state_at="scheduled"))

    rows, queries, _ = _count(census)
    assert len(rows) == 1 and len(queries) == 1, queries


@pytest.mark.django_db(transaction=True)
def test_transition_in_a_real_transaction_is_three_statements(visit_definition, patient, user):
    """Outside the test's wrapping transaction: ``atomic()`` is BEGIN … COMMIT, and the work
    between them is still lock+read, insert, update."""
    enc = create_encounter(visit_definition, patient)
    _, queries, captured = _count(transition, enc, "checked_in", transitioned_by=user)
    assert _kinds(queries) == ["SELECT", "INSERT", "UPDATE"], queries
    # No savepoint: the transaction is the real one.
    assert not any("SAVEPOINT" in q["sql"].upper() for q in captured.captured_queries)
    assert Encounter.objects.get(pk=enc.pk).state == "checked_in"
    assert enc.version == 1 and enc.state == "checked_in"


@pytest.mark.postgres_only
def test_the_lock_statement_reads_the_log_twice_on_postgresql(encounter):
    """The lock statement reads the log's head with two index lookups: the row at ``sequence =
    version`` (a join) and the last timeline row, both of its columns through one LATERAL
    subquery (issue 23: one reference to the log fewer to plan on every call)."""
    from django_encounters.store.statements import PK, statements

    transition(encounter, "checked_in")
    st = statements(connections["default"])
    with connection.cursor() as cursor:
        # The tables hold a row or two: without this the planner may scan them whole, whatever
        # the statement's shape (it did under server-side binding).
        if IS_CITUS:  # to the workers too, which plan the routed statement
            cursor.execute("SET LOCAL citus.propagate_set_commands TO 'local'")
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN " + st.lock_sql, {PK: encounter.pk})
        plan = "\n".join(row[0] for row in cursor.fetchall())
    log = [
        line for line in plan.splitlines() if " on django_encounters_encountertransition" in line
    ]
    assert len(log) == 2, plan
    assert all("Index" in line for line in log), plan
    assert st.lock_sql.count("LATERAL") == 1
