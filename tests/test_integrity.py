"""The log proves itself against someone with write access: each attack of the integrity
review, tried with raw SQL, the ORM's bulk methods, a lagging clock and backups, and what
catches it. Every test runs on SQLite and PostgreSQL unless marked."""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import io
import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any
from unittest import mock
from uuid import UUID

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_encounters import store
from django_encounters.checks import check_use_tz, check_validator_modules
from django_encounters.engine import (
    HASH_FORMAT,
    HASH_FORMATS,
    Genesis,
    HashFormat,
    Rules,
    StreamRow,
    definition_version_hash,
    genesis_hash,
    hash_format,
    register_hash_format,
    row_hash,
    stored_precision,
    verify_stream,
)
from django_encounters.engine.hashing import CURRENT, find_hash_format, unregister_hash_format
from django_encounters.exceptions import (
    EncounterConfigurationError,
    EncounterError,
    InvalidStateError,
    InvalidTransitionError,
    ProjectionDriftError,
)
from django_encounters.models import (
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.projections.audit import audit_encounters
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import (
    create_encounter,
    get_state_at,
    time_in_states,
    transition,
    upgrade_encounter,
)
from tests.helpers import (
    IS_POSTGRES,
    delete_rows,
    insert_row_raw,
    raw_update,
    reload,
    run_command,
    snapshot,
    triggers_off,
    version_hash_of,
    work_queries,
)

pytestmark = pytest.mark.django_db

ENCOUNTERS = Encounter._meta.db_table
TRANSITIONS = EncounterTransition._meta.db_table
VERSIONS = EncounterDefinitionVersion._meta.db_table


def anomalies(encounter: Any) -> list[tuple[int, str]]:
    report = audit_encounters(encounters=[encounter.pk])
    return [(a.sequence, a.kind) for audit in report.encounters for a in audit.anomalies]


@pytest.fixture
def visit(encounter: Any) -> Any:
    """A visit with two rows: scheduled -> checked_in -> in_progress."""
    transition(encounter, "checked_in")
    transition(encounter, "in_progress", skip_validation=True)
    return encounter


# ---------------------------------------------------------------------------------------------
# 1. The write path never trusts an edited projection
# ---------------------------------------------------------------------------------------------


def test_an_edited_state_is_never_written_into_the_log(visit):
    """The review's attack: with the log at scheduled -> checked_in -> in_progress, the state is
    set to 'scheduled' by SQL; transition(e, 'cancelled') used to append 'scheduled ->
    cancelled', an edge the log never allowed. Now it is refused and nothing is written."""
    raw_update(Encounter, visit.pk, state="scheduled")
    before = snapshot(visit)

    with pytest.raises(ProjectionDriftError) as refused:
        transition(visit, "cancelled")

    assert refused.value.encounter_id == visit.pk
    assert "state 'scheduled', the log says 'in_progress'" in str(refused.value)
    assert "rebuild_encounter_projections --encounter" in str(refused.value)
    assert snapshot(visit) == before


def test_an_edited_head_hash_is_refused_instead_of_chained_to(visit):
    raw_update(Encounter, visit.pk, head_hash="v2:" + "0" * 64)
    before = snapshot(visit)
    with pytest.raises(ProjectionDriftError, match="head_hash"):
        transition(visit, "completed", skip_validation=True)
    assert snapshot(visit) == before


def test_a_fresh_encounter_with_an_edited_projection_is_refused(encounter):
    raw_update(Encounter, encounter.pk, state="checked_in")
    with pytest.raises(ProjectionDriftError, match="the log says 'scheduled'"):
        transition(encounter, "in_progress", skip_validation=True)
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0


def test_a_deleted_last_row_is_refused_by_the_write_path(visit):
    delete_rows(visit, 2)
    with pytest.raises(ProjectionDriftError, match="no row 2 in the log"):
        transition(visit, "completed", skip_validation=True)


PROJECTION_TAMPERS = {
    "state": lambda e: "cancelled",
    "version": lambda e: e.version + 1,
    "timeline_end_at": lambda e: e.timeline_end_at + timedelta(seconds=1),
    "head_hash": lambda e: e.genesis_hash,
    "definition_version": lambda e: e.definition_version + 1,
    "last_transitioned_at": lambda e: e.last_transitioned_at - timedelta(milliseconds=1),
}


@pytest.mark.parametrize("column", sorted(PROJECTION_TAMPERS))
@pytest.mark.parametrize("rows", [1, 3])
def test_every_projection_column_is_proven_before_deciding(make_definition, patient, column, rows):
    """Each projection column tampered in turn (with a stream of 1 and of 3 rows, one of them
    backdated so the timeline's end is not the last recorded row): refused, nothing written."""
    definition = make_definition(
        final_states=[],
        transitions={
            "scheduled": ["checked_in", "in_progress"],
            "checked_in": ["in_progress", "scheduled"],
            "in_progress": ["checked_in"],
        },
    )
    encounter = create_encounter(definition, patient)
    transition(encounter, "checked_in", effective_at=timezone.now() - timedelta(hours=2))
    if rows == 3:
        transition(encounter, "in_progress")
        transition(encounter, "scheduled", effective_at=timezone.now() - timedelta(hours=1))
    stored = reload(encounter)
    raw_update(Encounter, encounter.pk, **{column: PROJECTION_TAMPERS[column](stored)})
    before = snapshot(encounter)

    with pytest.raises(ProjectionDriftError):
        transition(encounter, "in_progress" if rows == 1 else "checked_in")

    assert snapshot(encounter) == before


_histories = st.lists(
    st.tuples(
        st.sampled_from(["working", "onleave", "finished", "hired"]),
        st.none() | st.integers(min_value=1, max_value=30),
    ),
    max_size=6,
)


def _tampered(stored: Encounter, column: str, pick: int, others: list[str]) -> Any:
    """A value for ``column`` that differs from the stored one, chosen by ``pick``."""
    value = getattr(stored, column)
    shift = timedelta(milliseconds=pick % 5000 + 1)
    if column == "state":
        choices: list[Any] = [s for s in ("hired", "working", "onleave", "finished") if s != value]
    elif column == "version":
        choices = [v for v in (value - 1, value + 1, value + 2) if v >= 0]
    elif column == "head_hash":
        choices = [h for h in [*others, stored.genesis_hash, "v2:" + "0" * 64] if h != value]
    elif column == "definition_version":
        choices = [value + 1, 0]
    elif value is None:  # timeline_end_at, last_transitioned_at of a fresh encounter
        choices = [timezone.now() - shift]
    else:
        choices = [None, value - shift, value + shift]
    return choices[pick % len(choices)]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    history=_histories,
    column=st.sampled_from(store.PROJECTION_FIELDS),
    pick=st.integers(min_value=0, max_value=10**6),
    target=st.sampled_from(["working", "onleave", "finished", "hired"]),
)
def test_property_any_tampered_projection_column_is_refused(
    employment_definition, patient, history, column, pick, target
):
    """Random histories (backdated rows included), one projection column tampered with a
    value the log does not support: whatever the next transition asks, it is refused with
    ProjectionDriftError and nothing is written."""
    encounter = create_encounter(employment_definition, patient)
    for state, hours in history:
        effective = None if hours is None else timezone.now() - timedelta(hours=hours)
        try:
            transition(encounter, state, effective_at=effective)
        except InvalidTransitionError:
            pass
    stored = reload(encounter)
    others = list(
        EncounterTransition.objects.filter(encounter=encounter).values_list("hash", flat=True)
    )
    raw_update(Encounter, encounter.pk, **{column: _tampered(stored, column, pick, others)})
    before = snapshot(encounter)

    with pytest.raises(ProjectionDriftError):
        transition(encounter, target, effective_at=timezone.now() - timedelta(hours=pick % 40))

    assert snapshot(encounter) == before


