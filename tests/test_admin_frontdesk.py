"""The encounter admin for a day at the front desk, through Django's test client: the patient
found by name (and an id found only as an id), the subject named on every page and message, no
N+1 on the list, no lost edits (the edit form refused when the encounter changed since it was
rendered; only changed fields written), the fields a validator requires set with the
transition in one step, the reason kept after a refusal, read-only record fields, the
definition editor with a row per state."""

from __future__ import annotations

import html
import json
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_encounters.admin.common import configured_subject_search
from django_encounters.exceptions import EncounterConfigurationError
from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.services import create_encounter, transition
from tests.helpers import change_url, changelist_url, messages_of, reload, snapshot, transition_url
from tests.testapp.models import Device, Patient

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def front_desk(visit_definition):
    """Three patients, two of them Okafors, and a visit for each."""
    names = ["Ada Okafor", "Bola Adeyemi", "Chidi Okafor"]
    patients = [Patient.objects.create(name=name) for name in names]
    visits = [create_encounter(visit_definition, patient) for patient in patients]
    return dict(zip(names, visits, strict=True))


def found(client, q):
    page = client.get(changelist_url(), {"q": q})
    assert page.status_code == 200
    return {e.pk for e in page.context["cl"].result_list}


# -- subject-first search ----------------------------------------------------------------------


def test_the_list_searches_the_patients_name(admin_client, front_desk):
    assert found(admin_client, "Okafor") == {
        front_desk["Ada Okafor"].pk,
        front_desk["Chidi Okafor"].pk,
    }
    assert found(admin_client, "okafor ada") == {front_desk["Ada Okafor"].pk}
    assert found(admin_client, '"Bola Adeyemi"') == {front_desk["Bola Adeyemi"].pk}
    assert found(admin_client, "Nobody") == set()
    # The notes and the transitions' reasons are still searched.
    ada = front_desk["Ada Okafor"]
    transition(ada, "checked_in", reason="calibration overdue")
    Encounter.objects.filter(pk=front_desk["Bola Adeyemi"].pk).update(notes="allergic")
    assert found(admin_client, "calibration") == {ada.pk}
    assert found(admin_client, "allergic") == {front_desk["Bola Adeyemi"].pk}
    assert found(admin_client, "okafor calibration") == {ada.pk}


def test_an_id_matches_only_ids_never_notes(admin_client, visit_definition):
    patient = Patient.objects.create(name="Ada Okafor")
    other = Patient.objects.create(name="Bola Adeyemi")
    own = create_encounter(visit_definition, patient)
    in_room = create_encounter(visit_definition, other, notes=f"Room {patient.pk}")
    assert found(admin_client, str(patient.pk)) == {own.pk}
    assert found(admin_client, f"#{patient.pk}") == {own.pk}
    assert found(admin_client, "Room") == {in_room.pk}
    # An encounter's short id (as the list shows it) and its full UUID.
    assert found(admin_client, str(in_room.pk)[:8]) == {in_room.pk}
    assert found(admin_client, str(in_room.pk)) == {in_room.pk}
    # A UUID-keyed subject by its id.
    device = Device.objects.create(serial="SN-0001")
    on_device = create_encounter(visit_definition, device)
    assert found(admin_client, str(device.pk)) == {on_device.pk}


def test_the_setting_names_the_search_fields_of_a_model_without_them(
    admin_client, visit_definition, settings
):
    device = Device.objects.create(serial="SN-4711")
    visit = create_encounter(visit_definition, device)
    assert found(admin_client, "SN-4711") == set()  # its admin has no search_fields
    settings.ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS = {"testapp.device": ["serial"]}
    assert found(admin_client, "SN-4711") == {visit.pk}
    assert found(admin_client, "sn-47") == {visit.pk}


