"""Settings of django-encounters, each read when first asked for (never at import time) and
read again after Django's ``setting_changed`` signal, so the pytest ``settings`` fixture and
``override_settings`` work. Change them through those, not by assigning to
``django.conf.settings`` at run time.

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
``ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM``
    The ``system`` of the ``identifier`` every exported FHIR ``Encounter`` carries (a URI naming
    your installation's encounter ids); its ``value`` is the encounter's id. Default:
    ``"urn:ietf:rfc:3986"``, with the value then written as ``urn:uuid:<id>``.
``ENCOUNTERS_FHIR_STATUS_MAPS``
    Per definition code, how its states are written in FHIR: ``{"CODE": {"R4": {state: code},
    "R5": {state: code}, "subjectStatus": {state: code}, "class": {"system", "code",
    "display"}, "subject_type": "Patient"}}``, every key optional (``docs/guides/fhir.md``).
    Default: ``{}`` (state names must then be FHIR codes themselves).
``ENCOUNTERS_FHIR_SUBJECT_RESOLVER``
    The dotted path of a function ``(reference: dict, definition) -> model instance | None``
    that ``import_fhir_encounters`` asks for the subject of each imported encounter. Default:
    ``None`` (the import needs ``--subject-resolver``).
``ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS``
    ``{"app_label.model": ["field", ...]}``: the fields of a subject model the encounter admin's
    search box (and its subject search on "Add encounter") looks in, written as a
    ``ModelAdmin.search_fields`` entry (``"name"``, ``"^name"``, ``"=code"``, ``"owner__email"``).
    A model named here is searched by these fields; a model not named here is searched by the
    ``search_fields`` of its own admin when it is registered in the same admin site, else not by
    its fields at all. Default: ``{}``.
``ENCOUNTERS_SUBJECT_MODELS``
    The subject models whose deletes the subject guard checks (``django_encounters.subjects``):
    a list of ``"app_label.Model"`` (each refuses while encounters are about the subject), or a
    dict ``{"app_label.Model": "refuse" | "soft_delete"}``. Read once, when the app is ready.
    Default: none (``protect_subjects()`` registers models in code).
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
``ENCOUNTERS_MAX_REASON_LENGTH``
    The longest ``reason`` ``transition()`` and ``upgrade_encounter()`` store, in characters
    (a positive int). Default: 10,000.
``ENCOUNTERS_MAX_CONTEXT_BYTES``
    The largest ``context`` of a transition (and ``metadata`` of a new encounter), as UTF-8
    JSON, in bytes (a positive int). Default: 65,536 (64 KiB).
``ENCOUNTERS_MAX_CONTEXT_DEPTH``
    The deepest nesting of objects and arrays in that ``context``/``metadata`` (``{}`` is
    depth 1; an int from 1 to 500). Default: 20.
``ENCOUNTERS_ALLOW_DROPPING_LOG``
    Whether unapplying the package's migrations (``manage.py migrate django_encounters zero``,
    or back to any earlier migration) may proceed on a database that holds transitions: it
    drops the log's seals, its append-only triggers and, at ``zero``, the log itself. ``True``
    or ``False``. Default: ``False`` (refused with ``LogDropRefusedError``, nothing changed).

``USE_TZ`` must be on (system check ``django_encounters.E001``); with the checks skipped, the
write path refuses with the same message (:func:`require_use_tz`).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

from .engine.seals import KEY_ID, MIN_SECRET_BYTES, Sealer
from .exceptions import EncounterConfigurationError

DEFAULT_FUTURE_TOLERANCE = timedelta(minutes=5)
#: What the subject guard does when encounters are about a subject being deleted: refuse (the
#: default), or soft-delete them and let the subject go (``django_encounters.subjects``).
REFUSE = "refuse"
SOFT_DELETE = "soft_delete"
ON_DELETE_CHOICES = (REFUSE, SOFT_DELETE)
#: The largest future tolerance accepted: it is for clock skew, not for scheduling.
MAX_FUTURE_TOLERANCE = timedelta(days=1)


_UNSET = object()
#: The package's settings as read, by name (``_UNSET``: not set), and the settings object they
#: were read from. Django caches a setting that is set, but asking for one that is not (the
#: package's defaults, the usual case) raises and catches an ``AttributeError`` inside
#: ``django.conf`` on every call, several times per transition. What was read is forgotten when
#: the settings object is replaced (``override_settings`` and pytest-django's ``settings``
#: fixture put a new one in place, deletions included) or Django says a setting changed.
_read: dict[str, Any] = {}
_read_from: list[Any] = [None]


def _setting(name: str, default: Any = None) -> Any:
    """``getattr(settings, name, default)``, the lookup remembered until the settings change."""
    holder = settings.__dict__.get("_wrapped")
    if holder is not _read_from[0]:
        _read.clear()
        value = getattr(settings, name, _UNSET)  # configures the settings on first use
        _read_from[0] = settings.__dict__.get("_wrapped")
        _read[name] = value
    else:
        try:
            value = _read[name]
        except KeyError:
            value = _read[name] = getattr(settings, name, _UNSET)
    return default if value is _UNSET else value


def _forget(*, setting: str, **kwargs: Any) -> None:
    _read.pop(setting, None)


setting_changed.connect(_forget, dispatch_uid="django_encounters.conf._forget")


#: What is wrong with ``USE_TZ = False``: system check E001 and :func:`require_use_tz` say it.
USE_TZ_OFF = (
    "USE_TZ is off: django-encounters stores business and system times as aware UTC datetimes, "
    "compares them across app servers and hashes them into the audit chain; naive local times "
    "would be ambiguous (and shift at every DST change)."
)
USE_TZ_FIX = "Set USE_TZ = True."


def require_use_tz() -> None:
    """Refuse to write when ``USE_TZ`` is off: system check ``django_encounters.E001`` says so,
    but checks can be skipped (``--skip-checks``, a script, a test) or silenced, and the hash
    chain cannot take a naive time."""
    if not settings.USE_TZ:
        raise EncounterConfigurationError(
            f"{USE_TZ_OFF} {USE_TZ_FIX} (system check django_encounters.E001; nothing was written)"
        )


def allow_dropping_log() -> bool:
    """``ENCOUNTERS_ALLOW_DROPPING_LOG``: whether a backwards migration may drop a log that
    holds transitions (default False)."""
    value = _setting("ENCOUNTERS_ALLOW_DROPPING_LOG", False)
    if not isinstance(value, bool):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_ALLOW_DROPPING_LOG must be True or False, not {value!r}"
        )
    return value


def _seconds_setting(name: str, default: timedelta) -> tuple[Any, float]:
    """A duration setting as ``(value as given, seconds)``: a ``timedelta`` or a finite number
    of seconds, else ``EncounterConfigurationError`` naming it."""
    value = _setting(name, default)
    if isinstance(value, timedelta):
        return value, value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value, value
    raise EncounterConfigurationError(
        f"{name} must be a timedelta or a finite number of seconds, not {value!r}"
    )


def future_tolerance() -> timedelta:
    value, seconds = _seconds_setting("ENCOUNTERS_FUTURE_TOLERANCE", DEFAULT_FUTURE_TOLERANCE)
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
    value = _setting("ENCOUNTERS_ADMIN_TIMELINE_ORDER", "newest")
    if value not in ("newest", "oldest"):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_ADMIN_TIMELINE_ORDER must be 'newest' or 'oldest', not {value!r}"
        )
    return str(value)


def late_entry_tolerance() -> timedelta:
    value, seconds = _seconds_setting(
        "ENCOUNTERS_LATE_ENTRY_TOLERANCE", DEFAULT_LATE_ENTRY_TOLERANCE
    )
    if seconds < 0:
        raise EncounterConfigurationError(
            f"ENCOUNTERS_LATE_ENTRY_TOLERANCE must not be negative, not {value!r}"
        )
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def admin_process_map_days() -> int | None:
    value = _setting("ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS", DEFAULT_ADMIN_PROCESS_MAP_DAYS)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 36_500:
        raise EncounterConfigurationError(
            "ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS must be a whole number of days from 1 to 36,500 "
            f"or None (the whole log), not {value!r}"
        )
    return value


def validator_modules() -> list[str] | None:
    value = _setting("ENCOUNTERS_VALIDATOR_MODULES", None)
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_VALIDATOR_MODULES must be a list of module prefixes, not {value!r}"
        )
    return list(value)


def rest_require_if_match() -> bool:
    value = _setting("ENCOUNTERS_REST_REQUIRE_IF_MATCH", False)
    if not isinstance(value, bool):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_REST_REQUIRE_IF_MATCH must be True or False, not {value!r}"
        )
    return value


DEFAULT_FHIR_IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
#: The keys a definition's entry of ``ENCOUNTERS_FHIR_STATUS_MAPS`` may have.
FHIR_MAP_KEYS = ("R4", "R5", "subjectStatus", "class", "subject_type")


def fhir_identifier_system() -> str:
    value = _setting("ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM", DEFAULT_FHIR_IDENTIFIER_SYSTEM)
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise EncounterConfigurationError(
            "ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM must be a URI without spaces (e.g. "
            f"'https://hospital.example/fhir/encounter-id'), not {value!r}"
        )
    return value


def fhir_status_maps() -> dict[str, dict[str, Any]]:
    """``ENCOUNTERS_FHIR_STATUS_MAPS``, its shape checked (whether each code is one of its FHIR
    version's is checked when used, naming the encounter: ``FhirStatusError``)."""
    value = _setting("ENCOUNTERS_FHIR_STATUS_MAPS", None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EncounterConfigurationError(
            "ENCOUNTERS_FHIR_STATUS_MAPS must be a dict {definition code: {...}}, not "
            f"{type(value).__name__}"
        )
    for code, entry in value.items():
        where = f"ENCOUNTERS_FHIR_STATUS_MAPS[{code!r}]"
        if not isinstance(code, str) or not isinstance(entry, dict):
            raise EncounterConfigurationError(f"{where} must be a dict keyed by a definition code")
        unknown = sorted(str(key) for key in entry if key not in FHIR_MAP_KEYS)
        if unknown:
            raise EncounterConfigurationError(
                f"{where} has unknown keys {unknown} (known: {', '.join(FHIR_MAP_KEYS)})"
            )
        for key in ("R4", "R5", "subjectStatus"):
            states = entry.get(key, {})
            if not isinstance(states, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in states.items()
            ):
                raise EncounterConfigurationError(
                    f"{where}[{key!r}] must map state names to codes (text), not {states!r}"
                )
        coding = entry.get("class")
        if coding is not None and not (
            isinstance(coding, dict)
            and isinstance(coding.get("code"), str)
            and set(coding) <= {"system", "code", "display"}
        ):
            raise EncounterConfigurationError(
                f"{where}['class'] must be a Coding {{'system', 'code', 'display'}}, not {coding!r}"
            )
        subject_type = entry.get("subject_type")
        if subject_type is not None and not (
            isinstance(subject_type, str) and subject_type.isalpha()
        ):
            raise EncounterConfigurationError(
                f"{where}['subject_type'] must be a FHIR resource type such as 'Patient', not "
                f"{subject_type!r}"
            )
    return value


def fhir_subject_resolver() -> str | None:
    value = _setting("ENCOUNTERS_FHIR_SUBJECT_RESOLVER", None)
    if value is not None and (not isinstance(value, str) or "." not in value):
        raise EncounterConfigurationError(
            f"ENCOUNTERS_FHIR_SUBJECT_RESOLVER must be the dotted path of a function, not {value!r}"
        )
    return value


def admin_subject_search_fields() -> dict[str, list[str]]:
    """``ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS`` as ``"app_label.model" -> search fields``
    (labels lower-cased), its shape checked; the admin checks that each names an installed
    model and fields of it (``admin.common.configured_subject_search``)."""
    name = "ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS"
    value = _setting(name, None)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EncounterConfigurationError(
            f'{name} must be a dict {{"app_label.model": ["field", ...]}}, not {value!r}'
        )
    found: dict[str, list[str]] = {}
    for label, fields in value.items():
        if not isinstance(label, str) or label.count(".") != 1:
            raise EncounterConfigurationError(
                f"{name}: {label!r} is not an installed model ('app_label.model', e.g. "
                "'clinic.patient')"
            )
        if (
            isinstance(fields, str)
            or not isinstance(fields, (list, tuple))
            or not fields
            or not all(isinstance(f, str) and f.lstrip("^=@") for f in fields)
        ):
            raise EncounterConfigurationError(
                f"{name}[{label!r}] must be a non-empty list of field names, not {fields!r}"
            )
        found[label.lower()] = list(fields)
    return found


DEFAULT_MAX_REASON_LENGTH = 10_000
DEFAULT_MAX_CONTEXT_BYTES = 64 * 1024
DEFAULT_MAX_CONTEXT_DEPTH = 20
#: The deepest ``ENCOUNTERS_MAX_CONTEXT_DEPTH`` accepted: deeper JSON reaches Python's
#: recursion limit in the JSON encoder and in the databases' JSON functions.
MAX_CONTEXT_DEPTH = 500


def _limit(name: str, default: int, ceiling: int | None = None) -> int:
    value = _setting(name, default)
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
    value = _setting("ENCOUNTERS_SEAL_KEYS", None)
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
    value = _setting("ENCOUNTERS_SEAL_KEY_ID", None)
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
    keys_setting = _setting("ENCOUNTERS_SEAL_KEYS", None)
    key_id_setting = _setting("ENCOUNTERS_SEAL_KEY_ID", None)
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


def subject_models() -> dict[str, str]:
    """``ENCOUNTERS_SUBJECT_MODELS`` as ``{"app_label.Model": on_delete}`` ({} when unset)."""
    value = _setting("ENCOUNTERS_SUBJECT_MODELS", None) or {}
    if isinstance(value, (list, tuple)):
        value = dict.fromkeys(value, REFUSE)
    if not isinstance(value, dict) or not all(
        isinstance(label, str) and on_delete in ON_DELETE_CHOICES
        for label, on_delete in value.items()
    ):
        raise EncounterConfigurationError(
            "ENCOUNTERS_SUBJECT_MODELS must be a list of 'app_label.Model' or a dict "
            f"{{'app_label.Model': one of {ON_DELETE_CHOICES}}}, not {value!r}"
        )
    return value