def test_the_proof_costs_no_extra_statement(visit):
    with CaptureQueriesContext(connection) as captured:
        transition(visit, "completed", skip_validation=True)
    assert len(work_queries(captured)) == 3


@pytest.mark.parametrize(
    "attack",
    [
        lambda: Encounter.objects.filter().update(state="cancelled"),
        lambda: Encounter.all_objects.filter().update(version=9),
        lambda: Encounter.objects.update(head_hash="x", notes="n"),
        lambda: Encounter.objects.update(origin_state="x"),
        lambda: Encounter.objects.update(created_at=timezone.now()),
        lambda: Encounter.objects.bulk_update(list(Encounter.objects.all()), ["state"]),
        lambda: Encounter.objects.bulk_update(list(Encounter.objects.all()), ["genesis_hash"]),
    ],
    ids=[
        "state",
        "version",
        "head with notes",
        "origin",
        "created_at",
        "bulk state",
        "bulk genesis",
    ],
)
def test_queryset_updates_of_derived_columns_are_refused(visit, attack):
    before = snapshot(visit)
    with pytest.raises(EncounterError, match="derived from the transition log"):
        attack()
    assert snapshot(visit) == before
    assert Encounter.objects.filter(pk=visit.pk).update(notes="still allowed") == 1


# ---------------------------------------------------------------------------------------------
# 2. Genesis in the chain
# ---------------------------------------------------------------------------------------------


def test_genesis_heads_a_fresh_stream_and_row_one_chains_to_it(encounter, patient):
    fresh = reload(encounter)
    assert fresh.head_hash == fresh.genesis_hash == fresh.compute_genesis_hash()
    assert fresh.genesis_hash == genesis_hash(fresh.genesis(), version_hash_of(fresh))
    assert fresh.genesis_hash.startswith("v3:") and version_hash_of(fresh).startswith("v3:")
    genesis = fresh.genesis()
    assert genesis.subject_type == "testapp.patient"
    assert genesis.subject_id == str(patient.pk)
    assert genesis.definition_version == 1

    row = transition(encounter, "checked_in")
    assert row.hash == row_hash(
        encounter.pk, store.row_of_record(row), fresh.genesis_hash, version_hash_of(fresh)
    )
    assert row.hash == row.compute_hash(fresh.genesis_hash)


@pytest.mark.parametrize(
    "fact",
    ["origin_state", "created_at", "subject_id", "origin_version", "definition"],
)
@pytest.mark.parametrize("with_rows", [False, True], ids=["no rows", "rows"])
def test_changed_creation_facts_are_a_genesis_anomaly(encounter, make_definition, fact, with_rows):
    if with_rows:
        transition(encounter, "checked_in")
    changes = {
        "origin_state": {"origin_state": "checked_in"},
        "created_at": {"created_at": reload(encounter).created_at - timedelta(days=3)},
        "subject_id": {"subject_id": "999"},
        "origin_version": {"origin_version": 2},
        "definition": {"definition": make_definition().pk},
    }[fact]
    raw_update(Encounter, encounter.pk, **changes)

    assert (0, "genesis") in anomalies(encounter)
    assert run_command("audit_encounters", "--encounter", str(encounter.pk))[0] == 1
    result = rebuild_projections(check=True, encounters=[encounter.pk])
    assert "genesis" in {a.kind for a in result.anomalies}
    assert not result.ok


