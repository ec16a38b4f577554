"""Settings of django-encounters, each read when called (never at import time), so the pytest
``settings`` fixture and ``override_settings`` work.

``ENCOUNTERS_FUTURE_TOLERANCE``
    How far in the future an ``effective_at`` may lie (clock skew between app servers).
    A ``timedelta`` or a number of seconds, from 0 to one day. Default: 5 minutes.
``ENCOUNTERS_VALIDATOR_MODULES``
    Optional list of dotted module prefixes that validator paths must live under
    (``"myapp.validators"`` admits ``myapp.validators`` and ``myapp.validators.x``).
    The package's own validators are always admitted. Default: ``None`` (no restriction).
``ENCOUNTERS_SEAL_KEYS``
    ``{"<key id>": "<secret>", ...}``: the keys seals are made and checked with (docs:
    "Who can do what"). Secrets come from the environment, never from the database; each at
    least 32 bytes; key ids 1–32 of ``A-Z a-z 0-9 . _ -``. Unset or empty: the log is not
    sealed, and the audit says so.
``ENCOUNTERS_SEAL_KEY_ID``
    The key new records are sealed with (one of ``ENCOUNTERS_SEAL_KEYS``; the others only
    verify, for rotation). Default: the only key, when there is exactly one.
``ENCOUNTERS_REST_REQUIRE_IF_MATCH``
    Whether the REST API (``django_encounters.contrib.rest_framework``) refuses a transition
    POST without an ``If-Match`` header (``428 Precondition Required``). Default: ``False``.
``ENCOUNTERS_MAX_REASON_LENGTH``
    The longest ``reason`` ``transition()`` and ``upgrade_encounter()`` store, in characters
    (a positive int). Default: 10,000.
``ENCOUNTERS_MAX_CONTEXT_BYTES``
    The largest ``context`` of a transition (and ``metadata`` of a new encounter), as UTF-8
    JSON, in bytes (a positive int). Default: 65,536 (64 KiB).
``ENCOUNTERS_MAX_CONTEXT_DEPTH``
    The deepest nesting of objects and arrays in that ``context``/``metadata`` (``{}`` is
    depth 1; an int from 1 to 500). Default: 20.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.conf import settings

from .engine.seals import KEY_ID, MIN_SECRET_BYTES, Sealer
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


DEFAULT_MAX_REASON_LENGTH = 10_000
DEFAULT_MAX_CONTEXT_BYTES = 64 * 1024
DEFAULT_MAX_CONTEXT_DEPTH = 20
#: The deepest ``ENCOUNTERS_MAX_CONTEXT_DEPTH`` accepted: deeper JSON reaches Python's
#: recursion limit in the JSON encoder and in the databases' JSON functions.
MAX_CONTEXT_DEPTH = 500


def _limit(name: str, default: int, ceiling: int | None = None) -> int:
    value = getattr(settings, name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (ceiling is not None and value > ceiling)
    ):
        bound = "a positive int" if ceiling is None else f"an int from 1 to {ceiling}"
        raise EncounterConfigurationError(f"{name} must be {bound}, not {value!r}")
    return value


def max_reason_length() -> int:
    """``ENCOUNTERS_MAX_REASON_LENGTH``: the longest reason stored, in characters."""
    return _limit("ENCOUNTERS_MAX_REASON_LENGTH", DEFAULT_MAX_REASON_LENGTH)


def max_context_bytes() -> int:
    """``ENCOUNTERS_MAX_CONTEXT_BYTES``: the largest context/metadata, UTF-8 JSON bytes."""
    return _limit("ENCOUNTERS_MAX_CONTEXT_BYTES", DEFAULT_MAX_CONTEXT_BYTES)


def max_context_depth() -> int:
    """``ENCOUNTERS_MAX_CONTEXT_DEPTH``: the deepest nesting of context/metadata."""
    return _limit("ENCOUNTERS_MAX_CONTEXT_DEPTH", DEFAULT_MAX_CONTEXT_DEPTH, MAX_CONTEXT_DEPTH)


def seal_keys() -> dict[str, bytes]:
    """``ENCOUNTERS_SEAL_KEYS`` as ``key id -> secret bytes`` ({} when unset or empty)."""
    value = getattr(settings, "ENCOUNTERS_SEAL_KEYS", None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EncounterConfigurationError(
            'ENCOUNTERS_SEAL_KEYS must be a dict {"<key id>": "<secret>"}, not '
            f"{type(value).__name__}"
        )
    keys: dict[str, bytes] = {}
    for key_id, secret in value.items():
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise EncounterConfigurationError(
                f"ENCOUNTERS_SEAL_KEYS: the key id {key_id!r} is not 1-32 letters, digits, "
                "'.', '_' or '-'"
            )
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, bytes):
            raise EncounterConfigurationError(
                f"ENCOUNTERS_SEAL_KEYS[{key_id!r}] must be text or bytes (its secret)"
            )
        if len(secret) < MIN_SECRET_BYTES:
            raise EncounterConfigurationError(
                f"ENCOUNTERS_SEAL_KEYS[{key_id!r}] is {len(secret)} bytes long; a seal key "
                f"needs at least {MIN_SECRET_BYTES} (e.g. secrets.token_urlsafe(48))"
            )
        keys[key_id] = secret
    return keys


def seal_key_id(keys: dict[str, bytes] | None = None) -> str | None:
    """``ENCOUNTERS_SEAL_KEY_ID``: the key new records are sealed with (the only key when
    there is one and it is unset; None without keys)."""
    keys = seal_keys() if keys is None else keys
    value = getattr(settings, "ENCOUNTERS_SEAL_KEY_ID", None)
    if value is None:
        if len(keys) > 1:
            raise EncounterConfigurationError(
                "ENCOUNTERS_SEAL_KEY_ID must name the key new records are sealed with (one of "
                f"{', '.join(sorted(keys))})"
            )
        return next(iter(keys), None)
    if value not in keys:
        known = ", ".join(sorted(keys)) or "none are configured"
        raise EncounterConfigurationError(
            f"ENCOUNTERS_SEAL_KEY_ID {value!r} is not a key of ENCOUNTERS_SEAL_KEYS ({known})"
        )
    return str(value)


#: ``(ENCOUNTERS_SEAL_KEYS, ENCOUNTERS_SEAL_KEY_ID, their Sealer)`` last built: every write
#: asks, and checking the keys again costs more than the seal itself.
_sealer_built: tuple[Any, Any, Sealer | None] | None = None


def sealer() -> Sealer | None:
    """The configured seal keys (None when there are none: the log is not sealed). Read when
    called; built again only when either setting's value changed since the last call."""
    global _sealer_built
    keys_setting = getattr(settings, "ENCOUNTERS_SEAL_KEYS", None)
    key_id_setting = getattr(settings, "ENCOUNTERS_SEAL_KEY_ID", None)
    built = _sealer_built
    if built is not None and built[0] == keys_setting and built[1] == key_id_setting:
        return built[2]
    keys = seal_keys()
    found = Sealer(keys, seal_key_id(keys)) if keys else None
    _sealer_built = (
        dict(keys_setting) if isinstance(keys_setting, dict) else keys_setting,
        key_id_setting,
        found,
    )
    return found
