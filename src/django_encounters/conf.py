"""Settings of django-encounters, each read when called (never at import time), so the pytest
``settings`` fixture and ``override_settings`` work.

``ENCOUNTERS_FUTURE_TOLERANCE``
    How far in the future an ``effective_at`` may lie (clock skew between app servers).
    A ``timedelta`` or a number of seconds, from 0 to one day. Default: 5 minutes.
``ENCOUNTERS_VALIDATOR_MODULES``
    Optional list of dotted module prefixes that validator paths must live under
    (``"myapp.validators"`` admits ``myapp.validators`` and ``myapp.validators.x``).
    The package's own validators are always admitted. Default: ``None`` (no restriction).
``ENCOUNTERS_REST_REQUIRE_IF_MATCH``
    Whether the REST API (``django_encounters.contrib.rest_framework``) refuses a transition
    POST without an ``If-Match`` header (``428 Precondition Required``). Default: ``False``.
"""

from __future__ import annotations

import math
from datetime import timedelta

from django.conf import settings

from .exceptions import EncounterConfigurationError

DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)
#: The largest future tolerance accepted: it is for clock skew, not for scheduling.
MAX_FUTURE_TOLERANCE = timedelta(days=1)


def future_tolerance() -> timedelta:
    value = getattr(settings, "ENCOUNTERS_FUTURE_TOLERANCE", DEFAULT_FUTURE_TOLERANCE)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = value
    else:
        raise EncounterConfigurationError(
            "ENCOUNTERS_FUTURE_TOLERANCE must be a timedelta or a finite number of seconds, "
            f"not {value!r}"
        )
    if not 0 <= seconds <= MAX_FUTURE_TOLERANCE.total_seconds():
        raise EncounterConfigurationError(
            f"ENCOUNTERS_FUTURE_TOLERANCE must lie between 0 and {MAX_FUTURE_TOLERANCE} (it "
            f"allows for clock skew between app servers), not {value!r}"
        )
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def validator_modules() -> list[str] | None:
    value = getattr(settings, "ENCOUNTERS_VALIDATOR_MODULES", None)
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_VALIDATOR_MODULES must be a list of module prefixes, not {value!r}"
        )
    return list(value)


def rest_require_if_match() -> bool:
    value = getattr(settings, "ENCOUNTERS_REST_REQUIRE_IF_MATCH", False)
    if not isinstance(value, bool):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_REST_REQUIRE_IF_MATCH must be True or False, not {value!r}"
        )
    return value
