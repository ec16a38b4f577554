"""System checks (``manage.py check``): settings that make the store unsafe or wrong.

* ``django_encounters.E001`` (error): ``USE_TZ`` is off;
* ``django_encounters.E002`` (error): ``ENCOUNTERS_FUTURE_TOLERANCE`` is not a duration from 0 to
  a day;
* ``django_encounters.E003`` (error): ``ENCOUNTERS_VALIDATOR_MODULES`` is not a list of module
  prefixes;
* ``django_encounters.E004`` (error): ``ENCOUNTERS_REST_REQUIRE_IF_MATCH`` is not a bool;
* ``django_encounters.E005`` (error): ``ENCOUNTERS_SEAL_KEYS`` / ``ENCOUNTERS_SEAL_KEY_ID``
  unusable (a secret shorter than 32 bytes, a malformed key id, an unknown current key);
* ``django_encounters.E006`` (error): ``ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS`` names a model
  that is not installed or a field it does not have;
* ``django_encounters.E007`` (error): an ``ENCOUNTERS_FHIR_*`` setting of the wrong shape;
* ``django_encounters.E008`` (error): an admin display setting (``ENCOUNTERS_ADMIN_TIMELINE_*``,
  ``ENCOUNTERS_LATE_ENTRY_TOLERANCE``, ``ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS``) has a value it
  cannot use;
* ``django_encounters.E010`` (error): ``ENCOUNTERS_MAX_REASON_LENGTH``,
  ``ENCOUNTERS_MAX_CONTEXT_BYTES`` or ``ENCOUNTERS_MAX_CONTEXT_DEPTH`` is not a positive int
  (the depth at most 500);
* ``django_encounters.E011`` (error): a SQLite database sets ``OPTIONS["transaction_mode"]`` or
  ``OPTIONS["init_command"]`` on Django < 5.1, which has neither (``migrate`` would crash);
* ``django_encounters.E012`` (error): ``ENCOUNTERS_ALLOW_DROPPING_LOG`` is not a bool;
* ``django_encounters.W001`` (warning, ``--deploy``): ``ENCOUNTERS_VALIDATOR_MODULES`` is unset;
* ``django_encounters.W004`` (warning, ``--deploy``): ``ENCOUNTERS_SEAL_KEYS`` is unset: the
  log is not sealed;
* ``django_encounters.W002`` (warning): a SQLite database without
  ``transaction_mode="IMMEDIATE"`` (nor, before Django 5.1, a backend that begins immediate);
* ``django_encounters.W003`` (warning): an ``ENCOUNTERS_*`` setting the package does not know.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib import import_module
from typing import Any

import django
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from . import conf
from .exceptions import EncounterConfigurationError

PREFIX = "ENCOUNTERS_"
#: Every setting the package reads.
KNOWN_SETTINGS = (
    "ENCOUNTERS_FUTURE_TOLERANCE",
    "ENCOUNTERS_VALIDATOR_MODULES",
    "ENCOUNTERS_REST_REQUIRE_IF_MATCH",
    "ENCOUNTERS_SEAL_KEYS",
    "ENCOUNTERS_SEAL_KEY_ID",
    "ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM",
    "ENCOUNTERS_FHIR_STATUS_MAPS",
    "ENCOUNTERS_FHIR_SUBJECT_RESOLVER",
    "ENCOUNTERS_SUBJECT_MODELS",
    "ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS",
    # The admin's timeline and process map (issue 21)
    "ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE",
    "ENCOUNTERS_ADMIN_TIMELINE_ORDER",
    "ENCOUNTERS_LATE_ENTRY_TOLERANCE",
    "ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS",
    "ENCOUNTERS_MAX_REASON_LENGTH",
    "ENCOUNTERS_MAX_CONTEXT_BYTES",
    "ENCOUNTERS_MAX_CONTEXT_DEPTH",
    "ENCOUNTERS_ALLOW_DROPPING_LOG",
)


@checks.register()
def check_use_tz(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    if getattr(settings, "USE_TZ", False):
        return []
    return [checks.Error(conf.USE_TZ_OFF, hint=conf.USE_TZ_FIX, id="django_encounters.E001")]


@checks.register(checks.Tags.security, deploy=True)
def check_validator_modules(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    if getattr(settings, "ENCOUNTERS_VALIDATOR_MODULES", None) is not None:
        return []
    return [
        checks.Warning(
            "ENCOUNTERS_VALIDATOR_MODULES is not set: any module can be named as a definition's "
            "validator, and naming one imports it (running its import-time code) even when the "
            "entry is then refused. Anyone who may edit definitions (e.g. staff in the admin) "
            "can trigger that.",
            hint="Set ENCOUNTERS_VALIDATOR_MODULES = ['myapp.validators'] (the package's own "
            "validators are always allowed).",
            id="django_encounters.W001",
        )
    ]


@checks.register(checks.Tags.security, deploy=True)
def check_seal_keys(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    if getattr(settings, "ENCOUNTERS_SEAL_KEYS", None):
        return []
    return [
        checks.Warning(
            "ENCOUNTERS_SEAL_KEYS is not set: the log is not sealed. Whoever can write to the "
            "database (the application's own role included, e.g. through one SQL injection) "
            "can append rows, definition versions and acknowledgements with correct hashes, "
            "and the audit cannot tell.",
            hint='Set ENCOUNTERS_SEAL_KEYS = {"k1": os.environ["ENCOUNTERS_SEAL_KEY"]} (at '
            "least 32 bytes, kept outside the database) and run manage.py seal_encounters.",
            id="django_encounters.W004",
        )
    ]


@checks.register()
def check_settings(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    """Each ``ENCOUNTERS_*`` setting read as the package reads it when used: an unusable value
    is an error now rather than an ``EncounterConfigurationError`` at the first transition."""
    readers: list[tuple[str, Callable[[], Any], str, str]] = [
        (
            "ENCOUNTERS_FUTURE_TOLERANCE",
            conf.future_tolerance,
            "django_encounters.E002",
            "Set it to a timedelta (or seconds) from 0 to one day, e.g. timedelta(minutes=5), "
            "or remove it for the default.",
        ),
        (
            "ENCOUNTERS_VALIDATOR_MODULES",
            conf.validator_modules,
            "django_encounters.E003",
            "Set it to a list of dotted module prefixes, e.g. ['myapp.validators'], or remove it.",
        ),
        (
            "ENCOUNTERS_SEAL_KEYS",
            conf.sealer,
            "django_encounters.E005",
            'Set ENCOUNTERS_SEAL_KEYS = {"<key id>": os.environ["..."]} with secrets of at '
            "least 32 bytes, and ENCOUNTERS_SEAL_KEY_ID to one of its key ids.",
        ),
        (
            "ENCOUNTERS_REST_REQUIRE_IF_MATCH",
            conf.rest_require_if_match,
            "django_encounters.E004",
            "Set it to True or False, or remove it for the default (False).",
        ),
        (
            "ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM",
            conf.fhir_identifier_system,
            "django_encounters.E007",
            "Set it to a URI naming your encounter ids, or remove it for the default.",
        ),
        (
            "ENCOUNTERS_FHIR_STATUS_MAPS",
            conf.fhir_status_maps,
            "django_encounters.E007",
            'Set it to {"<definition code>": {"R4": {state: code}, "R5": {...}, '
            '"subjectStatus": {...}, "class": {...}, "subject_type": "Patient"}} '
            "(docs/guides/fhir.md), or remove it.",
        ),
        (
            "ENCOUNTERS_FHIR_SUBJECT_RESOLVER",
            conf.fhir_subject_resolver,
            "django_encounters.E007",
            "Set it to the dotted path of a function (reference, definition) -> subject.",
        ),
        (
            "ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS",
            _subject_search_fields,
            "django_encounters.E006",
            'Set it to {"app_label.model": ["field", ...]} naming installed subject models and '
            "their fields as ModelAdmin.search_fields would, or remove it.",
        ),
        *(
            (
                name,
                read,
                "django_encounters.E008",
                "Remove it for the default, or see docs/admin.md.",
            )
            for name, read in (
                ("ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE", conf.admin_timeline_page_size),
                ("ENCOUNTERS_ADMIN_TIMELINE_ORDER", conf.admin_timeline_order),
                ("ENCOUNTERS_LATE_ENTRY_TOLERANCE", conf.late_entry_tolerance),
                ("ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS", conf.admin_process_map_days),
            )
        ),
        (
            "ENCOUNTERS_MAX_REASON_LENGTH",
            conf.max_reason_length,
            "django_encounters.E010",
            "Set it to a positive int (characters), or remove it for the default (10000).",
        ),
        (
            "ENCOUNTERS_MAX_CONTEXT_BYTES",
            conf.max_context_bytes,
            "django_encounters.E010",
            "Set it to a positive int (bytes), or remove it for the default (65536).",
        ),
        (
            "ENCOUNTERS_MAX_CONTEXT_DEPTH",
            conf.max_context_depth,
            "django_encounters.E010",
            "Set it to an int from 1 to 500, or remove it for the default (20).",
        ),
        (
            "ENCOUNTERS_ALLOW_DROPPING_LOG",
            conf.allow_dropping_log,
            "django_encounters.E012",
            "Set it to True or False, or remove it for the default (False: a backwards "
            "migration that would drop a log holding transitions is refused).",
        ),
    ]
    found: list[checks.CheckMessage] = []
    for name, read, check_id, hint in readers:
        try:
            read()
        except EncounterConfigurationError as exc:
            found.append(checks.Error(str(exc), hint=hint, obj=name, id=check_id))
    for name in sorted(n for n in dir(settings) if n.startswith(PREFIX)):
        if name not in KNOWN_SETTINGS:
            # Compared without the common prefix, which would make every name look close.
            suffixes = {known.removeprefix(PREFIX): known for known in KNOWN_SETTINGS}
            close = [
                suffixes[m]
                for m in difflib.get_close_matches(name.removeprefix(PREFIX), suffixes, n=1)
            ]
            found.append(
                checks.Warning(
                    f"{name} is not a django-encounters setting; it has no effect.",
                    hint=f"Did you mean {close[0]}?"
                    if close
                    else f"Known: {', '.join(KNOWN_SETTINGS)}.",
                    obj=name,
                    id="django_encounters.W003",
                )
            )
    return found


def _subject_search_fields() -> Any:
    """``ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS`` resolved as the admin resolves it (models
    and fields), when the admin is installed; else its shape only."""
    from django.apps import apps

    if not apps.is_installed("django.contrib.admin"):
        return conf.admin_subject_search_fields()
    from .admin.common import configured_subject_search

    return configured_subject_search()


#: The SQLite ``OPTIONS`` Django 5.1 introduced; older releases hand every option to
#: ``sqlite3.connect()``, which fails with ``TypeError`` at the first connection (``migrate``).
SQLITE_OPTIONS_SINCE_5_1 = ("transaction_mode", "init_command")


@checks.register()  # settings only, no connection: not tagged "database" (run without --database)
def check_sqlite_transaction_mode(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    """SQLite's default deferred transactions take the write lock only at the first write: a
    ``transition()`` that waited would fail with "database is locked" instead of waiting its
    turn. ``transaction_mode="IMMEDIATE"`` (Django 5.1+) takes it at ``BEGIN``; on older Django
    that option (and ``init_command``) is an error."""
    return sqlite_messages(settings.DATABASES, django.VERSION)


def sqlite_messages(
    databases: dict[str, dict[str, Any]], django_version: tuple[Any, ...]
) -> list[checks.CheckMessage]:
    """W002 and E011 for the SQLite aliases of ``databases`` under Django ``django_version``
    (a parameter, so that both sides of the 5.1 boundary are tested on any release)."""
    found: list[checks.CheckMessage] = []
    modern = tuple(django_version[:2]) >= (5, 1)
    release = ".".join(str(part) for part in django_version[:2])
    for alias, database in databases.items():
        wrapper = _sqlite_backend(database)
        if wrapper is None:
            continue
        options: dict[str, Any] = database.get("OPTIONS") or {}
        unsupported = [name for name in SQLITE_OPTIONS_SINCE_5_1 if name in options]
        if unsupported and not modern:
            names = " and ".join(f'OPTIONS["{name}"]' for name in unsupported)
            found.append(
                checks.Error(
                    f"database {alias!r} sets {names}, which Django {release} does not know: "
                    "it passes every option to sqlite3.connect(), so the first connection (e.g. "
                    "migrate) fails with TypeError.",
                    hint=f"Remove {names} from DATABASES[{alias!r}] (Django 5.1 or later "
                    "supports them); for writers that wait for each other on this Django, use a "
                    "backend whose transactions begin with BEGIN IMMEDIATE (docs: SQLite or "
                    "PostgreSQL, 'SQLite on Django 4.2').",
                    obj=f"DATABASES[{alias!r}]",
                    id="django_encounters.E011",
                )
            )
            continue
        mode = str(options.get("transaction_mode") or "DEFERRED")
        if mode.upper() == "IMMEDIATE" or getattr(wrapper, "begins_immediate", False):
            continue
        if modern:
            hint = (
                f'Add "transaction_mode": "IMMEDIATE" to DATABASES["{alias}"]["OPTIONS"], so '
                "that concurrent writers wait for each other."
            )
        else:
            hint = (
                f"Django {release} has no OPTIONS['transaction_mode'] (5.1+ has): use a backend "
                "whose transactions begin with BEGIN IMMEDIATE (docs: SQLite or PostgreSQL, "
                "'SQLite on Django 4.2'), upgrade Django, or use PostgreSQL."
            )
        found.append(
            checks.Warning(
                f"database {alias!r} is SQLite in {mode} transaction mode: concurrent "
                "transition() calls on it fail with 'database is locked' instead of waiting "
                "(the row lock of transition() is a no-op on SQLite; the write lock at BEGIN "
                "is what serialises writers).",
                hint=hint,
                obj=f"DATABASES[{alias!r}]",
                id="django_encounters.W002",
            )
        )
    return found


def _sqlite_backend(database: dict[str, Any]) -> type | None:
    """The ``DatabaseWrapper`` class of the alias when it is SQLite — Django's backend or one
    derived from it, such as the Django 4.2 recipe whose ``begins_immediate = True`` says its
    transactions begin with ``BEGIN IMMEDIATE`` — else None."""
    engine = str(database.get("ENGINE", ""))
    if engine.endswith("sqlite3"):
        from django.db.backends.sqlite3.base import DatabaseWrapper

        return DatabaseWrapper
    try:
        wrapper = getattr(import_module(f"{engine}.base"), "DatabaseWrapper", None)
    except (ImportError, ImproperlyConfigured):
        return None
    from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteWrapper

    return wrapper if isinstance(wrapper, type) and issubclass(wrapper, SQLiteWrapper) else None
