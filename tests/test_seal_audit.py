"""Issue 19: the audit checks seals. With ``ENCOUNTERS_SEAL_KEYS`` configured, every row, each
encounter's genesis and the definition versions an encounter uses must carry a valid seal; a
missing one, a wrong one or one made with a key that is not configured is an anomaly of kind
``seal`` naming the record, in ``audit_encounters`` (every format) and ``rebuild --check``, and
a rebuild never "fixes" one. Without keys, both commands say first that seals were not
checked. The attacks use the application role's rights only (SELECT, INSERT; the seal column
may be UPDATEd, which the triggers allow) and the documented hash layout. Every test runs on
SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_encounters.engine import AnomalyKind
from django_encounters.models import (
    Encounter,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.projections.audit import audit_encounters
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.projections.seals import NOT_CHECKED
from django_encounters.services import create_encounter, transition
from tests.helpers import (
    SEAL_KEYS,
    forge_projection,
    insert_row_raw,
    raw_update,
    seal_everything,
    work_queries,
)

pytestmark = pytest.mark.django_db

NOTE = "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)"


@pytest.fixture
def keys(settings):
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEYS["k1"]}
    return settings


@pytest.fixture
def visit(visit_definition, patient, user):
    """A visit with two rows."""
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in", transitioned_by=user, reason="arrived")
    transition(visit, "in_progress", transitioned_by=user, reason="seen")
    return visit


def audit(*args: str) -> tuple[int, str, str]:
    from tests.helpers import run_command

    return run_command("audit_encounters", *args)


def rebuild(*args: str) -> tuple[int, str, str]:
    from tests.helpers import run_command

    return run_command("rebuild_encounter_projections", *args)


def seal_findings(encounter=None) -> list[tuple[int, str]]:
    """(sequence, detail) of every ``seal`` anomaly the audit reports (of ``encounter``)."""
    report = audit_encounters(encounters=None if encounter is None else [encounter.pk])
    return [
        (a.sequence, a.detail)
        for e in report.encounters
        for a in e.anomalies
        if a.kind == AnomalyKind.SEAL
    ]


# ---------------------------------------------------------------------------------------------
# Without keys: said first
# ---------------------------------------------------------------------------------------------


def test_without_keys_every_output_says_first_that_seals_were_not_checked(visit):
    code, out, err = audit()
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == NOTE

    code, out, err = audit("--format", "json")
    assert (code, err) == (0, "")
    assert out.startswith('{\n  "seals": "not checked (ENCOUNTERS_SEAL_KEYS is not set)",\n')
    assert json.loads(out)["seals"] == NOT_CHECKED

    code, out, err = audit("--format", "csv")  # a CSV's first line is its header
    assert code == 0
    assert err.splitlines()[0] == NOTE
    assert out.startswith("encounter_id,")

    for args in (("--check",), ()):
        code, out, err = rebuild(*args)
        assert (code, err) == (0, "")
        assert out.splitlines()[0] == NOTE
    assert rebuild_projections(check=True).seals == NOT_CHECKED
    assert audit_encounters().seals == NOT_CHECKED


def test_with_keys_the_reports_say_seals_were_checked(visit, keys):
    seal_everything()
    code, out, err = audit()
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "Seals: checked"
    assert json.loads(audit("--format", "json")[1])["seals"] == "checked"
    code, out, err = audit("--format", "csv")
    assert (code, err) == (0, "")
    code, out, err = rebuild("--check")
    assert (code, err) == (0, "")
    assert "Seals" not in out
    assert rebuild_projections(check=True).seals == "checked"


# ---------------------------------------------------------------------------------------------
# Each record's seal
# ---------------------------------------------------------------------------------------------


def test_an_unsealed_log_is_reported_record_by_record(visit, keys):
    """Written before seals were configured: each row, the genesis and the version are
    reported, each named; sealing it (what seal_encounters does) makes the audit clean."""
    Encounter.all_objects.filter(pk=visit.pk).values_list("genesis_seal", flat=True)
    found = seal_findings(visit)
    assert found == [
        (0, "the genesis: it is not sealed"),
        (0, "definition VISIT version 1: it is not sealed"),
        (1, "row 1: it is not sealed"),
        (2, "row 2: it is not sealed"),
    ]
    code, out, err = audit()
    assert code == 1 and "4 anomalies found" in err
    assert "    sequence 1: seal: row 1: it is not sealed\n" in out
    code, out, _ = audit("--format", "csv")
    lines = list(csv.reader(io.StringIO(out)))
    assert [line[-1] for line in lines[1:]][:2] == [
        "seal: row 1: it is not sealed",
        "seal: row 2: it is not sealed",
    ]
    result = rebuild_projections(check=True)
    assert (result.ok, result.anomaly_count, result.anomalous_encounters) == (False, 4, 1)
    assert {a.kind for a in result.anomalies} == {"seal"}
    code, out, err = rebuild("--check")
    assert code == 1 and "4 anomalies in 1 stream" in err

    seal_everything()

    assert seal_findings() == []
    assert audit()[0] == 0
    assert rebuild("--check")[0] == 0


def test_a_forged_append_with_a_correct_public_hash_is_caught_by_its_seal(visit, keys, user):
    """Issue 19, attack 1: INSERT row 3 with a hash computed from the documented layout and
    UPDATE the projection to match: the chain is intact, only the seal catches it — whatever
    seal the forger writes (none, made up, under a key id that is not configured)."""
    seal_everything()
    row = insert_row_raw(
        visit, sequence=3, from_state="in_progress", to_state="completed", reason="forged"
    )
    forge_projection(visit)
    pk = EncounterTransition.objects.get(encounter=visit, sequence=3).pk
    cases = [
        ("", "row 3: it is not sealed"),
        ("k1:" + "0" * 64, "row 3: its seal (key 'k1') does not match its content: it was forged"),
        ("k9:" + "0" * 64, "row 3: it is sealed with the key 'k9', which is not configured"),
        ("forged", "row 3: its seal 'forged' is not a seal"),
    ]
    for seal, detail in cases:
        if seal:
            raw_update(EncounterTransition, pk, seal=seal)
        ((sequence, found),) = seal_findings()
        assert sequence == 3 and found.startswith(detail), (seal, found)
        code, out, err = audit("--format", "json")
        assert code == 1
        (anomaly,) = json.loads(out)["encounters"][0]["anomalies"]
        assert anomaly["kind"] == "seal"
        assert anomaly["evidence"] == f"{row.hash} {seal or 'unsealed'}"
        assert rebuild("--check")[0] == 1

    # A rebuild writes no seal: the forged row stays reported.
    assert rebuild()[0] == 1
    assert EncounterTransition.objects.get(pk=pk).seal == "forged"
    assert seal_findings() != []


def test_the_genesis_seal_is_checked(visit, keys):
    seal_everything()
    raw_update(Encounter, visit.pk, genesis_seal="k1:" + "a" * 64)
    assert seal_findings() == [
        (0, "the genesis: its seal (key 'k1') does not match its content: it was forged or changed")
    ]


def test_a_seal_of_another_record_kind_does_not_verify(visit, keys):
    """The domain tag: a row's seal copied to the genesis (or the other way) is no seal."""
    seal_everything()
    row1 = EncounterTransition.objects.get(encounter=visit, sequence=1)
    raw_update(Encounter, visit.pk, genesis_seal=row1.seal)
    assert [s for s, _ in seal_findings()] == [0]