@pytest.mark.parametrize(
    "value, complaint",
    [
        (["name"], "must be a dict"),
        ({"testapp.nothing": ["name"]}, "'testapp.nothing' is not an installed model"),
        ({"testapp.patient": "name"}, "must be a non-empty list"),
        ({"testapp.patient": ["surname"]}, "'surname' does not name a field of testapp.Patient"),
    ],
)
def test_a_bad_search_fields_setting_is_a_clear_error_and_a_check(settings, value, complaint):
    settings.ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS = value
    with pytest.raises(EncounterConfigurationError, match="ENCOUNTERS_ADMIN_SUBJECT_SEARCH"):
        configured_subject_search()
    from django.core.management.base import SystemCheckError

    with pytest.raises(SystemCheckError) as raised:
        call_command("check")
    assert "django_encounters.E006" in str(raised.value) and complaint in str(raised.value)


def test_a_good_search_fields_setting_passes_the_check(settings):
    settings.ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS = {"testapp.patient": ["^name", "=id"]}
    call_command("check")
    assert configured_subject_search() == {Patient: ["^name", "=id"]}


def _list_queries(client, **params):
    with CaptureQueriesContext(connection) as queries:
        page = client.get(changelist_url(), params)
    assert page.status_code == 200
    return len(queries), page


def test_the_list_costs_the_same_queries_for_3_or_30_encounters(admin_client, visit_definition):
    for n in range(3):
        create_encounter(visit_definition, Patient.objects.create(name=f"Okafor {n}"))
        create_encounter(visit_definition, Device.objects.create(serial=f"SN-{n}"))
    few, _ = _list_queries(admin_client)
    few_search, _ = _list_queries(admin_client, q="okafor")
    for n in range(3, 15):
        create_encounter(visit_definition, Patient.objects.create(name=f"Okafor {n}"))
        create_encounter(visit_definition, Device.objects.create(serial=f"SN-{n}"))
    many, page = _list_queries(admin_client)
    many_search, searched = _list_queries(admin_client, q="okafor")
    assert many == few
    assert many_search == few_search
    assert len(searched.context["cl"].result_list) == 15
    text = page.content.decode()
    assert "Okafor 14 (#" in text and "SN-14 (#" in text  # each subject's str(), linked


# -- the subject named everywhere ------------------------------------------------------------


def test_pages_and_messages_name_the_definition_and_the_subject(
    admin_client, front_desk, admin_user
):
    visit = front_desk["Ada Okafor"]
    short = str(visit.pk)[:8]
    page = admin_client.get(change_url(visit))
    text = page.content.decode()
    assert f"<h2>Patient Visit for Ada Okafor · encounter {short}</h2>" in text
    assert f"&rsaquo; Patient Visit for Ada Okafor ({short}, scheduled)" in text  # breadcrumbs

    form = admin_client.get(transition_url(visit), {"to_state": "checked_in"})
    assert "<h1>Patient Visit for Ada Okafor: move to &#x27;checked_in&#x27;</h1>" in (
        form.content.decode()
    )
    moved = admin_client.post(
        transition_url(visit),
        {"to_state": "checked_in", "expected_version": 0, "reason": "arrived"},
        follow=True,
    )
    assert messages_of(moved) == [
        "Patient Visit for Ada Okafor: Moved from 'scheduled' to 'checked_in' (sequence 1): "
        "arrived."
    ]
    logged = LogEntry.objects.get(object_id=str(visit.pk))
    assert logged.object_repr == "Patient Visit for Ada Okafor"  # History, "Recent actions"

    saved = admin_client.post(
        change_url(visit), {**edit_payload(admin_client, visit), "notes": "x"}, follow=True
    )
    (message,) = messages_of(saved)
    assert "Patient Visit for Ada Okafor" in message and "Patient Visit - " not in message

    delete = reverse("admin:django_encounters_encounter_delete", args=[visit.pk])
    confirm = admin_client.get(delete).content.decode()
    assert f"<strong>Patient Visit for Ada Okafor ({short}, checked_in)</strong>" in confirm
    gone = admin_client.post(delete, {"post": "yes"}, follow=True)
    assert any("Patient Visit for Ada Okafor" in m for m in messages_of(gone))
    restore = reverse("admin:django_encounters_encounter_restore", args=[visit.pk])
    back = admin_client.post(restore, follow=True)
    assert any(
        "Patient Visit for Ada Okafor" in m and "was restored" in m for m in messages_of(back)
    )


