"""The async API (``acreate_encounter``, ``atransition``, ``aget_state_at``,
``aget_encounter_history``): the same results and the same typed errors as the sync functions,
nothing written on an error, and many calls gathered under one event loop — on different
encounters, and on one encounter with ``expected_version`` where exactly one call wins per
version. On PostgreSQL the gathered calls also run as Django runs concurrent async requests:
each in its own thread (``ThreadSensitiveContext``) with its own connection, racing for real.

No pytest-asyncio: a test drives its coroutine with asgiref's ``async_to_sync``, so the
thread-sensitive calls run in the test's own thread, on its connection, inside its transaction
(``asyncio.run`` would run them in another thread, which cannot see the test's rows).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connections
from django.utils import timezone

from django_encounters import (
    ConcurrentTransitionError,
    EncounterNotFoundError,
    InvalidTransitionError,
    ValidationError,
    acreate_encounter,
    aget_encounter_history,
    aget_state_at,
    atransition,
    create_encounter,
    get_encounter_history,
    transition,
)
from django_encounters.models import Encounter, EncounterTransition
from tests.helpers import reload, snapshot


def run(coroutine_function: Any, *args: Any) -> Any:
    return async_to_sync(coroutine_function)(*args)


def test_the_async_api_gives_what_the_sync_api_gives(visit_definition, patient, user):
    async def visit() -> tuple[Any, ...]:
        encounter = await acreate_encounter(visit_definition, patient, created_by=user)
        # Dated a minute back: two changes within one millisecond share their business time,
        # and the state at it is the later one's.
        first = await atransition(
            encounter,
            "checked_in",
            user,
            reason="arrived",
            effective_at=timezone.now() - timedelta(minutes=1),
        )
        second = await atransition(encounter, "in_progress", context={"room": 4})
        history = await aget_encounter_history(encounter)
        state_before = await aget_state_at(encounter, first.effective_at - timedelta(seconds=1))
        state_between = await aget_state_at(encounter, first.effective_at)
        known_before = await aget_state_at(
            encounter, timezone.now(), known_at=second.transitioned_at - timedelta(milliseconds=1)
        )
        return encounter, first, second, history, state_before, state_between, known_before

    encounter, first, second, history, before, between, known_before = run(visit)

    assert (encounter.state, encounter.version) == ("in_progress", 2)  # the instance moved on
    assert (first.sequence, first.from_state, first.to_state) == (1, "scheduled", "checked_in")
    assert (first.transitioned_by, first.reason) == (user, "arrived")
    assert (second.sequence, second.from_state, second.to_state) == (2, "checked_in", "in_progress")
    assert second.metadata == {"room": 4}
    assert [row.pk for row in history] == [first.pk, second.pk]
    assert history == get_encounter_history(encounter)
    assert (before, between, known_before) == ("scheduled", "checked_in", "checked_in")
    stored = reload(encounter)
    assert (stored.state, stored.version, stored.created_by) == ("in_progress", 2, user)


def test_errors_are_the_sync_api_s_typed_errors_and_nothing_is_written(
    validated_encounter, encounter
):
    before = snapshot(validated_encounter)

    async def refused(coroutine: Any) -> BaseException:
        try:
            await coroutine
        except Exception as error:
            return error
        raise AssertionError("not refused")

    async def attempts() -> list[BaseException]:
        return [
            await refused(atransition(validated_encounter, "completed")),
            await refused(atransition(validated_encounter, "nowhere")),
            await refused(atransition(validated_encounter, "checked_in", expected_version=3)),
            await refused(
                atransition(validated_encounter, "checked_in", effective_at=datetime(2020, 1, 1))
            ),
            await refused(aget_state_at(validated_encounter, datetime(2020, 1, 1))),
            await refused(acreate_encounter(validated_encounter.definition, "not a model")),
        ]

    errors = run(attempts)

    assert [type(e) for e in errors] == [
        InvalidTransitionError,
        InvalidTransitionError,
        ConcurrentTransitionError,
        ValueError,
        ValueError,
        TypeError,
    ]
    assert (errors[0].from_state, errors[0].to_state) == ("scheduled", "completed")
    assert (errors[2].expected_version, errors[2].actual_version) == (3, 0)
    assert snapshot(validated_encounter) == before
    assert Encounter.objects.count() == 2

    # A validator's refusal (in_progress needs started_at): nothing written, rolled back.
    run(atransition, validated_encounter, "checked_in")
    with pytest.raises(ValidationError) as caught:
        run(atransition, validated_encounter, "in_progress")
    assert caught.value.validator == "RequiredFieldsValidator"
    assert snapshot(validated_encounter).version == 1

    # A soft-deleted encounter is not found.
    encounter.delete()
    with pytest.raises(EncounterNotFoundError) as missing:
        run(atransition, encounter, "checked_in")
    assert missing.value.encounter_id == encounter.pk


def test_the_sync_api_refuses_to_run_inside_an_event_loop(encounter):
    """Why the async functions exist: Django refuses a database call made from a coroutine."""

    async def direct() -> None:
        transition(encounter, "checked_in")

    with pytest.raises(SynchronousOnlyOperation):
        run(direct)
    assert reload(encounter).version == 0


def test_gathered_transitions_on_different_encounters_all_land(visit_definition, patient):
    encounters = [create_encounter(visit_definition, patient) for _ in range(12)]

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(
            *(atransition(e, "checked_in", reason=f"#{n}") for n, e in enumerate(encounters))
        )

    rows = run(all_at_once)

    assert [(row.encounter_id, row.sequence, row.reason) for row in rows] == [
        (e.pk, 1, f"#{n}") for n, e in enumerate(encounters)
    ]
    assert [reload(e).state for e in encounters] == ["checked_in"] * 12
    assert EncounterTransition.objects.count() == 12


def _one_per_version(counter_definition: Any, patient: Any, contenders: int, rounds: int):
    """The encounter and, per round, the outcomes of ``contenders`` gathered transitions that
    all expect the version the round starts at."""
    encounter = create_encounter(counter_definition, patient)
    copies = [Encounter.objects.get(pk=encounter.pk) for _ in range(contenders)]

    async def round_at(version: int) -> list[Any]:
        return await asyncio.gather(
            *(
                atransition(copy, "open", reason=f"c{n}", expected_version=version)
                for n, copy in enumerate(copies)
            ),
            return_exceptions=True,
        )

    outcomes = [run(round_at, version) for version in range(rounds)]
    return encounter, outcomes


def _check_one_winner_per_version(encounter: Any, outcomes: list[list[Any]], contenders: int):
    for version, results in enumerate(outcomes):
        winners = [r for r in results if isinstance(r, EncounterTransition)]
        losers = [r for r in results if not isinstance(r, EncounterTransition)]
        assert len(winners) == 1, results
        assert winners[0].sequence == version + 1
        assert len(losers) == contenders - 1
        assert {type(e) for e in losers} == {ConcurrentTransitionError}
        assert {(e.expected_version, e.actual_version) for e in losers} == {(version, version + 1)}
    rows = list(EncounterTransition.objects.filter(encounter_id=encounter.pk).order_by("sequence"))
    assert [row.sequence for row in rows] == list(range(1, len(outcomes) + 1))
    assert reload(encounter).version == len(outcomes)


def test_gathered_transitions_expecting_one_version_exactly_one_wins(counter_definition, patient):
    encounter, outcomes = _one_per_version(counter_definition, patient, contenders=8, rounds=4)
    _check_one_winner_per_version(encounter, outcomes, contenders=8)


# -- real concurrency: one thread and one connection per call, as under ASGI ----------------


async def _in_own_thread(coroutine_function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``coroutine_function`` as Django's ASGI handler runs one request: its
    thread-sensitive calls in a thread of their own (so a connection of their own), closed
    afterwards. Returns ``(thread id, result or exception)``."""
    async with ThreadSensitiveContext():
        thread = await sync_to_async(threading.get_ident, thread_sensitive=True)()
        try:
            return thread, await coroutine_function(*args, **kwargs)
        except Exception as error:
            return thread, error
        finally:
            await sync_to_async(connections.close_all, thread_sensitive=True)()


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_racing_in_separate_threads_exactly_one_wins_per_version(counter_definition, patient):
    contenders, rounds = 6, 3
    encounter = create_encounter(counter_definition, patient)

    async def round_at(version: int, copies: list[Any]) -> list[tuple[int, Any]]:
        return await asyncio.gather(
            *(
                _in_own_thread(atransition, copy, "open", expected_version=version)
                for copy in copies
            )
        )

    outcomes = []
    for version in range(rounds):
        copies = [Encounter.objects.get(pk=encounter.pk) for _ in range(contenders)]
        results = asyncio.run(round_at(version, copies))
        assert len({thread for thread, _ in results}) == contenders  # really apart
        outcomes.append([outcome for _, outcome in results])
    _check_one_winner_per_version(encounter, outcomes, contenders)


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_racing_blind_appends_in_separate_threads_all_land_in_order(counter_definition, patient):
    encounter = create_encounter(counter_definition, patient)
    writers = 10

    copies = [Encounter.objects.get(pk=encounter.pk) for _ in range(writers)]

    async def everyone() -> list[tuple[int, Any]]:
        return await asyncio.gather(
            *(
                _in_own_thread(atransition, copy, "open", reason=f"w{n}")
                for n, copy in enumerate(copies)
            )
        )

    results = asyncio.run(everyone())

    rows = [outcome for _, outcome in results]
    assert all(isinstance(row, EncounterTransition) for row in rows), rows
    assert sorted(row.sequence for row in rows) == list(range(1, writers + 1))
    stored = EncounterTransition.objects.filter(encounter_id=encounter.pk)
    assert Counter(stored.values_list("reason", flat=True)) == Counter(
        f"w{n}" for n in range(writers)
    )
    assert reload(encounter).version == writers


