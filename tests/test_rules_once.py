"""The rules of a definition version are written once (``engine.timeline.violations``): what
the write path refuses, the verifier reports of a row that was recorded anyway, as the same
kind and with the same reason. No database."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from django_encounters.engine import (
    EncounterTimeline,
    Genesis,
    InvalidStateError,
    InvalidTransitionError,
    Rules,
    StreamRow,
    genesis_hash,
    row_hash,
    verify_stream,
)

STATES = ["a", "b", "c", "d"]
START = datetime(2020, 1, 1, tzinfo=timezone.utc)


@st.composite
def machines(draw: st.DrawFn) -> Rules:
    transitions = {
        state: draw(st.lists(st.sampled_from(STATES), unique=True, max_size=3)) for state in STATES
    }
    return Rules.from_config("M", STATES, transitions, [], "a", version=1)


def _genesis(origin: str = "a") -> Genesis:
    return Genesis(uuid.uuid4(), uuid.uuid4(), 1, "testapp.patient", "1", origin, START)


def _forced(timeline: EncounterTimeline, exc: InvalidTransitionError, at, clock, version=1):
    """The row the write path refused, recorded anyway (hashed and chained like any row)."""
    row = StreamRow(
        timeline.version + 1, exc.from_state, exc.to_state, at, clock, None, "", {}, version, ""
    )
    row.hash = row_hash(timeline.id, row, timeline.head_hash)
    return row


@settings(max_examples=300, deadline=None, database=None)
@given(
    rules=machines(),
    ops=st.lists(
        st.tuples(st.sampled_from([*STATES, "ghost"]), st.none() | st.integers(0, 60)),
        min_size=1,
        max_size=12,
    ),
)
def test_what_the_write_path_refuses_the_verifier_reports_with_the_same_reason(rules, ops):
    genesis = _genesis()
    head = genesis_hash(genesis)
    timeline = EncounterTimeline.open(genesis, head)
    decided: list[StreamRow] = []
    clock = START + timedelta(days=1)
    for to_state, minute in ops:
        clock += timedelta(seconds=1)
        at = (
            max(clock, timeline.end_at or clock)
            if minute is None
            else START + timedelta(minutes=minute)
        )
        try:
            decided.append(timeline.decide(rules, to_state, at, transitioned_at=clock))
        except InvalidTransitionError as exc:
            forced = _forced(timeline, exc, at, clock)
            found = verify_stream(genesis, head, [*decided, forced], {1: rules}.get).anomalies
            assert found, f"refused but not reported: {exc}"
            assert {a.sequence for a in found} == {forced.sequence}
            edge = f"'{exc.from_state}' -> '{exc.to_state}' under {rules.name}"
            assert found[0].detail == f"{edge}: {exc.reason}"
            assert found[0].kind == ("rechain" if "would be followed" in exc.reason else "edge")
            assert all(a.kind in ("edge", "rechain") for a in found)
            event(f"refused: {found[0].kind}")
    # What the write path accepted, the verifier accepts.
    assert verify_stream(genesis, head, decided, {1: rules}.get).anomalies == []


def test_a_refused_backdate_is_reported_as_a_rechain_with_the_write_paths_reason():
    rules = Rules.from_config(
        "EMP",
        ["working", "onleave", "finished"],
        {"working": ["onleave", "finished"], "onleave": ["working", "finished"]},
        ["finished"],
        "working",
    )
    genesis = _genesis("working")
    head = genesis_hash(genesis)
    timeline = EncounterTimeline.open(genesis, head)
    later = START + timedelta(hours=2)
    row = timeline.decide(rules, "onleave", later, transitioned_at=START + timedelta(hours=3))
    at = START + timedelta(hours=1)
    with pytest.raises(InvalidTransitionError) as refused:
        timeline.decide(rules, "finished", at, transitioned_at=START + timedelta(hours=4))
    reason = (
        "would be followed by 'onleave' (sequence 1, effective 2020-01-01T02:00:00+00:00); "
        "'finished' -> 'onleave' is not allowed"
    )
    assert refused.value.reason == reason
    assert (refused.value.from_state, refused.value.to_state) == ("working", "finished")
    forced = _forced(timeline, refused.value, at, START + timedelta(hours=4))
    found = verify_stream(genesis, head, [row, forced], {1: rules}.get).anomalies
    assert [(a.sequence, a.kind, a.detail) for a in found] == [
        (2, "rechain", f"'working' -> 'finished' under 'EMP' v1: {reason}")
    ]


def test_an_upgrade_the_write_path_refuses_is_an_upgrade_anomaly():
    v1 = Rules.from_config(
        "EMP", ["working", "onleave"], {"working": ["onleave"], "onleave": ["working"]}
    )
    v2 = Rules.from_config("EMP", ["working"], {}, [], "working", version=2)
    genesis = _genesis("working")
    head = genesis_hash(genesis)
    timeline = EncounterTimeline.open(genesis, head)
    rows = [timeline.decide(v1, "onleave", START, transitioned_at=START)]
    with pytest.raises(InvalidStateError, match="'onleave' is not a state of definition 'EMP v2'"):
        timeline.upgrade(v2, transitioned_at=START + timedelta(minutes=1))
    forced = StreamRow(2, "onleave", "onleave", START, START, None, "", {}, 2, "")
    forced.hash = row_hash(timeline.id, forced, timeline.head_hash)
    found = verify_stream(genesis, head, [*rows, forced], {1: v1, 2: v2}.get).anomalies
    assert [(a.sequence, a.kind) for a in found] == [(2, "upgrade")]
    assert found[0].detail.startswith("'onleave' -> 'onleave' under 'EMP' v2: ")
    # Back in a state v2 has, the upgrade is allowed, and verifies clean.
    later = START + timedelta(minutes=2)
    rows.append(timeline.decide(v1, "working", later, transitioned_at=later))
    rows.append(timeline.upgrade(v2, transitioned_at=later))
    assert (rows[-1].from_state, rows[-1].to_state, rows[-1].definition_version) == (
        "working",
        "working",
        2,
    )
    assert verify_stream(genesis, head, rows, {1: v1, 2: v2}.get).anomalies == []
