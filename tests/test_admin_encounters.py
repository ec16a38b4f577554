"""The encounter admin through Django's test client: transitions from the page (and every way
one is refused, with nothing changed), the timeline and the state-at box, the lists, the add
form through create_encounter, soft delete and restore, definitions."""

from __future__ import annotations

import html
import re
import shutil
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse
from django.utils import timezone

from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.services import create_encounter, transition
from tests.helpers import (
    change_url,
    changelist_url,
    messages_of,
    rewrite_row,
    snapshot,
    transition_url,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


def post_transition(client, encounter, to_state, version=None, **data):
    payload = {
        "to_state": to_state,
        "expected_version": encounter.version if version is None else version,
        "reason": "",
        "effective_at": "",
        **data,
    }
    return client.post(transition_url(encounter), payload, follow=True)


# -- the status panel and transitions -------------------------------------------------------


def test_change_page_shows_state_definition_version_and_one_button_per_allowed_transition(
    admin_client, encounter
):
    page = admin_client.get(change_url(encounter))
    text = page.content.decode()
    assert page.status_code == 200
    assert 'id="encounter-state">scheduled<' in text
    assert "Patient Visit</strong> v1" in text
    for state in ("checked_in", "cancelled"):
        assert f'data-state="{state}"' in text
        assert f"to_state={state}&amp;expected_version=0" in text
    assert 'data-state="completed"' not in text


def test_a_button_opens_the_form_carrying_the_version_the_page_showed(admin_client, encounter):
    page = admin_client.get(transition_url(encounter) + "?to_state=checked_in&expected_version=0")
    text = page.content.decode()
    assert page.status_code == 200
    assert 'name="expected_version" value="0"' in text
    assert 'name="to_state" value="checked_in"' in text
    assert 'name="reason"' in text and 'name="effective_at_0"' in text
    assert 'name="context"' not in text  # no validator of this definition reads one


def test_a_transition_from_the_admin_records_the_user_and_reason(
    admin_client, admin_user, encounter
):
    page = post_transition(admin_client, encounter, "checked_in", reason="arrived at desk")
    assert page.status_code == 200
    assert page.redirect_chain[-1][0] == change_url(encounter)
    row = EncounterTransition.objects.get(encounter=encounter)
    assert (row.sequence, row.from_state, row.to_state) == (1, "scheduled", "checked_in")
    assert row.transitioned_by == admin_user
    assert row.reason == "arrived at desk"
    text = page.content.decode()
    assert 'id="encounter-state">checked_in<' in text
    assert "arrived at desk" in text
    assert any("Moved from 'scheduled' to 'checked_in'" in m for m in messages_of(page))
    history = LogEntry.objects.get(object_id=str(encounter.pk))
    assert "checked_in" in history.get_change_message()


def test_a_backdated_transition_from_the_admin_uses_the_admins_time_zone(
    admin_client, counter_definition, patient, settings
):
    settings.TIME_ZONE = "Europe/Paris"
    encounter = create_encounter(counter_definition, patient)
    post_transition(admin_client, encounter, "open")
    when = timezone.now() - timedelta(hours=2)
    local = timezone.localtime(when, timezone.get_default_timezone())
    encounter.refresh_from_db()
    page = post_transition(
        admin_client, encounter, "open", effective_at=local.strftime("%Y-%m-%d %H:%M:%S")
    )
    rows = list(EncounterTransition.objects.filter(encounter=encounter).order_by("sequence"))
    assert len(rows) == 2
    assert abs(rows[1].effective_at - when) < timedelta(seconds=1)
    # newest business time first (ENCOUNTERS_ADMIN_TIMELINE_ORDER's default)
    assert [row.sequence for row in page.context["timeline"]] == [1, 2]
    assert page.context["timeline"][1].backdated
    assert local.strftime("%Y-%m-%d %H:%M:%S CET") in page.content.decode()


def test_stale_page_is_refused_with_a_clear_message_and_nothing_changes(admin_client, encounter):
    transition(encounter, "checked_in")
    before = snapshot(encounter)
    page = post_transition(admin_client, encounter, "cancelled", version=0, reason="no-show")
    assert snapshot(encounter) == before
    (message,) = messages_of(page)
    assert "moved on after your page was loaded" in message
    assert "your page showed version 0; it is now at version 1, in 'checked_in'" in message
    assert str(encounter.pk) not in message
    # The form again, the reason kept, carrying the version it now shows.
    assert page.status_code == 200 and not page.redirect_chain
    assert page.context["form"]["reason"].value() == "no-show"
    assert page.context["form"]["expected_version"].value() == "1"


def test_invalid_transition_is_refused_with_the_librarys_message(admin_client, encounter):
    before = snapshot(encounter)
    page = post_transition(admin_client, encounter, "completed")
    assert page.status_code == 200
    assert snapshot(encounter) == before
    (message,) = messages_of(page)
    assert "Cannot transition from 'scheduled' to 'completed'" in message


def test_validator_refusal_names_the_validator(admin_client, validated_encounter):
    encounter = validated_encounter
    transition(encounter, "checked_in")
    before = snapshot(encounter)
    page = post_transition(admin_client, encounter, "in_progress", context='{"note": 1}')
    assert snapshot(encounter) == before
    (message,) = messages_of(page)
    assert "RequiredFieldsValidator" in message
    assert "started_at" in message
    assert 'name="context"' in page.content.decode()  # the form is shown again


def test_context_is_passed_and_shown_on_the_timeline(admin_client, validated_encounter):
    page = post_transition(admin_client, validated_encounter, "checked_in", context='{"desk": "B"}')
    row = EncounterTransition.objects.get(encounter=validated_encounter)
    assert row.metadata == {"desk": "B"}
    assert "{&quot;desk&quot;: &quot;B&quot;}" in page.content.decode()


@pytest.mark.parametrize(
    "context, error",
    [
        ("{not json", "Context is not valid JSON"),
        ("[1, 2]", "Context must be a JSON object"),
        ('"text"', "Context must be a JSON object"),
    ],
)
def test_bad_context_json_is_a_form_error(admin_client, validated_encounter, context, error):
    before = snapshot(validated_encounter)
    page = post_transition(admin_client, validated_encounter, "checked_in", context=context)
    assert page.status_code == 200
    assert error in page.content.decode()
    assert snapshot(validated_encounter) == before


@pytest.mark.parametrize("value", ["yesterday", "2026-13-45 10:00:00", "2026-02-30"])
def test_bad_effective_at_is_a_form_error(admin_client, encounter, value):
    before = snapshot(encounter)
    page = post_transition(admin_client, encounter, "checked_in", effective_at=value)
    assert page.status_code == 200
    assert page.context["form"].errors["effective_at"]
    assert snapshot(encounter) == before


@pytest.mark.parametrize(
    "fields", [{"expected_version": "abc"}, {"expected_version": "-1"}, {"to_state": ""}]
)
def test_a_tampered_hidden_field_is_a_form_error(admin_client, encounter, fields):
    before = snapshot(encounter)
    payload = {"to_state": "checked_in", "expected_version": 0, "reason": "", **fields}
    page = admin_client.post(transition_url(encounter), payload)
    assert page.status_code == 200
    assert not page.context["form"].is_valid()
    assert 'class="errornote"' in page.content.decode()
    assert snapshot(encounter) == before


def test_future_effective_at_is_refused_by_the_library(admin_client, encounter):
    before = snapshot(encounter)
    later = (timezone.now() + timedelta(days=2)).isoformat()
    page = post_transition(admin_client, encounter, "checked_in", effective_at=later)
    assert snapshot(encounter) == before
    (message,) = messages_of(page)
    assert "Cannot transition" in message and "future" in message


def test_nul_in_reason_is_refused_not_a_server_error(admin_client, encounter):
    before = snapshot(encounter)
    page = post_transition(admin_client, encounter, "checked_in", reason="a\x00b")
    assert page.status_code == 200
    assert snapshot(encounter) == before


@pytest.fixture
def staff_client(client, django_user_model):
    """A staff user who may view and change encounters, but not transition them."""
    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type=ContentType.objects.get_for_model(Encounter),
            codename__in=["view_encounter", "change_encounter"],
        )
    )
    client.force_login(user)
    client.user = user
    return client


