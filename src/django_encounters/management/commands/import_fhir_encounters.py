"""``manage.py import_fhir_encounters FILE --definition CODE``: FHIR ``Encounter`` resources (a
Bundle or one resource, R4 or R5 JSON) as encounters of a definition, each created and moved
through its status history with backdated transitions the definition decides.

Idempotent: a resource imported before (its identifier, else its id) is skipped. All or
nothing: the file is imported in one transaction; a resource the definition refuses names
itself and the move, and nothing is written.

Exit status: 0 when imported (or all skipped); 1 when the file or a resource was refused
(nothing written); 2 for invalid options (an unknown or soft-deleted definition, an unusable
setting). See ``docs/guides/fhir.md``.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from django_encounters.exceptions import EncounterError, FhirImportError
from django_encounters.projections.fhir import FHIR_VERSIONS
from django_encounters.projections.fhir.importing import import_fhir_encounters

from ..helpers import EncounterCommand, plural


class Command(EncounterCommand):
    help = (
        "Import FHIR Encounter resources (a Bundle or one resource, R4 or R5 JSON) as "
        "encounters of a definition, with backdated transitions; idempotent, all or nothing."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("file", metavar="FILE", help="the JSON file (a Bundle or a resource)")
        parser.add_argument(
            "--definition", metavar="CODE", required=True, help="the definition they follow"
        )
        parser.add_argument(
            "--fhir-version",
            choices=FHIR_VERSIONS,
            help="the FHIR version of the file (default: told by each resource's elements)",
        )
        parser.add_argument(
            "--subject-resolver",
            metavar="DOTTED.PATH",
            help="function (reference, definition) -> subject instance (default: "
            "ENCOUNTERS_FHIR_SUBJECT_RESOLVER)",
        )
        parser.add_argument(
            "--user", metavar="USERNAME", help="record the encounters as created by this user"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user = None
        if options["user"]:
            model = get_user_model()
            try:
                user = model._default_manager.get_by_natural_key(options["user"])
            except model.DoesNotExist:
                raise CommandError(f"no user {options['user']!r}", returncode=2) from None
        try:
            result = import_fhir_encounters(
                options["file"],
                definition=options["definition"],
                resolve_subject=options["subject_resolver"],
                fhir_version=options["fhir_version"],
                created_by=user,
            )
        except FhirImportError as exc:
            raise CommandError(str(exc), returncode=1) from exc
        except (ValueError, TypeError, EncounterError) as exc:  # DefinitionNotFoundError too
            raise CommandError(str(exc), returncode=2) from exc
        if options["verbosity"] >= 1:
            self.stdout.write(
                f"{plural(len(result.created), 'encounter', 'encounters')} imported, "
                f"{plural(len(result.skipped), 'resource', 'resources')} skipped (imported "
                "before)"
            )
        if options["verbosity"] >= 2:
            for encounter in result.created:
                self.stdout.write(f"  {encounter.pk} {encounter.state}")
            for label in result.skipped:
                self.stdout.write(f"  skipped {label}")
