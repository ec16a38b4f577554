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