def test_transition_needs_the_transition_permission(staff_client, encounter):
    page = staff_client.get(change_url(encounter))
    assert page.status_code == 200
    assert "button transition-button" not in page.content.decode()
    assert staff_client.get(transition_url(encounter)).status_code == 403
    before = snapshot(encounter)
    response = staff_client.post(
        transition_url(encounter), {"to_state": "checked_in", "expected_version": 0}
    )
    assert response.status_code == 403
    assert snapshot(encounter) == before


def test_transition_permission_with_change_permission_is_enough(staff_client, encounter):
    staff_client.user.user_permissions.add(Permission.objects.get(codename="transition_encounter"))
    page = post_transition(staff_client, encounter, "checked_in")
    assert page.status_code == 200
    assert Encounter.objects.get(pk=encounter.pk).state == "checked_in"


def test_transition_permission_without_change_permission_is_not(
    client, django_user_model, encounter
):
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_encounter", "transition_encounter"])
    )
    client.force_login(user)
    response = client.post(
        transition_url(encounter), {"to_state": "checked_in", "expected_version": 0}
    )
    assert response.status_code == 403
    assert Encounter.objects.get(pk=encounter.pk).version == 0


def test_final_state_shows_that_no_transition_is_allowed(admin_client, encounter):
    transition(encounter, "cancelled")
    text = admin_client.get(change_url(encounter)).content.decode()
    assert "No transition is allowed from 'cancelled'" in text
    assert "(final)" in text


