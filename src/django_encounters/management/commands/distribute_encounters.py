"""``manage.py distribute_encounters``: turn the package's tables into Citus distributed and
reference tables, sharded by encounter (see ``docs/scaling.md``). Idempotent: a second run finds
nothing to do. ``--check`` prints what it would do and changes nothing.

Exit status: 0 when the tables are (now) distributed, or with ``--check`` when nothing is left to
do; 1 with ``--check`` when steps are pending; 2 when the database cannot be distributed (no
Citus extension, a foreign key from outside the package into a table to distribute, a table
distributed another way): nothing is changed.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS

from django_encounters.store import distribution

from ..helpers import EncounterCommand, plain, plural


class Command(EncounterCommand):
    help = (
        "Distribute the encounter tables on Citus: encounters by id, their transitions and "
        "acknowledgements co-located by encounter, definitions (and the user and content-type "
        "tables they reference) as reference tables. --check only reports."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--check", action="store_true", help="print what would be done; change nothing"
        )
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="database alias (default: 'default')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        try:
            layout = distribution.plan(using)
        except distribution.DistributionError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        verbose = options["verbosity"] >= 1
        if verbose:
            self.stdout.write(f"Citus {layout.citus_version} on database {using!r}")
            for note in layout.notes:
                self.stdout.write(f"  in place: {note}")
        if layout.done:
            if verbose:
                self.stdout.write("nothing to do: the encounter tables are distributed")
            return
        for number, step in enumerate(layout.steps, 1):
            if verbose or options["check"]:
                self.stdout.write(f"  {number}. {step.description}")
                if options["verbosity"] >= 2 or options["check"]:
                    for sql in step.sql:
                        self.stdout.write(f"       {sql}", style_func=plain)
        if options["check"]:
            raise CommandError(
                f"{plural(len(layout.steps), 'step', 'steps')} pending (nothing changed)",
                returncode=1,
            )
        try:
            distribution.apply(layout)
        except Exception as exc:
            raise CommandError(
                f"distribution failed, nothing changed (one transaction): {exc}", returncode=2
            ) from exc
        if verbose:
            self.stdout.write(
                f"done: {plural(len(layout.steps), 'step', 'steps')} applied in one transaction"
            )
