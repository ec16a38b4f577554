"""Errors as Problem Details (RFC 9457): an ``application/problem+json`` body with ``type``,
``title``, ``status``, ``detail``, ``instance`` and extension members naming what the problem is
about (``encounter``, ``from_state``, ``to_state``, ``validator``, ``errors``…).

:func:`problem_response` answers every exception a view of this package lets out: the
library's typed errors by what they mean over HTTP (:func:`encounter_problem`), Django REST
framework's own (not found, permission denied, a malformed body, field errors) by their status.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions
from rest_framework.response import Response

from ...exceptions import (
    ConcurrentTransitionError,
    DatabaseLockedError,
    EncounterConfigurationError,
    EncounterError,
    EncounterNotFoundError,
    FhirStatusError,
    InputLimitError,
    InvalidTransitionError,
    ProjectionDriftError,
    StreamGapError,
    ValidationError,
)

logger = logging.getLogger("django_encounters.rest")

CONTENT_TYPE = "application/problem+json"
#: The prefix of this package's problem types (not resolvable: they name the kind of problem;
#: the REST API guide lists them).
TYPE_PREFIX = "urn:django-encounters:problem:"


class Problem:
    """One problem: the standard members and the extension members."""

    def __init__(
        self,
        status: int,
        kind: str | None,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        self.status = status
        # "about:blank": the problem is what its status code says; its title is the phrase.
        self.type = "about:blank" if kind is None else TYPE_PREFIX + kind
        self.title = title if title is not None and kind is not None else HTTPStatus(status).phrase
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions

    def body(self, instance: str) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **self.extensions,
        }

    def response(self, request: Any) -> Response:
        """The response to ``request``: ``application/problem+json`` when it is rendered as
        JSON (a browser asking for the browsable API gets its HTML page, labelled as such)."""
        renderer = getattr(request, "accepted_renderer", None)
        as_json = renderer is None or getattr(renderer, "format", "json") == "json"
        response = Response(
            self.body(getattr(request, "path", "")),
            status=self.status,
            content_type=CONTENT_TYPE if as_json else None,
        )
        for name, value in self.headers.items():
            response[name] = value
        return response


def encounter_problem(exc: EncounterError) -> Problem:
    """What one of the library's errors means over HTTP."""
    if isinstance(exc, EncounterNotFoundError):
        return Problem(404, None, str(exc), encounter=str(exc.encounter_id))
    if isinstance(exc, DatabaseLockedError):
        # The database, not the encounter, was busy: retry later. The fix (a setting) is for
        # the operator: logged, not sent to the client.
        logger.warning("%s", exc)
        return Problem(
            503,
            "database-locked",
            "The database was locked by another writer; nothing was written. Try again.",
            title="The database is busy",
            headers={"Retry-After": "1"},
            encounter=str(exc.encounter_id),
        )
    if isinstance(exc, ConcurrentTransitionError):
        if exc.expected_version is not None:  # If-Match named a version the stream left
            return Problem(
                412,
                "stale-version",
                str(exc),
                title="The encounter changed since the version named in If-Match",
                # The tag to read again with (or to act on, once the client has looked).
                headers={} if exc.actual_version is None else {"ETag": f'"{exc.actual_version}"'},
                encounter=str(exc.encounter_id),
                expected_version=exc.expected_version,
                current_version=exc.actual_version,
            )
        return Problem(
            409,
            "concurrent-transition",
            str(exc),
            title="Another transition of the encounter was recorded first",
            encounter=str(exc.encounter_id),
        )
    if isinstance(exc, InvalidTransitionError):
        return Problem(
            409,
            "invalid-transition",
            str(exc),
            title="Transition refused by the encounter's state machine",
            encounter=None if exc.encounter_id is None else str(exc.encounter_id),
            from_state=exc.from_state,
            to_state=exc.to_state,
            reason=exc.reason,
        )
    if isinstance(exc, ValidationError) and exc.__cause__ is not None:
        # A validator that crashed (a bug, not a refusal): its exception's text may name
        # tables, keys or paths — logged for the operator, not sent to the client.
        logger.error("validator %s failed unexpectedly", exc.validator, exc_info=exc)
        return Problem(
            422,
            "validation-failed",
            f"Validation failed ({exc.validator}): the validator failed unexpectedly; the "
            "error is in the server's log.",
            title="Transition refused by a validator",
            validator=exc.validator,
            reason="the validator failed unexpectedly",
        )
    if isinstance(exc, ValidationError):
        return Problem(
            422,
            "validation-failed",
            str(exc),
            title="Transition refused by a validator",
            validator=exc.validator,
            reason=exc.message,
        )
    if isinstance(exc, (ProjectionDriftError, StreamGapError)):
        # The stored log needs an operator (rebuild, audit), not a different request.
        logger.error("encounter %s: %s", exc.encounter_id, exc)
        return Problem(
            500,
            "damaged-stream",
            f"Encounter {exc.encounter_id}: its stored history needs repair by an operator "
            "(the details are in the server's log).",
            title="The encounter's stored history needs repair",
            encounter=str(exc.encounter_id),
        )
    if isinstance(exc, InputLimitError):
        return Problem(
            400,
            "input-too-large",
            str(exc),
            title="The request's input exceeds a limit of the store",
            argument=exc.argument,
            limit=exc.limit,
            maximum=exc.maximum,
            setting=exc.setting,
        )
    if isinstance(exc, FhirStatusError):
        return Problem(
            409,
            "no-fhir-status",
            str(exc),
            title="A state of the encounter has no FHIR status code",
            encounter=str(exc.encounter_id),
            state=exc.state,
            fhir_version=exc.fhir_version,
            valid_codes=list(exc.valid_codes),
        )
    if isinstance(exc, EncounterConfigurationError):
        logger.error("django-encounters is misconfigured: %s", exc)
        return Problem(
            500,
            "configuration",
            "django-encounters is misconfigured (the details are in the server's log).",
            title="django-encounters is misconfigured",
        )
    return Problem(409, "refused", str(exc), title="Refused by django-encounters")


