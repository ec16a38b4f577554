"""Backups keep the proof: a ``dumpdata --all``/``loaddata`` round trip (Django's documented
way, content types and permissions excluded, so content-type ids may differ) and, on
PostgreSQL, a ``pg_dump``/``pg_restore`` round trip both leave the audit clean and every answer
the same. What makes it work: every time the hash chain covers is stored at millisecond
precision (what Django's JSON serialiser keeps), and the genesis names the subject's type as
``app_label.model``, not by its content-type id."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.acknowledgements import acknowledge_anomaly
from django_encounters.projections.audit import audit_encounters
from django_encounters.services import create_encounter, get_state_at, transition, upgrade_encounter
from tests.helpers import child_env, run_command

ROOT = Path(__file__).resolve().parent.parent
#: The seal key of the sealed round trips, and another one with the same key id.
SEAL_KEY = "backup-seal-key-" + "s" * 32
OTHER_KEY = "another-seal-key-" + "o" * 32
EXCLUDED = ["contenttypes", "auth.permission", "admin.logentry", "sessions"]


def _world(visit_definition: Any, employment_definition: Any, patient: Any, user: Any) -> None:
    """Everything the store holds: rows with users and context, a backdated row, a definition
    with two versions and an upgrade row, a soft-deleted encounter with history, an
    acknowledgement."""
    now = timezone.now()
    visit = create_encounter(visit_definition, patient, created_by=user, notes="first visit")
    transition(visit, "checked_in", transitioned_by=user, context={"desk": 3, "ratio": 0.1})
    job = create_encounter(employment_definition, patient)
    transition(job, "working", effective_at=now - timedelta(hours=5))
    transition(job, "finished")
    transition(job, "onleave", effective_at=now - timedelta(hours=3), reason="late entry")
    gone = create_encounter(visit_definition, patient)
    transition(gone, "cancelled", reason="duplicate")
    gone.delete()
    visit_definition.transitions = {**visit_definition.transitions, "scheduled": ["checked_in"]}
    visit_definition.save()
    upgrade_encounter(visit, transitioned_by=user, reason="new rules")
    acknowledge_anomaly(job.pk, 0, "genesis", "examined in review 12", acknowledged_by=user)


def _facts() -> dict[str, Any]:
    """What must survive the round trip: every row's hash, every projection, answers."""
    probes = [timezone.now() - timedelta(hours=h) for h in (6, 4, 2, 0)]
    return {
        "rows": sorted(EncounterTransition.objects.values_list("hash", "transitioned_at")),
        "projections": sorted(
            Encounter.all_objects.values_list(
                "id", "state", "version", "head_hash", "genesis_hash", "created_at"
            )
        ),
        "states": sorted(
            (str(e.pk), get_state_at(e, t)) for e in Encounter.all_objects.all() for t in probes
        ),
        "audit": audit_encounters(as_of=probes[-1]).as_dict(),
    }


def _seal_the_world(settings: Any) -> None:
    """Configure the seal key and seal what was written before it (the fixtures' versions)."""
    settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEY}
    code, out, err = run_command("seal_encounters")
    assert code == 0, err
    assert audit_encounters().as_dict()["anomaly_count"] == 0


