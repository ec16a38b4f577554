"""The front desk in a real browser (headless Chromium, Selenium, pytest-django's
``live_server``; the driver and the person of ``tests/test_admin_browser.py``): a patient found by
name, the edit form of a second tab refused after the first moved the visit on, a transition
that sets the field its validator requires, the reason kept after a stale refusal, the subject
found by name on "Add encounter", a state added in the definition editor's rows.

Screenshots go where ``tests/test_admin_browser.py`` puts them (``build/screenshots/``,
``frontdesk-*.png``). Skipped without ``chromium`` and ``chromedriver``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.contenttypes.models import ContentType
from django.utils import timezone

from django_encounters.models import Encounter, EncounterDefinition
from django_encounters.services import create_encounter, transition
from tests import test_admin_browser as browser_tests
from tests.helpers import reload
from tests.test_admin_browser import CHROMEDRIVER, CHROMIUM, change_path
from tests.testapp.models import Patient

#: The browser and the logged-in person of the admin's browser tests (fixtures, used by name).
driver = browser_tests.driver
person = browser_tests.person

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
    ),
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
]


def type_into(person, css, text, clear=True):
    element = person.find(css)
    if clear:
        element.clear()
    element.send_keys(text)
    return element


def set_time(person, name, when):
    local = timezone.localtime(when)
    type_into(person, f"#id_{name}_0", local.strftime("%Y-%m-%d"))
    type_into(person, f"#id_{name}_1", local.strftime("%H:%M:%S"))


def test_the_receptionist_finds_the_patient_by_name(person, visit_definition):
    for name in ("Ada Okafor", "Bola Adeyemi", "Chidi Okafor"):
        create_encounter(visit_definition, Patient.objects.create(name=name), notes="Room 3")
    person.open("/admin/django_encounters/encounter/", expect="#searchbar")
    type_into(person, "#searchbar", "Okafor")
    person.find("#changelist-search input[type=submit]").click()
    person.wait_for("#result_list")
    rows = person.text("#result_list tbody")
    assert "Ada Okafor" in rows and "Chidi Okafor" in rows and "Bola Adeyemi" not in rows
    assert "2 results" in person.text("#changelist-search")
    person.screenshot("frontdesk-01-search-by-name")


def test_a_second_tabs_edit_is_refused_after_the_first_moved_the_visit_on(
    person, validated_encounter
):
    visit = validated_encounter
    transition(visit, "checked_in")
    visit.started_at = timezone.now() - timedelta(hours=1)
    visit.save()
    transition(visit, "in_progress")
    browser = person.driver
    person.open(change_path(visit), expect="#id_notes")
    tab_a = browser.current_window_handle
    browser.switch_to.new_window("tab")
    person.open(change_path(visit), expect="#id_notes")
    tab_b = browser.current_window_handle

    # Tab A: Ended at, saved; then the visit is completed.
    browser.switch_to.window(tab_a)
    ended = timezone.now().replace(microsecond=0) - timedelta(minutes=2)
    set_time(person, "ended_at", ended)
    person.find("input[name=_continue]").click()
    person.wait_for("ul.messagelist")
    person.press_transition("completed")
    person.submit_transition(reason="visit concluded")
    assert person.text("#encounter-state") == "completed"

    # Tab B, still showing the visit in progress without Ended at: its notes are refused.
    browser.switch_to.window(tab_b)
    type_into(person, "#id_notes", "patient asked for a copy of the report")
    person.find("input[name=_continue]").click()
    note = person.text(".errornote, ul.errorlist.nonfield")
    error = person.text("ul.errorlist.nonfield")
    assert "Not saved, nothing was written" in error, note
    assert "in_progress → completed" in error and "Ended at was changed" in error
    assert person.find("#id_notes").get_attribute("value") == (
        "patient asked for a copy of the report"
    )
    assert person.find("#id_ended_at_1").get_attribute("value") == (
        timezone.localtime(ended).strftime("%H:%M:%S")
    )
    fresh = reload(visit)
    assert (fresh.notes, fresh.ended_at, fresh.state) == ("", ended, "completed")
    person.screenshot("frontdesk-02-edit-refused")

    # Saved again, having seen what changed: the notes are written, Ended at is kept.
    person.find("input[name=_continue]").click()
    person.wait_for("ul.messagelist")
    fresh = reload(visit)
    assert (fresh.notes, fresh.ended_at) == ("patient asked for a copy of the report", ended)
    browser.close()
    browser.switch_to.window(tab_a)


def test_a_transition_sets_the_field_its_validator_requires(person, validated_encounter):
    visit = validated_encounter
    transition(visit, "checked_in")
    person.open(change_path(visit), expect="#encounter-state")
    person.press_transition("in_progress")
    assert "Started at" in person.text("#transition_form")
    started = timezone.now().replace(microsecond=0) - timedelta(minutes=7)
    set_time(person, "set_started_at", started)
    type_into(person, "#id_reason", "doctor is ready")
    person.screenshot("frontdesk-03-transition-sets-started-at")
    person.find("#submit-transition").click()
    person.wait_for("ul.messagelist")
    assert person.text("#encounter-state") == "in_progress"
    assert "setting Started at to" in person.text("ul.messagelist")
    fresh = reload(visit)
    assert (fresh.state, fresh.started_at) == ("in_progress", started)


def test_a_stale_refusal_keeps_the_typed_reason(person, encounter):
    browser = person.driver
    person.open(change_path(encounter), expect="#encounter-state")
    tab_a = browser.current_window_handle
    browser.switch_to.new_window("tab")
    person.open(change_path(encounter), expect="#encounter-state")
    tab_b = browser.current_window_handle
    browser.switch_to.window(tab_a)
    person.press_transition("checked_in")
    person.submit_transition(reason="arrived")

    browser.switch_to.window(tab_b)
    person.press_transition("cancelled")
    person.submit_transition(reason="no-show after two calls")
    message = person.text("ul.messagelist")
    assert "moved on after your page was loaded" in message
    assert str(encounter.pk) not in message
    assert person.find("#id_reason").get_attribute("value") == "no-show after two calls"
    assert "scheduled → checked_in" in person.text("#recorded-since")
    person.screenshot("frontdesk-04-stale-refusal-keeps-the-reason")
    assert reload(encounter).state == "checked_in"

    # Pressed again, now from the fresh version: it goes through with the kept reason.
    person.find("#submit-transition").click()
    person.wait_for("#encounter-state")
    assert person.text("#encounter-state") == "cancelled"
    browser.close()
    browser.switch_to.window(tab_a)


def test_add_finds_the_subject_by_name(person, visit_definition):
    from selenium.webdriver.support.ui import Select

    Patient.objects.create(name="Bola Adeyemi")
    ada = Patient.objects.create(name="Ada Okafor")
    person.open("/admin/django_encounters/encounter/add/", expect="#id_subject_id_search")
    Select(person.find("#id_definition")).select_by_visible_text(visit_definition.name)
    patient_type = ContentType.objects.get_for_model(Patient)  # its label differs by release
    Select(person.find("#id_subject_content_type")).select_by_value(str(patient_type.pk))
    type_into(person, "#id_subject_id_search", "okaf")
    person.wait_for("button.subject-result")
    person.screenshot("frontdesk-05-add-subject-search")
    person.find("button.subject-result").click()
    assert person.find("#id_subject_id").get_attribute("value") == str(ada.pk)
    person.find("input[name=_save]").click()
    person.wait_for("ul.messagelist")
    assert "Patient Visit for Ada Okafor" in person.text("ul.messagelist")
    assert Encounter.objects.get().subject == ada


def test_a_state_added_in_the_definition_rows(person, visit_definition):
    person.open(
        f"/admin/django_encounters/encounterdefinition/{visit_definition.pk}/change/",
        expect="#state-rows",
    )
    n = len(visit_definition.states)
    type_into(person, f"#id_state_rows-{n}-name", "no_show")
    person.find(f"#id_state_rows-{n}-is_final").click()
    type_into(person, "#id_state_rows-0-next_states", ", no_show", clear=False)
    person.driver.execute_script(
        "document.getElementById('state-rows').scrollIntoView({block: 'start'});"
    )
    person.screenshot("frontdesk-06-definition-rows")
    person.find("input[name=_continue]").click()
    person.wait_for("ul.messagelist")
    fresh = EncounterDefinition.objects.get(pk=visit_definition.pk)
    assert (fresh.version, fresh.states[-1]) == (2, "no_show")
    assert fresh.transitions["scheduled"] == ["checked_in", "cancelled", "no_show"]
    assert fresh.final_states == ["completed", "cancelled", "no_show"]
