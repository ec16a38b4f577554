"""Settings for the django-encounters example project.

The SQLite database file is ``$ENCOUNTERS_DEMO_DB`` when set — ``example/demo.py`` points it at a
fresh temporary directory on every run — and ``example/demo.sqlite3`` otherwise (for ``manage.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import django

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "django-encounters-demo-not-secret"
DEBUG = True
ALLOWED_HOSTS: list[str] = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_encounters",
    "clinic",
]

_options: dict[str, object] = {}
if django.VERSION >= (5, 1):
    # Writers queue for the lock instead of failing with "database is locked".
    _options["transaction_mode"] = "IMMEDIATE"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("ENCOUNTERS_DEMO_DB") or str(BASE_DIR / "demo.sqlite3"),
        "OPTIONS": _options,
    }
}
