"""Issue 19, item 6: acknowledgements bound to evidence, chained and sealed. An acknowledgement
records the evidence its anomaly was found on (the stored hash, what the row's content hashes
to now, the checkpoint's root) and covers a finding with that evidence only; it is hashed,
chained per encounter and, with seal keys, sealed; a forged, changed or unsealed one covers
nothing and is reported. The attacks use the application role's rights (INSERT with
plausible columns, the hash computed by the documented layout) or, where said, the database
owner's. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import connection

from django_encounters.engine import AnomalyKind
from django_encounters.models import AnomalyAcknowledgement, Encounter, EncounterTransition
from django_encounters.projections.acknowledgements import (
    acknowledge_anomaly,
    acknowledgement_hash,
)
from django_encounters.projections.audit import (
    acknowledge_reported_anomaly,
    audit_encounters,
)
from django_encounters.projections.checkpoints import write_checkpoint
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import create_encounter, transition
from tests.helpers import (
    SEAL_KEYS,
    forge_projection,
    rehash_from,
    rewrite_row,
    run_command,
    seal_everything,
    triggers_off,
)

pytestmark = pytest.mark.django_db

ACKS = AnomalyAcknowledgement._meta.db_table


@pytest.fixture
def keys(settings):
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEYS["k1"]}
    return settings


def audit(*args: str) -> tuple[int, str, str]:
    return run_command("audit_encounters", *args)


def open_anomalies(**options) -> list[tuple[int, str]]:
    report = audit_encounters(**options)
    return [(a.sequence, a.kind) for e in report.encounters for a in e.unacknowledged]


def insert_acknowledgement(encounter_id, sequence, kind, evidence, *, previous="", seal=""):
    """What the application's role can do: INSERT an acknowledgement with plausible columns,
    its hash computed by the documented layout and chained to ``previous``."""
    from datetime import timedelta

    from django.db.models import Max
    from django.utils import timezone

    from django_encounters.engine import stored_precision

    at = stored_precision(timezone.now())
    latest = AnomalyAcknowledgement.objects.aggregate(latest=Max("acknowledged_at"))["latest"]
    if latest is not None and latest >= at:  # in order, as a careful forger would
        at = latest + timedelta(milliseconds=1)
    digest = acknowledgement_hash(encounter_id, sequence, kind, evidence, "ok", "", at, previous)
    columns = {
        "id": uuid.uuid4(),
        "created_at": at,
        "updated_at": at,
        "deleted_at": None,
        "encounter_id": encounter_id,
        "sequence": sequence,
        "kind": kind,
        "reason": "ok",
        "acknowledged_by_id": None,
        "acknowledged_at": at,
        "acknowledged_by_name": "",
        "evidence": evidence,
        "hash": digest,
        "seal": seal,
    }
    meta = AnomalyAcknowledgement._meta
    fields = [f for f in meta.concrete_fields if f.attname in columns]
    assert len(fields) == len(meta.concrete_fields), "the columns changed"
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {qn(ACKS)} ({', '.join(qn(f.column) for f in fields)}) "
            f"VALUES ({', '.join(['%s'] * len(fields))})",
            [f.get_db_prep_save(columns[f.attname], connection) for f in fields],
        )
    return digest


def test_an_acknowledgement_records_the_evidence_a_hash_and_the_reviewer_name(tampered, user):
    (finding,) = audit_encounters().encounters[0].anomalies
    stored = EncounterTransition.objects.get(encounter=tampered, sequence=2).hash
    assert finding.evidence.startswith(stored + " ")

    recorded, anomaly = acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined", user)

    ack = AnomalyAcknowledgement.objects.get()
    assert anomaly == finding
    assert (ack.evidence, ack.acknowledged_by_name, ack.seal) == (finding.evidence, "reception", "")
    assert ack.hash == acknowledgement_hash(
        tampered.pk, 2, "hash", finding.evidence, "examined", "reception", ack.acknowledged_at, ""
    )
    assert ack.hash.startswith("ack1:")
    assert ack.acknowledged_at.microsecond % 1000 == 0  # what every backup format keeps
    # The second one chains to the first, recorded later.
    second, _ = acknowledge_reported_anomaly(tampered.pk, 2, "hash", "again", user)
    assert second.acknowledged_at > ack.acknowledged_at
    assert second.hash == acknowledgement_hash(
        tampered.pk,
        2,
        "hash",
        finding.evidence,
        "again",
        "reception",
        second.acknowledged_at,
        ack.hash,
    )
    assert open_anomalies() == []


def test_with_keys_an_acknowledgement_is_sealed_in_its_insert(tampered, keys, user):
    seal_everything()
    assert open_anomalies() == [(2, "hash")]
    recorded, _ = acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined", user)
    from django_encounters import conf

    assert recorded.seal == conf.sealer().seal("acknowledgement", recorded.hash)
    assert AnomalyAcknowledgement.objects.get().seal == recorded.seal
    assert open_anomalies() == []
    assert audit()[0] == 0 and run_command("rebuild_encounter_projections", "--check")[0] == 0


def test_a_forged_acknowledgement_no_longer_turns_exit_1_into_0_with_keys(tampered, keys):
    """Issue 19, attack 3: the application's role INSERTs an acknowledgement with a correct
    hash (the layout is public) and a made-up seal: it covers nothing and is reported."""
    seal_everything()
    (finding,) = audit_encounters().encounters[0].anomalies
    for seal in ("", "k1:" + "c" * 64):
        insert_acknowledgement(tampered.pk, 2, "hash", finding.evidence, seal=seal)

        code, out, err = audit("--format", "json")

        assert code == 1
        anomalies = json.loads(out)["encounters"][0]["anomalies"]
        assert [(a["sequence"], a["kind"], "acknowledged" in a) for a in anomalies][:1] == [
            (2, "hash", False)
        ]
        forged = [a for a in anomalies if a["kind"] == "seal"]
        assert forged and all(
            a["detail"].startswith("the acknowledgement of 'hash' at sequence 2 by nobody")
            for a in forged
        )
        assert run_command("rebuild_encounter_projections", "--check")[0] == 1
        assert not rebuild_projections(check=True).ok


def test_without_keys_a_forged_acknowledgement_with_a_correct_hash_covers_its_finding(tampered):
    """What the docs say seals are for: without keys the hash and chain are public, so a
    forged acknowledgement with the right evidence covers its finding (one with a wrong hash
    does not, and is reported)."""
    (finding,) = audit_encounters().encounters[0].anomalies
    insert_acknowledgement(tampered.pk, 2, "hash", finding.evidence, previous="bogus")
    assert set(open_anomalies()) == {(2, "hash"), (2, "acknowledgement")}
    insert_acknowledgement(tampered.pk, 2, "hash", "", previous="bogus")  # no evidence
    assert (2, "hash") in open_anomalies()

    # One chained to the last acknowledgement, with the finding's evidence: covers it (and
    # the broken one stays reported).
    last = AnomalyAcknowledgement.objects.order_by("acknowledged_at", "pk").last()
    insert_acknowledgement(tampered.pk, 2, "hash", finding.evidence, previous=last.hash)
    assert (2, "hash") not in open_anomalies()


def test_an_acknowledgement_does_not_cover_a_later_different_change_to_the_row(tampered):
    assert (
        run_command("acknowledge_anomaly", str(tampered.pk), "2", "hash", "--reason", "examined")[0]
        == 0
    )
    assert audit()[0] == 0

    rewrite_row(tampered, 2, reason="edited again, differently")  # the stored hash is kept

    code, out, err = audit("--format", "json")
    assert code == 1
    (anomaly,) = json.loads(out)["encounters"][0]["anomalies"]
    assert (anomaly["sequence"], anomaly["kind"], "acknowledged" in anomaly) == (2, "hash", False)
    assert not rebuild_projections(check=True).ok

    rewrite_row(tampered, 2, reason="edited")  # back to what was examined
    assert audit()[0] == 0


def test_a_stale_acknowledgement_is_not_applied(tampered):
    """The evidence is no longer the stored value: the row's stored hash was replaced."""
    acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined")
    rewrite_row(tampered, 2, hash="v2:" + "d" * 64)
    assert (2, "hash") in open_anomalies()


