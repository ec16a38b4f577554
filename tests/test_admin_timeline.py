"""The encounter's timeline in the admin (issue 21): one page at a time, newest business time
first by default, "show all", on the page and on History, with the marks right on every page
(backdated, overtaken, the replayed from-state beside the recorded one, late entries);
"state at … as known at …" before the encounter existed; the backdates a final encounter can
still be given, reachable from its page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from django_encounters.models import EncounterTransition
from django_encounters.services import create_encounter, transition
from tests.helpers import change_url

pytestmark = pytest.mark.django_db


def history_url(encounter):
    return reverse("admin:django_encounters_encounter_history", args=[encounter.pk])


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client


@pytest.fixture
def counted(counter_definition, patient, past):
    """A counter with 12 rows 'open -> open', an hour apart in business time (12h ago to 1h
    ago), recorded now."""
    counter = create_encounter(counter_definition, patient)
    for hours in range(12, 0, -1):
        transition(counter, "open", effective_at=past(hours), reason=f"row at -{hours}h")
    return counter


@pytest.fixture
def backdated_employment(employment, past):
    """hired -> working (10h ago) -> finished (1h ago); then onleave backdated to 5h ago:
    the finished row is overtaken by it."""
    transition(employment, "working", effective_at=past(10), reason="start")
    transition(employment, "finished", effective_at=past(1), reason="contract over")
    transition(employment, "onleave", effective_at=past(5), reason="leave")
    return employment


def sequences(page):
    return [row.sequence for row in page.context["timeline"]]


# -- pages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url_of", [change_url, history_url], ids=["page", "history"])
def test_timeline_is_paginated_newest_first_with_a_show_all_link(
    admin_client, counted, settings, url_of
):
    settings.ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE = 5
    first = admin_client.get(url_of(counted))
    # Business time: row 1 is the oldest (-12h), row 12 the newest (-1h).
    assert sequences(first) == [12, 11, 10, 9, 8]
    text = first.content.decode()
    assert "Rows 1–5 of 12, newest first" in text
    assert "timeline_page=2" in text and "timeline_page=3" in text
    assert "show all 12 rows" in text and "timeline_page=all" in text
    assert sequences(admin_client.get(url_of(counted), {"timeline_page": 3})) == [2, 1]
    # A page past the last is the last; one that cannot be read is the first.
    assert sequences(admin_client.get(url_of(counted), {"timeline_page": 9})) == [2, 1]
    assert sequences(admin_client.get(url_of(counted), {"timeline_page": "x"}))[0] == 12
    every = admin_client.get(url_of(counted), {"timeline_page": "all"})
    assert sequences(every) == list(range(12, 0, -1))
    assert "show in pages" in every.content.decode()
    oldest = admin_client.get(url_of(counted), {"timeline_order": "oldest"})
    assert sequences(oldest) == [1, 2, 3, 4, 5]


def test_the_order_is_a_setting(admin_client, counted, settings):
    settings.ENCOUNTERS_ADMIN_TIMELINE_ORDER = "oldest"
    settings.ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE = 4
    page = admin_client.get(change_url(counted))
    assert sequences(page) == [1, 2, 3, 4]
    assert "newest first</a>" in page.content.decode()


def test_a_page_shows_only_its_rows(admin_client, counted, settings):
    settings.ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE = 5
    text = admin_client.get(change_url(counted)).content.decode()
    assert text.count('class="timeline-row') == 5
    assert "row at -12h" not in text and "row at -1h" in text


def test_marks_and_replayed_from_states_are_right_on_every_page(
    admin_client, backdated_employment, settings
):
    settings.ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE = 1
    shown = {}
    for number in (1, 2, 3):
        page = admin_client.get(change_url(backdated_employment), {"timeline_page": number})
        (row,) = page.context["timeline"]
        shown[row.sequence] = (row, page.content.decode())
    # Newest first: finished (2), then the backdated onleave (3), then working (1).
    finished, text = shown[2]
    assert finished.overtaken and finished.overtaken_by == 3
    # Recorded from 'working'; the timeline now reaches it from 'onleave'.
    assert (finished.from_state, finished.recorded_from_state) == ("onleave", "working")
    assert "(recorded: working)" in text
    onleave, text = shown[3]
    assert onleave.backdated and (onleave.from_state, onleave.recorded_from_state) == (
        "working",
        None,
    )
    assert "(recorded:" not in text
    working, _ = shown[1]
    assert (working.from_state, working.recorded_from_state) == ("hired", None)
    assert not (working.backdated or working.overtaken)


# -- late entries ----------------------------------------------------------------------------


def test_a_row_recorded_long_after_its_effective_time_is_a_late_entry(
    admin_client, counter_definition, patient, settings
):
    counter = create_encounter(counter_definition, patient)
    now = timezone.now()
    transition(counter, "open", effective_at=now - timedelta(days=3, hours=2), reason="late")
    transition(counter, "open", effective_at=now - timedelta(minutes=20), reason="on time")
    page = admin_client.get(change_url(counter))
    rows = {row.sequence: row for row in page.context["timeline"]}
    assert rows[1].late and rows[1].late_by == "3 days 2 hours"
    assert not rows[2].late  # 20 minutes: inside the default tolerance of an hour
    text = page.content.decode()
    assert "late entry: 3 days 2 hours" in text
    settings.ENCOUNTERS_LATE_ENTRY_TOLERANCE = timedelta(minutes=10)
    rows = {row.sequence: row for row in admin_client.get(change_url(counter)).context["timeline"]}
    assert rows[2].late and rows[2].late_by.startswith("20 minutes")
    settings.ENCOUNTERS_LATE_ENTRY_TOLERANCE = 4 * 86400  # seconds
    rows = {row.sequence: row for row in admin_client.get(change_url(counter)).context["timeline"]}
    assert not rows[1].late


def test_duration_words():
    from django_encounters.admin.timeline import duration_words

    assert duration_words(timedelta(days=3, hours=2, minutes=5)) == "3 days 2 hours"
    assert duration_words(timedelta(hours=1, seconds=5)) == "1 hour 5 seconds"
    assert duration_words(timedelta(minutes=40)) == "40 minutes"
    assert duration_words(timedelta(0)) == "0 seconds"


@pytest.mark.parametrize(
    "name, value",
    [
        ("ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE", 0),
        ("ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE", "50"),
        ("ENCOUNTERS_ADMIN_TIMELINE_ORDER", "sideways"),
        ("ENCOUNTERS_LATE_ENTRY_TOLERANCE", -1),
        ("ENCOUNTERS_LATE_ENTRY_TOLERANCE", "1h"),
        ("ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS", 0),
    ],
)
def test_unusable_settings_are_reported_by_the_checks(settings, name, value):
    from django.core.management.base import SystemCheckError

    setattr(settings, name, value)
    with pytest.raises(SystemCheckError, match=f"django_encounters.E008.*{name}|{name}"):
        call_command("check")


# -- state at … as known at … ----------------------------------------------------------------


def test_as_known_at_before_the_encounter_existed_says_so(admin_client, backdated_employment):
    created = backdated_employment.created_at
    before = (created - timedelta(minutes=5)).isoformat()
    now = timezone.now().isoformat()
    page = admin_client.get(change_url(backdated_employment), {"state_at": now, "known_at": before})
    assert "answer" not in page.context["state_at"]
    text = page.content.decode()
    assert "the encounter did not exist yet" in text
    assert "the state was" not in text


def test_state_at_a_time_before_the_encounter_existed_says_so(admin_client, encounter):
    before = (encounter.created_at - timedelta(hours=1)).isoformat()
    text = admin_client.get(change_url(encounter), {"state_at": before}).content.decode()
    assert "the encounter did not exist yet" in text and "scheduled</strong>" not in text
    after = (encounter.created_at + timedelta(seconds=1)).isoformat()
    page = admin_client.get(change_url(encounter), {"state_at": after})
    assert page.context["state_at"]["answer"] == "scheduled"


def test_a_history_dated_before_the_creation_still_answers(
    admin_client, counter_definition, patient, past
):
    """An imported history: rows effective before the encounter was created are its timeline."""
    counter = create_encounter(counter_definition, patient)
    transition(counter, "open", effective_at=past(48), reason="imported")
    page = admin_client.get(change_url(counter), {"state_at": past(24).isoformat()})
    assert page.context["state_at"]["answer"] == "open"
    text = admin_client.get(change_url(counter), {"state_at": past(72).isoformat()})
    assert "did not exist yet" in text.content.decode()
    assert "its timeline starts at" in text.content.decode()


# -- backdating a final encounter from its page -------------------------------------------------


def test_a_final_encounter_offers_the_backdates_its_definition_allows(
    admin_client, employment, past
):
    transition(employment, "working", effective_at=past(10))
    transition(employment, "finished", effective_at=past(1))
    page = admin_client.get(change_url(employment))
    text = page.content.decode()
    assert page.context["transition_buttons"] == []
    states = [option.state for option, _ in page.context["backdate_buttons"]]
    # Between 'working' (10h ago) and 'finished' (1h ago): a leave, which 'finished' may follow.
    assert "onleave" in states
    assert 'class="button backdate-button"' in text and 'data-state="onleave"' in text
    (url,) = [url for option, url in page.context["backdate_buttons"] if option.state == "onleave"]
    assert "to_state=onleave" in url and "expected_version=2" in url
    # The button's form records it, backdated, through transition().
    form = admin_client.get(url)
    assert form.status_code == 200
    when = timezone.localtime(past(5)).strftime("%Y-%m-%d %H:%M:%S")
    done = admin_client.post(
        url.split("?")[0],
        {"to_state": "onleave", "expected_version": 2, "reason": "leave", "effective_at": when},
        follow=True,
    )
    assert done.status_code == 200
    row = EncounterTransition.objects.get(encounter=employment, sequence=3)
    assert (row.from_state, row.to_state) == ("working", "onleave")
    # A state no window admits is not offered ('finished' cannot follow 'finished').
    assert "hired" not in states


def test_no_backdate_is_offered_before_the_first_row(admin_client, employment):
    page = admin_client.get(change_url(employment))
    assert page.context["backdate_buttons"] == []
