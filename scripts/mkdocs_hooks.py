"""mkdocs hooks: the management-command reference is generated from the commands themselves
(each command's module docstring and its ``--help``), so that it cannot drift from the code.

A page containing ``<!-- commands -->`` gets, in its place, one section per command of the
package, in alphabetical order.
"""

from __future__ import annotations

import importlib
import io
import pkgutil
from typing import Any

MARKER = "<!-- commands -->"


def _django() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=[
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "django_encounters",
            ],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            USE_TZ=True,
        )
        django.setup()


def commands_reference() -> str:
    _django()
    from django_encounters.management import commands

    sections = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command = module.Command(stdout=io.StringIO(), stderr=io.StringIO())
        usage = command.create_parser("manage.py", info.name).format_help()
        doc = (module.__doc__ or "").strip()
        sections.append(f"## `{info.name}`\n\n{doc}\n\n```text\n{usage.rstrip()}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, commands_reference())
    return markdown
