"""Every error of the REST API is Problem Details (RFC 9457, ``application/problem+json``):
hostile bodies (too deep for the parser, over ``DATA_UPLOAD_MAX_MEMORY_SIZE``, over the store's
limits), unknown paths under the API, 405/406/415, DRF's own refusals (authentication,
permission, throttling) — and the store's limits on ``reason`` and ``context``/``metadata``
are enforced by the services themselves (``transition()``, ``create_encounter()``,
``upgrade_encounter()``), with nothing written."""

from __future__ import annotations

import json
import sys

import pytest
from django.contrib.auth.models import User
from django.core import checks
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework.throttling import AnonRateThrottle

from django_encounters.contrib.rest_framework.views import EncounterViewSet
from django_encounters.exceptions import InputLimitError
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.services import create_encounter, transition, upgrade_encounter
from tests.test_rest_api import assert_problem, counts, url

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"
LIMIT = "urn:django-encounters:problem:input-too-large"


@pytest.fixture
def nurse():
    user = User.objects.create_superuser("head-nurse", "n@example.com", "pw")
    client = APIClient()
    client.force_authenticate(user)
    return client


def nested(depth: int, leaf=1):
    """``depth`` levels of ``{"a": …}`` around ``leaf``, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def deep_body(depth: int) -> str:
    """A transition body whose context nests ``depth`` objects, ``{"a":{"a":…1}}``, as text
    (5,000 deep: 30 KB)."""
    return json.dumps({"to_state": "checked_in", "context": {"x": "@"}}).replace(
        '"@"', '{"a":' * depth + "1" + "}" * depth
    )


# ---------------------------------------------------------------------------------------------
# Hostile bodies
# ---------------------------------------------------------------------------------------------


def test_a_body_nested_5000_deep_is_a_400_problem_not_a_500(nurse, encounter):
    body = deep_body(5000)
    assert 30_000 < len(body) < 31_000
    response = nurse.post(url(encounter, "transition"), body, content_type="application/json")
    if sys.version_info < (3, 13):
        # The JSON parser reaches Python's recursion limit: a parse error.
        problem = assert_problem(response, 400, "about:blank", title="Bad Request")
        assert problem["detail"] == "JSON parse error - the body is nested too deeply to be parsed"
    else:
        # Python 3.13's parser reads it; the store's depth limit refuses it.
        assert_problem(response, 400, LIMIT, limit="depth", setting="ENCOUNTERS_MAX_CONTEXT_DEPTH")
    assert counts() == (1, 0)


def test_a_context_deeper_than_the_limit_is_refused_naming_the_setting(nurse, encounter):
    body = deep_body(100)  # parseable, deeper than ENCOUNTERS_MAX_CONTEXT_DEPTH (20)
    response = nurse.post(url(encounter, "transition"), body, content_type="application/json")
    problem = assert_problem(
        response,
        400,
        LIMIT,
        argument="context",
        limit="depth",
        maximum=20,
        setting="ENCOUNTERS_MAX_CONTEXT_DEPTH",
    )
    assert "ENCOUNTERS_MAX_CONTEXT_DEPTH" in problem["detail"]
    assert counts() == (1, 0)


def test_a_context_larger_than_the_limit_is_refused(nurse, encounter):
    context = {"scan": "x" * 70_000}
    response = nurse.post(
        url(encounter, "transition"), {"to_state": "checked_in", "context": context}
    )
    problem = assert_problem(response, 400, LIMIT, argument="context", limit="size", maximum=65_536)
    assert problem["detail"].startswith("context is too large: 70012 bytes of JSON, at most 65536")
    assert counts() == (1, 0)


def test_a_two_million_character_reason_is_refused_and_not_stored(nurse, encounter):
    response = nurse.post(
        url(encounter, "transition"), {"to_state": "checked_in", "reason": "x" * 2_000_000}
    )
    problem = assert_problem(
        response,
        400,
        LIMIT,
        argument="reason",
        limit="length",
        maximum=10_000,
        setting="ENCOUNTERS_MAX_REASON_LENGTH",
    )
    assert problem["detail"] == (
        "reason is too large: 2000000 characters, at most 10000 allowed "
        "(ENCOUNTERS_MAX_REASON_LENGTH); shorten it (or raise ENCOUNTERS_MAX_REASON_LENGTH). "
        "Nothing was written."
    )
    assert counts() == (1, 0)


def test_metadata_over_the_limits_is_refused_on_create(nurse, visit_definition, patient):
    response = nurse.post(
        url(),
        {
            "definition": "VISIT",
            "subject_type": "testapp.patient",
            "subject_id": str(patient.pk),
            "metadata": nested(30),
        },
    )
    assert_problem(response, 400, LIMIT, argument="metadata", limit="depth")
    assert counts() == (0, 0)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_body_over_data_upload_max_memory_size_is_413(nurse, encounter, settings, content_type):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100_000
    if content_type == "application/json":
        body = json.dumps({"to_state": "checked_in", "reason": "x" * 200_000})
    else:
        body = "to_state=checked_in&reason=" + "x" * 200_000
    response = nurse.post(url(encounter, "transition"), body, content_type=content_type)
    problem = assert_problem(
        response,
        413,
        "urn:django-encounters:problem:body-too-large",
        maximum=100_000,
        setting="DATA_UPLOAD_MAX_MEMORY_SIZE",
    )
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in problem["detail"]
    assert counts() == (1, 0)


def test_a_3_mb_json_body_is_413_with_djangos_default_limit(nurse, encounter):
    body = json.dumps({"to_state": "checked_in", "context": {"blob": "x" * 3_000_000}})
    response = nurse.post(url(encounter, "transition"), body, content_type="application/json")
    assert_problem(response, 413, "urn:django-encounters:problem:body-too-large", maximum=2621440)
    assert counts() == (1, 0)


def test_a_body_that_is_not_utf8_is_a_parse_error(nurse, encounter):
    response = nurse.post(
        url(encounter, "transition"), b'{"to_state": "\xff"}', content_type="application/json"
    )
    problem = assert_problem(response, 400, "about:blank")
    assert problem["detail"].startswith("JSON parse error - the body is not utf-8 text")


# ---------------------------------------------------------------------------------------------
# HTTP's refusals and DRF's own
# ---------------------------------------------------------------------------------------------


def test_an_unknown_path_under_the_api_is_a_404_problem(nurse):
    response = nurse.get("/api/no-such-thing/")
    assert_problem(
        response,
        404,
        "about:blank",
        detail="No endpoint of the encounters API at /api/no-such-thing/.",
    )
    response = nurse.post("/api/encounters", {})
    assert_problem(
        response,
        404,
        "about:blank",
        detail="No endpoint of the encounters API at /api/encounters. Did you mean "
        "/api/encounters/ (with a trailing slash)?",
    )


def test_not_acceptable_is_a_406_problem(nurse, encounter):
    response = nurse.get(url(encounter), HTTP_ACCEPT="application/xml")
    assert_problem(response, 406, "about:blank", title="Not Acceptable")


def test_an_unsupported_media_type_is_a_415_problem(nurse, encounter):
    response = nurse.post(url(encounter, "transition"), "to_state", content_type="text/plain")
    assert_problem(response, 415, "about:blank", title="Unsupported Media Type")
    assert counts() == (1, 0)


def test_failed_authentication_is_a_problem(encounter):
    response = APIClient().get(url(encounter), HTTP_AUTHORIZATION="Basic bm9ib2R5Om5vcGU=")
    assert_problem(response, 403, "about:blank", detail="Invalid username/password.")


class OnceADay(AnonRateThrottle):
    rate = "1/day"


class ThrottledViewSet(EncounterViewSet):
    throttle_classes = [OnceADay]
    permission_classes = []


def test_throttling_is_a_429_problem_with_retry_after(encounter):
    from django.core.cache import cache

    cache.clear()
    view = ThrottledViewSet.as_view({"get": "retrieve"})
    factory = APIRequestFactory()
    first = view(factory.get(url(encounter)), pk=str(encounter.pk))
    assert first.status_code == 200
    second = view(factory.get(url(encounter)), pk=str(encounter.pk)).render()
    assert second.status_code == 429
    assert second["Content-Type"] == PROBLEM
    assert int(second["Retry-After"]) > 0
    body = json.loads(second.content)
    assert (body["type"], body["title"], body["status"]) == (
        "about:blank",
        "Too Many Requests",
        429,
    )
    assert body["detail"].startswith("Request was throttled.")
    cache.clear()


# ---------------------------------------------------------------------------------------------
# The state filter
# ---------------------------------------------------------------------------------------------


def test_an_unknown_state_filter_is_400_naming_the_known_states(nurse, encounter, make_definition):
    make_definition(
        code="OTHER",
        states=["scheduled", "checked_in", "in_progress", "completed", "cancelled", "no_show"],
    )
    problem = assert_problem(
        nurse.get(url(), {"state": "bogus"}), 400, "urn:django-encounters:problem:invalid-input"
    )
    assert problem["errors"] == {
        "state": [
            "'bogus' is not a state of any definition (known: ['cancelled', 'checked_in', "
            "'completed', 'in_progress', 'no_show', 'scheduled'])."
        ]
    }
    narrowed = nurse.get(url(), {"state": "no_show", "definition": "VISIT"})
    assert assert_problem(narrowed, 400, "urn:django-encounters:problem:invalid-input")[
        "errors"
    ] == {
        "state": [
            "'no_show' is not a state of definition 'VISIT' (known: ['cancelled', 'checked_in', "
            "'completed', 'in_progress', 'scheduled'])."
        ]
    }
    assert nurse.get(url(), {"state": "no_show"}).json()["count"] == 0
    assert nurse.get(url(), {"state": "scheduled"}).json()["count"] == 1


# ---------------------------------------------------------------------------------------------
# The limits are the services' (not only the API's)
# ---------------------------------------------------------------------------------------------


def test_transition_refuses_a_reason_over_the_limit_and_writes_nothing(encounter):
    with pytest.raises(InputLimitError) as refused:
        transition(encounter, "checked_in", reason="x" * 2_000_000)
    error = refused.value
    assert isinstance(error, ValueError)
    assert (error.argument, error.limit, error.actual, error.maximum, error.setting) == (
        "reason",
        "length",
        2_000_000,
        10_000,
        "ENCOUNTERS_MAX_REASON_LENGTH",
    )
    assert EncounterTransition.objects.count() == 0
    assert Encounter.objects.get().version == 0
    transition(encounter, "checked_in", reason="x" * 10_000)  # at the limit: accepted


def test_transition_refuses_a_context_too_deep_or_too_large(encounter, settings):
    with pytest.raises(InputLimitError, match="more than 20 levels of nesting"):
        transition(encounter, "checked_in", context=nested(21))
    with pytest.raises(InputLimitError, match=r"context is too large: 7\d{4} bytes of JSON"):
        transition(encounter, "checked_in", context={"scan": "x" * 70_000})
    deep_list: list = []
    for _ in range(10_000):  # deeper than the JSON encoder could recurse: no RecursionError
        deep_list = [deep_list]
    with pytest.raises(InputLimitError, match="ENCOUNTERS_MAX_CONTEXT_DEPTH"):
        transition(encounter, "checked_in", context={"x": deep_list})
    assert EncounterTransition.objects.count() == 0
    transition(encounter, "checked_in", context=nested(19))  # {"a": …} 19 deep + the dict: 20
    settings.ENCOUNTERS_MAX_CONTEXT_DEPTH = 30
    settings.ENCOUNTERS_MAX_CONTEXT_BYTES = 100_000
    transition(encounter, "in_progress", context={"deep": nested(25), "scan": "x" * 70_000})
    assert EncounterTransition.objects.count() == 2


def test_create_and_upgrade_enforce_the_limits(visit_definition, patient, settings):
    settings.ENCOUNTERS_MAX_CONTEXT_BYTES = 1000
    with pytest.raises(InputLimitError, match="metadata is too large"):
        create_encounter(visit_definition, patient, metadata={"x": "y" * 1000})
    assert Encounter.all_objects.count() == 0
    visit = create_encounter(visit_definition, patient)
    visit_definition.states = [*visit_definition.states, "extra"]
    visit_definition.save()
    settings.ENCOUNTERS_MAX_REASON_LENGTH = 5
    with pytest.raises(InputLimitError, match="reason is too large: 6 characters"):
        upgrade_encounter(visit, reason="sixsix")
    assert EncounterTransition.objects.count() == 0
    upgrade_encounter(visit, reason="five!")


@pytest.mark.parametrize(
    "name, value",
    [
        ("ENCOUNTERS_MAX_REASON_LENGTH", 0),
        ("ENCOUNTERS_MAX_REASON_LENGTH", "10000"),
        ("ENCOUNTERS_MAX_CONTEXT_BYTES", True),
        ("ENCOUNTERS_MAX_CONTEXT_BYTES", 1.5),
        ("ENCOUNTERS_MAX_CONTEXT_DEPTH", 501),
        ("ENCOUNTERS_MAX_CONTEXT_DEPTH", None),
    ],
)
def test_unusable_limits_are_reported_by_the_checks(settings, name, value):
    setattr(settings, name, value)
    found = [m for m in checks.run_checks() if m.id == "django_encounters.E010"]
    assert [(m.obj, m.level) for m in found] == [(name, checks.ERROR)]
    assert name in found[0].msg and repr(value) in found[0].msg
