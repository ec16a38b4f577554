"""The sealed log's write side: hash format v3 (the recorded name and the definition version in
every row's hash), definition versions hashed and chained, every record sealed when written
with keys configured, the verifier's checks of the version chain, and ``seal_encounters``
(adoption of a log written by the previous release, and key rotation). Every test runs on
SQLite and PostgreSQL."""

from __future__ import annotations

import hmac
import json
import pickle
from hashlib import sha256
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from django_encounters.engine import definition_version_hash, row_hash
from django_encounters.engine.seals import SEAL_TAGS, Sealer, seal_problem
from django_encounters.exceptions import DefinitionVersionError, SealingRefusedError
from django_encounters.models import (
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.projections.audit import audit_encounters, encounter_timeline
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.projections.sealing import seal_encounters
from django_encounters.projections.selection import RulesCache
from django_encounters.services import create_encounter, transition, upgrade_encounter
from tests.helpers import (
    insert_row_raw,
    raw_update,
    reload,
    run_command,
    triggers_off,
    work_queries,
)

KEYS = {"k1": "a" * 40, "k2": "b" * 40}
SECRETS = {key_id: secret.encode() for key_id, secret in KEYS.items()}
VERSIONS = EncounterDefinitionVersion._meta.db_table


@pytest.fixture
def sealed(settings: Any) -> Any:
    settings.ENCOUNTERS_SEAL_KEYS = KEYS
    settings.ENCOUNTERS_SEAL_KEY_ID = "k1"
    return settings


def anomalies(encounter: Any) -> list[tuple[int, str]]:
    report = audit_encounters(encounters=[encounter.pk])
    return [(a.sequence, a.kind) for audit in report.encounters for a in audit.anomalies]


def seal_ok(tag: str, record_hash: str, seal: str) -> bool:
    return seal_problem(SECRETS, tag, record_hash, seal) is None


def test_a_sealer_makes_and_checks_the_documented_hmac_every_time():
    """The sealer keys its HMAC once per key and tag and copies it per record: the seals are
    still exactly the documented HMAC, for every key, tag and record, first time or not, and
    after the sealer is pickled (its cache is not)."""
    sealer = Sealer(SECRETS, "k1")
    records = ["v3:" + "0" * 64, "v2:" + "f" * 64, "", "é|x"]
    for _attempt in range(2):
        for tag in SEAL_TAGS:
            for record in records:
                message = f"django-encounters/seal/1|{tag}|{record}".encode()
                expected = {
                    key_id: f"{key_id}:{hmac.new(secret, message, sha256).hexdigest()}"
                    for key_id, secret in SECRETS.items()
                }
                assert sealer.seal(tag, record) == expected["k1"]
                for seal in expected.values():
                    assert sealer.problem(tag, record, seal) is None
                    assert sealer.problem(tag, record + "x", seal) == seal_problem(
                        SECRETS, tag, record + "x", seal
                    )
                    assert "does not match" in sealer.problem(tag, record + "x", seal)
        sealer = pickle.loads(pickle.dumps(sealer))
    assert sealer == Sealer(SECRETS, "k1")


# ---------------------------------------------------------------------------------------------
# Written sealed, in v3
# ---------------------------------------------------------------------------------------------


def test_every_record_is_sealed_when_written_with_keys(sealed, make_definition, patient, user):
    definition = make_definition()
    version = definition.latest_version()
    assert version.content_hash.startswith("v3:")
    assert version.content_hash == definition_version_hash(definition.pk, 1, version.machine(), "")
    assert version.seal.startswith("k1:") and seal_ok("version", version.content_hash, version.seal)

    encounter = create_encounter(definition, patient)
    fresh = reload(encounter)
    assert (
        fresh.genesis_hash.startswith("v3:") and fresh.genesis_hash == fresh.compute_genesis_hash()
    )
    assert seal_ok("genesis", fresh.genesis_hash, fresh.genesis_seal)

    row = transition(encounter, "checked_in", transitioned_by=user)
    stored = EncounterTransition.objects.get(pk=row.pk)
    assert stored.hash.startswith("v3:") and stored.transitioned_by_name == "reception"
    assert seal_ok("row", stored.hash, stored.seal)
    assert not seal_ok("genesis", stored.hash, stored.seal)  # the tag is part of the seal
    assert anomalies(encounter) == []

    # A second version chains to the first; the upgrade row commits to it.
    definition.transitions = {**definition.transitions, "checked_in": ["scheduled"]}
    definition.save()
    second = definition.latest_version()
    assert second.number == 2
    assert second.content_hash == definition_version_hash(
        definition.pk, 2, second.machine(), version.content_hash
    )
    assert seal_ok("version", second.content_hash, second.seal)
    upgraded = upgrade_encounter(encounter, transitioned_by=user, reason="new rules")
    assert seal_ok("row", upgraded.hash, upgraded.seal)
    assert upgraded.hash == upgraded.compute_hash(stored.hash)
    assert anomalies(encounter) == []


def test_unsealed_without_keys_and_the_low_level_append_seals_too(
    sealed, settings, encounter, user
):
    del settings.ENCOUNTERS_SEAL_KEYS
    row = transition(encounter, "checked_in", transitioned_by=user)
    assert row.seal == "" and reload(encounter).genesis_seal.startswith("k1:")
    settings.ENCOUNTERS_SEAL_KEYS = KEYS
    appended = EncounterTransition(
        encounter=reload(encounter),
        from_state="checked_in",
        to_state="in_progress",
        transitioned_by=user,
    )
    appended.save()
    stored = EncounterTransition.objects.get(pk=appended.pk)
    assert stored.transitioned_by_name == "reception"
    assert seal_ok("row", stored.hash, stored.seal)
    # Row 1, written while no key was configured, is reported unsealed; row 2 is sealed.
    assert anomalies(encounter) == [(1, "seal")]


def test_a_sealed_transition_keeps_its_three_statements(sealed, encounter, user):
    with CaptureQueriesContext(connection) as captured:
        transition(encounter, "checked_in", transitioned_by=user)
    assert len(work_queries(captured)) == 3, work_queries(captured)


# ---------------------------------------------------------------------------------------------
# Who, in the chain
# ---------------------------------------------------------------------------------------------


def test_renaming_a_user_does_not_change_whom_the_audit_names(encounter, user):
    transition(encounter, "checked_in", transitioned_by=user)
    User.objects.filter(pk=user.pk).update(username="mallory")

    (row,) = encounter_timeline(encounter).timeline
    assert (row.transitioned_by, row.transitioned_by_now) == ("reception", "mallory")
    assert row.who == "reception (now: mallory)"
    code, out, _ = run_command("audit_encounters", "--encounter", str(encounter.pk))
    assert code == 0 and "reception (now: mallory)" in out
    code, out, _ = run_command(
        "audit_encounters", "--encounter", str(encounter.pk), "--format", "json"
    )
    (entry,) = json.loads(out)["encounters"][0]["timeline"]
    assert (entry["transitioned_by"], entry["transitioned_by_now"]) == ("reception", "mallory")
    # Not renamed: no extra key.
    User.objects.filter(pk=user.pk).update(username="reception")
    (entry,) = encounter_timeline(encounter).as_dict()["timeline"]
    assert entry["transitioned_by"] == "reception" and "transitioned_by_now" not in entry


def test_a_changed_recorded_name_breaks_the_hash(encounter, user):
    transition(encounter, "checked_in", transitioned_by=user)
    row = EncounterTransition.objects.get(encounter=encounter, sequence=1)
    with triggers_off():
        raw_update(EncounterTransition, row.pk, transitioned_by_name="mallory")
    assert anomalies(encounter) == [(1, "hash")]


# ---------------------------------------------------------------------------------------------
# Definition versions in the chain
# ---------------------------------------------------------------------------------------------


def _insert_version(definition: Any, number: int, content_hash: str, **machine: Any) -> None:
    """INSERT a version with plain SQL, triggers on: what the application's role may do."""
    fields = {**definition.latest_version().machine(), **machine}
    version = EncounterDefinitionVersion(
        definition=definition, number=number, content_hash=content_hash, **fields
    )
    meta = EncounterDefinitionVersion._meta
    qn = connection.ops.quote_name
    columns = list(meta.concrete_fields)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(f.column) for f in columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})",
            [f.get_db_prep_save(getattr(version, f.attname), connection) for f in columns],
        )