# -- the twins of upgrade_encounter, time in state, as_of and the exports -----------------------


def test_the_newer_twins_give_what_the_sync_functions_give(visit_definition, patient, user):
    from django_encounters import (
        aas_of,
        aduration_in_state,
        atime_in_states,
        aupgrade_encounter,
        duration_in_state,
        time_in_states,
    )
    from django_encounters.projections.fhir import (
        aencounter_bundle,
        aencounter_resource,
        encounter_bundle,
        encounter_resource,
    )

    encounter = create_encounter(visit_definition, patient)
    start = encounter.created_at
    transition(encounter, "checked_in", effective_at=start + timedelta(seconds=30))
    later = start + timedelta(hours=2)
    visit_definition.states = [*visit_definition.states, "no_show"]
    visit_definition.save()  # version 2
    status_map = {"scheduled": "planned", "checked_in": "arrived"}

    async def twins() -> tuple[Any, ...]:
        upgraded = await aupgrade_encounter(encounter, user, "new rules")
        return (
            upgraded,
            await atime_in_states(encounter, later),
            await aduration_in_state(encounter, "checked_in", later),
            await aas_of(start + timedelta(seconds=10)),
            await aas_of(later, queryset=Encounter.objects.filter(pk=encounter.pk)),
            await aencounter_resource(encounter, "R4", status_map),
            await aencounter_bundle(Encounter.objects.filter(pk=encounter.pk), "R4", status_map),
        )

    upgraded, hours, checked_in, before, after, resource, bundle = run(twins)

    assert (upgraded.sequence, upgraded.to_state, upgraded.reason) == (2, "checked_in", "new rules")
    assert upgraded.definition_version == 2
    assert (encounter.version, encounter.definition_version) == (2, 2)  # the instance moved on
    assert hours == time_in_states(encounter, later)
    assert checked_in == duration_in_state(encounter, "checked_in", later) > 0
    assert [(e.pk, e.state_at) for e in before] == [(encounter.pk, "scheduled")]
    assert [(e.pk, e.state_at) for e in after] == [(encounter.pk, "checked_in")]
    assert resource == encounter_resource(encounter, "R4", status_map)
    assert bundle == encounter_bundle([encounter], "R4", status_map)


