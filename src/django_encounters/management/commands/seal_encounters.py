"""``manage.py seal_encounters [--rekey]``: verify the whole log, then seal what is unsealed
under the current key of ``ENCOUNTERS_SEAL_KEYS`` (rows, genesis, definition versions — a
version with no content hash gets its chain's first — and acknowledgements); with ``--rekey``
also re-seal what is sealed under another configured key (after a rotation).

Exit status: 0 when done (a summary line; running it again seals nothing new); 1 when
anomalies nobody acknowledged stand (nothing written: see them with ``audit_encounters``);
2 when no seal key is configured or the arguments are wrong. See ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS

from django_encounters.exceptions import EncounterConfigurationError, SealingRefusedError
from django_encounters.projections.sealing import DEFAULT_BATCH_SIZE, seal_encounters

from ..helpers import EncounterCommand, plural, positive_int, quiet_broken_pipe


class Command(EncounterCommand):
    help = (
        "Verify the log, then seal what is unsealed under the current seal key "
        "(ENCOUNTERS_SEAL_KEYS); --rekey re-seals what an older key sealed."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--rekey",
            action="store_true",
            help="also re-seal records sealed under another configured key with the current one",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=DEFAULT_BATCH_SIZE,
            help=f"encounters per transaction (default {DEFAULT_BATCH_SIZE})",
        )
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="database alias (default: 'default')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            summary = seal_encounters(
                rekey=options["rekey"],
                batch_size=options["batch_size"],
                using=options["database"],
            )
        except EncounterConfigurationError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        except SealingRefusedError as exc:
            if options["verbosity"] >= 2:
                for anomaly in exc.anomalies:
                    self.stderr.write(f"  {anomaly}")
            standing = plural(
                len(exc.anomalies),
                "unacknowledged anomaly stands",
                "unacknowledged anomalies stand",
            )
            raise CommandError(
                f"{standing}"
                "; nothing was sealed. See them with `manage.py audit_encounters` (all of them, "
                "definition versions included: run this with -v 2) and acknowledge what was "
                "examined with `manage.py acknowledge_anomaly`",
                returncode=1,
            ) from exc
        with quiet_broken_pipe(self):
            self.stdout.write(str(summary))
