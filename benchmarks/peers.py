"""django-encounters beside the peer a Django user would pick instead — django-fsm-2 with
django-fsm-log — on the same visit workload, in the same process and database.

    python -m benchmarks.peers --backend sqlite [--synchronous NORMAL|FULL]
    python -m benchmarks.peers --backend postgresql        # PostgreSQL from PGHOST/PGPORT/…
    python -m benchmarks.peers --visits 100 --queries 500  # smaller

The workload, the same for both (``schedule``): ``--visits`` visits of SPEC.md's workflow
(scheduled → checked_in → in_progress → completed), their transitions interleaved round-robin as
a clinic records them. A seeded ``--late`` fraction of the transitions is *entered late*: the
step happened when it was due, but is recorded only ``--lag`` events later (a nurse types the
check-in after the fact); the visit waits for it. django-encounters records such a step with
``effective_at`` = when it happened; django-fsm-log cannot (its ``StateLog.timestamp`` is the
time of recording), which is the point of the wrong-answer count.

Measured, each side with the documented, safe usage:

* transition with a log row — ours: ``transition(encounter, to_state, transitioned_by=…,
  reason=…)``; the peer: in one ``transaction.atomic()``, ``select_for_update().get()`` (django-fsm
  does not lock by itself: without it two writers both pass the source-state check), the
  ``@transition`` method with ``by=``/``description=`` (django-fsm-log writes its ``StateLog``
  row), ``save()``. The two sides run the schedule in alternating chunks so that noise on a
  shared machine hits both alike;
* "state at t" for random visits and random ``t`` in the run — ours: ``get_state_at``; the peer:
  the latest ``StateLog`` row of the visit with ``timestamp <= t`` (``scheduled`` without one).
  Every answer is checked against the truth (the time each step really happened); the wrong
  ones are counted;
* history — ours: ``get_encounter_history``; the peer: the visit's ``StateLog`` rows in
  ``timestamp`` order.

Prints a small table; ``--json PATH`` writes the figures (``benchmarks/run.py`` runs this module
for each backend and prints them beside its raw-SQL floors).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from benchmarks.soak import configure as soak_configure
from benchmarks.soak import database_from_env

#: The visit workflow's steps, in order (SPEC.md's usage example).
STEPS = ("checked_in", "in_progress", "completed")
ORIGIN = "scheduled"
VISIT = {
    "name": "Patient Visit",
    "code": "PEER_VISIT",
    "states": ["scheduled", "checked_in", "in_progress", "completed", "cancelled"],
    "initial_state": "scheduled",
    "final_states": ["completed", "cancelled"],
    "transitions": {
        "scheduled": ["checked_in", "cancelled"],
        "checked_in": ["in_progress", "cancelled"],
        "in_progress": ["completed"],
    },
}


def configure(database: dict[str, Any]) -> None:
    """Django in this process with both libraries installed."""
    soak_configure(database, ("django_fsm", "django_fsm_log", "benchmarks.peerapp"))


# ---------------------------------------------------------------------------------------------
# The schedule both sides follow.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    visit: int  # index of the visit
    step: int  # index into STEPS
    late: bool  # entered late: recorded `lag` events after it happened


def schedule(visits: int, late: float, lag: int, seed: int = 20261127) -> list[tuple[str, Event]]:
    """The order of what happens: ``("happen", event)`` when a step happens (on-time steps are
    recorded right then), ``("record", event)`` when a late step is finally recorded: ``lag``
    actions later, or sooner when nothing else can happen meanwhile. Steps of one visit happen
    in order, each only once the previous one is recorded."""
    rng = random.Random(seed)
    next_step = [0] * visits
    waiting: list[tuple[int, Event]] = []  # (due at action number, event)
    actions: list[tuple[str, Event]] = []
    blocked: set[int] = set()
    while True:
        progressed = False
        for visit in range(visits):
            waiting.sort(key=lambda item: item[0])
            while waiting and waiting[0][0] <= len(actions):
                _, event = waiting.pop(0)
                actions.append(("record", event))
                blocked.discard(event.visit)
            if visit in blocked or next_step[visit] >= len(STEPS):
                continue
            event = Event(visit, next_step[visit], rng.random() < late)
            next_step[visit] += 1
            actions.append(("happen", event))
            if event.late:
                blocked.add(visit)
                waiting.append((len(actions) + lag, event))
            progressed = True
        if not progressed:
            if not waiting:
                return actions
            _, event = waiting.pop(0)
            actions.append(("record", event))
            blocked.discard(event.visit)


# ---------------------------------------------------------------------------------------------
# The two sides.
# ---------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One library running the schedule: how it records a step, answers "state at t", lists a
    history, and what it stored as each step's time."""

    name: str
    subjects: list[Any]
    happened: dict[tuple[int, int], datetime] = field(default_factory=dict)  # the truth
    transition_s: float = 0.0
    transitions: int = 0

    def record(self, event: Event, happened_at: datetime | None) -> None:
        raise NotImplementedError

    def state_at(self, visit: int, when: datetime) -> str:
        raise NotImplementedError

    def history(self, visit: int) -> list[Any]:
        raise NotImplementedError

    def recorded_times(self) -> dict[tuple[int, int], datetime]:
        """When each step is on the library's own log (its notion of the step's time)."""
        raise NotImplementedError


