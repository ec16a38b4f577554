"""Django settings for the test suite.

The database is chosen by ``ENCOUNTERS_TEST_DB``: ``sqlite`` (the default), ``postgres`` or
``citus`` (PostgreSQL with the Citus extension, the tables distributed).
PostgreSQL connection parameters come from the standard libpq variables (``PGHOST``, ``PGPORT``,
``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``), which ``scripts/run_tests.sh`` sets for the throwaway
cluster it starts.
"""

from __future__ import annotations

import os

import django

SECRET_KEY = "django-encounters-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# For the tests only, never in a real project: MD5 is not a safe way to store passwords. Django's
# default (PBKDF2) is slow on purpose, a large fraction of a second per hash, and the admin tests
# create and log in users in many fixtures; nothing in the suite depends on which hasher is used.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_encounters",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
# The admin's CSS and JavaScript, served by the live server of the browser tests.
STATIC_URL = "/static/"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# The REST API's tests (tests/test_rest_api.py): pages of 3, so that paging shows with a few
# encounters; APIClient sends JSON.
REST_FRAMEWORK = {
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 3,
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

DB_VENDOR = os.environ.get("ENCOUNTERS_TEST_DB", "sqlite")

if DB_VENDOR in ("postgres", "citus"):
    # "citus": the coordinator of a local Citus cluster (scripts/citus_cluster.sh), whose test
    # database exists beforehand on every node with the extension (tests/conftest.py keeps it
    # and distributes the tables with `distribute_encounters` once migrated).
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("PGDATABASE", "encounters"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "TEST": {"NAME": os.environ.get("ENCOUNTERS_TEST_DB_NAME", "test_encounters")},
        }
    }
    if os.environ.get("ENCOUNTERS_TEST_PG_PREPARED"):
        # Server-side binding with prepared statements (docs/guides/databases.md).
        DATABASES["default"]["OPTIONS"] = {"server_side_binding": True, "prepare_threshold": 1}
elif DB_VENDOR == "sqlite":
    _options: dict[str, object] = {}
    if django.VERSION >= (5, 1):
        # Writers wait for each other instead of failing with "database is locked".
        _options["transaction_mode"] = "IMMEDIATE"
    else:
        # Django 4.2 has no transaction_mode: the check that asks for it (W002) would print
        # its warning in every command the tests run; tests/test_checks.py checks it directly.
        SILENCED_SYSTEM_CHECKS = ["django_encounters.W002"]
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("ENCOUNTERS_SQLITE_PATH", ":memory:"),
            "OPTIONS": _options,
            "TEST": {"NAME": os.environ.get("ENCOUNTERS_SQLITE_TEST_PATH") or None},
        }
    }
else:  # pragma: no cover - configuration error
    raise RuntimeError(
        f"ENCOUNTERS_TEST_DB must be 'sqlite', 'postgres' or 'citus', not {DB_VENDOR!r}"
    )

# A second alias for the read-replica tests (tests/test_replicas.py): a database of its own,
# migrated like the default one, which those tests fill with an older copy of the default's
# rows — a replica that lags. Nothing routes to it unless a test says so.
DATABASES["replica"] = {
    **DATABASES["default"],
    "TEST": {
        "NAME": (
            os.environ.get("ENCOUNTERS_TEST_DB_NAME", "test_encounters") + "_replica"
            if DB_VENDOR != "sqlite"
            else None
        )
    },
}


# A child process of the backup tests audits a restored database with the seal key it was sealed
# with (or another one): the key comes from the environment, as the docs advise.
if os.environ.get("ENCOUNTERS_TEST_SEAL_KEY"):
    ENCOUNTERS_SEAL_KEYS = {"k1": os.environ["ENCOUNTERS_TEST_SEAL_KEY"]}
