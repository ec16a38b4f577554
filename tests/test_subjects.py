"""Deleting a subject that encounters are about: the guard (refuse, or soft-delete the
encounters), its admin page, the ``EncounterRelation`` recipe, and the audit's
``subject_missing`` anomaly for what was deleted without the guard."""

from __future__ import annotations

import csv
import io
import json

import django
import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.db.models.deletion import ProtectedError
from django.db.models.signals import pre_delete
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import django_encounters
from django_encounters import create_encounter, transition
from django_encounters.exceptions import (
    EncounterConfigurationError,
    EncounterError,
    SubjectProtectedError,
)
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.audit import audit_encounters
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.subjects import (
    EncounterRelation,
    absent_subjects,
    protect_configured_subjects,
    protect_subjects,
    protected_subjects,
    unprotect_subjects,
)
from tests.helpers import run_command
from tests.testapp.models import Bed, Device, Patient, Ward

pytestmark = pytest.mark.django_db


@pytest.fixture
def guarded():
    """Guard Patient and Device (refuse) for one test, and take the guards off after it."""
    protect_subjects(Patient, Device)
    yield
    unprotect_subjects(Patient, Device, Bed, Permission)
    assert protected_subjects() == {}


@pytest.fixture
def unguard():
    yield
    unprotect_subjects(Patient, Device, Bed, Permission)


# ---------------------------------------------------------------------------------------------
# Refuse (the default)
# ---------------------------------------------------------------------------------------------


def test_a_guarded_subject_with_encounters_is_not_deleted(guarded, visit_definition, patient):
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in")
    with pytest.raises(SubjectProtectedError) as refused:
        patient.delete()
    error = refused.value
    assert isinstance(error, EncounterError) and isinstance(error, ProtectedError)
    message = str(error)
    assert f"testapp.Patient {patient.pk!r} cannot be deleted" in message
    assert f"{visit.pk} (VISIT, 'checked_in')" in message
    assert "encounter.delete()" in message and 'on_delete="soft_delete"' in message
    assert "Nothing was deleted" in message
    assert error.count == 1 and list(error.protected_objects) == [visit]
    assert Patient.objects.filter(pk=patient.pk).exists()
    assert Encounter.objects.get(pk=visit.pk).subject == patient


def test_a_fresh_encounter_protects_its_subject_too(guarded, visit_definition, device):
    visit = create_encounter(visit_definition, device)  # no transition yet; UUID key
    with pytest.raises(SubjectProtectedError, match=str(visit.pk)):
        device.delete()
    assert Device.objects.filter(pk=device.pk).exists()


def test_queryset_delete_refuses_the_whole_delete(guarded, visit_definition):
    free = Patient.objects.create(name="No visits")
    busy = Patient.objects.create(name="Has a visit")
    create_encounter(visit_definition, busy)
    with pytest.raises(SubjectProtectedError):
        Patient.objects.filter(pk__in=[free.pk, busy.pk]).delete()
    assert set(Patient.objects.values_list("pk", flat=True)) >= {free.pk, busy.pk}


def test_the_message_names_ten_encounters_and_counts_the_rest(guarded, visit_definition, patient):
    visits = [create_encounter(visit_definition, patient) for _ in range(12)]
    with pytest.raises(SubjectProtectedError) as refused:
        patient.delete()
    assert refused.value.count == 12
    assert len(refused.value.protected_objects) == 10
    assert "12 encounter(s) are about it" in str(refused.value)
    assert str(refused.value).count("(VISIT, 'scheduled')") == 10
    assert "and 2 more" in str(refused.value)
    assert {e.pk for e in refused.value.protected_objects} <= {v.pk for v in visits}


def test_soft_deleted_encounters_do_not_hold_the_subject(guarded, visit_definition, patient):
    visit = create_encounter(visit_definition, patient)
    visit.delete()  # soft
    patient.delete()
    assert not Patient.objects.filter(pk=patient.pk).exists()
    # Soft-deleted encounters are not reported by the audit (the subject went on purpose).
    assert audit_encounters().anomaly_count == 0


