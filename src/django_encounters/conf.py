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
``ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE``
    Rows per page of an encounter's timeline in the admin (its page and History; "show all"
    shows every row). A whole number from 1 to 10,000. Default: 50.
``ENCOUNTERS_ADMIN_TIMELINE_ORDER``
    ``"newest"`` (newest business time first, the default) or ``"oldest"``: the order the
    admin shows a timeline in (a link on the page flips it).
``ENCOUNTERS_LATE_ENTRY_TOLERANCE``
    How long after its effective (business) time a row may be recorded before the admin marks
    it a *late entry*. A ``timedelta`` or seconds, not negative. Default: 1 hour.
``ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS``
    The window of the process map a definition's admin page loads (apart from the page, when
    it has been shown): the rows effective in the last this many days; ``None`` for the whole
    log. The page offers the other windows. Default: 30.
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


DEFAULT_ADMIN_TIMELINE_PAGE_SIZE = 50
MAX_ADMIN_TIMELINE_PAGE_SIZE = 10_000
DEFAULT_LATE_ENTRY_TOLERANCE = timedelta(hours=1)
DEFAULT_ADMIN_PROCESS_MAP_DAYS = 30


def admin_timeline_page_size() -> int:
    value = getattr(
        settings, "ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE", DEFAULT_ADMIN_TIMELINE_PAGE_SIZE
    )
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_ADMIN_TIMELINE_PAGE_SIZE
    ):
        raise EncounterConfigurationError(
            "ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE must be a whole number from 1 to "
            f"{MAX_ADMIN_TIMELINE_PAGE_SIZE:,}, not {value!r}"
        )
    return value


def admin_timeline_order() -> str:
    value = getattr(settings, "ENCOUNTERS_ADMIN_TIMELINE_ORDER", "newest")
    if value not in ("newest", "oldest"):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_ADMIN_TIMELINE_ORDER must be 'newest' or 'oldest', not {value!r}"
        )
    return str(value)


def late_entry_tolerance() -> timedelta:
    value = getattr(settings, "ENCOUNTERS_LATE_ENTRY_TOLERANCE", DEFAULT_LATE_ENTRY_TOLERANCE)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = value
    else:
        raise EncounterConfigurationError(
            "ENCOUNTERS_LATE_ENTRY_TOLERANCE must be a timedelta or a finite number of seconds, "
            f"not {value!r}"
        )
    if seconds < 0:
        raise EncounterConfigurationError(
            f"ENCOUNTERS_LATE_ENTRY_TOLERANCE must not be negative, not {value!r}"
        )
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def admin_process_map_days() -> int | None:
    value = getattr(settings, "ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS", DEFAULT_ADMIN_PROCESS_MAP_DAYS)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 36_500:
        raise EncounterConfigurationError(
            "ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS must be a whole number of days from 1 to 36,500 "
            f"or None (the whole log), not {value!r}"
        )
    return value


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