def test_a_transition_of_a_deleted_encounter_says_deleted(admin_client, front_desk):
    visit = front_desk["Ada Okafor"]
    visit.delete()
    for page in (
        admin_client.get(transition_url(visit), {"to_state": "checked_in"}, follow=True),
        admin_client.post(
            transition_url(visit), {"to_state": "checked_in", "expected_version": 0}, follow=True
        ),
    ):
        (message,) = messages_of(page)
        assert message.startswith("Patient Visit for Ada Okafor was deleted (soft-deleted at")
        assert "Restore it first" in message
    assert reload(visit).version == 0


# -- no lost edits ---------------------------------------------------------------------------


def edit_payload(client, encounter):
    """What the edit page of ``encounter`` posts when saved unchanged: every field as shown,
    and the hidden fields saying what it was rendered with."""
    from django_encounters.admin.forms import widget_data

    page = client.get(change_url(encounter))
    form = page.context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        data.update(widget_data(field, form[name].html_name, form[name].initial))
    seen = page.context["seen"]
    data[seen["version_name"]] = seen["version"]
    data[seen["fields_name"]] = seen["fields"]
    return data


@pytest.fixture
def in_progress(validated_encounter):
    """A validated visit in progress (started an hour ago)."""
    visit = validated_encounter
    transition(visit, "checked_in")
    visit.started_at = timezone.now() - timedelta(hours=1)
    visit.save()
    transition(visit, "in_progress")
    return visit


def test_a_save_from_a_page_older_than_the_encounter_is_refused(admin_client, in_progress):
    """Tab B opened the form; tab A set Ended at and completed the visit; B's notes save is
    refused, says what changed, keeps B's notes and shows A's Ended at; saved again, it writes
    the notes only."""
    visit = in_progress
    tab_b = edit_payload(admin_client, visit)
    ended = timezone.now().replace(microsecond=0) - timedelta(minutes=5)
    visit.ended_at = ended
    visit.save()
    transition(visit, "completed")
    before = snapshot(visit)

    page = admin_client.post(change_url(visit), {**tab_b, "notes": "patient asked for a copy"})
    assert page.status_code == 200
    assert snapshot(visit) == before and reload(visit).notes == ""
    text = page.content.decode()
    assert "Not saved, nothing was written" in text
    assert "it moved on from version 2 to 3 (#3 in_progress → completed)" in text
    assert "Ended at was changed from (empty) to" in text
    form = page.context["adminform"].form
    assert form["notes"].value() == "patient asked for a copy"
    assert form["ended_at"].value()[0] == timezone.localtime(ended).strftime("%Y-%m-%d")
    seen = page.context["seen"]
    assert seen["version"] == "3"

    again = {k: v for k, v in form.data.items()}
    saved = admin_client.post(change_url(visit), again)
    assert saved.status_code == 302, saved.context["adminform"].form.errors
    fresh = reload(visit)
    assert (fresh.notes, fresh.ended_at, fresh.state) == (
        "patient asked for a copy",
        ended,
        "completed",
    )


def test_a_field_both_tabs_changed_keeps_the_typed_value(admin_client, in_progress):
    visit = in_progress
    tab_b = edit_payload(admin_client, visit)
    visit.notes = "from tab A"
    visit.save()
    page = admin_client.post(change_url(visit), {**tab_b, "notes": "from tab B"})
    text = page.content.decode()
    assert "Notes was changed from (empty) to &#x27;from tab A&#x27;" in text
    assert "you changed it too: your value is kept in the form" in text
    assert page.context["adminform"].form["notes"].value() == "from tab B"
    assert reload(visit).notes == "from tab A"