class Ours(Side):
    def __init__(self, user: Any, visits: int) -> None:
        from django_encounters.models import EncounterDefinition
        from django_encounters.services import create_encounter

        definition, _ = EncounterDefinition.objects.get_or_create(
            code=VISIT["code"], defaults=VISIT
        )
        self.user = user
        super().__init__(
            "django-encounters", [create_encounter(definition, user) for _ in range(visits)]
        )

    def record(self, event: Event, happened_at: datetime | None) -> None:
        from django_encounters.services import transition

        transition(
            self.subjects[event.visit],
            STEPS[event.step],
            transitioned_by=self.user,
            reason="entered late" if happened_at else "",
            effective_at=happened_at,
        )

    def state_at(self, visit: int, when: datetime) -> str:
        from django_encounters.services import get_state_at

        return get_state_at(self.subjects[visit], when)

    def history(self, visit: int) -> list[Any]:
        from django_encounters.services import get_encounter_history

        return list(get_encounter_history(self.subjects[visit]))

    def recorded_times(self) -> dict[tuple[int, int], datetime]:
        from django_encounters.models import EncounterTransition

        index = {encounter.pk: i for i, encounter in enumerate(self.subjects)}
        rows = EncounterTransition.objects.filter(encounter__in=self.subjects).values_list(
            "encounter_id", "sequence", "effective_at"
        )
        return {(index[pk], sequence - 1): effective for pk, sequence, effective in rows}


class Peer(Side):
    def __init__(self, user: Any, visits: int) -> None:
        from benchmarks.peerapp.models import FsmVisit

        self.user = user
        visits_made = FsmVisit.objects.bulk_create([FsmVisit(subject=user) for _ in range(visits)])
        if visits_made[0].pk is None:  # backends that do not return ids from bulk_create
            visits_made = list(FsmVisit.objects.order_by("pk"))[-visits:]
        super().__init__("django-fsm-2 + django-fsm-log", visits_made)

    def record(self, event: Event, happened_at: datetime | None) -> None:
        from django.db import transaction

        from benchmarks.peerapp.models import METHOD_TO, FsmVisit

        with transaction.atomic():
            visit = FsmVisit.objects.select_for_update().get(pk=self.subjects[event.visit].pk)
            move = getattr(visit, METHOD_TO[STEPS[event.step]])
            # django-fsm-log has no business time: the step is logged when it is recorded.
            move(by=self.user, description="entered late" if happened_at else "")
            visit.save()

    def state_at(self, visit: int, when: datetime) -> str:
        from django_fsm_log.models import StateLog

        found = (
            StateLog.objects.for_(self.subjects[visit])
            .filter(timestamp__lte=when)
            .order_by("-timestamp", "-id")
            .values_list("state", flat=True)
            .first()
        )
        return found or ORIGIN

    def history(self, visit: int) -> list[Any]:
        from django_fsm_log.models import StateLog

        return list(StateLog.objects.for_(self.subjects[visit]).order_by("timestamp", "id"))

    def recorded_times(self) -> dict[tuple[int, int], datetime]:
        from django_fsm_log.models import StateLog

        index = {visit.pk: i for i, visit in enumerate(self.subjects)}
        rows = StateLog.objects.filter(object_id__in=list(index)).values_list(
            "object_id", "state", "timestamp"
        )
        return {(index[pk], STEPS.index(state)): stamp for pk, state, stamp in rows}


class Floor(Side):
    """The raw-SQL floor of the reads, on our visits' rows: the single indexed statement each
    read needs, through the bare DB-API cursor (``benchmarks/run.py``'s floors)."""

    def __init__(self, ours: Ours) -> None:
        from benchmarks.run import Schema, raw_connection

        super().__init__("raw SQL", ours.subjects)
        self.happened = ours.happened
        self.schema = schema = Schema()
        t, ph = schema.t, schema.ph
        self.state_sql = (
            f"SELECT {t['to_state']} FROM {schema.tr} WHERE {t['encounter']} = {ph} AND "
            f"{t['effective_at']} <= {ph} ORDER BY {t['effective_at']} DESC, "
            f"{t['sequence']} DESC LIMIT 1"
        )
        columns = ", ".join(t[n] for n in schema.tr_fields)
        self.history_sql = (
            f"SELECT {columns} FROM {schema.tr} WHERE {t['encounter']} = {ph} "
            f"ORDER BY {t['sequence']}"
        )
        self.cursor = raw_connection().cursor()
        self.keys = [schema.db(encounter.pk) for encounter in ours.subjects]
        self.ours = ours

    def state_at(self, visit: int, when: datetime) -> str:
        self.cursor.execute(self.state_sql, [self.keys[visit], self.schema.db(when)])
        row = self.cursor.fetchone()
        return row[0] if row else ORIGIN

    def history(self, visit: int) -> list[Any]:
        self.cursor.execute(self.history_sql, [self.keys[visit]])
        return self.cursor.fetchall()

    def recorded_times(self) -> dict[tuple[int, int], datetime]:
        return self.ours.recorded_times()