def test_a_truncation_acknowledged_does_not_cover_a_longer_one(tampered):
    from tests.helpers import delete_rows

    acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined")
    delete_rows(tampered, 3)
    acknowledge_reported_anomaly(tampered.pk, 3, "truncated", "row 3 lost")
    assert open_anomalies() == []
    delete_rows(tampered, 2)
    found = open_anomalies()
    assert (3, "truncated") in found


def test_an_acknowledgement_against_one_checkpoint_does_not_cover_another(
    visit_definition, patient, tmp_path
):
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in")
    transition(visit, "in_progress")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_checkpoint(first)
    create_encounter(visit_definition, patient)  # B covers one more encounter: another root
    write_checkpoint(second)
    rewrite_row(visit, 1, reason="forged")
    rehash_from(visit, 1)
    forge_projection(visit)
    assert audit("--against", str(first))[0] == 1
    assert audit("--against", str(second))[0] == 1

    code, _, err = run_command(
        "acknowledge_anomaly",
        str(visit.pk),
        "2",
        "rewritten",
        "--reason",
        "forensics done",
        "--against",
        str(first),
    )
    assert (code, err) == (0, "")
    ack = AnomalyAcknowledgement.objects.get()
    root = json.loads(first.read_text())["root"]
    assert ack.evidence.startswith(root + " ")

    assert audit("--against", str(first))[0] == 0
    code, out, _ = audit("--against", str(second), "--format", "json")
    assert code == 1
    (anomaly,) = [a for e in json.loads(out)["encounters"] for a in e["anomalies"]]
    assert (anomaly["kind"], "acknowledged" in anomaly) == ("rewritten", False)

    # A new rewrite found against the same checkpoint is not covered either.
    rewrite_row(visit, 1, reason="forged twice")
    rehash_from(visit, 1)
    forge_projection(visit)
    assert audit("--against", str(first))[0] == 1