def test_the_newer_twins_raise_the_sync_functions_typed_errors(visit_definition, patient):
    from django_encounters import aas_of, atime_in_states, aupgrade_encounter
    from django_encounters.exceptions import (
        EncounterError,
        FhirStatusError,
        UnknownFormatError,
    )
    from django_encounters.projections.event_log import aexport_event_log
    from django_encounters.projections.fhir import aencounter_resource

    encounter = create_encounter(visit_definition, patient)

    async def refused(coroutine: Any) -> BaseException:
        try:
            await coroutine
        except Exception as error:
            return error
        raise AssertionError("not refused")

    async def attempts() -> list[BaseException]:
        return [
            await refused(aupgrade_encounter(encounter)),  # already at the latest version
            await refused(atime_in_states(encounter, datetime(2020, 1, 1))),
            await refused(aas_of(datetime(2020, 1, 1))),
            await refused(aas_of(timezone.now(), queryset=EncounterTransition.objects.all())),
            await refused(aencounter_resource(encounter, "R4")),  # "scheduled" is no R4 code
            await refused(aexport_event_log("bogus", "never-written.xes")),
        ]

    errors = run(attempts)

    assert [type(e) for e in errors] == [
        EncounterError,
        ValueError,
        ValueError,
        TypeError,
        FhirStatusError,
        UnknownFormatError,
    ]
    assert "already at the latest version" in str(errors[0])
    assert reload(encounter).version == 0


def _thread_of_every_query(coroutine_function: Any) -> tuple[int, set[int], Any]:
    """Run ``coroutine_function`` from the test's thread; (the event loop's thread, the threads
    every SQL statement ran in, its result)."""
    threads: set[int] = set()

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        threads.add(threading.get_ident())
        return execute(sql, params, many, context)

    async def observed() -> tuple[int, Any]:
        return threading.get_ident(), await coroutine_function()

    with connections["default"].execute_wrapper(wrapper):
        loop_thread, result = run(observed)
    return loop_thread, threads, result


