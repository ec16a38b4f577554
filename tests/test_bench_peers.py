"""The schedule the peer benchmark runs (benchmarks/peers.py): every step of every visit is
recorded exactly once, in the visit's order, late steps ``lag`` events after they happened; and
the truth it checks answers against."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from benchmarks.peers import STEPS, schedule, true_state


def test_every_step_is_recorded_once_in_order_and_late_ones_after_their_lag():
    actions = schedule(visits=30, late=0.3, lag=7, seed=1)
    recorded: dict[int, list[int]] = {}
    happened_at: dict[tuple[int, int], int] = {}
    for number, (kind, event) in enumerate(actions):
        key = (event.visit, event.step)
        if kind == "happen":
            assert key not in happened_at
            happened_at[key] = number
            # A step happens only once the visit's previous step is recorded.
            assert recorded.get(event.visit, []) == list(range(event.step))
            if not event.late:
                recorded.setdefault(event.visit, []).append(event.step)
        else:
            assert event.late
            # `lag` events later, or sooner when nothing else could happen meanwhile (every
            # other visit finished or itself waiting for a late step).
            waiting = {v for (v, s), n in happened_at.items() if len(recorded.get(v, [])) == s}
            finished = {v for v, steps in recorded.items() if len(steps) == len(STEPS)}
            assert number - happened_at[key] >= 7 or waiting | finished == set(range(30))
            recorded.setdefault(event.visit, []).append(event.step)
    assert recorded == {visit: list(range(len(STEPS))) for visit in range(30)}
    late = [event for kind, event in actions if kind == "record"]
    assert 0 < len(late) < 30 * len(STEPS)
    assert schedule(visits=30, late=0.3, lag=7, seed=1) == actions  # seeded


def test_no_late_steps_without_a_late_fraction():
    actions = schedule(visits=5, late=0.0, lag=3)
    assert [kind for kind, _ in actions] == ["happen"] * 15


def test_true_state():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    timeline = [(t0, "checked_in"), (t0 + timedelta(minutes=5), "in_progress")]
    assert true_state(timeline, t0 - timedelta(seconds=1)) == "scheduled"
    assert true_state(timeline, t0) == "checked_in"
    assert true_state(timeline, t0 + timedelta(minutes=5)) == "in_progress"
    assert true_state([], t0) == "scheduled"
