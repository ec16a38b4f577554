"""The REST API (``django_encounters.contrib.rest_framework``) through DRF's ``APIClient``:
every status code it answers, the ETag / If-Match / 412 round trip, Problem Details bodies,
permissions, filters, ``as_of``, state-at with ``known_at``, pagination — and that no error
writes anything."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core import checks
from django.utils import timezone
from rest_framework.test import APIClient

from django_encounters.models import Encounter, EncounterTransition
from django_encounters.services import create_encounter, transition
from tests.helpers import HOLD_SECONDS, RowLockHolder

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"
ROOT = Path(__file__).resolve().parent.parent


def url(encounter=None, action=""):
    if encounter is None:
        return "/api/encounters/"
    pk = encounter if isinstance(encounter, (str, uuid.UUID)) else encounter.pk
    return f"/api/encounters/{pk}/" + (f"{action}/" if action else "")


def t(hours):
    """An aware time ``hours`` hours ago."""
    return timezone.now() - timedelta(hours=hours)


def client_for(username, *codenames):
    """An APIClient logged in as a new user holding ``codenames`` of django_encounters."""
    user = User.objects.create_user(username=username)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_encounters", codename__in=codenames
        )
    )
    user = User.objects.get(pk=user.pk)  # no cached permissions
    client = APIClient()
    client.force_authenticate(user)
    client.user = user
    return client


@pytest.fixture
def nurse():
    """May read, create and transition encounters."""
    return client_for(
        "nurse", "view_encounter", "add_encounter", "change_encounter", "transition_encounter"
    )


@pytest.fixture
def viewer():
    return client_for("viewer", "view_encounter")


def counts():
    return (Encounter.all_objects.count(), EncounterTransition.objects.count())


def assert_problem(response, status, type_, **members):
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["type"] == type_
    assert body["instance"] == response.wsgi_request.path
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for name, value in members.items():
        assert body[name] == value, (name, body)
    return body


# ---------------------------------------------------------------------------------------------
# Reading one encounter, creating one
# ---------------------------------------------------------------------------------------------


def test_get_one_encounter_carries_its_stream_version_as_a_strong_etag(nurse, encounter, patient):
    transition(encounter, "checked_in")
    transition(encounter, "in_progress")
    response = nurse.get(url(encounter))
    assert response.status_code == 200
    assert response["ETag"] == '"2"'
    body = response.json()
    assert body["id"] == str(encounter.pk)
    assert body["definition"] == "VISIT"
    assert body["subject_type"] == "testapp.patient"
    assert body["subject_id"] == str(patient.pk)
    assert (body["state"], body["version"], body["origin_state"]) == ("in_progress", 2, "scheduled")
    assert body["allowed_transitions"] == ["completed", "cancelled"]
    assert body["is_final"] is False


def test_create_goes_through_create_encounter(nurse, visit_definition, patient):
    response = nurse.post(
        url(),
        {
            "definition": "VISIT",
            "subject_type": "testapp.patient",
            "subject_id": str(patient.pk),
            "scheduled_at": "2030-01-02T09:30:00+01:00",
            "notes": "first visit",
            "metadata": {"room": 4},
        },
    )
    assert response.status_code == 201, response.content
    created = Encounter.objects.get()
    assert response["ETag"] == '"0"'
    assert response["Location"] == f"http://testserver/api/encounters/{created.pk}/"
    assert response.json()["id"] == str(created.pk)
    assert (created.subject, created.state, created.created_by) == (
        patient,
        "scheduled",
        nurse.user,
    )
    assert created.scheduled_at.isoformat() == "2030-01-02T08:30:00+00:00"
    assert (created.notes, created.metadata) == ("first visit", {"room": 4})
    assert created.genesis_hash and created.head_hash == created.genesis_hash


def test_create_for_a_uuid_keyed_subject(nurse, visit_definition, device):
    response = nurse.post(
        url(),
        {"definition": "VISIT", "subject_type": "testapp.Device", "subject_id": str(device.pk)},
    )
    assert response.status_code == 201, response.content
    assert Encounter.objects.get().subject == device


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"definition": "NOPE"}, "definition", "No definition has the code 'NOPE'."),
        (
            {"subject_type": "testapp.nothing"},
            "subject_type",
            "'testapp.nothing' names no installed model (expected \"app_label.model\", e.g. "
            '"clinic.patient").',
        ),
        ({"subject_id": "999999"}, "subject_id", "No testapp.patient has the id '999999'."),
        ({"subject_id": "abc"}, "subject_id", "No testapp.patient has the id 'abc'."),
        (
            {"scheduled_at": "2030-01-02T09:30:00"},
            "scheduled_at",
            "scheduled_at must include a UTC offset (e.g. 2024-05-01T09:30:00+02:00 or "
            "2024-05-01T07:30:00Z), got '2030-01-02T09:30:00'.",
        ),
        ({"metadata": [1, 2]}, "metadata", "metadata must be a JSON object, not list [1, 2]"),
    ],
)
def test_create_refuses_bad_input_with_400_and_writes_nothing(
    nurse, visit_definition, patient, change, field, message
):
    payload = {
        "definition": "VISIT",
        "subject_type": "testapp.patient",
        "subject_id": str(patient.pk),
    }
    response = nurse.post(url(), {**payload, **change})
    body = assert_problem(response, 400, "urn:django-encounters:problem:invalid-input")
    assert body["errors"] == {field: [message]}
    assert body["detail"] == f"{field}: {message}"
    assert counts() == (0, 0)


def test_create_can_be_narrowed_to_some_subject_types(nurse, visit_definition, device, settings):
    from django_encounters.contrib.rest_framework.views import EncounterViewSet

    class PatientsOnly(EncounterViewSet):
        subject_types = {"testapp.patient"}

    request = {
        "definition": "VISIT",
        "subject_type": "testapp.device",
        "subject_id": str(device.pk),
    }
    view = PatientsOnly.as_view({"post": "create"})
    from rest_framework.test import APIRequestFactory, force_authenticate

    http = APIRequestFactory().post(url(), request, format="json")
    force_authenticate(http, nurse.user)
    response = view(http).render()
    assert response.status_code == 400
    assert json.loads(response.content)["errors"] == {
        "subject_type": [
            "'testapp.device' is not a subject type of this API (allowed: ['testapp.patient'])."
        ]
    }
    assert counts() == (0, 0)


# ---------------------------------------------------------------------------------------------
# Transitions: ETag, If-Match, 412
# ---------------------------------------------------------------------------------------------


def test_transition_with_if_match_answers_the_new_etag(nurse, encounter):
    response = nurse.post(
        url(encounter, "transition"),
        {"to_state": "checked_in", "reason": "arrived", "context": {"desk": "A"}},
        HTTP_IF_MATCH='"0"',
    )
    assert response.status_code == 200, response.content
    assert response["ETag"] == '"1"'
    body = response.json()
    assert (body["encounter"]["state"], body["encounter"]["version"]) == ("checked_in", 1)
    row = body["transition"]
    assert (row["sequence"], row["from_state"], row["to_state"]) == (1, "scheduled", "checked_in")
    assert (row["reason"], row["context"], row["transitioned_by"]) == (
        "arrived",
        {"desk": "A"},
        "nurse",
    )
    stored = EncounterTransition.objects.get()
    assert (stored.transitioned_by, stored.reason, stored.metadata) == (
        nurse.user,
        "arrived",
        {"desk": "A"},
    )
    assert row["hash"] == stored.hash


def test_two_clients_the_stale_one_gets_412_and_nothing_is_written(nurse, encounter):
    other = client_for("other nurse", "view_encounter", "change_encounter", "transition_encounter")
    first, second = nurse.get(url(encounter)), other.get(url(encounter))
    assert first["ETag"] == second["ETag"] == '"0"'
    moved = nurse.post(
        url(encounter, "transition"), {"to_state": "checked_in"}, HTTP_IF_MATCH=first["ETag"]
    )
    assert (moved.status_code, moved["ETag"]) == (200, '"1"')
    stale = other.post(
        url(encounter, "transition"), {"to_state": "cancelled"}, HTTP_IF_MATCH=second["ETag"]
    )
    body = assert_problem(
        stale,
        412,
        "urn:django-encounters:problem:stale-version",
        encounter=str(encounter.pk),
        expected_version=0,
        current_version=1,
    )
    assert body["detail"] == (
        f"Encounter {encounter.pk} was changed concurrently: expected version 0, found 1"
    )
    assert stale["ETag"] == '"1"'  # the version it is at now
    assert counts() == (1, 1)
    encounter.refresh_from_db()
    assert (encounter.state, encounter.version) == ("checked_in", 1)
    # Read again, act again: it goes through.
    fresh = other.get(url(encounter))
    again = other.post(
        url(encounter, "transition"), {"to_state": "cancelled"}, HTTP_IF_MATCH=fresh["ETag"]
    )
    assert (again.status_code, again["ETag"]) == (200, '"2"')


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_writer_that_wins_while_the_request_waits_for_the_row_lock_gives_412(encounter):
    """The request reads version 0 (the other writer has not committed), so If-Match passes
    the first check; transition() then waits for the row lock and finds version 1 under it."""
    nurse = client_for("nurse", "view_encounter", "change_encounter", "transition_encounter")
    holder = RowLockHolder(encounter.pk, action=lambda e: transition(e, "checked_in"))
    holder.start()
    assert holder.locked.wait(15) and holder.error is None, holder.error
    releaser = threading.Timer(HOLD_SECONDS, holder.release.set)
    releaser.start()
    started = time.monotonic()
    try:
        response = nurse.post(
            url(encounter, "transition"), {"to_state": "cancelled"}, HTTP_IF_MATCH='"0"'
        )
        waited = time.monotonic() - started
    finally:
        holder.release.set()
        holder.join(20)
        releaser.cancel()
    assert holder.error is None, holder.error
    assert waited >= HOLD_SECONDS * 0.8  # it was refused under the lock, not before it
    assert_problem(
        response,
        412,
        "urn:django-encounters:problem:stale-version",
        expected_version=0,
        current_version=1,
    )
    assert list(EncounterTransition.objects.values_list("to_state", flat=True)) == ["checked_in"]


def test_a_stale_if_match_is_412_even_with_a_body_that_is_also_wrong(nurse, encounter):
    transition(encounter, "checked_in")
    response = nurse.post(
        url(encounter, "transition"), {"effective_at": "yesterday"}, HTTP_IF_MATCH='"0"'
    )
    assert_problem(response, 412, "urn:django-encounters:problem:stale-version")
    assert counts() == (1, 1)


@pytest.mark.parametrize(
    "if_match, status",
    [
        (None, 200),  # no check
        ("*", 200),  # no check, on purpose
        ('"7", "1"', 200),  # a list: one of them is the current version
        ('"7", "8"', 412),
        ('W/"1"', 412),  # If-Match compares strongly: a weak tag never matches
        ('"01"', 412),
        ('"one"', 412),
        ('"³"', 412),  # a digit to str.isdigit(), not to int()
        ('"' + "9" * 5000 + '"', 412),  # more digits than int() converts
    ],
)
def test_if_match_forms(nurse, encounter, if_match, status):
    transition(encounter, "checked_in")
    headers = {} if if_match is None else {"HTTP_IF_MATCH": if_match}
    response = nurse.post(url(encounter, "transition"), {"to_state": "in_progress"}, **headers)
    assert response.status_code == status, response.content
    assert EncounterTransition.objects.count() == (2 if status == 200 else 1)
    if status == 412:
        body = assert_problem(response, 412, "urn:django-encounters:problem:stale-version")
        assert body["current_version"] == 1
        assert response["ETag"] == '"1"'
        assert body["detail"] == (
            f'Encounter {encounter.pk}: If-Match {if_match} does not match its current ETag "1"'
        )


def test_a_malformed_if_match_is_400(nurse, encounter):
    response = nurse.post(
        url(encounter, "transition"), {"to_state": "checked_in"}, HTTP_IF_MATCH="0"
    )
    assert_problem(response, 400, "urn:django-encounters:problem:malformed-if-match")
    assert counts() == (1, 0)


def test_if_match_can_be_required_428(nurse, encounter, settings):
    settings.ENCOUNTERS_REST_REQUIRE_IF_MATCH = True
    response = nurse.post(url(encounter, "transition"), {"to_state": "checked_in"})
    body = assert_problem(
        response, 428, "urn:django-encounters:problem:if-match-required", current_version=0
    )
    assert body["detail"] == (
        "A transition must name the version it acts on: send If-Match with the ETag of the "
        'encounter you read (now "0").'
    )
    assert counts() == (1, 0)
    assert (
        nurse.post(
            url(encounter, "transition"), {"to_state": "checked_in"}, HTTP_IF_MATCH='"0"'
        ).status_code
        == 200
    )
    assert (
        nurse.post(
            url(encounter, "transition"), {"to_state": "in_progress"}, HTTP_IF_MATCH="*"
        ).status_code
        == 200
    )


def test_the_require_if_match_setting_is_checked(settings):
    settings.ENCOUNTERS_REST_REQUIRE_IF_MATCH = "yes"
    found = [m for m in checks.run_checks() if m.id == "django_encounters.E004"]
    assert [m.msg for m in found] == [
        "ENCOUNTERS_REST_REQUIRE_IF_MATCH must be True or False, not 'yes'"
    ]


# ---------------------------------------------------------------------------------------------
# Refusals: 409, 422, 404, 400 — nothing written
# ---------------------------------------------------------------------------------------------


def test_a_refused_transition_is_409_with_the_library_message(nurse, encounter):
    response = nurse.post(url(encounter, "transition"), {"to_state": "completed"})
    body = assert_problem(
        response,
        409,
        "urn:django-encounters:problem:invalid-transition",
        encounter=str(encounter.pk),
        from_state="scheduled",
        to_state="completed",
        reason="Allowed transitions: ['checked_in', 'cancelled']",
    )
    assert body["detail"] == (
        "Cannot transition from 'scheduled' to 'completed': Allowed transitions: "
        f"['checked_in', 'cancelled'] [encounter {encounter.pk}]"
    )
    assert body["title"] == "Transition refused by the encounter's state machine"
    assert counts() == (1, 0)


def test_a_validator_refusal_is_422_naming_the_validator(nurse, validated_encounter):
    transition(validated_encounter, "checked_in")
    response = nurse.post(url(validated_encounter, "transition"), {"to_state": "in_progress"})
    body = assert_problem(
        response,
        422,
        "urn:django-encounters:problem:validation-failed",
        validator="RequiredFieldsValidator",
        reason="Field 'started_at' is required for state 'in_progress'",
    )
    assert body["detail"] == (
        "Validation failed (RequiredFieldsValidator): Field 'started_at' is required for state "
        "'in_progress'"
    )
    assert counts() == (1, 1)


def test_a_crashing_validator_is_422_without_its_exception_text(
    nurse, make_definition, patient, caplog
):
    definition = make_definition(validators=["tests.encounter_validators.ExplodingValidator"])
    encounter = create_encounter(definition, patient)
    with caplog.at_level("ERROR", logger="django_encounters.rest"):
        response = nurse.post(url(encounter, "transition"), {"to_state": "checked_in"})
    body = assert_problem(
        response,
        422,
        "urn:django-encounters:problem:validation-failed",
        validator="ExplodingValidator",
        reason="the validator failed unexpectedly",
    )
    assert "ZeroDivisionError" not in response.content.decode()
    assert "validator bug" not in response.content.decode()
    assert body["detail"] == (
        "Validation failed (ExplodingValidator): the validator failed unexpectedly; the error "
        "is in the server's log."
    )
    assert "validator bug" in caplog.text  # the operator sees it
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0


def test_a_damaged_stream_is_500_without_the_details(nurse, encounter, caplog):
    from tests.helpers import raw_update

    transition(encounter, "checked_in")
    raw_update(Encounter, encounter.pk, state="cancelled")  # the projection edited behind us
    with caplog.at_level("ERROR", logger="django_encounters.rest"):
        response = nurse.post(url(encounter, "transition"), {"to_state": "in_progress"})
    body = assert_problem(
        response, 500, "urn:django-encounters:problem:damaged-stream", encounter=str(encounter.pk)
    )
    assert body["detail"] == (
        f"Encounter {encounter.pk}: its stored history needs repair by an operator (the details "
        "are in the server's log)."
    )
    assert "cancelled" not in response.content.decode()
    assert "its projection disagrees with its transition log" in caplog.text
    assert counts() == (1, 1)


def test_a_backdate_that_would_break_the_next_row_is_409(nurse, employment):
    transition(employment, "working", effective_at=t(10))
    transition(employment, "onleave", effective_at=t(2))
    response = nurse.post(
        url(employment, "transition"),
        {"to_state": "finished", "effective_at": t(5).isoformat()},
    )
    body = assert_problem(response, 409, "urn:django-encounters:problem:invalid-transition")
    assert body["reason"].startswith("would be followed by 'onleave' (sequence 2, effective ")
    assert counts() == (1, 2)


@pytest.mark.parametrize(
    "payload, field, message",
    [
        ({}, "to_state", "This field is required."),
        (
            {"to_state": "checked_in", "effective_at": "2024-05-01T09:30:00"},
            "effective_at",
            "effective_at must include a UTC offset (e.g. 2024-05-01T09:30:00+02:00 or "
            "2024-05-01T07:30:00Z), got '2024-05-01T09:30:00'.",
        ),
        (
            {"to_state": "checked_in", "context": "[1, 2]"},
            "context",
            "context must be a JSON object, not str '[1, 2]'",
        ),
        (
            {"to_state": "checked_in", "context": ["a"]},
            "context",
            "context must be a JSON object, not list ['a']",
        ),
        (
            {"to_state": "checked_in", "reason": "a\x00b"},
            "reason",
            "Null characters are not allowed.",
        ),
        (
            {"to_state": "checked_in", "context": {"note": "a\x00b"}},
            "context",
            "context contains a NUL character (\\x00), which cannot be stored",
        ),
        (
            {"to_state": "checked_in", "effective_at": "2024-02-30T10:00:00Z"},
            "effective_at",
            "Datetime has wrong format. Use one of these formats instead: "
            "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].",
        ),
    ],
)
def test_bad_transition_input_is_400_and_writes_nothing(nurse, encounter, payload, field, message):
    response = nurse.post(url(encounter, "transition"), payload)
    body = assert_problem(response, 400, "urn:django-encounters:problem:invalid-input")
    assert body["errors"] == {field: [message]}
    assert counts() == (1, 0)


def test_malformed_json_is_400(nurse, encounter):
    response = nurse.post(
        url(encounter, "transition"),
        '{"to_state": "checked_in", "context": {',
        content_type="application/json",
    )
    body = assert_problem(response, 400, "about:blank", title="Bad Request")
    assert body["detail"].startswith("JSON parse error - ")
    assert counts() == (1, 0)


def test_an_unknown_state_is_422(nurse, encounter):
    response = nurse.post(url(encounter, "transition"), {"to_state": "teleported"})
    body = assert_problem(
        response,
        422,
        "urn:django-encounters:problem:unknown-state",
        to_state="teleported",
        states=["scheduled", "checked_in", "in_progress", "completed", "cancelled"],
    )
    assert body["detail"] == (
        "'teleported' is not a state of definition 'VISIT' (states: ['scheduled', 'checked_in', "
        f"'in_progress', 'completed', 'cancelled']) [encounter {encounter.pk}]"
    )
    assert counts() == (1, 0)


@pytest.mark.parametrize("action", ["", "history", "state-at", "transition"])
def test_unknown_and_soft_deleted_encounters_are_404(nurse, encounter, action):
    gone = create_encounter(encounter.definition, encounter.subject)
    gone.delete()
    for pk in (uuid.uuid4(), "not-a-uuid", gone.pk):
        if action == "transition":
            response = nurse.post(url(pk, action), {"to_state": "checked_in"})
        else:
            response = nurse.get(url(pk, action), {"at": timezone.now().isoformat()})
        assert_problem(
            response, 404, "about:blank", title="Not Found", detail=f"Encounter {pk} not found"
        )
    assert counts() == (2, 0)


def test_a_browser_gets_the_problem_as_the_browsable_apis_page(nurse, encounter):
    response = nurse.post(
        url(encounter, "transition"), {"to_state": "completed"}, HTTP_ACCEPT="text/html"
    )
    assert response.status_code == 409
    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert b"Cannot transition from &#x27;scheduled&#x27; to &#x27;completed&#x27;" in (
        response.content
    )
    assert counts() == (1, 0)


def test_a_method_not_allowed_is_a_problem_too(encounter):
    admin = APIClient()
    admin.force_authenticate(User.objects.create_superuser("root", "r@example.com", "pw"))
    response = admin.delete(url(encounter))
    assert_problem(response, 405, "about:blank", title="Method Not Allowed")
    assert counts() == (1, 0)


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


def test_anonymous_requests_are_refused(encounter):
    response = APIClient().get(url(encounter))
    assert_problem(
        response, 403, "about:blank", detail="Authentication credentials were not provided."
    )


def test_reading_needs_view_permission(encounter):
    nobody = client_for("nobody")
    for path in (url(), url(encounter), url(encounter, "history")):
        assert_problem(
            nobody.get(path),
            403,
            "about:blank",
            title="Forbidden",
            detail="You do not have permission to perform this action.",
        )


def test_creating_needs_add_permission(viewer, visit_definition, patient):
    payload = {
        "definition": "VISIT",
        "subject_type": "testapp.patient",
        "subject_id": str(patient.pk),
    }
    assert_problem(viewer.post(url(), payload), 403, "about:blank")
    assert counts() == (0, 0)


@pytest.mark.parametrize(
    "codenames, status",
    [
        (("view_encounter",), 403),
        (("view_encounter", "change_encounter"), 403),
        (("view_encounter", "transition_encounter"), 403),
        (("view_encounter", "add_encounter", "change_encounter"), 403),
        (("view_encounter", "change_encounter", "transition_encounter"), 200),
    ],
)
def test_transitioning_needs_change_and_transition_permissions(encounter, codenames, status):
    client = client_for("someone", *codenames)
    response = client.post(url(encounter, "transition"), {"to_state": "checked_in"})
    assert response.status_code == status
    assert EncounterTransition.objects.count() == (1 if status == 200 else 0)
    if status == 200:
        assert EncounterTransition.objects.get().transitioned_by == client.user


def test_a_superuser_may_do_everything(encounter):
    admin = APIClient()
    admin.force_authenticate(User.objects.create_superuser("root", "r@example.com", "pw"))
    assert admin.post(url(encounter, "transition"), {"to_state": "checked_in"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# Lists: filters, as_of, pagination
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def clinic(visit_definition, employment_definition, patient, device):
    """Three visits (scheduled; checked in 3 h ago; in progress since 1 h ago, checked in 5 h
    ago) and an employment."""
    idle = create_encounter(visit_definition, patient)
    arrived = create_encounter(visit_definition, device)
    transition(arrived, "checked_in", effective_at=t(3))
    busy = create_encounter(visit_definition, patient)
    transition(busy, "checked_in", effective_at=t(5))
    transition(busy, "in_progress", effective_at=t(1))
    job = create_encounter(employment_definition, patient)
    return {"idle": idle, "arrived": arrived, "busy": busy, "job": job}


def ids(response):
    assert response.status_code == 200, response.content
    return {item["id"] for item in response.json()["results"]}


def test_list_filters_by_state_and_definition(viewer, clinic):
    assert ids(viewer.get(url(), {"state": "checked_in"})) == {str(clinic["arrived"].pk)}
    assert ids(viewer.get(url(), {"definition": "EMPLOYMENT"})) == {str(clinic["job"].pk)}
    assert ids(viewer.get(url(), {"definition": "VISIT", "state": "scheduled"})) == {
        str(clinic["idle"].pk)
    }


def test_list_as_of_filters_on_the_state_then(viewer, clinic):
    response = viewer.get(url(), {"as_of": t(2).isoformat(), "state": "checked_in"})
    assert ids(response) == {str(clinic["arrived"].pk), str(clinic["busy"].pk)}
    assert {item["state_at"] for item in response.json()["results"]} == {"checked_in"}
    assert {item["state"] for item in response.json()["results"]} == {"checked_in", "in_progress"}
    earlier = viewer.get(url(), {"as_of": t(4).isoformat(), "definition": "VISIT"})
    assert {item["id"]: item["state_at"] for item in earlier.json()["results"]} == {
        str(clinic["idle"].pk): "scheduled",
        str(clinic["arrived"].pk): "scheduled",
        str(clinic["busy"].pk): "checked_in",
    }


def test_list_as_of_as_known_at(viewer, clinic):
    busy = clinic["busy"]
    first = busy.transitions.get(sequence=1)
    known = viewer.get(
        url(),
        {"as_of": timezone.now().isoformat(), "known_at": first.transitioned_at.isoformat()},
    )
    states = {item["id"]: item["state_at"] for item in known.json()["results"]}
    assert states[str(busy.pk)] == "checked_in"  # its second row was recorded later


@pytest.mark.parametrize(
    "query, field, message",
    [
        ({"definition": "NOPE"}, "definition", "No definition has the code 'NOPE'."),
        (
            {"as_of": "2024-05-01T09:30:00"},
            "as_of",
            "as_of must include a UTC offset (e.g. 2024-05-01T09:30:00+02:00 or "
            "2024-05-01T07:30:00Z), got '2024-05-01T09:30:00'.",
        ),
        (
            {"known_at": "2024-05-01T09:30:00Z"},
            "known_at",
            "known_at needs as_of (the business time it is about).",
        ),
    ],
)
def test_bad_list_filters_are_400(viewer, clinic, query, field, message):
    body = assert_problem(
        viewer.get(url(), query), 400, "urn:django-encounters:problem:invalid-input"
    )
    assert body["errors"] == {field: [message]}


def test_the_list_is_paginated_with_drfs_settings(viewer, visit_definition, patient):
    made = [create_encounter(visit_definition, patient) for _ in range(5)]
    first = viewer.get(url()).json()
    assert first["count"] == 5
    assert first["previous"] is None
    assert first["next"] == "http://testserver/api/encounters/?page=2"
    second = viewer.get(first["next"]).json()
    assert second["next"] is None
    # The view's order: newest first, ties (created within one millisecond) by id.
    newest_first = sorted(made, key=lambda e: (-e.created_at.timestamp(), str(e.pk)))
    listed = [item["id"] for item in first["results"] + second["results"]]
    assert sorted(listed) == sorted(str(e.pk) for e in made)
    assert [item["id"] for item in first["results"]][0] == str(newest_first[0].pk)


# ---------------------------------------------------------------------------------------------
# Timeline and state at a time
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def late_entry(employment, user):
    """Working from 10 h ago, finished 2 h ago; then a leave from 6 h ago entered late
    (row 3, backdated, overtaking row 2)."""
    transition(employment, "working", transitioned_by=user, effective_at=t(10))
    transition(employment, "finished", effective_at=t(2), reason="contract ended")
    transition(employment, "onleave", effective_at=t(6), context={"note": "sick"})
    return employment


def test_history_is_the_timeline_with_the_audits_marks(viewer, late_entry):
    response = viewer.get(url(late_entry, "history"))
    assert response.status_code == 200
    assert response["ETag"] == '"3"'
    body = response.json()
    assert (body["encounter"], body["version"], body["known_at"]) == (str(late_entry.pk), 3, None)
    timeline = body["timeline"]
    assert [(r["sequence"], r["from_state"], r["to_state"]) for r in timeline] == [
        (1, "hired", "working"),
        (3, "working", "onleave"),
        (2, "working", "finished"),
    ]
    assert [(r["backdated"], r["overtaken"], r["overtaken_by"]) for r in timeline] == [
        (False, False, None),
        (True, False, None),
        (False, True, 3),
    ]
    assert [r["transitioned_by"] for r in timeline] == ["reception", None, None]
    assert [r["context"] for r in timeline] == [{}, {"note": "sick"}, {}]
    assert timeline[2]["reason"] == "contract ended"
    assert body["anomalies"] == []


def test_history_as_known_at(viewer, late_entry):
    second = late_entry.transitions.get(sequence=2)
    response = viewer.get(
        url(late_entry, "history"), {"known_at": second.transitioned_at.isoformat()}
    )
    assert [r["sequence"] for r in response.json()["timeline"]] == [1, 2]


def test_state_at_with_known_at(viewer, late_entry):
    second = late_entry.transitions.get(sequence=2)
    at = t(4)
    now = viewer.get(url(late_entry, "state-at"), {"at": at.isoformat()})
    assert now.status_code == 200
    assert now["ETag"] == '"3"'
    assert now.json()["state"] == "onleave"
    assert now.json()["known_at"] is None
    then = viewer.get(
        url(late_entry, "state-at"),
        {"at": at.isoformat(), "known_at": second.transitioned_at.isoformat()},
    )
    assert then.json()["state"] == "working"
    assert then.json()["encounter"] == str(late_entry.pk)
    before = viewer.get(url(late_entry, "state-at"), {"at": t(20).isoformat()})
    assert before.json()["state"] == "hired"


@pytest.mark.parametrize(
    "query, field, message",
    [
        ({}, "at", "This field is required."),
        (
            {"at": "2024-05-01 09:30"},
            "at",
            "at must include a UTC offset (e.g. 2024-05-01T09:30:00+02:00 or "
            "2024-05-01T07:30:00Z), got '2024-05-01 09:30'.",
        ),
        (
            {"at": "soon"},
            "at",
            "Datetime has wrong format. Use one of these formats instead: "
            "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].",
        ),
        *(
            (
                {"at": value},
                "at",
                "Datetime has wrong format. Use one of these formats instead: "
                "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].",
            )
            # Well formed, but no real time: Django's parser raises instead of answering None.
            for value in (
                "2024-02-30T10:00:00Z",
                "2024-13-01T10:00:00+02:00",
                "2024-01-01T25:00:00Z",
                "2024-01-01T10:00:00+25:00",
            )
        ),
    ],
)
def test_bad_state_at_queries_are_400(viewer, encounter, query, field, message):
    body = assert_problem(
        viewer.get(url(encounter, "state-at"), query),
        400,
        "urn:django-encounters:problem:invalid-input",
    )
    assert body["errors"] == {field: [message]}


def test_if_none_match_answers_304_until_the_stream_moves(nurse, encounter):
    for action, query in (("history", {}), ("state-at", {"at": timezone.now().isoformat()})):
        first = nurse.get(url(encounter, action), query)
        etag = first["ETag"]
        again = nurse.get(url(encounter, action), query, HTTP_IF_NONE_MATCH=etag)
        assert (again.status_code, again["ETag"], again.content) == (304, etag, b"")
        assert nurse.get(url(encounter, action), query, HTTP_IF_NONE_MATCH='"9"').status_code == 200
    transition(encounter, "checked_in")
    moved = nurse.get(url(encounter, "history"), HTTP_IF_NONE_MATCH='"0"')
    assert (moved.status_code, moved["ETag"]) == (200, '"1"')


# ---------------------------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------------------------


def test_the_core_does_not_import_rest_framework():
    script = (
        "import sys, django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['django.contrib.auth', 'django.contrib.contenttypes',"
        " 'django_encounters'], DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3',"
        " 'NAME': ':memory:'}}, USE_TZ=True)\n"
        "django.setup()\n"
        "import django_encounters.services, django_encounters.projections.audit\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rest_framework'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]"
