"""``manage.py rebuild_encounter_projections``: recompute every encounter's projection from its
transition log, in batches, writing only what differs; or ``--check`` it without writing.
With ``ENCOUNTERS_SEAL_KEYS`` the seals are checked too (a ``seal`` anomaly is never "fixed":
a rebuild writes no seal); without, the first line of the output says they were not checked.

Exit status: 0 when the run completed and no stream has an anomaly nobody acknowledged (drift
it fixed included); 1 when one has (reported, never repaired; a projection whose version or
head is evidence of deleted or replaced rows is left untouched), or with ``--check`` when any
projection drifted, or (``--jobs N``) when a worker process failed; 2 for invalid options
(unknown definition code, malformed or unknown encounter id, ``--jobs`` > 1 on an in-memory
SQLite database); 141 when standard output was closed early. See ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from django_encounters.exceptions import EncounterError, EncounterNotFoundError
from django_encounters.projections.rebuild import (
    DEFAULT_BATCH_SIZE,
    RebuildResult,
    RebuildWorkerError,
    rebuild_projections,
)

from ..helpers import (
    EncounterCommand,
    Progress,
    add_selection_arguments,
    plural,
    positive_int,
    quiet_broken_pipe,
)

#: Drifts listed at verbosity 1 (all kept ones at verbosity 2).
SHOWN_AT_VERBOSITY_1 = 20


class Command(EncounterCommand):
    help = (
        "Recompute encounter projections (state, version, timeline end, head hash) from the "
        "transition log, verifying every stream. Writes only the encounters that differ."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--check",
            action="store_true",
            help="write nothing; report drifted projections and anomalies, exit 1 if any",
        )
        add_selection_arguments(
            parser,
            batch_size=DEFAULT_BATCH_SIZE,
            batch_help="encounters per batch and transaction",
        )
        parser.add_argument(
            "--jobs",
            type=positive_int,
            default=1,
            metavar="N",
            help=(
                "worker processes (default 1: this process). N > 1 splits the encounters into "
                "N primary-key ranges of equal size (whole batches; never more workers than "
                "batches), each rebuilt by its own process and database connection exactly "
                "as one process would; results are merged. Not "
                "for an in-memory SQLite database. On SQLite the workers' batches take turns "
                "holding the write lock, so expect a speed-up mainly on PostgreSQL"
            ),
        )
        parser.add_argument(
            "--no-progress", action="store_true", help="no progress display even on a terminal"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity = options["verbosity"]
        progress = None
        if not options["no_progress"] and verbosity >= 1 and self.stderr.isatty():
            progress = Progress(self.stderr)
        try:
            result = rebuild_projections(
                check=options["check"],
                definition=options["definition"],
                encounters=options["encounters"],
                batch_size=options["batch_size"],
                using=options["database"],
                progress=progress,
                jobs=options["jobs"],
            )
        except RebuildWorkerError as exc:  # before EncounterError: it is one
            raise CommandError(str(exc), returncode=1) from exc
        except EncounterNotFoundError as exc:
            raise CommandError(
                f"--encounter {exc.encounter_id}: no encounter has this id", returncode=2
            ) from exc
        except (ValueError, EncounterError) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        finally:
            if progress is not None:
                progress.clear()
        with quiet_broken_pipe(self):
            self.report(result, verbosity)
        if not result.ok:
            problems = []
            if result.check and result.projections_drifted:
                problems.append(
                    plural(result.projections_drifted, "projection", "projections") + " drifted"
                )
            if result.anomaly_count:
                anomalies = plural(result.anomaly_count, "anomaly", "anomalies")
                streams = plural(result.anomalous_encounters, "stream", "streams")
                problems.append(
                    f"{anomalies} in {streams} (a rebuild cannot repair them: the rows are "
                    "facts; see docs/operations.md)"
                )
            if result.acknowledged_count:
                acknowledged = plural(
                    result.acknowledged_count, "acknowledged anomaly", "acknowledged anomalies"
                )
                problems.append(f"{acknowledged} not counted")
            raise CommandError("; ".join(problems), returncode=1)

    def report(self, result: RebuildResult, verbosity: int) -> None:
        if verbosity < 1:
            return
        if result.seals != "checked":
            self.stdout.write(self.style.WARNING(f"Seals: {result.seals}"))
        label = "drift" if result.check else "fixed"
        shown = result.drift if verbosity >= 2 else result.drift[:SHOWN_AT_VERBOSITY_1]
        for drift in shown:
            self.stdout.write(f"{label}: {drift}")
        if result.projections_drifted > len(shown):
            more = result.projections_drifted - len(shown)
            self.stdout.write(f"{label}: ... and {more} more (-v 2 lists up to 1000)")
        for anomaly in result.anomalies:
            self.stdout.write(self.style.ERROR(f"anomaly: {anomaly}"))
        if result.anomaly_count > len(result.anomalies):
            self.stdout.write(
                self.style.ERROR(
                    f"anomaly: ... and {result.anomaly_count - len(result.anomalies)} more"
                )
            )
        for acknowledged in result.acknowledged:
            self.stdout.write(f"acknowledged: {acknowledged}")
        if result.acknowledged_count > len(result.acknowledged):
            more = result.acknowledged_count - len(result.acknowledged)
            self.stdout.write(f"acknowledged: ... and {more} more")
        style = self.style.SUCCESS if result.ok else self.style.WARNING
        self.stdout.write(style(result.summary()))