def test_no_twin_runs_sql_in_the_event_loop_s_thread(visit_definition, patient, tmp_path):
    from django_encounters import aas_of, atime_in_states, aupgrade_encounter
    from django_encounters.projections.event_log import aexport_event_log
    from django_encounters.projections.fhir import aencounter_bundle, aencounter_resource

    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "cancelled")
    visit_definition.states = [*visit_definition.states, "no_show"]
    visit_definition.save()  # version 2
    status_map = {"scheduled": "planned"}
    calls = [
        lambda: aupgrade_encounter(encounter),
        lambda: atime_in_states(encounter),
        lambda: aas_of(timezone.now()),
        lambda: aencounter_resource(encounter, "R4", status_map),
        lambda: aencounter_bundle([encounter], "R5", status_map),
        lambda: aexport_event_log("xes", tmp_path / "log.xes"),
        lambda: aexport_event_log("ocel2-json", tmp_path / "log.jsonocel"),
    ]
    for call in calls:
        loop_thread, threads, _ = _thread_of_every_query(call)
        assert threads, "no SQL observed"
        assert loop_thread not in threads  # the loop's thread never waits on the database
    assert (tmp_path / "log.xes").read_text().count("<trace>") == 1


class _SlowStream:
    """A text stream whose every write takes a while (a slow disk, a slow client)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        time.sleep(0.02)
        self.parts.append(text)
        return len(text)


def test_a_slow_export_does_not_block_the_event_loop(visit_definition, patient):
    from django_encounters.projections.event_log import aexport_event_log

    for _ in range(10):
        transition(create_encounter(visit_definition, patient), "checked_in")
    out = _SlowStream()

    async def export_while_ticking() -> tuple[int, Any]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        counts = await aexport_event_log("xes", out)
        done.set()
        await task
        return ticks, counts

    ticks, counts = run(export_while_ticking)

    assert (counts.traces, counts.events) == (10, 20)
    assert len(out.parts) == 12  # header, ten traces, end: 0.24 s of writing
    assert ticks >= 20  # the loop went on ticking meanwhile


@pytest.mark.django_db(transaction=True)
def test_twins_on_committed_data_from_another_thread(visit_definition, patient, tmp_path):
    """``asyncio.run`` from the test: the calls run in asgiref's executor thread, with its own
    connection, on committed rows (SQLite's in-memory test database is shared between them)."""
    from django_encounters import aas_of, atime_in_states, aupgrade_encounter
    from django_encounters.projections.event_log import aexport_event_log

    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    visit_definition.states = [*visit_definition.states, "no_show"]
    visit_definition.save()  # version 2

    async def in_turn() -> tuple[Any, ...]:
        main = threading.get_ident()
        worker = await sync_to_async(threading.get_ident, thread_sensitive=True)()
        try:
            return (
                main != worker,
                await aupgrade_encounter(encounter, None, "up"),
                await atime_in_states(encounter),
                await aas_of(timezone.now() + timedelta(seconds=1)),
                await aexport_event_log("csv", tmp_path / "log.csv"),
            )
        finally:
            await sync_to_async(connections.close_all, thread_sensitive=True)()

    elsewhere, upgraded, hours, census, counts = asyncio.run(in_turn())

    assert elsewhere
    assert (upgraded.sequence, upgraded.definition_version) == (2, 2)
    assert set(hours) == {"scheduled", "checked_in"}
    assert [(e.pk, e.state_at) for e in census] == [(encounter.pk, "checked_in")]
    assert (counts.traces, counts.events) == (1, 3)
    assert reload(encounter).definition_version == 2


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_twins_gathered_on_committed_data_each_in_its_own_thread(visit_definition, patient):
    """As under ASGI: each call in a thread (and connection) of its own, on committed rows."""
    from django_encounters import aas_of, atime_in_states, aupgrade_encounter

    encounters = [create_encounter(visit_definition, patient) for _ in range(3)]
    for encounter in encounters:
        transition(encounter, "checked_in")
    visit_definition.states = [*visit_definition.states, "no_show"]
    visit_definition.save()  # version 2
    copies = [Encounter.objects.get(pk=e.pk) for e in encounters]

    async def everyone() -> list[tuple[int, Any]]:
        return await asyncio.gather(
            *(_in_own_thread(aupgrade_encounter, copy, None, "up") for copy in copies),
            _in_own_thread(atime_in_states, copies[0]),
            _in_own_thread(aas_of, timezone.now() + timedelta(seconds=1)),
        )

    results = asyncio.run(everyone())

    outcomes = [outcome for _, outcome in results]
    assert [type(o).__name__ for o in outcomes[:3]] == ["EncounterTransition"] * 3, outcomes
    assert set(outcomes[3]) == {"scheduled", "checked_in"}
    assert {e.pk: e.state_at for e in outcomes[4]} == {e.pk: "checked_in" for e in encounters}
    assert [reload(e).definition_version for e in encounters] == [2, 2, 2]
