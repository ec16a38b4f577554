"""Property tests, with hypothesis, on both databases.

Random definitions (2–5 states, random edges including self-loops, random final states) and
random sequences of ``transition()`` calls — mostly along an allowed edge from the state at the
chosen time, sometimes to any state or one the definition does not have; "now" appends and
backdated ones at random minutes (ties included); some with a current or a stale
``expected_version``. A NAIVE REFERENCE written here, independent of the engine:

* a state at time ``t`` (as known at ``r``) is the ``to_state`` of the last row by
  ``(effective_at, sequence)`` among rows with ``effective_at <= t`` (and ``transitioned_at <=
  r``), else the origin state;
* a transition at ``T`` is accepted iff the version is not stale, ``to_state`` is a state, the
  edge from the state at ``T`` is allowed, and the first later row's ``to_state`` is allowed from
  ``to_state``.

Every call's outcome (accepted/refused, the recorded ``from_state`` and ``sequence``) must match
the reference; after each sequence the projection (state, version, timeline end, head hash —
the genesis hash with no rows),
``get_state_at`` at every interesting time, ``known_at`` queries, ``Encounter.objects.as_of``
and a rebuild must all equal the reference fold.

Times the tests pass in are at the stored (millisecond) precision since issue 8, so the
reference compares exactly what the library stores.

Isolation: pytest-django gives one database transaction per test function, not per hypothesis
example, so each example runs inside its own ``transaction.atomic()`` and is rolled back by
raising ``_Rollback`` at its end (a failing assertion rolls it back the same way).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from django_encounters.engine import (
    EncounterTimeline,
    Genesis,
    Rules,
    genesis_hash,
    stored_precision,
    verify_stream,
)
from django_encounters.exceptions import ConcurrentTransitionError, InvalidTransitionError
from django_encounters.models import Encounter, EncounterDefinition
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    transition,
)
from tests.helpers import raw_update

POOL = ("a", "b", "c", "d", "e")
MICRO = timedelta(microseconds=1)

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- strategies ------------------------------------------------------------------------------


@st.composite
def definitions(draw: Any) -> tuple[list[str], dict[str, list[str]], list[str]]:
    n = draw(st.integers(2, len(POOL)))
    states = list(POOL[:n])
    transitions: dict[str, list[str]] = {}
    for source in states:
        targets = [t for t in states if draw(st.booleans())]
        if targets:
            transitions[source] = targets
    if not transitions:
        transitions[states[0]] = [states[1]]
    finals = draw(st.lists(st.sampled_from(states), unique=True, max_size=2))
    return states, transitions, finals


@dataclass(frozen=True)
class Op:
    pick: int  # which target: an allowed one from the state at that time, mostly
    follow: bool  # True: pick among the allowed targets; False: among POOL + an unknown state
    minute: int | None  # None: now (append); else base + minute (backdated below "now" rows)
    expected: str | None  # None, "current", "stale"

    def target(self, states: list[str], transitions: dict[str, list[str]], state_then: str) -> str:
        allowed = transitions.get(state_then, [])
        if self.follow and allowed:
            return allowed[self.pick % len(allowed)]
        anything = POOL + ("zz",)
        return anything[self.pick % len(anything)]


ops_strategy = st.lists(
    st.builds(
        Op,
        pick=st.integers(0, 11),
        follow=st.sampled_from((True, True, True, False)),
        minute=st.one_of(st.none(), st.integers(0, 40)),
        expected=st.sampled_from((None, None, None, "current", "stale")),
    ),
    min_size=4,
    max_size=16,
)


# --- the naive reference ---------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    sequence: int
    to_state: str
    effective_at: datetime
    transitioned_at: datetime


def fold(
    origin: str, rows: list[Row], at: datetime | None = None, known_at: datetime | None = None
) -> str:
    seen = [
        r
        for r in rows
        if (at is None or r.effective_at <= at)
        and (known_at is None or r.transitioned_at <= known_at)
    ]
    if not seen:
        return origin
    return max(seen, key=lambda r: (r.effective_at, r.sequence)).to_state


def predict(
    origin: str,
    rows: list[Row],
    states: list[str],
    transitions: dict[str, list[str]],
    to_state: str,
    at: datetime | None,
) -> tuple[bool, str]:
    """(accepted, from_state) for a transition to ``to_state`` at ``at`` (None: at the end)."""
    from_state = fold(origin, rows, at)
    if to_state not in states or to_state not in transitions.get(from_state, []):
        return False, from_state
    later = [r for r in rows if at is not None and r.effective_at > at]
    if later:
        successor = min(later, key=lambda r: (r.effective_at, r.sequence))
        if successor.to_state not in transitions.get(to_state, []):
            return False, from_state
    return True, from_state


# --- the property ----------------------------------------------------------------------------


class _Rollback(Exception):
    pass


_codes = itertools.count(1)


def run_example(
    definition: tuple, ops: list[Op], probe_minutes: list[int], patient_model: Any
) -> None:
    states, transitions, finals = definition
    code = f"PROP{next(_codes)}"
    d = EncounterDefinition.objects.create(
        name=code,
        code=code,
        states=states,
        initial_state=states[0],
        final_states=finals,
        transitions=transitions,
    )
    subject = patient_model.objects.create(name=code)
    enc = create_encounter(d, subject)
    bystander = create_encounter(d, subject)  # never moves: as_of must keep its origin
    origin = states[0]
    base = stored_precision(timezone.now() - timedelta(days=2))
    rows: list[Row] = []

    for op in ops:
        at = None if op.minute is None else base + timedelta(minutes=op.minute)
        version = len(rows)
        expected_version = {None: None, "current": version, "stale": version + 1}[op.expected]
        to_state = op.target(states, transitions, fold(origin, rows, at))
        accepted, from_state = predict(origin, rows, states, transitions, to_state, at)
        if op.expected == "stale":
            accepted = False
        try:
            record = transition(enc, to_state, effective_at=at, expected_version=expected_version)
        except ConcurrentTransitionError:
            assert op.expected == "stale", op
            continue
        except InvalidTransitionError as exc:
            assert not accepted and op.expected != "stale", (op, rows)
            assert (exc.from_state, exc.to_state) == (from_state, to_state), (op, str(exc))
            if "would be followed by" in str(exc):
                event("a backdate refused: it would break the next row")
            continue
        assert accepted, (op, from_state, rows)
        if at is not None and any(r.effective_at > at for r in rows):
            event("a backdate accepted into the middle of the timeline")
        assert (record.sequence, record.from_state, record.to_state) == (
            version + 1,
            from_state,
            to_state,
        )
        rows.append(
            Row(record.sequence, record.to_state, record.effective_at, record.transitioned_at)
        )

    event(f"rows written: {len(rows) // 4 * 4}+")
    event(f"refused: {len(ops) - len(rows) > 0}")
    # The projection equals the reference fold.
    fresh = Encounter.objects.get(pk=enc.pk)
    history = get_encounter_history(fresh)
    assert [h.sequence for h in history] == list(range(1, len(rows) + 1))
    assert fresh.state == fold(origin, rows), (fresh.state, rows)
    assert fresh.version == len(rows)
    assert fresh.timeline_end_at == max((r.effective_at for r in rows), default=None)
    assert fresh.head_hash == (history[-1].hash if history else fresh.genesis_hash)
    assert (enc.state, enc.version) == (fresh.state, fresh.version)  # the caller's instance

    # get_state_at / known_at / as_of at every interesting time.
    times = {base - timedelta(days=1), timezone.now() + timedelta(hours=1)}
    times.update(base + timedelta(minutes=m) for m in probe_minutes)
    for r in rows:
        times.update((r.effective_at, r.effective_at - MICRO))
    known = [None] + sorted(
        {k for r in rows for k in (r.transitioned_at, r.transitioned_at - MICRO)}
    )
    for t in sorted(times):
        for known_at in known:
            expected = fold(origin, rows, t, known_at)
            assert get_state_at(fresh, t, known_at=known_at) == expected, (t, known_at, rows)
        for known_at in known[:: max(1, len(known) // 4)]:
            census = dict(
                Encounter.objects.as_of(t, known_at=known_at)
                .filter(pk__in=[enc.pk, bystander.pk])
                .values_list("pk", "state_at")
            )
            assert census == {enc.pk: fold(origin, rows, t, known_at), bystander.pk: origin}

    # The in-memory engine replaying the stored stream agrees too. The projection is put back
    # to the origin with raw SQL (issue 8: the ORM refuses projection columns, and the head must
    # be the genesis hash for version 0 to be derivable drift rather than a `head` anomaly).
    raw_update(
        Encounter,
        enc.pk,
        state=origin,
        version=0,
        head_hash=fresh.genesis_hash,
        timeline_end_at=None,
        definition_version=fresh.origin_version,
        last_transitioned_at=None,
    )
    result = rebuild_projections(encounters=[enc.pk, bystander.pk])
    assert result.anomaly_count == 0, [str(a) for a in result.anomalies]
    assert result.projections_fixed == (1 if rows else 0)
    columns = Encounter.PROJECTION_FIELDS
    rebuilt = Encounter.objects.get(pk=enc.pk)
    assert [getattr(rebuilt, c) for c in columns] == [getattr(fresh, c) for c in columns]
    assert rebuild_projections(encounters=[enc.pk], check=True).projections_drifted == 0


@pytest.mark.slow
@pytest.mark.django_db
@PROPERTY_SETTINGS
@given(
    definition=definitions(),
    ops=ops_strategy,
    probe_minutes=st.lists(st.integers(-5, 45), max_size=3),
)
def test_transitions_and_every_read_agree_with_a_naive_fold(definition, ops, probe_minutes):
    from tests.testapp.models import Patient

    try:
        with transaction.atomic():
            run_example(definition, ops, probe_minutes, Patient)
            raise _Rollback
    except _Rollback:
        pass


# --- the engine alone (no database): many more examples, same reference -----------------------


@settings(max_examples=300, deadline=None, database=None)
@given(definition=definitions(), ops=ops_strategy)
def test_timeline_engine_agrees_with_the_naive_fold(definition, ops):
    import uuid

    states, transitions, finals = definition
    origin = states[0]
    rules = Rules.from_config("P", states, transitions, finals, origin, version=1)
    base = datetime(2020, 1, 1, tzinfo=timezone.get_fixed_timezone(0))
    created = base - timedelta(days=1)
    encounter_id = uuid.uuid4()
    # Issue 8: a timeline opens on its genesis (the creation facts) and chains row 1 to its hash.
    genesis = Genesis(
        encounter_id=encounter_id,
        definition_id=uuid.uuid4(),
        definition_version=1,
        subject_type="testapp.patient",
        subject_id="1",
        origin_state=origin,
        created_at=created,
    )
    head = genesis_hash(genesis)
    timeline = EncounterTimeline.open(genesis, head)
    assert (timeline.state, timeline.version, timeline.head_hash) == (origin, 0, head)
    rows: list[Row] = []
    decided_rows = []
    clock = base + timedelta(days=10)
    for op in ops:
        clock += timedelta(seconds=1)
        at = clock if op.minute is None else base + timedelta(minutes=op.minute)
        if op.minute is None:
            at = max(at, timeline.end_at or at)
        to_state = op.target(states, transitions, fold(origin, rows, at))
        accepted, from_state = predict(origin, rows, states, transitions, to_state, at)
        try:
            decided = timeline.decide(rules, to_state, at, transitioned_at=clock)
        except InvalidTransitionError as exc:
            assert not accepted
            assert exc.from_state == from_state
            continue
        assert accepted and decided.from_state == from_state
        # Whole seconds: already at the stored precision, and the clock always moves on.
        assert (decided.effective_at, decided.transitioned_at) == (at, clock)
        decided_rows.append(decided)
        rows.append(Row(decided.sequence, to_state, at, clock))
        assert timeline.state == fold(origin, rows)
        assert timeline.version == len(rows)

    # A replay of the same rows from scratch (the read/rebuild path) gives the same timeline.
    replayed = EncounterTimeline.replay(genesis, head, decided_rows)
    attributes = ("state", "version", "end_at", "head_hash", "definition_version", "recorded_until")
    assert [getattr(replayed, a) for a in attributes] == [getattr(timeline, a) for a in attributes]
    # ... and the verifying replay (rebuild, audit) finds nothing wrong with decided rows.
    verified = verify_stream(genesis, head, decided_rows, {1: rules}.get)
    assert verified.anomalies == [], [str(a) for a in verified.anomalies]
    assert verified.state == timeline.state
    probes = [base + timedelta(minutes=minute) for minute in range(-5, 45, 3)]
    for t in probes:
        assert timeline.state_at(t) == replayed.state_at(t) == fold(origin, rows, t)
    # "As known at r" (issue 8: the engine's known_at) agrees with the reference too.
    probes += [r.effective_at for r in rows]
    for r in rows:
        for known_at in (r.transitioned_at - MICRO, r.transitioned_at):
            known = EncounterTimeline.replay(genesis, head, decided_rows, known_at=known_at)
            for t in probes:
                assert known.state_at(t) == fold(origin, rows, t, known_at), (t, known_at)
