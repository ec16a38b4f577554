"""System checks: unusable ``ENCOUNTERS_*`` settings are errors at ``manage.py check`` time (not
at the first transition), typos and SQLite's deferred transactions are warnings naming what to
change."""

from __future__ import annotations

import io
import math
from datetime import timedelta
from typing import Any

import django
import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test.utils import override_settings

from django_encounters.checks import check_settings, check_sqlite_transaction_mode


def _ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


@pytest.mark.parametrize(
    "value",
    ["5 minutes", timedelta(days=2), -1, math.nan, math.inf, True, None],
    ids=["text", "two days", "negative", "nan", "infinite", "bool", "None"],
)
def test_an_unusable_future_tolerance_is_an_error(value: Any) -> None:
    with override_settings(ENCOUNTERS_FUTURE_TOLERANCE=value):
        [error] = check_settings(None)
    assert error.id == "django_encounters.E002"
    assert error.obj == "ENCOUNTERS_FUTURE_TOLERANCE"
    assert "ENCOUNTERS_FUTURE_TOLERANCE must" in error.msg
    assert "timedelta" in error.hint


@pytest.mark.parametrize("value", [timedelta(0), timedelta(minutes=5), 60, 86400.0])
def test_a_usable_future_tolerance_passes(value: Any) -> None:
    with override_settings(ENCOUNTERS_FUTURE_TOLERANCE=value):
        assert check_settings(None) == []


@pytest.mark.parametrize(
    "value", ["myapp.validators", ["myapp", ""], [3]], ids=["a string", "empty", "number"]
)
def test_unusable_validator_modules_are_an_error(value: Any) -> None:
    with override_settings(ENCOUNTERS_VALIDATOR_MODULES=value):
        [error] = check_settings(None)
    assert error.id == "django_encounters.E003"
    assert repr(value) in error.msg


def test_a_misspelt_setting_is_a_warning_with_the_right_name() -> None:
    with override_settings(ENCOUNTERS_FUTURE_TOLERANCES=60, ENCOUNTERS_COLOUR="red"):
        warnings = check_settings(None)
    assert _ids(warnings) == ["django_encounters.W003", "django_encounters.W003"]
    colour, tolerance = warnings
    assert tolerance.obj == "ENCOUNTERS_FUTURE_TOLERANCES"
    assert tolerance.hint == "Did you mean ENCOUNTERS_FUTURE_TOLERANCE?"
    assert "has no effect" in tolerance.msg
    assert colour.hint.startswith("Known: ENCOUNTERS_FUTURE_TOLERANCE")


@pytest.mark.django_db(databases=["default", "replica"])  # Django 6's checks ask every database
def test_manage_py_check_fails_on_an_unusable_setting() -> None:
    out = io.StringIO()
    with override_settings(ENCOUNTERS_FUTURE_TOLERANCE="soon"):
        with pytest.raises(SystemCheckError, match=r"django_encounters\.E002"):
            call_command("check", stdout=out, stderr=out)


@pytest.mark.django_db(databases=["default", "replica"])
@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_manage_py_check_shows_the_sqlite_warning_without_database_flag() -> None:
    out = io.StringIO()
    databases = _databases(default={"ENGINE": SQLITE})
    with override_settings(DATABASES=databases, SILENCED_SYSTEM_CHECKS=[]):
        call_command("check", stdout=out, stderr=out)
    assert "django_encounters.W002" in out.getvalue()
    assert "'default' is SQLite in DEFERRED transaction mode" in out.getvalue()


SQLITE = "django.db.backends.sqlite3"


def _databases(**aliases: dict[str, Any]) -> dict[str, Any]:
    return {alias: {"NAME": ":memory:", **options} for alias, options in aliases.items()}


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_sqlite_without_immediate_transactions_is_a_warning_naming_the_alias() -> None:
    databases = _databases(
        default={"ENGINE": SQLITE, "OPTIONS": {"transaction_mode": "IMMEDIATE"}},
        reports={"ENGINE": SQLITE},
        legacy={"ENGINE": SQLITE, "OPTIONS": {"transaction_mode": "DEFERRED"}},
        warehouse={"ENGINE": "django.db.backends.postgresql"},
    )
    with override_settings(DATABASES=databases):
        warnings = check_sqlite_transaction_mode(None)
    if django.VERSION < (5, 1):  # transaction_mode itself is an error there (E011)
        assert _ids(warnings) == [
            "django_encounters.E011",
            "django_encounters.W002",
            "django_encounters.E011",
        ]
        reports = warnings[1]
        assert reports.obj == "DATABASES['reports']"
        assert "BEGIN IMMEDIATE" in reports.hint
        return
    assert _ids(warnings) == ["django_encounters.W002"] * 2
    reports, legacy = warnings
    assert reports.obj == "DATABASES['reports']"
    assert "'reports' is SQLite in DEFERRED transaction mode" in reports.msg
    assert "database is locked" in reports.msg
    assert 'DATABASES["reports"]["OPTIONS"]' in reports.hint
    assert '"transaction_mode": "IMMEDIATE"' in reports.hint
    assert legacy.obj == "DATABASES['legacy']"


def test_the_test_settings_pass_every_check() -> None:
    """The suite's own settings are what the docs recommend: no message from the package
    (but W002 under Django < 5.1, which has no transaction_mode)."""
    expected = [] if django.VERSION >= (5, 1) else ["django_encounters.W002"]
    from django_encounters.checks import check_use_tz

    found = check_settings(None) + check_use_tz(None) + check_sqlite_transaction_mode(None)
    if all(not str(d["ENGINE"]).endswith("sqlite3") for d in _settings_databases()):
        expected = []
    assert sorted(set(_ids(found))) == expected


def _settings_databases() -> list[dict[str, Any]]:
    from django.conf import settings

    return list(settings.DATABASES.values())