def test_a_save_that_does_not_say_what_it_saw_is_refused(admin_client, in_progress):
    data = edit_payload(admin_client, in_progress)
    del data["_seen_version"], data["_seen_fields"]
    page = admin_client.post(change_url(in_progress), {**data, "notes": "x"})
    assert page.status_code == 200
    assert "did not say which version" in page.content.decode()
    assert reload(in_progress).notes == ""


def test_saving_one_time_keeps_the_other_times_to_the_microsecond(
    admin_client, visit_definition, patient
):
    scheduled = timezone.now().replace(microsecond=123456) + timedelta(days=1)
    visit = create_encounter(visit_definition, patient, scheduled_at=scheduled)
    data = edit_payload(admin_client, visit)
    started = timezone.localtime(timezone.now()).replace(microsecond=0)
    data["started_at_0"] = started.strftime("%Y-%m-%d")
    data["started_at_1"] = started.strftime("%H:%M:%S")
    assert admin_client.post(change_url(visit), data).status_code == 302
    fresh = reload(visit)
    assert fresh.scheduled_at == scheduled  # microseconds and all
    assert fresh.started_at == started
    entry = LogEntry.objects.filter(object_id=str(visit.pk)).latest("action_time")
    assert entry.get_change_message() == "Changed Started at."


def test_an_unchanged_save_writes_nothing(admin_client, in_progress):
    before = reload(in_progress).updated_at
    assert admin_client.post(change_url(in_progress), edit_payload(admin_client, in_progress))
    assert reload(in_progress).updated_at == before


def test_record_fields_are_read_only_on_the_edit_form(admin_client, in_progress, other_user):
    page = admin_client.get(change_url(in_progress))
    text = page.content.decode()
    for name in ("created_by", "metadata", "created_at"):
        assert f'name="{name}"' not in text
    assert "Created by" in text and "Metadata" in text
    data = edit_payload(admin_client, in_progress)
    admin_client.post(
        change_url(in_progress), {**data, "created_by": other_user.pk, "metadata": '{"x": 1}'}
    )
    fresh = reload(in_progress)
    assert fresh.created_by_id is None and fresh.metadata == {}


# -- the transition form: same-step fields, times kept, refusals ------------------------------


def split(name, when):
    local = timezone.localtime(when)
    return {f"{name}_0": local.strftime("%Y-%m-%d"), f"{name}_1": local.strftime("%H:%M:%S")}


def test_the_transition_form_sets_a_required_field_in_the_same_step(
    admin_client, validated_encounter
):
    visit = validated_encounter
    transition(visit, "checked_in")
    form = admin_client.get(transition_url(visit), {"to_state": "in_progress"})
    text = form.content.decode()
    assert 'name="set_started_at_0"' in text and "Started at" in text
    assert 'name="set_ended_at_0"' not in text
    started = timezone.now().replace(microsecond=0) - timedelta(minutes=10)
    page = admin_client.post(
        transition_url(visit),
        {"to_state": "in_progress", "expected_version": 1, **split("set_started_at", started)},
        follow=True,
    )
    fresh = reload(visit)
    assert (fresh.state, fresh.started_at) == ("in_progress", started)
    (message,) = messages_of(page)
    assert "Moved from 'checked_in' to 'in_progress' (sequence 2), setting Started at to" in message