# -- the timeline and the state-at box -------------------------------------------------------


@pytest.fixture
def backdated_employment(employment, past, user):
    """hired -> working (10h ago) -> finished (1h ago); then onleave backdated to 5h ago:
    the finished row is overtaken by it."""
    transition(employment, "working", effective_at=past(10), transitioned_by=user, reason="start")
    transition(employment, "finished", effective_at=past(1), reason="contract over")
    transition(employment, "onleave", effective_at=past(5), reason="leave", context={"days": 3})
    return employment


def test_timeline_is_in_business_time_order_to_the_second_with_marks(
    admin_client, backdated_employment
):
    page = admin_client.get(change_url(backdated_employment))
    text = page.content.decode()
    rows = page.context["timeline"][::-1]  # shown newest first
    assert [row.sequence for row in rows] == [1, 3, 2]
    assert rows[1].backdated and not rows[1].overtaken
    assert rows[2].overtaken and rows[2].overtaken_by == 3
    assert not rows[0].backdated and not rows[0].overtaken
    assert rows[1].context == '{"days": 3}'
    assert rows[0].transitioned_by == "reception"
    effective = timezone.localtime(
        EncounterTransition.objects.get(encounter=backdated_employment, sequence=1).effective_at
    ).strftime("%Y-%m-%d %H:%M:%S")
    assert effective in text
    assert "backdated</span>" in text
    assert "overtaken by #3" in text
    assert text.index('data-sequence="3"') > text.index('data-sequence="2"')


def test_state_at_box_answers_get_state_at_and_as_known_at(
    admin_client, backdated_employment, past
):
    t = timezone.localtime(past(3)).strftime("%Y-%m-%d %H:%M:%S")
    page = admin_client.get(change_url(backdated_employment), {"state_at": t})
    assert page.context["state_at"]["answer"] == "onleave"
    assert "the state was <strong>onleave</strong>" in page.content.decode()
    row3 = EncounterTransition.objects.get(encounter=backdated_employment, sequence=3)
    known = (row3.transitioned_at - timedelta(milliseconds=1)).isoformat()
    page = admin_client.get(change_url(backdated_employment), {"state_at": t, "known_at": known})
    assert page.context["state_at"]["answer"] == "working"


def test_state_at_box_with_a_bad_time_is_a_form_error(admin_client, encounter):
    page = admin_client.get(change_url(encounter), {"state_at": "not a time"})
    assert page.status_code == 200
    assert "answer" not in page.context["state_at"]
    assert page.context["state_at"]["form"].errors["state_at"]


def test_anomalies_of_the_log_are_shown_on_the_page(admin_client, encounter):
    transition(encounter, "checked_in", reason="arrived")
    rewrite_row(encounter, 1, reason="edited behind the library's back")
    text = admin_client.get(change_url(encounter)).content.decode()
    assert "The audit finds 1 anomaly" in text
    assert "sequence 1: hash" in text


def test_history_button_shows_the_timeline(admin_client, backdated_employment):
    url = reverse("admin:django_encounters_encounter_history", args=[backdated_employment.pk])
    page = admin_client.get(url)
    text = page.content.decode()
    assert page.status_code == 200
    assert "contract over" in text and "overtaken by #3" in text
    assert "doesn’t have a change history" not in text


# -- lists -------------------------------------------------------------------------------------