def run_schedule(sides: list[Side], actions: list[tuple[str, Event]], chunk: int = 50) -> None:
    """Both sides through the same schedule, in alternating chunks (who goes first alternates
    too); only the recording calls are timed."""
    from django.utils import timezone

    for start in range(0, len(actions), chunk):
        order = sides if (start // chunk) % 2 == 0 else list(reversed(sides))
        for side in order:
            for kind, event in actions[start : start + chunk]:
                key = (event.visit, event.step)
                if kind == "happen":
                    now = timezone.now()  # to the millisecond, as business time is stored
                    side.happened[key] = now.replace(microsecond=now.microsecond // 1000 * 1000)
                    if event.late:
                        continue  # recorded later
                    happened_at = None
                else:
                    happened_at = side.happened[key]
                began = time.perf_counter()
                side.record(event, happened_at)
                side.transition_s += time.perf_counter() - began
                side.transitions += 1


def truth_of(side: Side, actions: list[tuple[str, Event]]) -> dict[int, list[tuple[datetime, str]]]:
    """Each visit's real timeline: a step recorded on time happened when the library stamped
    it; a late step happened when it was due (``happened``)."""
    stamped = side.recorded_times()
    late = {(e.visit, e.step) for kind, e in actions if kind == "record"}
    timelines: dict[int, list[tuple[datetime, str]]] = {}
    for (visit, step), stamp in stamped.items():
        when = side.happened[(visit, step)] if (visit, step) in late else stamp
        timelines.setdefault(visit, []).append((when, STEPS[step]))
    for steps in timelines.values():
        steps.sort()
    return timelines


def true_state(timeline: list[tuple[datetime, str]], when: datetime) -> str:
    times = [t for t, _ in timeline]
    position = bisect.bisect_right(times, when)
    return timeline[position - 1][1] if position else ORIGIN


def measure_reads(
    sides: list[Side], actions: list[tuple[str, Event]], queries: int, seed: int = 7
) -> dict[str, dict[str, Any]]:
    """``state_at`` at the same random (visit, t) for each side, checked against its truth;
    ``history`` of the same random visits; alternating which side goes first."""
    results: dict[str, dict[str, Any]] = {}
    truths = {side.name: truth_of(side, actions) for side in sides}
    start = min(min(side.happened.values()) for side in sides)
    end = max(max(side.happened.values()) for side in sides)
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    probes = [
        (rng.randrange(len(sides[0].subjects)), start + (end - start) * rng.random())
        for _ in range(queries)
    ]
    histories = [rng.randrange(len(sides[0].subjects)) for _ in range(max(1, queries // 2))]
    for side in sides:
        results[side.name] = {"state_at_s": 0.0, "wrong": 0, "history_s": 0.0}
    for number, (visit, when) in enumerate(probes):
        for side in sides if number % 2 == 0 else reversed(sides):
            began = time.perf_counter()
            answer = side.state_at(visit, when)
            results[side.name]["state_at_s"] += time.perf_counter() - began
            if answer != true_state(truths[side.name].get(visit, []), when):
                results[side.name]["wrong"] += 1
    for number, visit in enumerate(histories):
        for side in sides if number % 2 == 0 else reversed(sides):
            began = time.perf_counter()
            side.history(visit)
            results[side.name]["history_s"] += time.perf_counter() - began
    for side in sides:
        figures = results[side.name]
        figures["queries"] = queries
        figures["histories"] = len(histories)
        figures["span_s"] = span
    return results


def run(
    backend: str,
    visits: int,
    late: float,
    lag: int,
    queries: int,
    synchronous: str,
    transitions: int = 2000,
) -> dict:
    tmp = None
    if backend == "sqlite":
        tmp = tempfile.TemporaryDirectory(prefix="encounters-peers-")
        database = database_from_env(os.path.join(tmp.name, "peers.sqlite3"))
    else:
        database = database_from_env()
        database["NAME"] = os.environ.get("BENCH_PEERS_DATABASE", database["NAME"])
    try:
        configure(database)
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from django.db import connection

        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={synchronous}")
        call_command("migrate", verbosity=0, interactive=False)
        user, _ = User.objects.get_or_create(username="peers-nurse")
        actions = schedule(visits, late, lag)
        ours, peer = Ours(user, visits), Peer(user, visits)
        run_schedule([ours, peer], actions)
        floor = Floor(ours)
        reads = measure_reads([floor, ours, peer], actions, queries)
        # The floor of a transition: run.py's raw three-statement transaction (the same for any
        # workflow), beside ours on its ping-pong encounters, in this database and mode.
        from benchmarks.run import Schema, bench_transition, make_definition

        pingpong = bench_transition(Schema(), make_definition(), transitions)
        late_steps = sum(1 for kind, _ in actions if kind == "record")
        from benchmarks.run import _server_version

        result = {
            "backend": backend,
            "server": _server_version(connection),
            "synchronous": synchronous if backend == "sqlite" else None,
            "visits": visits,
            "late_steps": late_steps,
            "lag": lag,
            "pingpong_transition": pingpong,
            "sides": {},
        }
        for side in (floor, ours, peer):
            figures = reads[side.name]
            transition_us = (
                pingpong["floor_per_op_us"]
                if side is floor
                else side.transition_s / side.transitions * 1e6
            )
            result["sides"][side.name] = {
                "transition_us": transition_us,
                "transitions_per_s": 1e6 / transition_us,
                "state_at_us": figures["state_at_s"] / figures["queries"] * 1e6,
                "wrong": figures["wrong"],
                "queries": figures["queries"],
                "history_us": figures["history_s"] / figures["histories"] * 1e6,
            }
        connection.close()
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


OURS, PEER, FLOOR = "django-encounters", "django-fsm-2 + django-fsm-log", "raw SQL"


def label(result: dict) -> str:
    if result["synchronous"]:
        return f"{result['backend']} (WAL, synchronous={result['synchronous']})"
    return result["backend"]


TABLE_HEAD = [
    "| database | operation | raw-SQL floor | django-encounters | × floor | django-fsm-2 + "
    "django-fsm-log | × floor | who is ahead |",
    "|---|---|---:|---:|---:|---:|---:|---|",
]


def _ahead(ours: float, peer: float) -> str:
    """Which side is faster, plainly (times: lower is better)."""
    if ours <= peer:
        return f"ours, {peer / ours:.1f}× faster"
    return f"**the peer**, {ours / peer:.1f}× faster"


def table_rows(result: dict) -> list[str]:
    """The markdown rows of one configuration: per operation the floor, ours and the peer, each
    with its ratio to the floor, and the wrong "state at t" answers."""
    floor, ours, peer = (result["sides"][name] for name in (FLOOR, OURS, PEER))
    where = label(result)
    rows = []
    for key, name in (
        ("transition_us", "transition with a log row"),
        ("state_at_us", "state at t, from the log"),
        ("history_us", "history (3 rows)"),
    ):
        rows.append(
            f"| {where} | {name} | {floor[key]:,.0f} µs | {ours[key]:,.0f} µs | "
            f"{floor[key] / ours[key]:.2f}× | {peer[key]:,.0f} µs | "
            f"{floor[key] / peer[key]:.2f}× | {_ahead(ours[key], peer[key])} |"
        )
    queries = ours["queries"]
    rows.append(
        f'| {where} | wrong "state at t" answers | {floor["wrong"]}/{queries} | '
        f"{ours['wrong']}/{queries} | | {peer['wrong']}/{queries} "
        f"({peer['wrong'] / queries:.1%}) | | "
        + ("ours" if ours["wrong"] < peer["wrong"] else "neither")
        + " |"
    )
    return rows


def table(result: dict) -> str:
    return "\n".join(
        [
            f"{label(result)}: {result['visits']} visits, {result['late_steps']} of their "
            f"{result['visits'] * len(STEPS)} steps entered late ({result['lag']} events later)",
            "",
            *TABLE_HEAD,
            *table_rows(result),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--visits", type=int, default=400)
    parser.add_argument("--late", type=float, default=0.1, help="fraction entered late")
    parser.add_argument("--lag", type=int, default=25, help="events before a late step is recorded")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument(
        "--transitions", type=int, default=2000, help="calls for the transition floor"
    )
    parser.add_argument("--json", help="write the figures here")
    options = parser.parse_args(argv)
    try:
        import django_fsm  # noqa: F401
        import django_fsm_log  # noqa: F401
    except ImportError:
        print(
            "peers: django-fsm-2 and django-fsm-log are not installed (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return 2
    result = run(
        options.backend,
        options.visits,
        options.late,
        options.lag,
        options.queries,
        options.synchronous,
    )
    print(table(result))
    if options.json:
        with open(options.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
