"""System checks (``manage.py check``): settings that make the store unsafe or wrong."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register()
def check_use_tz(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    if getattr(settings, "USE_TZ", False):
        return []
    return [
        checks.Error(
            "USE_TZ is off: django-encounters stores business and system times as aware UTC "
            "datetimes, compares them across app servers and hashes them into the audit "
            "chain; naive local times would be ambiguous (and shift at every DST change).",
            hint="Set USE_TZ = True.",
            id="django_encounters.E001",
        )
    ]


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