def test_a_recomputed_genesis_breaks_row_one(encounter):
    """An attacker who changes a fact and also stores the matching genesis hash is caught by
    row 1, whose hash covers the original genesis."""
    transition(encounter, "checked_in")
    raw_update(Encounter, encounter.pk, origin_state="checked_in")
    forged = reload(encounter).compute_genesis_hash()
    raw_update(Encounter, encounter.pk, genesis_hash=forged)
    found = anomalies(encounter)
    assert (1, "hash") in found and (0, "genesis") not in found


# ---------------------------------------------------------------------------------------------
# 3. The audit and the rebuild compare the head
# ---------------------------------------------------------------------------------------------


def test_a_deleted_last_row_is_reported_and_never_erased_by_a_rebuild(visit):
    transition(visit, "completed", skip_validation=True)
    delete_rows(visit, 3)
    before = snapshot(visit)

    assert anomalies(visit) == [(3, "truncated")]
    code, out, _ = run_command("rebuild_encounter_projections", "--check")
    assert code == 1 and "truncated" in out
    code, out, _ = run_command("rebuild_encounter_projections")
    assert code == 1
    assert snapshot(visit) == before  # the version still says 3: the evidence is kept
    assert reload(visit).version == 3


def test_a_head_that_is_no_rows_hash_is_reported(visit):
    rows = list(EncounterTransition.objects.filter(encounter=visit).order_by("sequence"))
    raw_update(Encounter, visit.pk, head_hash=rows[0].hash)  # version still 2
    assert anomalies(visit) == [(2, "head")]
    result = rebuild_projections()
    assert [a.kind for a in result.anomalies] == ["head"]
    assert reload(visit).head_hash == rows[0].hash  # left as it was


def test_a_projection_behind_the_log_is_drift_and_fixed(visit):
    """Rows appended below the library (the projection behind, its head still the hash of the
    row it names) are derivable: a rebuild moves the projection forward."""
    insert_row_raw(
        visit,
        sequence=3,
        from_state="in_progress",
        to_state="completed",
        transitioned_at=reload(visit).last_transitioned_at + timedelta(seconds=1),
        definition_version=1,
    )
    check = rebuild_projections(check=True)
    assert (check.projections_drifted, check.anomaly_count) == (1, 0)
    assert rebuild_projections().projections_fixed == 1
    assert (reload(visit).version, reload(visit).state) == (3, "completed")


# ---------------------------------------------------------------------------------------------
# 4. System time is monotonic per stream
# ---------------------------------------------------------------------------------------------


def test_system_time_increases_even_within_one_millisecond(encounter):
    frozen = timezone.now()
    with mock.patch("django_encounters.services.timezone.now", return_value=frozen):
        rows = [
            transition(encounter, s, skip_validation=True) for s in ("checked_in", "in_progress")
        ]
    assert rows[0].transitioned_at == stored_precision(frozen)
    assert rows[1].transitioned_at == rows[0].transitioned_at + timedelta(milliseconds=1)


def test_rows_recorded_within_one_millisecond_are_effective_now_not_in_the_future(encounter):
    # Their system times are stamped a millisecond apart, ahead of the clock; their business
    # time is the clock: asked about "now", the state is the last one recorded.
    frozen = timezone.now()
    states = ("checked_in", "in_progress", "completed")
    with mock.patch("django_encounters.services.timezone.now", return_value=frozen):
        rows = [transition(encounter, s, skip_validation=True) for s in states]
        assert get_state_at(encounter, timezone.now()) == "completed" == reload(encounter).state
    assert [r.effective_at for r in rows] == [stored_precision(frozen)] * 3
    assert rows[-1].transitioned_at == stored_precision(frozen) + timedelta(milliseconds=2)
    assert reload(encounter).ended_at == stored_precision(frozen)
    assert anomalies(encounter) == []


def test_a_lagging_clock_cannot_record_before_the_previous_row(encounter):
    first = transition(encounter, "checked_in")
    behind = first.transitioned_at - timedelta(minutes=10)
    with mock.patch("django_encounters.services.timezone.now", return_value=behind):
        second = transition(encounter, "in_progress", skip_validation=True)
    assert second.transitioned_at > first.transitioned_at
    assert second.effective_at >= first.effective_at  # "now" never lands before the timeline
    assert anomalies(encounter) == []


def test_the_low_level_create_refuses_an_earlier_system_time(visit):
    last = reload(visit).last_transitioned_at
    before = snapshot(visit)
    with pytest.raises(EncounterError, match="never decreases"):
        EncounterTransition.objects.create(
            encounter=visit,
            from_state="in_progress",
            to_state="completed",
            transitioned_at=last - timedelta(seconds=1),
        )
    assert snapshot(visit) == before


def test_a_decreasing_system_time_is_an_audit_anomaly(visit):
    insert_row_raw(
        visit,
        sequence=3,
        from_state="in_progress",
        to_state="completed",
        transitioned_at=reload(visit).last_transitioned_at - timedelta(hours=1),
        definition_version=1,
    )
    assert (3, "clock") in anomalies(visit)


def test_known_at_is_a_prefix_of_the_stream(employment):
    rows = [
        transition(employment, "working", effective_at=timezone.now() - timedelta(hours=5)),
        transition(employment, "finished"),
        transition(employment, "onleave", effective_at=timezone.now() - timedelta(hours=3)),
    ]
    known = rows[1].transitioned_at
    report = audit_encounters(encounters=[employment.pk], known_at=known)
    (audit,) = report.encounters
    assert [r.sequence for r in audit.timeline] == [1, 2]
    assert audit.state_as_of == "finished"
    code, out, _ = run_command(
        "audit_encounters",
        "--encounter",
        str(employment.pk),
        "--known-at",
        known.isoformat(),
        "--format",
        "json",
    )
    assert code == 0
    assert [r["sequence"] for r in json.loads(out)["encounters"][0]["timeline"]] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 5. Versioned definitions
# ---------------------------------------------------------------------------------------------