def test_a_cascade_from_a_parent_row_is_refused(unguard, visit_definition):
    """Deleting a content type cascades to its permissions; a guarded permission with an
    encounter stops the whole delete (Django's collector re-raises the guard's refusal as its
    own ProtectedError for the parent, with the encounters as the protected objects)."""
    kind = ContentType.objects.create(app_label="clinic", model="room")
    # An explicit id: on the Citus test cluster auth_permission's sequence is behind its rows.
    next_id = (Permission.objects.order_by("-id").values_list("id", flat=True).first() or 0) + 1
    permission = Permission.objects.create(
        id=next_id, content_type=kind, codename="book", name="Book"
    )
    protect_subjects(Permission)
    visit = create_encounter(visit_definition, permission)
    with pytest.raises(ProtectedError) as refused:
        kind.delete()
    assert set(refused.value.protected_objects) == {visit}
    assert ContentType.objects.filter(pk=kind.pk).exists()
    assert Permission.objects.filter(pk=permission.pk).exists()


def test_a_model_without_encounters_deletes_as_before(guarded, patient):
    patient.delete()
    assert not Patient.objects.filter(pk=patient.pk).exists()


# ---------------------------------------------------------------------------------------------
# Soft-delete the encounters (the opt-in)
# ---------------------------------------------------------------------------------------------


def test_soft_delete_lets_the_subject_go_and_keeps_the_log(unguard, visit_definition, patient):
    protect_subjects(Patient, on_delete="soft_delete")
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in")
    other = create_encounter(visit_definition, Patient.objects.create(name="Someone else"))
    patient.delete()
    assert not Patient.objects.filter(pk=patient.pk).exists()
    kept = Encounter.all_objects.get(pk=visit.pk)
    assert kept.is_deleted and kept.state == "checked_in" and kept.version == 1
    assert EncounterTransition.objects.filter(encounter_id=visit.pk).count() == 1
    assert not Encounter.all_objects.get(pk=other.pk).is_deleted
    report = audit_encounters()
    assert report.anomaly_count == 0
    assert [a.deleted for a in report.encounters if a.id == visit.pk] == [True]


def test_soft_delete_is_undone_when_the_delete_fails(unguard, visit_definition, patient):
    protect_subjects(Patient, on_delete="soft_delete")
    visit = create_encounter(visit_definition, patient)

    def veto(sender, instance, **kwargs):
        raise RuntimeError("another receiver refuses")

    pre_delete.connect(veto, sender=Patient, dispatch_uid="test-veto")
    try:
        with pytest.raises(RuntimeError), transaction.atomic():
            patient.delete()
    finally:
        pre_delete.disconnect(sender=Patient, dispatch_uid="test-veto")
    assert Patient.objects.filter(pk=patient.pk).exists()
    assert not Encounter.all_objects.get(pk=visit.pk).is_deleted


def test_decorator_setting_and_bad_registrations(unguard):
    assert protect_subjects(on_delete="soft_delete")(Patient) is Patient
    assert protected_subjects() == {Patient: "soft_delete"}
    assert django_encounters.protect_subjects(Device) is Device  # the default refuses
    assert protected_subjects()[Device] == "refuse"
    unprotect_subjects(Patient, Device)
    with override_settings(ENCOUNTERS_SUBJECT_MODELS=["testapp.Patient"]):
        protect_configured_subjects()
    assert protected_subjects() == {Patient: "refuse"}
    with override_settings(ENCOUNTERS_SUBJECT_MODELS={"testapp.Device": "soft_delete"}):
        protect_configured_subjects()
    assert protected_subjects() == {Patient: "refuse", Device: "soft_delete"}
    with pytest.raises(EncounterConfigurationError, match="ENCOUNTERS_SUBJECT_MODELS"):
        with override_settings(ENCOUNTERS_SUBJECT_MODELS={"testapp.Device": "cascade"}):
            protect_configured_subjects()
    with pytest.raises(EncounterConfigurationError, match="on_delete must be one of"):
        protect_subjects(Patient, on_delete="cascade")
    with pytest.raises(EncounterConfigurationError, match="names no installed model"):
        protect_subjects("testapp.Nobody")
    with pytest.raises(EncounterConfigurationError, match="EncounterRelation"):
        protect_subjects(Bed)  # a plain GenericRelation would cascade before the guard


# ---------------------------------------------------------------------------------------------
# GenericRelation and EncounterRelation (the docs' recipe)
# ---------------------------------------------------------------------------------------------


