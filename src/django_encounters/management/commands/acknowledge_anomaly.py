"""``manage.py acknowledge_anomaly ENCOUNTER_ID SEQUENCE KIND --reason TEXT``: record that a
reviewer examined an anomaly the audit reports (who, when, why; append-only), bound to the
evidence it was found on (the stored hash, or the checkpoint's root): a later finding with
other evidence is not covered. Acknowledged anomalies are still listed by the audit and the
rebuild, marked, but no longer fail their exit status. Anomalies found against a checkpoint
(``rewritten``, ``truncated``, ``missing``) need the same ``--against FILE`` to be confirmed.
With seal keys configured the acknowledgement is sealed.

Exit status: 0 when recorded; 2 when nothing was recorded: invalid arguments, an unknown user
or encounter, an unusable checkpoint, or an anomaly the audit does not report now. See
``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS

from django_encounters.engine import AnomalyKind
from django_encounters.exceptions import EncounterError, EncounterNotFoundError
from django_encounters.projections.audit import (
    AnomalyNotReportedError,
    acknowledge_reported_anomalies,
)
from django_encounters.projections.checkpoints import CheckpointError

from ..helpers import EncounterCommand, quiet_broken_pipe


class Command(EncounterCommand):
    help = (
        "Acknowledge an anomaly the audit reports (who, when, why): it stays listed, marked, "
        "and no longer fails audit_encounters or rebuild_encounter_projections --check."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("encounter_id", metavar="ENCOUNTER_ID")
        parser.add_argument(
            "sequence", metavar="SEQUENCE", help="the anomaly's sequence (0: the encounter)"
        )
        parser.add_argument("kind", metavar="KIND", help="the anomaly's kind, e.g. hash")
        parser.add_argument("--reason", required=True, help="why it is acknowledged")
        parser.add_argument("--user", metavar="USERNAME", help="who acknowledges it")
        parser.add_argument(
            "--against",
            metavar="FILE",
            help="the checkpoint the anomaly was found against (rewritten, truncated, missing)",
        )
        parser.add_argument("--root", metavar="HEX", help="that checkpoint's published root")
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="database alias (default: 'default')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"]
        try:
            sequence = int(options["sequence"])
        except ValueError:
            raise CommandError(
                f"SEQUENCE: not an integer: {options['sequence']!r}", returncode=2
            ) from None
        user = None
        if options["user"] is not None:
            model = get_user_model()
            try:
                user = model._default_manager.db_manager(using).get(
                    **{model.USERNAME_FIELD: options["user"]}
                )
            except model.DoesNotExist:
                raise CommandError(
                    f"--user: no user has the username {options['user']!r}", returncode=2
                ) from None
        if options["root"] is not None and options["against"] is None:
            raise CommandError(
                "--root is the published root of a checkpoint: give --against", returncode=2
            )
        try:
            recorded = acknowledge_reported_anomalies(
                options["encounter_id"],
                sequence,
                options["kind"],
                options["reason"],
                user,
                against=options["against"],
                root=options["root"],
                using=using,
            )
        except EncounterNotFoundError as exc:
            hint = ""
            if options["against"] is None:
                hint = " (to acknowledge it is missing from a checkpoint, give --against FILE)"
            raise CommandError(
                f"no encounter has the id {exc.encounter_id}{hint}", returncode=2
            ) from exc
        except AnomalyNotReportedError as exc:
            message = str(exc)
            if options["kind"] in AnomalyKind.checkpoint_kinds() and options["against"] is None:
                message += "; an anomaly found against a checkpoint needs --against FILE"
            raise CommandError(message, returncode=2) from exc
        except (CheckpointError, ValueError, TypeError, EncounterError) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        with quiet_broken_pipe(self):
            who = options["user"] if user is not None else "nobody recorded"
            for ack, anomaly in recorded:
                self.stdout.write(
                    f"acknowledged: {anomaly} (by {who} at {ack.acknowledged_at.isoformat()}: "
                    f"{ack.reason})"
                )