def test_a_version_seal_is_reported_on_each_encounter_using_it(
    visit, visit_definition, patient, keys
):
    other = create_encounter(visit_definition, patient)
    seal_everything()
    version = EncounterDefinitionVersion.objects.get(definition=visit_definition, number=1)
    raw_update(EncounterDefinitionVersion, version.pk, seal="k1:" + "b" * 64)

    report = audit_encounters()
    found = {(e.id, a.sequence, a.detail) for e in report.encounters for a in e.anomalies}
    detail = (
        "definition VISIT version 1: its seal (key 'k1') does not match its content: it was "
        "forged or changed"
    )
    assert found == {(visit.pk, 0, detail), (other.pk, 0, detail)}
    assert rebuild_projections(check=True).anomaly_count == 2


def test_a_rotated_key_still_verifies_and_a_dropped_one_does_not(visit, settings):
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEYS["k1"]}
    seal_everything()
    settings.ENCOUNTERS_SEAL_KEYS = dict(SEAL_KEYS)
    settings.ENCOUNTERS_SEAL_KEY_ID = "k2"
    assert seal_findings() == []
    transition(visit, "completed")  # sealed when written, with the current key
    assert EncounterTransition.objects.get(encounter=visit, sequence=3).seal.startswith("k2:")
    assert seal_findings() == []

    settings.ENCOUNTERS_SEAL_KEYS = {"k2": SEAL_KEYS["k2"]}
    settings.ENCOUNTERS_SEAL_KEY_ID = None
    found = seal_findings()
    assert [s for s, _ in found] == [0, 0, 1, 2]
    assert all("sealed with the key 'k1', which is not configured" in d for _, d in found)


def test_a_different_key_reports_every_record(visit, keys, settings):
    seal_everything()
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEYS["k2"]}
    assert len(seal_findings()) == 4


def test_seals_add_no_query_per_batch(visit_definition, patient, keys, settings):
    """The rows' seals come with the stream, the genesis seal with the encounter's columns:
    with keys, an audit of one batch reads the versions once and the acknowledgements once
    per batch; without keys it reads what it read before."""
    for _ in range(3):
        encounter = create_encounter(visit_definition, patient)
        transition(encounter, "checked_in")
    seal_everything()

    def count() -> int:
        with CaptureQueriesContext(connection) as captured:
            report = audit_encounters(batch_size=2)
        assert report.anomaly_count == 0
        return len(work_queries(captured))

    sealed = count()
    settings.ENCOUNTERS_SEAL_KEYS = None
    unsealed = count()
    # 2 batches: 1 query for the versions' seals, 1 per batch for the acknowledgements.
    assert sealed == unsealed + 1 + 2


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_worker_processes_check_seals_as_one_process_does(visit_definition, patient, settings):
    """The seal settings are read when used, so the spawned workers are given them as they
    are now (here overridden by the test)."""
    visits = []
    for _ in range(4):
        visit = create_encounter(visit_definition, patient)
        transition(visit, "checked_in")
        visits.append(visit)
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEYS["k1"]}
    seal_everything()
    forged = EncounterTransition.objects.get(encounter=visits[3], sequence=1)
    raw_update(EncounterTransition, forged.pk, seal="k1:" + "e" * 64)

    one = rebuild_projections(check=True, batch_size=1)
    many = rebuild_projections(check=True, batch_size=1, jobs=2)

    assert [(a.encounter_id, a.sequence, a.kind) for a in one.anomalies] == [
        (visits[3].pk, 1, "seal")
    ]
    assert (many.anomalies, many.seals) == (one.anomalies, "checked")