def test_an_edited_version_is_caught_for_the_version_and_every_row_under_it(
    visit_definition, patient, user
):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", transitioned_by=user)
    transition(encounter, "in_progress", transitioned_by=user)
    version = visit_definition.latest_version()
    permissive = {state: list(visit_definition.states) for state in visit_definition.states}
    with triggers_off(VERSIONS):  # the database owner
        raw_update(EncounterDefinitionVersion, version.pk, transitions=permissive)

    found = anomalies(encounter)
    assert (0, "definition") in found and (0, "genesis") in found
    for sequence in (1, 2):
        assert (sequence, "definition") in found and (sequence, "hash") in found
    (problem,) = RulesCache("default").problems()
    assert problem[:2] == (visit_definition.pk, 1) and "does not hash" in problem[2]
    assert run_command("audit_encounters")[0] == 1

    # The owner also stores the recomputed hash: the rows still committed to the old one.
    forged = definition_version_hash(
        visit_definition.pk, 1, {**version.machine(), "transitions": permissive}, ""
    )
    with triggers_off(VERSIONS):
        raw_update(EncounterDefinitionVersion, version.pk, content_hash=forged)
    found = anomalies(encounter)
    assert (1, "hash") in found and (2, "hash") in found and (0, "genesis") in found


def test_a_permissive_version_inserted_with_the_triggers_on_and_a_forged_upgrade_are_caught(
    visit_definition, patient, user
):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", transitioned_by=user)
    permissive = {state: list(visit_definition.states) for state in visit_definition.states}
    v1 = visit_definition.latest_version()
    # Without the documented hash: caught as a version that does not hash.
    _insert_version(visit_definition, 2, "v3:" + "0" * 64, transitions=permissive)
    fresh = reload(encounter)
    insert_row_raw(
        fresh, sequence=2, from_state="checked_in", to_state="checked_in", definition_version=2
    )
    insert_row_raw(
        fresh, sequence=3, from_state="checked_in", to_state="scheduled", definition_version=2
    )
    found = anomalies(encounter)
    assert (2, "definition") in found and (3, "definition") in found
    problems = RulesCache("default").problems()
    assert [(number, "does not hash" in why) for _, number, why in problems if number] == [
        (2, True)
    ]
    # The definition's pointer still names version 1: reported, and new encounters refused.
    assert any(number == 0 and "points to version 1" in why for _, number, why in problems)
    with pytest.raises(
        DefinitionVersionError, match="points to version 1 but its last version is 2"
    ):
        create_encounter(visit_definition, patient)
    assert v1.content_hash


