"""Settings for the django-encounters example project: the clinic app (``clinic``, whose
``Patient`` is the encounters' subject) and Django's admin at ``/admin/``.

Two ways in:

* ``make demo`` runs ``example/demo.py``, the usage example on a fresh SQLite database;
* ``make admin-demo`` runs ``manage.py migrate``, ``manage.py seed_clinic`` (patients, visits,
  the superuser ``admin``/``admin``) and ``manage.py runserver``: log in at
  http://127.0.0.1:8000/admin/.

The SQLite database file is ``$ENCOUNTERS_DEMO_DB`` when set — ``example/demo.py`` points it at a
fresh temporary directory on every run — and ``example/demo.sqlite3`` otherwise (what
``make admin-demo`` keeps between runs; ``make clean`` deletes it).

Not for production: the secret key is public and ``DEBUG`` is on (runserver serves the admin's
static files only then).
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
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_encounters",
    "clinic",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]

STATIC_URL = "static/"

_options: dict[str, object] = {}
if django.VERSION >= (5, 1):
    # Writers queue for the lock instead of failing with "database is locked": the admin's
    # requests (runserver serves each in its own thread) and the seed write concurrently.
    _options["transaction_mode"] = "IMMEDIATE"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("ENCOUNTERS_DEMO_DB") or str(BASE_DIR / "demo.sqlite3"),
        "OPTIONS": _options,
    }
}