def test_a_refused_transition_writes_none_of_its_fields(admin_client, validated_encounter):
    visit = validated_encounter
    transition(visit, "checked_in")
    started = timezone.now().replace(microsecond=0)
    page = admin_client.post(
        transition_url(visit),
        {
            "to_state": "in_progress",
            "expected_version": 0,  # stale
            "reason": "doctor is ready",
            **split("set_started_at", started),
        },
    )
    fresh = reload(visit)
    assert (fresh.state, fresh.version, fresh.started_at) == ("checked_in", 1, None)
    form = page.context["form"]
    assert form["reason"].value() == "doctor is ready"
    assert form["set_started_at"].value() == [
        timezone.localtime(started).strftime("%Y-%m-%d"),
        timezone.localtime(started).strftime("%H:%M:%S"),
    ]
    text = page.content.decode()
    assert (
        "Recorded since your page was loaded" in text and "scheduled → <strong>checked_in" in text
    )


def test_a_validator_refusal_names_the_field_by_its_label_and_keeps_the_reason(
    admin_client, validated_encounter
):
    visit = validated_encounter
    transition(visit, "checked_in")
    page = admin_client.post(
        transition_url(visit),
        {"to_state": "in_progress", "expected_version": 1, "reason": "doctor is ready"},
    )
    (message,) = messages_of(page)
    assert message == (
        "Refused, nothing was changed (Validated Visit for Ada Lovelace): RequiredFieldsValidator "
        "says: Field “Started at” (started_at) is required for state 'in_progress'"
    )
    form = page.context["form"]
    assert form["reason"].value() == "doctor is ready"
    assert form.errors["set_started_at"] == ["Required for 'in_progress'."]
    assert reload(visit).version == 1


def test_a_library_refusal_names_no_uuid(admin_client, encounter):
    page = admin_client.post(
        transition_url(encounter),
        {"to_state": "completed", "expected_version": 0, "reason": "typed"},
    )
    (message,) = messages_of(page)
    assert str(encounter.pk) not in message
    assert "Cannot transition from 'scheduled' to 'completed'" in message
    assert page.context["form"]["reason"].value() == "typed"


def test_an_ended_at_set_before_completing_is_kept(admin_client, in_progress):
    visit = in_progress
    typed = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=30)
    admin_client.post(
        transition_url(visit),
        {"to_state": "completed", "expected_version": 2, **split("set_ended_at", typed)},
    )
    fresh = reload(visit)
    assert fresh.state == "completed"
    assert fresh.ended_at == typed  # not the transition's time


def test_transition_sets_ended_at_only_when_it_is_empty(encounter):
    typed = timezone.now().replace(microsecond=0) - timedelta(hours=2)
    transition(encounter, "checked_in")
    encounter.ended_at = typed
    encounter.save()
    row = transition(encounter, "cancelled")
    assert reload(encounter).ended_at == typed != row.effective_at
    other = create_encounter(encounter.definition, encounter.subject)
    row = transition(other, "cancelled")
    assert reload(other).ended_at == row.effective_at


def test_effective_at_takes_the_admins_date_and_time_boxes(admin_client, encounter):
    when = timezone.now().replace(microsecond=0) - timedelta(hours=3)
    admin_client.post(
        transition_url(encounter),
        {"to_state": "checked_in", "expected_version": 0, **split("effective_at", when)},
    )
    row = EncounterTransition.objects.get(encounter=encounter)
    assert row.effective_at == when
    text = admin_client.get(transition_url(encounter), {"to_state": "cancelled"}).content
    assert b'class="vDateField"' in text and b"DateTimeShortcuts.js" in text


# -- the subject search of the add form -------------------------------------------------------


def subjects_url():
    return reverse("admin:django_encounters_encounter_subjects")


def test_the_add_form_finds_the_subject_by_name(admin_client, front_desk):
    patient_type = ContentType.objects.get_for_model(Patient)
    answer = admin_client.get(subjects_url(), {"content_type": patient_type.pk, "term": "okafor"})
    names = sorted(result["text"].split(" (#")[0] for result in answer.json()["results"])
    assert names == ["Ada Okafor", "Chidi Okafor"]
    ada = Patient.objects.get(name="Ada Okafor")
    assert {"id": str(ada.pk), "text": f"Ada Okafor (#{ada.pk})"} in answer.json()["results"]
    page = admin_client.get(reverse("admin:django_encounters_encounter_add"))
    assert 'id="id_subject_id_search"' in page.content.decode()
    device_type = ContentType.objects.get_for_model(Device)
    answer = admin_client.get(subjects_url(), {"content_type": device_type.pk, "term": "SN"})
    assert answer.json() == {"results": [], "searchable": False}