def test_a_version_pointer_moved_back_pins_no_new_encounter(visit_definition, patient):
    visit_definition.transitions = {**visit_definition.transitions, "cancelled": ["scheduled"]}
    visit_definition.save()
    assert visit_definition.version == 2
    raw_update(EncounterDefinition, visit_definition.pk, version=1)
    moved = EncounterDefinition.objects.get(pk=visit_definition.pk)
    with pytest.raises(DefinitionVersionError, match="points to version 1"):
        create_encounter(moved, patient)
    assert not Encounter.objects.exists()
    assert any("points to version 1" in why for *_, why in RulesCache("default").problems())
    raw_update(EncounterDefinition, visit_definition.pk, version=7)
    with pytest.raises(DefinitionVersionError, match="points to version 7"):
        create_encounter(EncounterDefinition.objects.get(pk=visit_definition.pk), patient)


def test_a_version_can_receive_its_content_hash_once_and_nothing_else(visit_definition):
    version = visit_definition.latest_version()
    with pytest.raises(IntegrityError, match="append-only"):
        with transaction.atomic():
            raw_update(EncounterDefinitionVersion, version.pk, content_hash="v3:" + "1" * 64)


# ---------------------------------------------------------------------------------------------
# seal_encounters: adoption of a log written by the previous release, rotation
# ---------------------------------------------------------------------------------------------


