"""The rebuild's faster paths give what the generic ones give (issue 12 item 4): the locked
batch read through ``store.values_rows``, the stream times through the store's loaders, and
the timeline's per-stream event builder."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timezone as dt_timezone

import pytest
from django.db import transaction
from eventsourcing.utils import get_topic

from django_encounters import store
from django_encounters.engine import EncounterTimeline, StreamRow, genesis_hash, row_hash
from django_encounters.engine.hashing import stream_hashes
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.replay import ENCOUNTER_COLUMNS
from django_encounters.services import create_encounter, transition
from tests.helpers import IS_CITUS, version_hash_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def encounters(visit_definition, patient, user):
    made = [create_encounter(visit_definition, patient) for _ in range(3)]
    transition(made[0], "checked_in", transitioned_by=user, reason="arrived")
    transition(made[0], "in_progress")
    transition(made[1], "cancelled")
    return made


def test_values_rows_is_the_querysets_values(encounters):
    query = Encounter.all_objects.order_by("pk").values_list(*ENCOUNTER_COLUMNS)
    first = list(query[:1])
    with transaction.atomic():
        # Citus locks a distributed table's rows only with its distribution column's value
        # given (the sharded rebuild locks each batch that way, shard by shard).
        assert store.values_rows(query.filter(pk=first[0][0]).select_for_update()) == first
        fast = store.values_rows((query if IS_CITUS else query.select_for_update())[:2])
    assert fast == list(query[:2])
    assert store.values_rows(query.filter(pk__gt=fast[-1][0])) == list(query[2:])
    assert [type(value) for value in fast[0]] == [type(value) for value in list(query)[0]]


def test_stream_times_are_the_orms(encounters):
    rows = EncounterTransition.objects.all()
    streamed = {
        (key, row.sequence): (row.effective_at, row.transitioned_at)
        for key, stream in store.iter_streams(rows)
        for row in stream
    }
    expected = {
        (encounter, sequence): (effective, recorded)
        for encounter, sequence, effective, recorded in rows.values_list(
            "encounter_id", "sequence", "effective_at", "transitioned_at"
        )
    }
    assert streamed == expected
    for effective, recorded in streamed.values():
        assert effective.tzinfo is recorded.tzinfo is dt_timezone.utc


def test_events_builds_the_librarys_event_and_checks_the_id_once(encounters):
    encounter = encounters[0]
    stream = store.load_stream(encounter.pk, "default")
    build = EncounterTimeline.events(encounter.pk)
    for row in stream:
        fast = build(row)
        generic = EncounterTimeline.Transitioned(  # the library's own constructor
            originator_id=encounter.pk,
            originator_version=row.sequence,
            timestamp=row.transitioned_at,
            row=row,
        )
        assert type(fast) is type(generic) is EncounterTimeline.Transitioned
        assert fast.__dict__ == generic.__dict__
    with pytest.raises(TypeError, match="non-UUID"):
        EncounterTimeline.events(str(encounter.pk))
    row = StreamRow(
        1, "a", "b", stream[0].effective_at, stream[0].transitioned_at, None, "", {}, 1, ""
    )
    assert EncounterTimeline.events(uuid.uuid4())(row).originator_version == 1


def test_open_is_the_librarys_opened_event(encounters):
    encounter = encounters[0]
    genesis = encounter.genesis()
    fast = EncounterTimeline.open(genesis, encounter.genesis_hash)
    generic = EncounterTimeline.Opened(  # type: ignore[call-arg]
        originator_topic=get_topic(EncounterTimeline),
        originator_id=genesis.encounter_id,
        originator_version=0,
        timestamp=genesis.created_at,
        origin_state=genesis.origin_state,
        definition_version=genesis.definition_version,
        genesis_hash=encounter.genesis_hash,
    ).mutate(None)
    assert type(fast) is type(generic)
    assert fast.__dict__ == generic.__dict__
    with pytest.raises(TypeError, match="non-UUID"):
        EncounterTimeline.open(replace(genesis, encounter_id=str(genesis.encounter_id)), "")


def test_stream_hashes_are_genesis_hash_and_row_hash(encounters):
    encounter = encounters[0]
    genesis = encounter.genesis()
    version = version_hash_of(encounter)
    computed, hash_row = stream_hashes(genesis, {genesis.definition_version: version}.get)
    assert computed == genesis_hash(genesis, version) == encounter.genesis_hash
    previous = computed
    for row in store.load_stream(encounter.pk, "default"):
        assert row.definition_version == genesis.definition_version
        assert hash_row(row, previous) == row_hash(encounter.pk, row, previous, version)
        assert hash_row(row, previous) == row.hash
        previous = row.hash