def test_list_shows_short_id_and_subject_link(admin_client, encounter, patient):
    text = admin_client.get(changelist_url()).content.decode()
    assert str(encounter.pk)[:8] in text
    subject_url = reverse("admin:testapp_patient_change", args=[patient.pk])
    assert f'<a href="{subject_url}">Ada Lovelace (#{patient.pk})</a>' in text


def test_search_by_subject_id_notes_and_reason(admin_client, make_definition, patient, device):
    definition = make_definition()
    by_patient = create_encounter(definition, patient, notes="allergic to penicillin")
    by_device = create_encounter(definition, device)
    transition(by_device, "checked_in", reason="calibration overdue")

    def found(q):
        page = admin_client.get(changelist_url(), {"q": q})
        return {e.pk for e in page.context["cl"].result_list}

    assert found(str(device.pk)) == {by_device.pk}
    assert found(str(patient.pk)) == {by_patient.pk}
    assert found("penicillin") == {by_patient.pk}
    assert found("calibration") == {by_device.pk}


def test_state_filter_is_per_definition(admin_client, make_definition, patient):
    first, second = make_definition(), make_definition()
    a = create_encounter(first, patient)
    create_encounter(second, patient)
    page = admin_client.get(changelist_url(), {"state_of": f"{first.pk}:scheduled"})
    assert [e.pk for e in page.context["cl"].result_list] == [a.pk]
    text = page.content.decode()
    assert f"{first.name}: scheduled" in text and f"{second.name}: scheduled" in text


def test_list_has_a_date_hierarchy(admin_client, encounter):
    today = timezone.localdate()
    page = admin_client.get(
        changelist_url(),
        {"created_at__year": today.year, "created_at__month": today.month},
    )
    assert [e.pk for e in page.context["cl"].result_list] == [encounter.pk]


def test_transition_list_names_the_encounter_and_subject(admin_client, encounter, patient):
    row = transition(encounter, "checked_in")
    page = admin_client.get(reverse("admin:django_encounters_encountertransition_changelist"))
    text = page.content.decode()
    assert f"{str(encounter.pk)[:8]}</a> (Patient Visit)" in text
    assert f"patient #{patient.pk}" in text
    detail = admin_client.get(
        reverse("admin:django_encounters_encountertransition_change", args=[row.pk])
    ).content.decode()
    assert row.hash in detail
    assert timezone.localtime(row.transitioned_at).strftime("%H:%M:%S") in detail
    assert "Sequence" in detail


def test_definition_list_counts_its_live_encounters(admin_client, visit_definition, patient):
    create_encounter(visit_definition, patient)
    create_encounter(visit_definition, patient).delete()
    page = admin_client.get(reverse("admin:django_encounters_encounterdefinition_changelist"))
    assert page.context["cl"].result_list[0].live_encounters == 1


def test_definition_page_shows_machine_versions_warnings_and_count(admin_client, make_definition):
    definition = make_definition(
        states=["a", "b", "orphan"],
        initial_state="a",
        final_states=["b"],
        transitions={"a": ["b"]},
    )
    page = admin_client.get(
        reverse("admin:django_encounters_encounterdefinition_change", args=[definition.pk])
    )
    text = page.content.decode()
    assert "<td>orphan</td>" in text
    assert any("orphan" in m for m in messages_of(page))
    assert "encounter definition versions" in text.lower()


# -- the add form ------------------------------------------------------------------------------


def seen_payload(client, encounter):
    """The hidden fields the edit page of ``encounter`` carries: what it was rendered with."""
    seen = client.get(change_url(encounter)).context["seen"]
    return {seen["version_name"]: seen["version"], seen["fields_name"]: seen["fields"]}


def add_payload(definition, subject_type, subject_id, **extra):
    return {
        "definition": definition.pk,
        "subject_content_type": ContentType.objects.get_for_model(subject_type).pk,
        "subject_id": subject_id,
        "notes": "",
        "metadata": "{}",
        **extra,
    }


def test_add_goes_through_create_encounter(admin_client, admin_user, visit_definition, patient):
    from tests.testapp.models import Patient

    response = admin_client.post(
        reverse("admin:django_encounters_encounter_add"),
        add_payload(visit_definition, Patient, patient.pk, notes="first visit"),
    )
    assert response.status_code == 302
    encounter = Encounter.objects.get()
    assert encounter.subject == patient
    assert encounter.created_by == admin_user
    assert (encounter.state, encounter.version, encounter.definition_version) == ("scheduled", 0, 1)
    assert encounter.genesis_hash and encounter.head_hash == encounter.genesis_hash
    assert response["Location"].startswith(reverse("admin:django_encounters_encounter_changelist"))