def test_editing_a_definition_never_turns_history_into_anomalies(encounter, visit_definition):
    transition(encounter, "checked_in")
    transition(encounter, "cancelled")
    visit_definition.transitions = {
        "scheduled": ["checked_in"],  # 'cancelled' removed from both sources
        "checked_in": ["in_progress"],
        "in_progress": ["completed", "cancelled"],
    }
    visit_definition.save()

    assert visit_definition.version == 2
    assert list(visit_definition.versions.values_list("number", flat=True)) == [1, 2]
    assert anomalies(encounter) == []
    assert rebuild_projections(check=True).ok


def test_encounters_keep_their_rules_until_upgraded(visit_definition, patient, user):
    old = create_encounter(visit_definition, patient)
    visit_definition.transitions = {**visit_definition.transitions, "scheduled": ["checked_in"]}
    visit_definition.save()
    new = create_encounter(visit_definition, patient)
    assert (reload(old).definition_version, reload(new).definition_version) == (1, 2)

    with pytest.raises(InvalidTransitionError):
        transition(new, "cancelled")  # the new rules
    upgraded = upgrade_encounter(old, transitioned_by=user, reason="new intake rules")
    assert (upgraded.from_state, upgraded.to_state, upgraded.definition_version) == (
        "scheduled",
        "scheduled",
        2,
    )
    assert (upgraded.transitioned_by, upgraded.reason) == (user, "new intake rules")
    assert reload(old).definition_version == 2
    with pytest.raises(InvalidTransitionError):
        transition(old, "cancelled")
    transition(old, "checked_in")
    assert anomalies(old) == []


def test_an_old_encounter_still_moves_by_its_pinned_rules(visit_definition, patient):
    old = create_encounter(visit_definition, patient)
    visit_definition.transitions = {**visit_definition.transitions, "scheduled": ["checked_in"]}
    visit_definition.save()
    transition(old, "cancelled")  # allowed by version 1
    assert anomalies(old) == []


def test_upgrade_is_refused_when_the_state_is_gone(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    visit_definition.states = [s for s in visit_definition.states if s != "checked_in"]
    visit_definition.transitions = {"scheduled": ["in_progress"], "in_progress": ["completed"]}
    visit_definition.final_states = ["completed"]
    visit_definition.save()
    before = snapshot(encounter)

    with pytest.raises(InvalidStateError, match="checked_in"):
        upgrade_encounter(encounter, reason="try")
    assert snapshot(encounter) == before
    with pytest.raises(EncounterError, match="already at the latest version"):
        upgrade_encounter(create_encounter(visit_definition, encounter.subject))


def test_definition_versions_are_immutable(visit_definition):
    version = visit_definition.versions.get()
    with pytest.raises(EncounterError):
        EncounterDefinitionVersion.objects.filter(pk=version.pk).update(states=["x"])
    with pytest.raises(EncounterError):
        version.save()
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        raw_update(EncounterDefinitionVersion, version.pk, states=["x"])


def test_saving_an_unchanged_machine_adds_no_version(visit_definition):
    visit_definition.description = "edited"
    visit_definition.save()
    assert visit_definition.version == 1
    assert visit_definition.versions.count() == 1


# ---------------------------------------------------------------------------------------------
# 7. The hash format is named; a known answer pins it
# ---------------------------------------------------------------------------------------------

KNOWN_ID = UUID("12345678-1234-5678-1234-567812345678")
KNOWN_GENESIS = Genesis(
    KNOWN_ID,
    UUID("87654321-4321-8765-4321-876543218765"),
    1,
    "clinic.patient",
    "42",
    "scheduled",
    datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=dt_timezone.utc),
)
KNOWN_ROW = StreamRow(
    1,
    "scheduled",
    "checked_in",
    datetime(2026, 1, 2, 4, 0, 0, 123000, tzinfo=dt_timezone.utc),
    datetime(2026, 1, 2, 4, 0, 1, 456000, tzinfo=dt_timezone.utc),
    7,
    "arrived",
    {"room": 3, "note": "ü"},
    1,
    "",
    transitioned_by_name="alice",
)
#: Version 1 of KNOWN_GENESIS's definition: its machine and (pinned below) its content hash.
KNOWN_MACHINE = {
    "states": ["scheduled", "checked_in"],
    "initial_state": "scheduled",
    "final_states": ["checked_in"],
    "transitions": {"scheduled": ["checked_in"]},
    "validators": [],
}
KNOWN_VERSION_HASH = "v3:770aad181fa2d5fa8675c5b0426724df0f3ffafd4fd07f0093b229b50199fb36"
KNOWN_VERSIONS = {1: KNOWN_VERSION_HASH}.get


#: Every registered hash format's answers for ``KNOWN_GENESIS`` and ``KNOWN_ROW`` chained to it:
#: ``name -> (genesis hash, row hash)``. A format registered without its answer pinned here
#: fails ``test_every_registered_hash_format_gives_its_known_answer``.
KNOWN_ANSWERS = {
    "v2": (
        "v2:163365900696286814b65d79e665eb36250a66e26b5e7184ae2684fd10e17851",
        "v2:4938d85cdfed4c139d8cdf88a80f4d0807a9654a736e991dbda09aa551b919eb",
    ),
    "v3": (
        "v3:49db8be2c14e76802b82533851dd4cc5fdbb5f9bb0e5692415681241663cb4a6",
        "v3:b6d51366b5262e38f00b2e5bb0101e60899b7086beb1b4bca02258235af3241f",
    ),
}