def api_problem(exc: exceptions.APIException) -> Problem:
    """Django REST framework's errors, their headers kept (``WWW-Authenticate``,
    ``Retry-After``) as DRF's own handler keeps them."""
    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = str(exc.auth_header)  # type: ignore[attr-defined]
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))  # type: ignore[attr-defined]
    if isinstance(exc, exceptions.ValidationError):
        return Problem(
            400,
            "invalid-input",
            _summary(exc.detail),
            title="The request's input is invalid",
            errors=exc.detail,
        )
    return Problem(exc.status_code, None, _summary(exc.detail), headers=headers)


def _summary(detail: Any) -> str:
    """Field errors as one line: ``to_state: This field is required.; …``."""
    if isinstance(detail, dict):
        return "; ".join(f"{name}: {_summary(value)}" for name, value in detail.items())
    if isinstance(detail, list):
        return " ".join(_summary(value) for value in detail)
    return str(detail)


def request_problem(exc: SuspiciousOperation) -> Problem:
    """What Django refuses while reading a request: a body over
    ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (413), too many form fields or files (400)."""
    if isinstance(exc, RequestDataTooBig):
        return Problem(
            413,
            "body-too-large",
            str(exc) or "The request body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE.",
            title="The request body is too large",
            maximum=settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
            setting="DATA_UPLOAD_MAX_MEMORY_SIZE",
        )
    return Problem(400, None, str(exc) or "The request was refused as suspicious.")


def problem_response(exc: Exception, context: dict[str, Any]) -> Response | None:
    """The exception handler of this package's views: a Problem Details response, or None
    (DRF then re-raises: a bug is a 500 as ever)."""
    request = context.get("request")
    if isinstance(exc, EncounterError):
        return encounter_problem(exc).response(request)
    if isinstance(exc, SuspiciousOperation):
        return request_problem(exc).response(request)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, exceptions.APIException):
        return api_problem(exc).response(request)
    return None


@csrf_exempt
def not_found_view(request: HttpRequest, unmatched: str = "") -> JsonResponse:
    """The last route of the API's URLs: any other path under them, whatever the method, is a
    ``404`` Problem (not the project's HTML page), naming the path and, when it only lacks its
    trailing slash, the one that exists."""
    detail = f"No endpoint of the encounters API at {request.path}."
    if not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        if match is not None and match.func is not not_found_view:
            detail += f" Did you mean {request.path}/ (with a trailing slash)?"
    body = Problem(404, None, detail).body(request.path)
    return JsonResponse(body, status=404, content_type=CONTENT_TYPE)
