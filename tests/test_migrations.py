"""The committed migrations match the models (nothing left for ``makemigrations`` to write)."""

from __future__ import annotations

import io

import pytest
from django.apps import apps
from django.core.management import call_command

# The apps whose migrations this project owns: the package and the test subjects.
OWN_APPS = ("django_encounters", "tests.testapp")


def _own_app_labels() -> list[str]:
    labels = [config.label for config in apps.get_app_configs() if config.name in OWN_APPS]
    assert len(labels) == len(OWN_APPS), f"expected apps {OWN_APPS} installed, found {labels}"
    return labels


@pytest.mark.django_db
def test_no_missing_migrations() -> None:
    out = io.StringIO()
    try:
        call_command(
            "makemigrations",
            *_own_app_labels(),
            "--check",
            "--dry-run",
            "-v",
            "3",
            stdout=out,
            stderr=out,
        )
    except SystemExit as exc:  # makemigrations --check exits 1 when it would write a migration
        pytest.fail(
            f"models and migrations differ (makemigrations --check exit {exc.code}); run "
            f"`python -m django makemigrations --settings=tests.settings`:\n{out.getvalue()}"
        )


@pytest.mark.django_db
def test_package_ships_an_initial_migration() -> None:
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    label = apps.get_app_config("django_encounters").label
    assert (label, "0001_initial") in loader.disk_migrations