def test_known_answer_hashes():
    """Format v2 (engine/hashing.py's docstring, docs/concepts.md): one line of text, fields
    separated by "|", text as <length in code points>:<text>, times as integer microseconds
    since the epoch in UTC."""
    created = calendar.timegm((2026, 1, 2, 3, 4, 5)) * 10**6 + 6000
    assert created == 1767323045006000
    genesis_payload = (
        "v2|genesis|36:12345678-1234-5678-1234-567812345678|"
        "36:87654321-4321-8765-4321-876543218765|1|14:clinic.patient|2:42|9:scheduled|"
        f"{created}"
    )
    expected_genesis = "v2:" + hashlib.sha256(genesis_payload.encode()).hexdigest()
    assert HASH_FORMATS["v2"].genesis_hash(KNOWN_GENESIS) == expected_genesis
    assert expected_genesis == KNOWN_ANSWERS["v2"][0]
    effective = calendar.timegm((2026, 1, 2, 4, 0, 0)) * 10**6 + 123000
    recorded = calendar.timegm((2026, 1, 2, 4, 0, 1)) * 10**6 + 456000
    row_payload = (
        "v2|row|36:12345678-1234-5678-1234-567812345678|1|9:scheduled|10:checked_in|"
        f"{effective}|{recorded}|1:7|7:arrived|21:" + '{"note":"ü","room":3}'
        "|1|67:" + expected_genesis
    )
    expected_row = "v2:" + hashlib.sha256(row_payload.encode()).hexdigest()
    assert HASH_FORMATS["v2"].stream_hasher(KNOWN_ID)(KNOWN_ROW, expected_genesis) == expected_row
    assert expected_row == KNOWN_ANSWERS["v2"][1]
    assert hash_format(expected_row) == "v2"
    assert hash_format("d425f065") is None


def test_known_answer_hashes_v3():
    """Format v3 (engine/hashing.py's docstring, docs/concepts.md): v2's rules, the row
    carrying the recorded name and the content hash of its definition version, the genesis
    the content hash of the version it was created under; a version's content hash covers its
    definition, number, machine (canonical JSON) and the previous version's hash."""
    machine = (
        '{"final_states":["checked_in"],"initial_state":"scheduled",'
        '"states":["scheduled","checked_in"],"transitions":{"scheduled":["checked_in"]},'
        '"validators":[]}'
    )
    version_payload = (
        f"v3|version|36:87654321-4321-8765-4321-876543218765|1|{len(machine)}:{machine}|0:"
    )
    expected_version = "v3:" + hashlib.sha256(version_payload.encode()).hexdigest()
    assert expected_version == KNOWN_VERSION_HASH
    assert (
        HASH_FORMATS["v3"].hash_version(str(KNOWN_GENESIS.definition_id), 1, KNOWN_MACHINE, "")
        == expected_version
    )
    assert definition_version_hash(KNOWN_GENESIS.definition_id, 1, KNOWN_MACHINE, "") == (
        expected_version
    )
    created = calendar.timegm((2026, 1, 2, 3, 4, 5)) * 10**6 + 6000
    genesis_payload = (
        "v3|genesis|36:12345678-1234-5678-1234-567812345678|"
        f"36:87654321-4321-8765-4321-876543218765|1|67:{expected_version}|14:clinic.patient|"
        f"2:42|9:scheduled|{created}"
    )
    expected_genesis = "v3:" + hashlib.sha256(genesis_payload.encode()).hexdigest()
    assert HASH_FORMATS["v3"].genesis_hash(KNOWN_GENESIS, KNOWN_VERSIONS) == expected_genesis
    assert expected_genesis == KNOWN_ANSWERS["v3"][0]
    effective = calendar.timegm((2026, 1, 2, 4, 0, 0)) * 10**6 + 123000
    recorded = calendar.timegm((2026, 1, 2, 4, 0, 1)) * 10**6 + 456000
    row_payload = (
        "v3|row|36:12345678-1234-5678-1234-567812345678|1|9:scheduled|10:checked_in|"
        f"{effective}|{recorded}|1:7|5:alice|7:arrived|21:" + '{"note":"ü","room":3}'
        f"|1|67:{expected_version}|67:{expected_genesis}"
    )
    expected_row = "v3:" + hashlib.sha256(row_payload.encode()).hexdigest()
    hasher = HASH_FORMATS["v3"].stream_hasher(KNOWN_ID, KNOWN_VERSIONS)
    assert hasher(KNOWN_ROW, expected_genesis) == expected_row
    assert expected_row == KNOWN_ANSWERS["v3"][1]
    # The name and the version are covered: either changed, the hash changes.
    renamed = dataclasses.replace(KNOWN_ROW, transitioned_by_name="mallory")
    assert hasher(renamed, expected_genesis) != expected_row
    other_version = {1: "v3:" + "0" * 64}.get
    assert (
        HASH_FORMATS["v3"].stream_hasher(KNOWN_ID, other_version)(KNOWN_ROW, expected_genesis)
        != expected_row
    )
    assert HASH_FORMATS["v3"].genesis_hash(KNOWN_GENESIS, other_version) != expected_genesis


def test_every_registered_hash_format_gives_its_known_answer():
    assert HASH_FORMATS, "no hash format is registered"
    for name, fmt in HASH_FORMATS.items():
        assert name in KNOWN_ANSWERS, f"hash format {name!r} has no pinned known answer"
        known_genesis, known_row = KNOWN_ANSWERS[name]
        assert (fmt.name, fmt.prefix) == (name, name + ":")
        assert fmt.genesis_hash(KNOWN_GENESIS, KNOWN_VERSIONS) == known_genesis
        assert fmt.stream_hasher(KNOWN_ID, KNOWN_VERSIONS)(KNOWN_ROW, known_genesis) == known_row
        assert (
            fmt.stream_hasher(str(KNOWN_ID), KNOWN_VERSIONS)(KNOWN_ROW, known_genesis) == known_row
        )
        assert hash_format(known_row) == hash_format(known_genesis) == name
        assert find_hash_format(known_row) is find_hash_format(known_genesis) is fmt