def test_the_subject_search_needs_the_permissions(client, django_user_model, front_desk):
    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(user)
    patient_type = ContentType.objects.get_for_model(Patient)
    query = {"content_type": patient_type.pk, "term": "okafor"}
    assert client.get(subjects_url(), query).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="add_encounter"))
    assert client.get(subjects_url(), query).status_code == 403  # may not view patients
    user.user_permissions.add(Permission.objects.get(codename="view_patient"))
    assert len(client.get(subjects_url(), query).json()["results"]) == 2


# -- the definition editor --------------------------------------------------------------------


def definition_url(definition):
    return reverse("admin:django_encounters_encounterdefinition_change", args=[definition.pk])


class _Inputs(HTMLParser):
    """What a browser posts for the page's main form: its inputs, text areas and selects as
    rendered (checked boxes only, the selected options)."""

    def __init__(self, form_id):
        super().__init__()
        self.form_id, self.inside, self.data = form_id, False, []
        self._textarea = self._select = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside or "name" not in a and tag != "option":
            return
        if tag == "input" and a.get("type") not in ("submit", "button", "file"):
            if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                return
            self.data.append(
                (a["name"], a.get("value", "on" if a.get("type") == "checkbox" else ""))
            )
        elif tag == "textarea":
            self._textarea = [a["name"], ""]
        elif tag == "select":
            self._select = a["name"]
        elif tag == "option" and self._select and "selected" in a:
            self.data.append((self._select, a.get("value", "")))

    def handle_data(self, data):
        if self._textarea is not None:
            self._textarea[1] += data

    def handle_endtag(self, tag):
        if tag == "textarea" and self._textarea is not None:
            self.data.append((self._textarea[0], html.unescape(self._textarea[1]).lstrip("\n")))
            self._textarea = None
        elif tag == "select":
            self._select = None
        elif tag == "form":
            self.inside = False


def as_posted(page, form_id):
    parser = _Inputs(form_id)
    parser.feed(page.content.decode())
    data = {}
    for name, value in parser.data:
        data.setdefault(name, []).append(value)
    return data


def definition_page(client, definition):
    return client.get(definition_url(definition))


def save_as_shown(client, definition, **changes):
    data = as_posted(definition_page(client, definition), "encounterdefinition_form")
    for name, value in changes.items():
        data[name] = [value] if not isinstance(value, list) else value
    return client.post(definition_url(definition), data)


ODD_MACHINES = {
    "visit": {},
    "self_loop": {
        "states": ["open", "closed"],
        "initial_state": "open",
        "final_states": ["closed"],
        "transitions": {"open": ["open", "closed"]},
    },
    "explicit_empty_and_unordered": {
        "states": ["a", "b", "c"],
        "initial_state": "b",
        "final_states": ["c", "a"],
        "transitions": {"c": [], "b": ["c", "a"]},
    },
    "names_with_spaces_and_commas": {
        "states": ["new, unread", "read"],
        "initial_state": "new, unread",
        "final_states": ["read"],
        "transitions": {"new, unread": ["read"]},
    },
}