def _seal_findings(report: dict[str, Any]) -> int:
    return sum(a["kind"] == "seal" for e in report["encounters"] for a in e["anomalies"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
def test_dumpdata_loaddata_round_trip_keeps_the_audit_clean(
    sealed, visit_definition, employment_definition, patient, user, tmp_path, settings
):
    if sealed:
        settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEY}
    _world(visit_definition, employment_definition, patient, user)
    if sealed:
        _seal_the_world(settings)
    before = _facts()
    assert before["audit"]["anomaly_count"] == 0
    patient_type = ContentType.objects.get_for_model(type(patient)).pk

    backup = tmp_path / "backup.json"
    call_command(
        "dumpdata",
        "--all",
        "--natural-foreign",
        *(f"--exclude={label}" for label in EXCLUDED),
        output=str(backup),
        verbosity=0,
    )
    call_command("flush", "--no-input", verbosity=0)
    # A restored database numbers its content types its own way.
    ContentType.objects.all().delete()
    ContentType.objects.clear_cache()
    for model in reversed(apps.get_models()):
        ContentType.objects.get_for_model(model)
    assert ContentType.objects.get_for_model(type(patient)).pk != patient_type
    call_command("loaddata", str(backup), verbosity=0)

    after = _facts()
    assert after == before
    code, out, err = run_command("audit_encounters", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["anomaly_count"] == 0
    if sealed:
        # The same backup audited with another secret under the same key id: every seal is
        # reported (nothing in the backup proves it came from the keys' holder).
        settings.ENCOUNTERS_SEAL_KEYS = {"k1": OTHER_KEY}
        code, out, err = run_command("audit_encounters", "--format", "json")
        assert code == 1
        report = json.loads(out)
        assert _seal_findings(report) >= EncounterTransition.objects.count()
        assert "does not match its content" in out


def test_millisecond_precision_is_what_the_serialiser_keeps():
    """Django's JSON serialiser cuts datetimes to milliseconds; the store never stores more."""
    from django.core.serializers.json import DjangoJSONEncoder

    from django_encounters.engine import stored_precision

    value = timezone.now().replace(microsecond=123456)
    text = DjangoJSONEncoder().default(value)
    assert text.endswith(".123Z") or ".123" in text
    assert stored_precision(value).microsecond == 123000


def _pg_tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail(f"{name} not found under /usr/lib/postgresql/*/bin")
    return found[-1]


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sealed", [False, True], ids=["unsealed", "sealed"])
def test_pg_dump_pg_restore_round_trip_keeps_the_audit_clean(
    sealed, visit_definition, employment_definition, patient, user, tmp_path, settings
):
    if sealed:
        settings.ENCOUNTERS_SEAL_KEYS = {"k1": SEAL_KEY}
    _world(visit_definition, employment_definition, patient, user)
    if sealed:
        _seal_the_world(settings)
    before = audit_encounters(as_of=timezone.now()).as_dict()
    assert before["anomaly_count"] == 0
    settings = connection.settings_dict
    env = dict(
        os.environ,
        PGHOST=str(settings["HOST"]),
        PGPORT=str(settings["PORT"] or os.environ.get("PGPORT", "5432")),
        PGUSER=str(settings["USER"]),
    )
    dump = tmp_path / "store.dump"
    subprocess.run(
        [_pg_tool("pg_dump"), "-Fc", "-f", str(dump), settings["NAME"]], env=env, check=True
    )
    restored = f"restored_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {restored}")
    try:
        subprocess.run(
            [_pg_tool("pg_restore"), "--no-owner", "-d", restored, str(dump)],
            env=env,
            check=True,
        )
        child = child_env() | {"PGDATABASE": restored}
        if sealed:
            child["ENCOUNTERS_TEST_SEAL_KEY"] = SEAL_KEY
        done = subprocess.run(
            [sys.executable, "-m", "django", "audit_encounters", "--format", "json"],
            cwd=ROOT,
            env=child,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        restored_report = json.loads(done.stdout)
        if sealed:
            assert restored_report["seals"] == "checked"
            other = subprocess.run(
                [sys.executable, "-m", "django", "audit_encounters", "--format", "json"],
                cwd=ROOT,
                env=child | {"ENCOUNTERS_TEST_SEAL_KEY": OTHER_KEY},
                capture_output=True,
                text=True,
            )
            assert other.returncode == 1, other.stderr
            assert _seal_findings(json.loads(other.stdout)) >= EncounterTransition.objects.count()
        assert restored_report["anomaly_count"] == 0
        assert [e["id"] for e in restored_report["encounters"]] == [
            e["id"] for e in before["encounters"]
        ]
        assert [e["timeline"] for e in restored_report["encounters"]] == [
            e["timeline"] for e in before["encounters"]
        ]
        # The restored database still refuses to rewrite its log.
        check = subprocess.run(
            [
                _pg_tool("psql"),
                "-d",
                restored,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                f"UPDATE {EncounterTransition._meta.db_table} SET reason = 'x'",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert check.returncode != 0 and "append-only" in check.stderr
    finally:
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {restored}")