def _previous_release(definition: Any, patient: Any, user: Any) -> list[Any]:
    """A log as the previous release wrote it: versions without content hash, v2 hashes
    (the write path hashes in v2 under a version without content hash), no seals, no
    recorded names."""
    with triggers_off(VERSIONS):
        for version in definition.versions.all():
            raw_update(EncounterDefinitionVersion, version.pk, content_hash="", seal="")
    encounters = [create_encounter(definition, patient) for _ in range(3)]
    for encounter in encounters[:2]:
        transition(encounter, "checked_in", transitioned_by=user)
        transition(encounter, "in_progress", transitioned_by=user)
    with triggers_off():
        for row in EncounterTransition.objects.all():
            raw_update(EncounterTransition, row.pk, transitioned_by_name="")
    # rows hashed without the name: recompute them the way the old code did (v2)
    for encounter in encounters[:2]:
        fresh = reload(encounter)
        previous = fresh.genesis_hash
        with triggers_off():
            for row in EncounterTransition.objects.filter(encounter=fresh).order_by("sequence"):
                content = row_of(row)
                previous = row_hash(fresh.pk, content, previous)
                raw_update(EncounterTransition, row.pk, hash=previous)
        raw_update(Encounter, fresh.pk, head_hash=previous)
    return encounters


def row_of(record: Any) -> Any:
    from django_encounters.models import row_of_record

    return row_of_record(record)


def test_seal_encounters_adopts_a_log_written_by_the_previous_release(
    settings, visit_definition, patient, user
):
    encounters = _previous_release(visit_definition, patient, user)
    assert all(reload(e).genesis_hash.startswith("v2:") for e in encounters)
    assert all(r.hash.startswith("v2:") for r in EncounterTransition.objects.all())
    assert run_command("audit_encounters")[0] == 0

    code, _, err = run_command("seal_encounters")
    assert code == 2 and "ENCOUNTERS_SEAL_KEYS" in err

    settings.ENCOUNTERS_SEAL_KEYS = {"k1": KEYS["k1"]}
    code, out, _ = run_command("seal_encounters", "--batch-size", "2")
    assert code == 0, out
    assert "sealed under key 'k1': 4 row(s), 3 genesis, 1 version(s) (1 given" in out
    version = visit_definition.latest_version()
    assert version.content_hash == definition_version_hash(
        visit_definition.pk, 1, version.machine(), ""
    )
    assert seal_ok("version", version.content_hash, version.seal)
    for encounter in encounters:
        fresh = reload(encounter)
        assert seal_ok("genesis", fresh.genesis_hash, fresh.genesis_seal)
    for row in EncounterTransition.objects.all():
        assert row.hash.startswith("v2:") and seal_ok("row", row.hash, row.seal)
    assert run_command("audit_encounters")[0] == 0  # v2 rows keep verifying

    # New rows are v3 now; sealing again seals nothing new.
    row = transition(encounters[2], "checked_in", transitioned_by=user)
    assert row.hash.startswith("v3:") and seal_ok("row", row.hash, row.seal)
    code, out, _ = run_command("seal_encounters")
    assert code == 0 and "0 row(s), 0 genesis, 0 version(s)" in out
    assert run_command("audit_encounters")[0] == 0