def test_add_refuses_a_subject_that_does_not_exist(admin_client, visit_definition):
    from tests.testapp.models import Device, Patient

    for model, subject_id in ((Patient, "999999"), (Patient, "abc"), (Device, "not-a-uuid")):
        page = admin_client.post(
            reverse("admin:django_encounters_encounter_add"),
            add_payload(visit_definition, model, subject_id),
        )
        assert page.status_code == 200
        assert f"There is no {model._meta.verbose_name} with id" in page.content.decode()
    assert not Encounter.all_objects.exists()


# -- changing an encounter ---------------------------------------------------------------------


def test_definition_and_subject_of_an_encounter_with_history_are_read_only(
    admin_client, encounter, make_definition, patient
):
    transition(encounter, "checked_in")
    other = make_definition()
    page = admin_client.get(change_url(encounter))
    assert 'name="definition"' not in page.content.decode()
    assert 'name="subject_id"' not in page.content.decode()
    from tests.testapp.models import Patient

    response = admin_client.post(
        change_url(encounter),
        {
            **add_payload(other, Patient, patient.pk),
            "notes": "changed",
            **seen_payload(admin_client, encounter),
        },
    )
    assert response.status_code == 302  # no 500: the facts are simply not part of the form
    stored = Encounter.objects.get(pk=encounter.pk)
    assert stored.definition_id == encounter.definition_id
    assert stored.notes == "changed"


def test_change_refuses_a_subject_that_does_not_exist(admin_client, encounter, visit_definition):
    from tests.testapp.models import Patient

    page = admin_client.post(
        change_url(encounter),
        {
            **add_payload(visit_definition, Patient, "424242"),
            **seen_payload(admin_client, encounter),
        },
    )
    assert page.status_code == 200
    assert "There is no patient with id" in page.content.decode()
    assert Encounter.objects.get(pk=encounter.pk).subject_id == encounter.subject_id


def test_moving_an_encounter_without_history_starts_it_in_the_new_initial_state(
    admin_client, encounter, make_definition, patient
):
    from tests.testapp.models import Patient

    other = make_definition(
        states=["open", "done"],
        initial_state="open",
        final_states=["done"],
        transitions={"open": ["done"]},
    )
    response = admin_client.post(
        change_url(encounter),
        {**add_payload(other, Patient, patient.pk), **seen_payload(admin_client, encounter)},
    )
    assert response.status_code == 302
    stored = Encounter.objects.get(pk=encounter.pk)
    assert (stored.definition_id, stored.state) == (other.pk, "open")


# -- soft delete and restore -------------------------------------------------------------------


def delete_url(encounter):
    return reverse("admin:django_encounters_encounter_delete", args=[encounter.pk])


def test_delete_confirmation_is_honest_about_a_soft_delete(admin_client, encounter):
    transition(encounter, "checked_in")
    text = admin_client.get(delete_url(encounter)).content.decode()
    assert (
        f"Soft-delete the encounter <strong>Patient Visit for Ada Lovelace ({str(encounter.pk)[:8]}"
        in text
    )
    assert "1 transition(s)" in text and "are kept" in text
    assert "Restore" in text
    assert "would require deleting" not in text
    assert "permission" not in text


def test_delete_is_a_soft_delete_with_a_message_saying_so(admin_client, encounter):
    transition(encounter, "checked_in")
    page = admin_client.post(delete_url(encounter), {"post": "yes"}, follow=True)
    assert page.status_code == 200
    stored = Encounter.all_objects.get(pk=encounter.pk)
    assert stored.is_deleted
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 1
    assert any("soft-deleted" in m and "restored" in m for m in messages_of(page))
    assert encounter.pk not in {e.pk for e in page.context["cl"].result_list}


def test_bulk_delete_action_is_a_soft_delete_with_an_honest_confirmation(admin_client, encounter):
    transition(encounter, "checked_in")
    data = {"action": "delete_selected", "_selected_action": [str(encounter.pk)]}
    text = admin_client.post(changelist_url(), data).content.decode()
    assert "Soft-delete the selected encounters" in text
    assert "would require deleting" not in text
    admin_client.post(changelist_url(), {**data, "post": "yes"})
    assert Encounter.all_objects.get(pk=encounter.pk).is_deleted


