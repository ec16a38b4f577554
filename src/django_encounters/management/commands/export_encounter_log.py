"""``manage.py export_encounter_log``: the encounters' logs as an event log for process-mining
tools (ProM, pm4py, Disco, Celonis, …), as XES (IEEE 1849-2016), CSV, or OCEL 2.0 JSON
(``ocel2-json``: encounters, subjects, users and definition versions as objects).

One trace per encounter (its id, definition code and subject), one event per row in
business-time order (the state entered, ``effective_at``, who, ``complete``; the sequence, the
state left, when it was recorded, why, and the audit's backdated/overtaken marks), after a first
event for the creation in the origin state. ``--definition`` narrows to one definition;
``--since``/``--until`` to the encounters with a row effective in ``[--since, --until)``
(whole traces); ``--known-at`` exports the log as it was known at that time (rows recorded by
then). ``--lifecycle`` (XES, CSV) writes each stay in a state as a ``start``/``complete`` pair,
so the time spent in each state is in the log; ``--exclude-deleted`` leaves soft-deleted
encounters out.

Exit status: 0 when written; 2 for invalid options (an unknown format or definition code, a bad
time, ``--since`` not before ``--until``, an output file that cannot be written), nothing
written; 141 when standard output was closed early. See ``docs/guides/event-log.md``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from django_encounters.exceptions import EncounterError
from django_encounters.projections.audit import DEFAULT_BATCH_SIZE
from django_encounters.projections.event_log import export_event_log
from django_encounters.projections.output import formats

from ..helpers import (
    EncounterCommand,
    Unended,
    add_run_arguments,
    parse_times,
    plural,
    quiet_broken_pipe,
)


class Command(EncounterCommand):
    help = (
        "Export the encounters' logs as an event log for process-mining tools: XES "
        "(IEEE 1849-2016) or CSV (pm4py's column names), one trace per encounter; or an "
        "object-centric OCEL 2.0 JSON log."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--format", choices=formats("event-log"), required=True)
        select = parser.add_argument_group("selection")
        select.add_argument(
            "--definition", metavar="CODE", help="only encounters of this definition"
        )
        select.add_argument(
            "--since",
            metavar="TIME",
            help="only encounters with a row effective at or after TIME (their whole trace)",
        )
        select.add_argument(
            "--until",
            metavar="TIME",
            help="only encounters with a row effective before TIME (their whole trace)",
        )
        select.add_argument(
            "--known-at",
            metavar="TIME",
            help="the log as it was known at TIME (only rows recorded by then)",
        )
        select.add_argument(
            "--exclude-deleted",
            action="store_true",
            help="leave soft-deleted encounters out (by default exported, marked deleted)",
        )
        parser.add_argument(
            "--lifecycle",
            action="store_true",
            help="each stay in a state as a start/complete pair (xes, csv)",
        )
        parser.add_argument(
            "--output",
            metavar="FILE",
            help="write to FILE (whole or not at all) instead of stdout",
        )
        add_run_arguments(parser, batch_size=DEFAULT_BATCH_SIZE, batch_help="encounters per batch")

    def handle(self, *args: Any, **options: Any) -> None:
        times = parse_times(options, ("since", "until", "known_at"))
        path = options["output"]
        selection = {
            "definition": options["definition"],
            "batch_size": options["batch_size"],
            "using": options["database"],
            "exclude_deleted": options["exclude_deleted"],
            **times,
        }
        if options["lifecycle"]:
            selection["lifecycle"] = True
        if path:
            try:
                counts = export_event_log(options["format"], path, **selection)
            except (ValueError, TypeError, EncounterError) as exc:  # EventLogWriteError too
                raise CommandError(str(exc), returncode=2) from exc
            if options["verbosity"] >= 1:
                self.stderr.write(
                    f"{plural(counts.traces, 'trace', 'traces')}, "
                    f"{plural(counts.events, 'event', 'events')} written to {path}"
                )
            self._warn_anomalous(counts.anomalous)
            return
        out = Unended(self.stdout)
        with quiet_broken_pipe(self):
            try:
                counts = export_event_log(options["format"], out, **selection)  # type: ignore[arg-type]
            except (ValueError, TypeError, EncounterError) as exc:
                raise CommandError(str(exc), returncode=2) from exc
        self._warn_anomalous(counts.anomalous)

    def _warn_anomalous(self, anomalous: int) -> None:
        """Exported as they are, but said: logs the audit would fail."""
        if anomalous:
            self.stderr.write(
                f"warning: {plural(anomalous, 'encounter', 'encounters')} exported with "
                "unacknowledged anomalies in their logs; `manage.py audit_encounters` says what "
                "is wrong"
            )
