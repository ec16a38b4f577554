"""``manage.py check_encounter_definitions``: validate every definition and list its warnings.

Exit status: 1 when a definition is invalid (it was changed behind ``save()``, e.g. by
``QuerySet.update()`` or raw SQL), or with ``--strict`` when any warning exists; 0 otherwise.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from django_encounters.models import EncounterDefinition

from ..helpers import EncounterCommand, plural


class Command(EncounterCommand):
    help = (
        "Validate encounter definitions and list structural warnings "
        "(unreachable states, exits from final states, dead ends)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--definition", metavar="CODE", help="only this definition")
        parser.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")

    def handle(self, *args: Any, **options: Any) -> None:
        definitions = EncounterDefinition.objects.order_by("code")
        if options["definition"]:
            definitions = definitions.filter(code=options["definition"])
            if not definitions.exists():
                raise CommandError(
                    f"no definition with code {options['definition']!r}", returncode=2
                )
        errors = warnings = 0
        for definition in definitions:
            problems: list[str] = []
            try:
                definition.clean()
            except ValidationError as exc:
                for field, messages in exc.message_dict.items():
                    problems.extend(f"ERROR {field}: {m}" for m in messages)
                errors += 1
            found = definition.get_warnings()
            warnings += len(found)
            problems.extend(f"WARNING {w}" for w in found)
            status = "ok" if not problems else f"{len(problems)} problem(s)"
            self.stdout.write(f"{definition.code} ({definition.name}): {status}")
            for problem in problems:
                self.stdout.write(f"  {problem}")
        self.stdout.write(
            f"{definitions.count()} definition(s), {errors} invalid, {warnings} warning(s)"
        )
        if errors or (options["strict"] and warnings):
            found = [plural(errors, "invalid definition", "invalid definitions")] if errors else []
            if options["strict"] and warnings:
                found.append(plural(warnings, "warning", "warnings") + " (--strict)")
            raise CommandError(", ".join(found), returncode=1)