def test_new_hashes_are_written_in_the_current_format():
    assert HASH_FORMAT == CURRENT.name == "v3"
    known_genesis, known_row = KNOWN_ANSWERS[HASH_FORMAT]
    assert genesis_hash(KNOWN_GENESIS, KNOWN_VERSION_HASH) == known_genesis
    assert row_hash(KNOWN_ID, KNOWN_ROW, known_genesis, KNOWN_VERSION_HASH) == known_row
    assert row_hash(str(KNOWN_ID), KNOWN_ROW, known_genesis, KNOWN_VERSION_HASH) == known_row
    # Under a version with no content hash yet (written before v3): the previous format.
    assert genesis_hash(KNOWN_GENESIS) == KNOWN_ANSWERS["v2"][0]
    assert row_hash(KNOWN_ID, KNOWN_ROW, KNOWN_ANSWERS["v2"][0]) == KNOWN_ANSWERS["v2"][1]


def test_a_hash_format_is_registered_once():
    v2 = HASH_FORMATS["v2"]
    same_name = HashFormat("v2", v2.row_head, v2.hash_row, v2.hash_genesis)
    with pytest.raises(ValueError, match="already registered"):
        register_hash_format(same_name)
    with pytest.raises(ValueError, match="new hashes are written in"):
        unregister_hash_format(HASH_FORMAT)
    for name in ("", "v2:", "v 3", "v|3", "vé"):  # a name is its hashes' prefix before ":"
        with pytest.raises(ValueError, match="ASCII letters and digits"):
            HashFormat(name, v2.row_head, v2.hash_row, v2.hash_genesis)
    assert HASH_FORMATS["v2"] is v2


T1_HEADS: list[str] = []  # each encounter id a t1 row head was built for


def _t1_row_head(encounter_id: str, version_hashes: Any = None) -> str:
    T1_HEADS.append(encounter_id)
    return f"t1 row {encounter_id}"


def _t1_hash_row(head: str, row: StreamRow, previous_hash: str) -> str:
    content = [head, row.sequence, row.from_state, row.to_state, row.effective_at.isoformat()]
    payload = json.dumps([*content, row.transitioned_at.isoformat(), previous_hash])
    return "t1:" + hashlib.sha256(payload.encode()).hexdigest()


def _t1_hash_genesis(genesis: Genesis, encounter_id: str, version_hashes: Any = None) -> str:
    payload = json.dumps([encounter_id, genesis.origin_state, genesis.created_at.isoformat()])
    return "t1:" + hashlib.sha256(payload.encode()).hexdigest()


@pytest.fixture
def t1_format():
    """A second hash format, registered for the test only."""
    fmt = register_hash_format(HashFormat("t1", _t1_row_head, _t1_hash_row, _t1_hash_genesis))
    try:
        yield fmt
    finally:
        unregister_hash_format("t1")
    assert "t1" not in HASH_FORMATS


def test_rows_hashed_in_another_registered_format_keep_verifying(t1_format):
    """Each stored hash is recomputed in the format its prefix names: rows (and a genesis)
    hashed in an older format still verify while new rows are written in the current one,
    and a changed row is still caught in either."""
    rules = Rules.from_config(
        "VISIT",
        ["scheduled", "checked_in"],
        {"scheduled": ["checked_in"], "checked_in": ["scheduled"]},
    )
    start = KNOWN_GENESIS.created_at
    rows, previous = [], t1_format.genesis_hash(KNOWN_GENESIS)
    stored_genesis = previous
    states = ["scheduled", "checked_in"]
    for sequence in range(1, 7):
        at = start + timedelta(minutes=sequence)
        row = StreamRow(
            sequence, states[(sequence - 1) % 2], states[sequence % 2], at, at, None, "", {}, 1, ""
        )
        # Rows 1-3 in the older format, 4-5 in the current one, 6 in the older again.
        fmt = CURRENT if sequence in (4, 5) else t1_format
        row.hash = previous = fmt.stream_hasher(KNOWN_ID)(row, previous)
        rows.append(row)
    assert [hash_format(r.hash) for r in rows] == ["t1", "t1", "t1", "v3", "v3", "t1"]

    T1_HEADS.clear()
    replay = verify_stream(KNOWN_GENESIS, stored_genesis, rows, {1: rules}.get)
    assert replay.anomalies == []
    assert T1_HEADS == [str(KNOWN_ID)]  # once per stream and format, not per row
    assert (replay.state, replay.version, replay.timeline.head_hash) == ("scheduled", 6, previous)

    for changed in (2, 5):  # one row of each format, its content changed after hashing
        edited = [dataclasses.replace(r) for r in rows]
        edited[changed - 1].effective_at += timedelta(seconds=1)
        found = verify_stream(KNOWN_GENESIS, stored_genesis, edited, {1: rules}.get).anomalies
        assert [(a.sequence, a.kind, a.detail) for a in found] == [
            (changed, "hash", "content or chain does not match the stored hash")
        ]
    moved = dataclasses.replace(KNOWN_GENESIS, origin_state="checked_in")
    found = verify_stream(moved, stored_genesis, rows, check_hashes=True).anomalies
    assert [(a.sequence, a.kind) for a in found][:1] == [(0, "genesis")]

    unregister_hash_format("t1")  # gone: its hashes name no known format any more
    try:
        found = verify_stream(KNOWN_GENESIS, stored_genesis, rows, {1: rules}.get).anomalies
    finally:
        register_hash_format(t1_format)
    assert [(a.sequence, a.kind) for a in found] == [
        (0, "genesis"),
        (1, "hash"),
        (2, "hash"),
        (3, "hash"),
        (6, "hash"),
    ]
    assert found[1].detail == "the stored hash names no known format ('t1')"