@pytest.mark.parametrize("kind", sorted(ODD_MACHINES))
def test_a_definition_saved_as_shown_keeps_its_machine_and_version(
    admin_client, make_definition, kind
):
    definition = make_definition(
        validators=["django_encounters.validators.FinalStateValidator"], **ODD_MACHINES[kind]
    )
    before = EncounterDefinition.objects.get(pk=definition.pk)
    response = save_as_shown(admin_client, definition, description="edited")
    assert response.status_code == 302, response.context["adminform"].form.errors
    after = EncounterDefinition.objects.get(pk=definition.pk)
    assert after.machine() == before.machine()
    assert after.version == before.version == 1
    assert after.description == "edited"
    page = definition_page(admin_client, definition).content.decode()
    if kind == "names_with_spaces_and_commas":
        assert 'id="state-rows"' not in page
        assert "edited as JSON only: a state name has a comma" in page
    else:
        assert 'id="state-rows"' in page and "States as JSON" in page


def test_the_rows_edit_the_machine(admin_client, visit_definition):
    data = as_posted(definition_page(admin_client, visit_definition), "encounterdefinition_form")
    assert data["state_rows-0-name"] == ["scheduled"] and data["state_rows-0-is_initial"] == ["on"]
    assert data["state_rows-0-next_states"] == ["checked_in, cancelled"]
    n = len(visit_definition.states)
    data[f"state_rows-{n}-name"] = ["no_show"]
    data[f"state_rows-{n}-is_final"] = ["on"]
    data["state_rows-0-next_states"] = ["checked_in, cancelled, no_show"]
    response = admin_client.post(definition_url(visit_definition), data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    fresh = EncounterDefinition.objects.get(pk=visit_definition.pk)
    assert fresh.version == 2
    assert fresh.states == [*visit_definition.states, "no_show"]
    assert fresh.final_states == ["completed", "cancelled", "no_show"]
    assert fresh.transitions["scheduled"] == ["checked_in", "cancelled", "no_show"]
    assert fresh.transitions["checked_in"] == visit_definition.transitions["checked_in"]


def test_json_is_still_accepted_and_the_rows_say_what_is_wrong(admin_client, visit_definition):
    states = json.dumps([*visit_definition.states, "no_show"])
    response = save_as_shown(admin_client, visit_definition, states=states)
    assert response.status_code == 302
    assert EncounterDefinition.objects.get(pk=visit_definition.pk).states[-1] == "no_show"

    data = as_posted(definition_page(admin_client, visit_definition), "encounterdefinition_form")
    data["state_rows-0-next_states"] = ["checked_in, nowhere"]
    data["state_rows-1-is_initial"] = ["on"]
    page = admin_client.post(definition_url(visit_definition), data)
    text = page.content.decode()
    assert "States: tick exactly one initial state (ticked: scheduled, checked_in)." in text
    assert "States: next states that are not a state of the rows: nowhere." in text

    data = as_posted(definition_page(admin_client, visit_definition), "encounterdefinition_form")
    data["state_rows-0-next_states"] = ["checked_in"]
    data["final_states"] = ['["completed"]']
    page = admin_client.post(definition_url(visit_definition), data)
    assert "changed both in the rows and in the JSON boxes (final_states)" in page.content.decode()
    assert EncounterDefinition.objects.get(pk=visit_definition.pk).version == 2


def test_a_new_definition_from_rows(admin_client):
    page = admin_client.get(reverse("admin:django_encounters_encounterdefinition_add"))
    data = as_posted(page, "encounterdefinition_form")
    data.update(
        {
            "name": ["Triage"],
            "code": ["TRIAGE"],
            "state_rows-0-name": ["waiting"],
            "state_rows-0-is_initial": ["on"],
            "state_rows-0-next_states": ["seen"],
            "state_rows-1-name": ["seen"],
            "state_rows-1-is_final": ["on"],
        }
    )
    response = admin_client.post(reverse("admin:django_encounters_encounterdefinition_add"), data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    created = EncounterDefinition.objects.get(code="TRIAGE")
    assert created.machine() == {
        "states": ["waiting", "seen"],
        "initial_state": "waiting",
        "final_states": ["seen"],
        "transitions": {"waiting": ["seen"]},
        "validators": [],
    }
