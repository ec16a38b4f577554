"""Every Python example of README.md and docs/ runs: the ```python blocks of each file are
extracted and executed in order, in one namespace per file, on the test database.

An example may take a few names for granted (``patient``, ``quarter_end``…): the namespace of its
file provides them (``_names_for``), with values the example works with. A block that is not
Python code (signatures, shell sessions) must be fenced as ``text``/``console``, not ``python``.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


def _names_for(name: str) -> dict[str, Any]:
    """The names the examples of document ``name`` take for granted."""
    from tests.testapp.models import Patient

    now = timezone.now()
    names: dict[str, Any] = {}
    if name == "README.md":
        # Only the settings example's BASE_DIR, which the settings.py that
        # `django-admin startproject` writes defines; the quickstart takes nothing for granted
        # (tests/test_packaging.py runs it in a fresh project).
        names.update(BASE_DIR=ROOT)
    if name in ("docs/guides/fhir.md", "docs/guides/async.md", "docs/guides/process-mining.md"):
        names.update(patient=Patient.objects.create(name="Grace Hopper"))
    if name in (
        "docs/operations.md",
        "docs/scaling.md",
        "docs/diagrams.md",
        "docs/guides/event-log.md",
    ):
        from django_encounters import create_encounter, transition
        from django_encounters.models import EncounterDefinition
        from tests.conftest import visit_definition_kwargs

        visit = create_encounter(
            EncounterDefinition.objects.create(**visit_definition_kwargs()),
            Patient.objects.create(name="Grace Hopper"),
        )
        transition(visit, "checked_in")
        transition(visit, "in_progress")
        names.update(
            pk=visit.pk, quarter_end=now + timedelta(days=1), start=now - timedelta(days=1)
        )
    if name == "docs/guides/rest-api.md":
        from django.contrib.auth.models import Permission

        nurse = User.objects.create(username="nurse")
        nurse.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label="django_encounters",
                codename__in=[
                    "view_encounter",
                    "add_encounter",
                    "change_encounter",
                    "transition_encounter",
                ],
            )
        )
        names.update(nurse=nurse, patient=Patient.objects.create(name="Ada Lovelace"))
    if name == "docs/guides/subjects.md":
        from django_encounters.models import EncounterDefinition
        from tests.conftest import visit_definition_kwargs

        names.update(
            Patient=Patient,
            visit_def=EncounterDefinition.objects.create(**visit_definition_kwargs()),
        )
    if name == "docs/operations.md":
        from django_encounters.projections.checkpoints import write_checkpoint

        # A checkpoint written earlier, whose root was published.
        written = write_checkpoint("checkpoint-2024-04-01.json")
        names.update(
            start=now - timedelta(days=90),
            end=now + timedelta(days=1),
            review_date=now + timedelta(days=1),
            published_root=written.root,
        )
    return names


CASES = [path for path in _documents() if _blocks(path)]


@pytest.mark.django_db
@pytest.mark.parametrize("path", CASES, ids=[str(p.relative_to(ROOT)) for p in CASES])
def test_the_python_examples_run(path: Path, tmp_path: Path) -> None:
    name = str(path.relative_to(ROOT))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples that write files write them here
    try:
        namespace: dict[str, Any] = {"__name__": f"example:{name}", **_names_for(name)}
        for number, block in enumerate(_blocks(path), 1):
            code = compile(block, f"{name}, python block {number}", "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        os.chdir(cwd)


def test_every_document_is_in_the_site_navigation() -> None:
    """mkdocs.yml lists every page under docs/ (a page left out is not on the site)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [page for page in pages if page not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