def test_encounter_relation_queries_and_does_not_cascade(visit_definition, patient):
    assert isinstance(Patient._meta.get_field("encounters"), EncounterRelation)
    visit = create_encounter(visit_definition, patient)
    gone = create_encounter(visit_definition, patient)
    gone.delete()
    assert list(patient.encounters.all()) == [visit]  # soft-deleted ones hidden
    if django.VERSION >= (5, 0) or connection.vendor != "postgresql":
        # Before 5.0, Django compares the text subject id with the integer key uncast, which
        # PostgreSQL refuses (Django ticket #16055; documented in docs/guides/subjects.md).
        assert list(Encounter.objects.filter(patient__name="Ada Lovelace")) == [visit]
    # Unguarded, the delete orphans the encounter but never deletes it.
    patient.delete()
    assert Encounter.all_objects.filter(pk__in=[visit.pk, gone.pk]).count() == 2


def test_a_plain_generic_relation_cascades_into_the_encounters(visit_definition):
    """What the docs warn about: Django's raw ProtectedError for an encounter with a log, and
    a fresh encounter hard-deleted with its subject."""
    ward = Ward.objects.create(name="East")
    bed = Bed.objects.create(ward=ward, label="E1")
    visit = create_encounter(visit_definition, bed)
    transition(visit, "checked_in")
    if django.VERSION >= (5, 0) or connection.vendor != "postgresql":  # see above
        assert list(Encounter.objects.filter(bed__label="E1")) == [visit]
    with pytest.raises(ProtectedError) as raw:
        bed.delete()
    assert not isinstance(raw.value, EncounterError)
    fresh_bed = Bed.objects.create(ward=ward, label="E2")
    fresh = create_encounter(visit_definition, fresh_bed)
    fresh_bed.delete()
    assert not Encounter.all_objects.filter(pk=fresh.pk).exists()  # hard-deleted


# ---------------------------------------------------------------------------------------------
# The admin's delete page
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def admin_client_here(client):
    staff = User.objects.create_superuser("boss", "boss@example.com", "pw")
    client.force_login(staff)
    return client


def test_the_admin_delete_page_names_the_encounters_and_deletes_nothing(
    guarded, admin_client_here, visit_definition, patient
):
    """The testapp's plain ``ModelAdmin`` for Patient: the guard's refusal is a
    ``ProtectedError`` raised while Django collects, so the admin lists the encounters as
    protected objects (linked to their pages) and refuses "Yes, I'm sure" — no 500."""
    visit = create_encounter(visit_definition, patient)
    url = f"/admin/testapp/patient/{patient.pk}/delete/"
    page = admin_client_here.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "would require deleting the following protected related objects" in text
    assert f"/admin/django_encounters/encounter/{visit.pk}/change/" in text
    assert "Patient Visit - scheduled" in text
    confirmed = admin_client_here.post(url, {"post": "yes"})
    assert confirmed.status_code == 200  # the same page again
    assert "protected related objects" in confirmed.content.decode()
    assert Patient.objects.filter(pk=patient.pk).exists()
    action = admin_client_here.post(
        "/admin/testapp/patient/",
        {"action": "delete_selected", "_selected_action": [patient.pk], "post": "yes"},
    )
    assert action.status_code == 200
    assert "protected related objects" in action.content.decode()
    assert Patient.objects.filter(pk=patient.pk).exists()


def test_the_admin_deletes_with_soft_delete(unguard, admin_client_here, visit_definition):
    protect_subjects(Patient, on_delete="soft_delete")
    patient = Patient.objects.create(name="Grace Hopper")
    visit = create_encounter(visit_definition, patient)
    url = f"/admin/testapp/patient/{patient.pk}/delete/"
    assert admin_client_here.get(url).status_code == 200
    done = admin_client_here.post(url, {"post": "yes"})
    assert done.status_code == 302
    assert not Patient.objects.filter(pk=patient.pk).exists()
    assert Encounter.all_objects.get(pk=visit.pk).is_deleted


# ---------------------------------------------------------------------------------------------
# The audit: subject_missing
# ---------------------------------------------------------------------------------------------


def _orphan(visit_definition, name="Ada Lovelace"):
    """An encounter whose subject was deleted without the guard."""
    patient = Patient.objects.create(name=name)
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in")
    Patient.objects.filter(pk=patient.pk).delete()
    return visit, patient