def test_deleted_filter_and_restore_action(admin_client, encounter, make_definition, patient):
    kept = create_encounter(make_definition(), patient)
    encounter.delete()
    listed = admin_client.get(changelist_url()).context["cl"].result_list
    assert [e.pk for e in listed] == [kept.pk]
    deleted = admin_client.get(changelist_url(), {"deleted": "yes"}).context["cl"].result_list
    assert [e.pk for e in deleted] == [encounter.pk]
    every = admin_client.get(changelist_url(), {"deleted": "all"}).context["cl"].result_list
    assert {e.pk for e in every} == {encounter.pk, kept.pk}
    admin_client.post(
        changelist_url() + "?deleted=yes",
        {"action": "restore_selected", "_selected_action": [str(encounter.pk)]},
    )
    assert not Encounter.all_objects.get(pk=encounter.pk).is_deleted


def test_a_link_to_a_soft_deleted_encounter_opens_it_with_a_restore_button(admin_client, encounter):
    transition(encounter, "checked_in")
    encounter.delete()
    page = admin_client.get(change_url(encounter))
    text = page.content.decode()
    assert page.status_code == 200
    assert "was soft-deleted" in text
    assert 'id="restore-encounter"' in text
    assert "button transition-button" not in text
    restore = reverse("admin:django_encounters_encounter_restore", args=[encounter.pk])
    page = admin_client.post(restore, follow=True)
    assert page.redirect_chain[-1][0] == change_url(encounter)
    assert not Encounter.objects.get(pk=encounter.pk).is_deleted
    assert "button transition-button" in page.content.decode()


def test_restore_needs_a_post_and_the_change_permission(client, django_user_model, encounter):
    encounter.delete()
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_encounter"))
    client.force_login(user)
    restore = reverse("admin:django_encounters_encounter_restore", args=[encounter.pk])
    assert client.post(restore).status_code == 403
    assert Encounter.all_objects.get(pk=encounter.pk).is_deleted


def test_a_soft_deleted_encounter_cannot_be_transitioned_from_the_admin(admin_client, encounter):
    encounter.delete()
    before = snapshot(encounter)
    page = post_transition(admin_client, encounter, "checked_in")
    assert snapshot(encounter) == before
    (message,) = messages_of(page)
    assert "Patient Visit for Ada Lovelace was deleted" in message
    assert "not found" not in message


def test_unknown_encounter_redirects_with_a_message(admin_client, visit_definition):
    import uuid

    page = admin_client.get(
        reverse("admin:django_encounters_encounter_transition", args=[uuid.uuid4()]), follow=True
    )
    assert any("doesn’t exist" in m for m in messages_of(page))


# -- definitions: soft delete, restore, diagrams ------------------------------------------------


def definition_url(definition, view="change"):
    return reverse(f"admin:django_encounters_encounterdefinition_{view}", args=[definition.pk])


def definitions_url():
    return reverse("admin:django_encounters_encounterdefinition_changelist")


def test_definition_delete_confirmation_is_honest_about_a_soft_delete(
    admin_client, visit_definition, encounter
):
    transition(encounter, "checked_in")
    page = admin_client.get(definition_url(visit_definition, "delete"))
    text = page.content.decode()
    assert page.status_code == 200
    assert "Soft-delete the encounter definition <strong>Patient Visit (VISIT)" in text
    assert "no new encounter can be created with it" in text
    assert "its 1 encounter(s) keep their history" in text
    assert "Cannot delete" not in text and "protected" not in text
    assert "would require deleting" not in text


def test_definition_delete_is_a_soft_delete_that_keeps_its_encounters_working(
    admin_client, visit_definition, encounter
):
    transition(encounter, "checked_in")
    page = admin_client.post(
        definition_url(visit_definition, "delete"), {"post": "yes"}, follow=True
    )
    assert page.status_code == 200
    assert any("soft-deleted" in m and "restored" in m for m in messages_of(page))
    assert EncounterDefinition.all_objects.get(pk=visit_definition.pk).is_deleted
    assert list(page.context["cl"].result_list) == []
    # Its encounter is untouched and can still move on; no new encounter can be made with it.
    encounter.refresh_from_db()
    transition(encounter, "in_progress")
    assert encounter.state == "in_progress"
    with pytest.raises(ValueError, match="soft-deleted"):
        create_encounter(
            EncounterDefinition.all_objects.get(pk=visit_definition.pk), encounter.subject
        )