def test_a_v1_hash_names_no_known_format(visit):
    """Format v1 (JSON per row) was replaced by v2 before the first release: a stored v1 hash
    is reported like any other unknown format."""
    row = EncounterTransition.objects.get(encounter=visit, sequence=1)
    with triggers_off():
        raw_update(EncounterTransition, row.pk, hash="v1:" + row.hash[3:])
    found = audit_encounters(encounters=[visit.pk]).encounters[0].anomalies
    assert [(a.sequence, a.kind) for a in found][:1] == [(1, "hash")]
    assert "no known format ('v1')" in found[0].detail


def test_a_hash_in_an_unknown_format_is_reported(visit):
    row = EncounterTransition.objects.get(encounter=visit, sequence=2)
    with triggers_off():
        raw_update(EncounterTransition, row.pk, hash="v9:" + row.hash[3:])
    found = audit_encounters(encounters=[visit.pk]).encounters[0].anomalies
    assert [(a.sequence, a.kind) for a in found][:1] == [(2, "hash")]
    assert "no known format ('v9')" in found[0].detail


# ---------------------------------------------------------------------------------------------
# 8. bulk_create is refused rather than skip the genesis
# ---------------------------------------------------------------------------------------------


def test_bulk_create_of_encounters_is_refused(visit_definition, patient):
    with pytest.raises(EncounterError, match="create_encounter"):
        Encounter.objects.bulk_create([Encounter(definition=visit_definition, subject=patient)])
    assert Encounter.objects.count() == 0


def test_bulk_create_of_transitions_is_refused(encounter):
    with pytest.raises(EncounterError, match="bulk-created"):
        EncounterTransition.objects.bulk_create(
            [
                EncounterTransition(
                    encounter=encounter, from_state="scheduled", to_state="checked_in"
                )
            ]
        )
    assert EncounterTransition.objects.count() == 0


# ---------------------------------------------------------------------------------------------
# 10. Side doors
# ---------------------------------------------------------------------------------------------


def test_insert_or_replace_cannot_rewrite_a_row(visit):
    row = EncounterTransition.objects.get(encounter=visit, sequence=1)
    qn = connection.ops.quote_name
    columns = [f for f in EncounterTransition._meta.concrete_fields]
    values = [f.get_db_prep_save(getattr(row, f.attname), connection) for f in columns]
    values[[f.name for f in columns].index("reason")] = "rewritten"
    names = ", ".join(qn(f.column) for f in columns)
    marks = ", ".join(["%s"] * len(columns))
    if IS_POSTGRES:
        sql = (
            # The primary key by its name: (id), or (encounter_id, id) on Citus.
            f"INSERT INTO {TRANSITIONS} ({names}) VALUES ({marks}) ON CONFLICT ON CONSTRAINT "
            f"{qn(TRANSITIONS + '_pkey')} DO UPDATE SET reason = EXCLUDED.reason"
        )
    else:
        sql = f"INSERT OR REPLACE INTO {TRANSITIONS} ({names}) VALUES ({marks})"
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql, values)
    assert EncounterTransition.objects.get(pk=row.pk).reason == row.reason


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's REPLACE INTO")
def test_replace_into_is_refused_on_sqlite(visit):
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                f"REPLACE INTO {TRANSITIONS} SELECT * FROM {TRANSITIONS} WHERE sequence = 1"
            )
    assert EncounterTransition.objects.filter(encounter=visit).count() == 2


def test_system_checks():
    with override_settings(ENCOUNTERS_VALIDATOR_MODULES=None):
        (warning,) = check_validator_modules(None)
        assert warning.id == "django_encounters.W001"
    with override_settings(ENCOUNTERS_VALIDATOR_MODULES=["myapp.validators"]):
        assert check_validator_modules(None) == []
    with override_settings(USE_TZ=False):
        (error,) = check_use_tz(None)
        assert error.id == "django_encounters.E001"
    assert check_use_tz(None) == []
    out = io.StringIO()
    with override_settings(ENCOUNTERS_VALIDATOR_MODULES=None):
        call_command("check", "--deploy", "--tag", "security", stdout=out, stderr=out)
    assert "django_encounters.W001" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# 12. Inputs the checks used to miss: typed errors, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"states": ["scheduled", "check\x00ed_in"]},
        {"states": ["scheduled", "checked\nin"]},
        {"states": ["scheduled", "tab\there"]},
        {"name": "N" * 101},
        {"code": "C" * 51},
        {"code": ""},
        {"validators": None},
    ],
    ids=["NUL", "newline", "tab", "long name", "long code", "empty code", "validators None"],
)
def test_definitions_with_unstorable_fields_are_refused(overrides):
    kwargs = {
        "name": "Visit",
        "code": "V",
        "states": ["scheduled", "done"],
        "initial_state": "scheduled",
        "transitions": {"scheduled": ["done"]},
        **overrides,
    }
    with pytest.raises(DjangoValidationError):
        EncounterDefinition.objects.create(**kwargs)
    assert EncounterDefinition.objects.count() == 0
    assert EncounterDefinitionVersion.objects.count() == 0


@pytest.mark.parametrize(
    ("notes", "error"),
    [(None, TypeError), (5, TypeError), ("a\x00b", ValueError)],
    ids=["None", "int", "NUL"],
)
def test_bad_notes_are_refused(visit_definition, patient, notes, error):
    with pytest.raises(error, match="notes"):
        create_encounter(visit_definition, patient, notes=notes)
    assert Encounter.all_objects.count() == 0