def test_a_changed_or_deleted_acknowledgement_breaks_the_chain_and_is_reported(tampered):
    """The database owner (triggers off) edits the reason of the first acknowledgement, then
    deletes it: each time the broken ones cover nothing and are reported."""
    first, _ = acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined")
    rewrite_row(tampered, 3, reason="edited too")
    second, _ = acknowledge_reported_anomaly(tampered.pk, 3, "hash", "examined too")
    assert open_anomalies() == []
    qn = connection.ops.quote_name
    key = AnomalyAcknowledgement._meta.pk.get_db_prep_value(first.pk, connection)

    with triggers_off(ACKS) as cursor:
        cursor.execute(f"UPDATE {qn(ACKS)} SET {qn('reason')} = %s WHERE id = %s", ["x", key])
    assert open_anomalies() == [(2, "hash"), (2, "acknowledgement")]
    (broken,) = [
        a for a in audit_encounters().encounters[0].anomalies if a.kind == "acknowledgement"
    ]
    assert broken.detail.startswith("the acknowledgement of 'hash' at sequence 2 by nobody")
    assert "covers nothing: its hash does not match" in broken.detail
    assert broken.evidence == f"{first.hash} unsealed"

    with triggers_off(ACKS) as cursor:
        cursor.execute(f"DELETE FROM {qn(ACKS)} WHERE id = %s", [key])
    # The second one no longer chains: it is reported and covers nothing.
    assert sorted(open_anomalies()) == [(2, "hash"), (3, "acknowledgement"), (3, "hash")]


def test_an_unsealed_acknowledgement_covers_nothing_once_keys_are_configured(tampered, settings):
    acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined")  # no keys: unsealed
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEYS["k1"]}
    seal_everything_but_acknowledgements()
    found = audit_encounters().encounters[0]
    assert [(a.sequence, a.kind) for a in found.unacknowledged] == [(2, "hash"), (2, "seal")]
    assert found.unacknowledged[1].detail.endswith("covers nothing: it is not sealed")

    seal_everything()  # adopting the log seals it too
    assert open_anomalies() == []


def seal_everything_but_acknowledgements() -> None:
    saved = list(AnomalyAcknowledgement.objects.values_list("pk", "seal"))
    seal_everything()
    from tests.helpers import raw_update

    for pk, seal in saved:
        raw_update(AnomalyAcknowledgement, pk, seal=seal)


def test_an_acknowledgement_without_evidence_covers_nothing(tampered):
    """``acknowledge_anomaly`` without ``evidence`` (or one recorded before evidence existed)
    covers no finding."""
    acknowledge_anomaly(tampered.pk, 2, "hash", "blanket")
    assert open_anomalies() == [(2, "hash")]
    (finding,) = audit_encounters().encounters[0].anomalies
    acknowledge_anomaly(tampered.pk, 2, "hash", "examined", evidence=finding.evidence)
    assert open_anomalies() == []
    with pytest.raises(ValueError, match="evidence is longer than 255"):
        acknowledge_anomaly(tampered.pk, 2, "hash", "x", evidence="e" * 256)


def test_seal_anomalies_at_the_same_sequence_are_acknowledged_each_by_its_evidence(
    visit_definition, patient, keys
):
    """The genesis seal and the version seal are both at sequence 0: acknowledging `seal` at
    0 records one acknowledgement for each, each bound to its own evidence."""
    from tests.helpers import raw_update

    visit = create_encounter(visit_definition, patient)
    # Written before adoption: the version (created before the keys) and, here, the genesis
    # are unsealed.
    raw_update(Encounter, visit.pk, genesis_seal="")
    code, out, err = run_command(
        "acknowledge_anomaly", str(visit.pk), "0", "seal", "--reason", "before adoption"
    )
    assert (code, err) == (0, "")
    assert out.count("acknowledged: ") == 2
    assert sorted(AnomalyAcknowledgement.objects.values_list("evidence", flat=True)) == sorted(
        a.evidence for a in audit_encounters().encounters[0].anomalies if a.kind == "seal"
    )
    assert [a.kind for a in audit_encounters().encounters[0].unacknowledged] == []
    assert AnomalyKind.SEAL.stream