def test_bulk_delete_of_definitions_is_a_soft_delete(admin_client, make_definition):
    first, second = make_definition(code="first"), make_definition(code="second")
    data = {"action": "delete_selected", "_selected_action": [str(first.pk), str(second.pk)]}
    text = admin_client.post(definitions_url(), data).content.decode()
    assert "Soft-delete the selected encounter definitions" in text
    assert "its versions are kept" in text
    admin_client.post(definitions_url(), {**data, "post": "yes"})
    assert EncounterDefinition.objects.count() == 0
    assert EncounterDefinition.all_objects.filter(deleted_at__isnull=False).count() == 2


def test_soft_deleted_definitions_can_be_listed_opened_and_restored(admin_client, make_definition):
    kept, gone = make_definition(code="kept"), make_definition(code="gone")
    gone.delete()
    listed = admin_client.get(definitions_url()).context["cl"].result_list
    assert [d.pk for d in listed] == [kept.pk]
    deleted = admin_client.get(definitions_url(), {"deleted": "yes"}).context["cl"].result_list
    assert [d.pk for d in deleted] == [gone.pk]
    page = admin_client.get(definition_url(gone))
    assert page.status_code == 200
    assert 'id="restore-definition"' in page.content.decode()
    page = admin_client.post(definition_url(gone, "restore"), follow=True)
    assert page.redirect_chain[-1][0] == definition_url(gone)
    assert not EncounterDefinition.objects.get(pk=gone.pk).is_deleted
    assert 'id="restore-definition"' not in page.content.decode()
    kept.delete()
    admin_client.post(
        definitions_url() + "?deleted=yes",
        {"action": "restore_selected", "_selected_action": [str(kept.pk)]},
    )
    assert not EncounterDefinition.objects.get(pk=kept.pk).is_deleted


def process_map_url(definition):
    return reverse("admin:django_encounters_encounterdefinition_process_map", args=[definition.pk])


def _image_svg(text, element_id):
    """The SVG document shown as the image inside the element ``element_id`` of the page."""
    import base64

    found = re.search(
        rf'<div class="encounter-diagram" id="{element_id}"><img src="data:image/svg\+xml;base64,'
        r'([A-Za-z0-9+/=]+)"',
        text,
    )
    assert found, f"no SVG image in #{element_id}"
    return base64.b64decode(found.group(1)).decode("utf-8")


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz (dot) is not installed")
def test_definition_page_draws_the_machine_and_the_process_map(
    admin_client, visit_definition, encounter
):
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")
    text = admin_client.get(definition_url(visit_definition)).content.decode()
    # The process map is loaded apart (issue 21), from its own URL.
    text += admin_client.get(process_map_url(visit_definition)).content.decode()
    machine = _image_svg(text, "definition-diagram")
    assert machine.lstrip().startswith("<?xml") and "<svg" in machine
    for state in visit_definition.states:
        assert f">{state}</text>" in machine
    mined = _image_svg(text, "process-map")
    # The two edges taken, each once, labelled with their counts; the untaken ones dashed.
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", mined)
    assert [t.split(",")[0] for t in texts if "×" in t] == ["1×", "1×"]
    assert all(t.startswith("1×, median ") for t in texts if "×" in t)
    assert "stroke-dasharray" in mined
    assert "process map of &#x27;VISIT&#x27;: 2 transitions of 1 encounter effective from" in text


def test_definition_page_without_graphviz_shows_the_mermaid_source_with_a_copy_button(
    admin_client, visit_definition, monkeypatch, tmp_path
):
    from django_encounters.engine.graphs import to_mermaid
    from django_encounters.projections.diagrams import definition_diagram

    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no Graphviz on it
    text = admin_client.get(definition_url(visit_definition)).content.decode()
    text += admin_client.get(process_map_url(visit_definition)).content.decode()
    assert 'id="definition-diagram-copy"' in text and 'id="process-map-copy"' in text
    assert "Graphviz" in text and "Mermaid source" in text
    source = html.unescape(
        text.split('<pre id="definition-diagram-source">', 1)[1].split("</pre>", 1)[0]
    )
    assert source == to_mermaid(definition_diagram(visit_definition.code))