def test_an_unsaved_subject_with_a_preset_pk_is_refused(visit_definition):
    from tests.testapp.models import Device

    unsaved = Device(serial="never saved")
    assert unsaved.pk is not None  # a UUID primary key is set before the first save
    with pytest.raises(ValueError, match="not saved"):
        create_encounter(visit_definition, unsaved)
    assert Encounter.all_objects.count() == 0


def test_skip_validation_must_be_a_bool(encounter):
    before = snapshot(encounter)
    with pytest.raises(TypeError, match="skip_validation"):
        transition(encounter, "checked_in", skip_validation="yes")
    assert snapshot(encounter) == before


@pytest.mark.parametrize("value", [timedelta.max, float("inf"), 10**12, timedelta(days=30)])
def test_overflowing_future_tolerances_are_refused(encounter, settings, value):
    settings.ENCOUNTERS_FUTURE_TOLERANCE = value
    before = snapshot(encounter)
    with pytest.raises(EncounterConfigurationError, match="ENCOUNTERS_FUTURE_TOLERANCE"):
        transition(encounter, "checked_in")
    assert snapshot(encounter) == before


def test_time_in_states_needs_an_encounter():
    with pytest.raises(TypeError, match="encounter must be an Encounter"):
        time_in_states("abc")


def test_state_names_with_control_characters_never_reach_the_database(encounter):
    before = snapshot(encounter)
    with pytest.raises(InvalidTransitionError):
        transition(encounter, "checked_in\x00")
    assert snapshot(encounter) == before


def test_get_state_at_still_one_query(visit):
    with CaptureQueriesContext(connection) as captured:
        get_state_at(visit, timezone.now())
    assert len(work_queries(captured)) == 1


def test_an_upgrade_in_a_final_state_keeps_ended_at(visit_definition, patient):
    """An upgrade keeps the state: it does not 'end' the encounter again."""
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "cancelled", effective_at=timezone.now() - timedelta(hours=1))
    ended = reload(encounter).ended_at
    assert ended is not None
    visit_definition.description = "v2"
    visit_definition.transitions = {**visit_definition.transitions, "scheduled": ["checked_in"]}
    visit_definition.save()
    upgrade_encounter(encounter, reason="new rules")
    assert reload(encounter).ended_at == ended
    assert anomalies(encounter) == []


# ---------------------------------------------------------------------------------------------
# Found by review: legitimate operations that must not write half a move or refuse wrongly
# ---------------------------------------------------------------------------------------------


def test_moving_an_empty_encounter_with_update_fields_writes_the_whole_move(
    encounter, make_definition
):
    other = make_definition(
        states=["new", "done"],
        initial_state="new",
        final_states=["done"],
        transitions={"new": ["done"]},
    )
    encounter.definition = other
    encounter.save(update_fields=["definition"])
    fresh = reload(encounter)
    assert (fresh.definition_id, fresh.state, fresh.origin_state) == (other.pk, "new", "new")
    assert fresh.genesis_hash == fresh.head_hash == fresh.compute_genesis_hash()
    assert anomalies(encounter) == []
    transition(fresh, "done")


def test_saving_a_partly_loaded_encounter_is_no_move(encounter, visit_definition):
    transition(encounter, "checked_in")
    partial = Encounter.objects.only("notes").get(pk=encounter.pk)
    partial.notes = "edited"
    partial.save()
    assert reload(encounter).notes == "edited"

    fresh = create_encounter(visit_definition, encounter.subject)
    visit_definition.states = [*visit_definition.states, "extra"]
    visit_definition.initial_state = "extra"
    visit_definition.save()
    partial = Encounter.objects.defer("definition").get(pk=fresh.pk)
    partial.notes = "edited"
    partial.save()
    stored = reload(fresh)
    assert (stored.state, stored.definition_version) == ("scheduled", 1)
    assert anomalies(fresh) == []


def test_a_refreshed_instance_is_no_move(encounter):
    transition(encounter, "checked_in")
    stale = Encounter.objects.defer("subject_id").get(pk=encounter.pk)
    stale.refresh_from_db()
    stale.notes = "after refresh"
    stale.save()
    assert reload(encounter).notes == "after refresh"


def test_a_definition_saved_with_update_fields_stores_the_machine_it_versions(visit_definition):
    visit_definition.states = [*visit_definition.states, "extra"]
    visit_definition.save(update_fields=["description"])
    stored = EncounterDefinition.objects.get(pk=visit_definition.pk)
    assert "extra" in stored.states and stored.version == 2
    stored.save()  # an unchanged machine: no new version, nothing reverted
    assert stored.versions.count() == 2
    assert "extra" in stored.versions.get(number=2).states


def test_the_low_level_create_stamps_its_default_system_time_under_the_lock(
    counter_definition, patient
):
    encounter = create_encounter(counter_definition, patient)
    ahead = timezone.now() + timedelta(minutes=5)
    with mock.patch("django_encounters.services.timezone.now", return_value=ahead):
        first = transition(encounter, "open")
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="open", to_state="open"
    )
    assert row.transitioned_at > first.transitioned_at
    assert anomalies(encounter) == []


def test_two_rolled_back_transitions_in_a_row_leave_the_first_state(encounter):
    for target in ("checked_in", "cancelled"):
        with pytest.raises(RuntimeError), transaction.atomic():
            transition(encounter, target)
            raise RuntimeError("roll back")
        assert (encounter.state, encounter.version) == ("scheduled", 0)


@pytest.mark.parametrize("sequence", [0, -1])
def test_the_low_level_create_refuses_a_sequence_below_one(visit, sequence):
    before = snapshot(visit)
    with pytest.raises(EncounterError, match="not a row number"):
        EncounterTransition.objects.create(
            encounter=visit, from_state="in_progress", to_state="completed", sequence=sequence
        )
    assert snapshot(visit) == before