def test_the_audit_reports_an_encounter_whose_subject_is_gone(visit_definition, device):
    visit, patient = _orphan(visit_definition)
    kept = create_encounter(visit_definition, device)
    Device.objects.filter(pk=device.pk).delete()
    alive = create_encounter(visit_definition, Patient.objects.create(name="Still here"))
    report = audit_encounters()
    found = {a.id: [(x.sequence, x.kind) for x in a.anomalies] for a in report.encounters}
    assert found[visit.pk] == [(0, "subject_missing")]
    assert found[kept.pk] == [(0, "subject_missing")]
    assert found[alive.pk] == []
    (anomaly,) = next(a for a in report.encounters if a.id == visit.pk).anomalies
    assert f"testapp.patient:{patient.pk} no longer exists" in anomaly.detail
    assert anomaly.evidence == f"testapp.patient:{patient.pk}"
    # transition() still works: the log is not the subject's.
    transition(Encounter.objects.get(pk=visit.pk), "in_progress")


def test_the_subjects_are_looked_up_once_per_batch(visit_definition, device):
    for n in range(6):
        create_encounter(visit_definition, Patient.objects.create(name=f"P{n}"))
    create_encounter(visit_definition, device)
    _orphan(visit_definition)
    with CaptureQueriesContext(connection) as captured:
        report = audit_encounters(batch_size=4)
    lookups = [q["sql"] for q in captured if "testapp_" in q["sql"]]
    assert len(lookups) == 2  # ceil(8 / 4) batches, both tables in one UNION each
    assert "UNION" not in lookups[0].upper()  # four patients
    assert "UNION" in lookups[1].upper()  # two patients, the device, the orphan
    assert report.anomaly_count == 1


def test_absent_subjects_by_kind_of_reason(patient, device):
    patient_type = ContentType.objects.get_for_model(Patient).pk
    device_type = ContentType.objects.get_for_model(Device).pk
    gone_type = ContentType.objects.create(app_label="gone", model="thing").pk
    references = [
        (patient_type, str(patient.pk)),
        (patient_type, "999999"),
        (patient_type, "not-a-number"),
        (device_type, str(device.pk)),
        (gone_type, "1"),
    ]
    absent = absent_subjects(references, "default")
    assert set(absent) == {references[1], references[2], references[4]}
    assert "not installed" in absent[references[4]]
    assert absent_subjects([], "default") == {}


def test_output_check_and_acknowledgement(visit_definition, user):
    visit, _ = _orphan(visit_definition)

    code, out, _ = run_command("audit_encounters", "--format", "json")
    assert code == 1
    document = json.loads(out)
    assert document["anomaly_count"] == 1
    (entry,) = [e for e in document["encounters"] if e["id"] == str(visit.pk)]
    assert [a["kind"] for a in entry["anomalies"]] == ["subject_missing"]

    code, out, _ = run_command("audit_encounters", "--format", "csv")
    assert code == 1
    assert (
        "subject_missing" in {value for row in csv.reader(io.StringIO(out)) for value in row}
        or "subject_missing" in out
    )

    code, out, _ = run_command("audit_encounters")
    assert code == 1 and "subject_missing" in out

    check = rebuild_projections(check=True)
    assert not check.ok and check.anomaly_count == 1
    assert check.projections_drifted == 0
    code, out, _ = run_command("rebuild_encounter_projections", "--check")
    assert code == 1

    code, out, err = run_command(
        "acknowledge_anomaly",
        str(visit.pk),
        "0",
        "subject_missing",
        "--reason",
        "patient erased on request (GDPR art. 17); visit kept",
        "--user",
        user.username,
    )
    assert code == 0, err
    assert audit_encounters().anomaly_count == 0
    assert rebuild_projections(check=True).ok
    code, _, _ = run_command("rebuild_encounter_projections", "--check")
    assert code == 0


def test_soft_deleting_the_orphan_clears_the_finding(visit_definition):
    visit, _ = _orphan(visit_definition)
    assert audit_encounters().anomaly_count == 1
    Encounter.objects.get(pk=visit.pk).delete()
    assert audit_encounters().anomaly_count == 0


def test_the_guide_declares_the_relation_as_the_test_app_does():
    from pathlib import Path

    root = Path(__file__).resolve().parent
    line = 'encounters = EncounterRelation(related_query_name="patient")'
    assert line in (root.parent / "docs" / "guides" / "subjects.md").read_text()
    assert line in (root / "testapp" / "models.py").read_text()


def test_a_guarded_model_passes_the_system_checks(guarded):
    from django.core import checks

    found = [m for m in checks.run_checks() if m.is_serious()]
    assert found == []
    assert "_encounters_subject_guard" in {f.name for f in Patient._meta.private_fields}
