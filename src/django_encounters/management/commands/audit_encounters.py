"""``manage.py audit_encounters``: replay encounter streams for a compliance review.

Reports per encounter its timeline (who, when, why; backdated and overtaken rows), its
anomalies (gaps, from_state mismatches, disallowed edges, broken re-chains, hash mismatches)
and its state as of ``--as-of`` (as known at ``--known-at``), as a table, CSV or JSON.

Exit status: 0 when no stream has an anomaly, 1 when any has, 2 for invalid options.
See ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from django_encounters.exceptions import EncounterError
from django_encounters.projections.audit import DEFAULT_BATCH_SIZE, iter_audit
from django_encounters.projections.rendering import write_csv, write_json, write_table

from ..helpers import Unended, add_selection_arguments, parse_subject, parse_time


class Command(BaseCommand):
    help = (
        "Replay encounter streams for an audit: timeline with who/when/why, backdated and "
        "overtaken rows, anomalies (tamper evidence), state as of a time. Exit 1 on anomalies."
    )

    def add_arguments(self, parser: Any) -> None:
        select = add_selection_arguments(
            parser, batch_size=DEFAULT_BATCH_SIZE, batch_help="encounters per batch"
        )
        select.add_argument(
            "--subject",
            metavar="APP.MODEL:PK",
            help="only encounters about this object, e.g. clinic.Patient:42",
        )
        select.add_argument(
            "--since", metavar="TIME", help="only encounters with a row effective at or after TIME"
        )
        select.add_argument(
            "--until", metavar="TIME", help="only encounters with a row effective before TIME"
        )
        when = parser.add_argument_group("state")
        when.add_argument(
            "--as-of", metavar="TIME", help="report each encounter's state at TIME (default: now)"
        )
        when.add_argument(
            "--known-at",
            metavar="TIME",
            help="... as it was known at TIME (only rows recorded by then)",
        )
        output = parser.add_argument_group("output")
        output.add_argument("--format", choices=["table", "csv", "json"], default="table")
        output.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        times = {
            name: parse_time(options[name], "--" + name.replace("_", "-"))
            for name in ("since", "until", "as_of", "known_at")
            if options[name] is not None
        }
        if times.get("as_of") is None:
            times["as_of"] = timezone.now()
        if "since" in times and "until" in times and times["since"] >= times["until"]:
            raise CommandError("--since must be before --until", returncode=2)
        subject = parse_subject(options["subject"]) if options["subject"] else None
        try:  # arguments are checked here, before anything is written
            audits = iter_audit(
                definition=options["definition"],
                encounters=options["encounters"],
                subject=subject,
                batch_size=options["batch_size"],
                using=options["database"],
                **times,
            )
        except (ValueError, TypeError, EncounterError) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        fmt = options["format"]
        path = options["output"]
        if path:
            try:
                out: Any = open(  # noqa: SIM115 - closed below
                    path, "w", encoding="utf-8", newline="" if fmt == "csv" else None
                )
            except OSError as exc:
                raise CommandError(f"--output: cannot write {path}: {exc}", returncode=2) from exc
        else:
            out = Unended(self.stdout)
        try:
            if fmt == "json":
                count = write_json(audits, out)
            elif fmt == "csv":
                count = write_csv(audits, out)
            else:
                count = write_table(
                    audits, out, as_of=times["as_of"], known_at=times.get("known_at")
                )
        finally:
            if path:
                out.close()
        if path and options["verbosity"] >= 1:
            self.stderr.write(f"audit written to {path} ({count} anomalies)")
        if count:
            raise CommandError(
                f"{count} anomal{'y' if count == 1 else 'ies'} found in the audited streams",
                returncode=1,
            )