def test_seal_encounters_refuses_while_an_anomaly_stands_and_writes_nothing(
    sealed, visit_definition, patient, user
):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", transitioned_by=user)
    row = EncounterTransition.objects.get(encounter=encounter)
    with triggers_off():
        raw_update(EncounterTransition, row.pk, seal="", reason="forged")
    code, _, err = run_command("seal_encounters")
    assert code == 1 and "1 unacknowledged anomaly stands; nothing was sealed" in err
    assert "audit_encounters" in err
    assert EncounterTransition.objects.get(pk=row.pk).seal == ""
    with pytest.raises(SealingRefusedError, match="hash"):
        seal_encounters()
    # Once a reviewer acknowledged the finding (bound to its evidence), sealing goes on: the
    # forged row is sealed as it stands and its finding stays listed, acknowledged.
    code, _, err = run_command(
        "acknowledge_anomaly", str(encounter.pk), "1", "hash", "--reason", "examined: ticket 7"
    )
    assert code == 0, err
    code, out, err = run_command("seal_encounters")
    assert code == 0, err
    assert EncounterTransition.objects.get(pk=row.pk).seal.startswith("k1:")
    report = audit_encounters(encounters=[encounter.pk])
    assert [(a.sequence, a.kind) for a in report.encounters[0].anomalies] == [(1, "hash")]
    assert report.anomaly_count == 0


def test_seal_encounters_rekeys_after_a_rotation(sealed, settings, encounter, user):
    transition(encounter, "checked_in", transitioned_by=user)
    settings.ENCOUNTERS_SEAL_KEY_ID = "k2"
    summary = seal_encounters()
    assert (summary.rows, summary.genesis, summary.versions) == (0, 0, 0)
    summary = seal_encounters(rekey=True)
    assert (summary.rows, summary.genesis, summary.versions) == (1, 1, 1)
    row = EncounterTransition.objects.get(encounter=encounter)
    assert row.seal.startswith("k2:") and seal_ok("row", row.hash, row.seal)
    assert reload(encounter).genesis_seal.startswith("k2:")
    assert seal_encounters(rekey=True).sealed == 0


def test_a_forged_seal_is_never_resealed(sealed, encounter, user):
    transition(encounter, "checked_in", transitioned_by=user)
    row = EncounterTransition.objects.get(encounter=encounter)
    with triggers_off():
        raw_update(EncounterTransition, row.pk, seal="k1:" + "0" * 64)
    with pytest.raises(SealingRefusedError, match="forged or changed"):
        seal_encounters(rekey=True)
    assert EncounterTransition.objects.get(pk=row.pk).seal == "k1:" + "0" * 64


def test_a_changed_version_is_reported_once_for_itself_and_can_be_acknowledged(
    sealed, visit_definition, patient, user
):
    """Besides the finding on every encounter and row decided under it, the version itself
    is an entry of the audit (``definition_version``), counted by ``rebuild --check``,
    standing in ``seal_encounters``' way until a reviewer acknowledges it — bound to its
    evidence, the stored content hash."""
    version = visit_definition.latest_version()
    permissive = {state: list(visit_definition.states) for state in visit_definition.states}
    with triggers_off(VERSIONS):  # the database owner, before any encounter used it
        raw_update(EncounterDefinitionVersion, version.pk, transitions=permissive)

    code, out, _ = run_command("audit_encounters", "--format", "json")
    assert code == 1
    (entry,) = json.loads(out)["encounters"]
    assert (entry["id"], entry["definition"], entry["definition_version"]) == (
        str(version.pk),
        "VISIT",
        1,
    )
    (finding,) = entry["anomalies"]
    assert finding["kind"] == "definition" and "does not hash" in finding["detail"]
    code, out, _ = run_command("audit_encounters")
    assert f"Definition VISIT, version 1  (id {version.pk})" in out
    assert rebuild_projections(check=True).anomaly_count == 1
    assert run_command("seal_encounters")[0] == 1

    code, _, err = run_command(
        "acknowledge_anomaly", str(version.pk), "1", "definition", "--reason", "restored: #12"
    )
    assert code == 0, err
    assert run_command("audit_encounters")[0] == 0
    assert rebuild_projections(check=True).ok
    assert run_command("seal_encounters")[0] == 0
    # Edited again: other evidence, not covered.
    with triggers_off(VERSIONS):
        raw_update(EncounterDefinitionVersion, version.pk, initial_state="checked_in")
    assert run_command("audit_encounters")[0] == 1
