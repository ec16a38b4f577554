"""Settings of django-encounters, each read when called (never at import time), so the pytest
``settings`` fixture and ``override_settings`` work.

``ENCOUNTERS_FUTURE_TOLERANCE``
    How far in the future an ``effective_at`` may lie (clock skew between app servers).
    A ``timedelta`` or a number of seconds. Default: 5 minutes.
``ENCOUNTERS_VALIDATOR_MODULES``
    Optional list of dotted module prefixes that validator paths must live under
    (``"myapp.validators"`` admits ``myapp.validators`` and ``myapp.validators.x``).
    The package's own validators are always admitted. Default: ``None`` (no restriction).
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)


def future_tolerance() -> timedelta:
    value = getattr(settings, "ENCOUNTERS_FUTURE_TOLERANCE", DEFAULT_FUTURE_TOLERANCE)
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = timedelta(seconds=value)
    else:
        raise ImproperlyConfigured(
            f"ENCOUNTERS_FUTURE_TOLERANCE must be a timedelta or a number of seconds, not {value!r}"
        )
    if result < timedelta(0):
        raise ImproperlyConfigured(f"ENCOUNTERS_FUTURE_TOLERANCE must not be negative: {value!r}")
    return result


def validator_modules() -> list[str] | None:
    value = getattr(settings, "ENCOUNTERS_VALIDATOR_MODULES", None)
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ImproperlyConfigured(
            f"ENCOUNTERS_VALIDATOR_MODULES must be a list of module prefixes, not {value!r}"
        )
    return list(value)
