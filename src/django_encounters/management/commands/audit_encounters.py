"""``manage.py audit_encounters``: replay encounter streams for a compliance review.

Reports per encounter its timeline (who, when, why; backdated and overtaken rows), its
anomalies (gaps, from_state mismatches, disallowed edges, broken re-chains, hash mismatches)
and its state as of ``--as-of`` (as known at ``--known-at``), as a table, CSV or JSON.

Exit status: 0 when no stream has an anomaly, 1 when any has, 2 for invalid options.
See ``docs/operations.md``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS
from django.utils.dateparse import parse_datetime

from django_encounters.exceptions import EncounterError
from django_encounters.projections.audit import (
    DEFAULT_BATCH_SIZE,
    iter_audit,
    write_csv,
    write_json,
    write_table,
)

from .rebuild_encounter_projections import positive_int

TIME_HELP = "ISO-8601 with a UTC offset, e.g. 2024-03-31T23:59:59+10:00 or 2024-03-31T13:59:59Z"


def parse_time(text: str, option: str) -> datetime:
    value = None
    try:
        value = parse_datetime(text.strip())
    except ValueError:
        pass
    if value is None:
        raise CommandError(
            f"{option}: not an ISO-8601 date-time: {text!r} ({TIME_HELP})", returncode=2
        )
    if value.tzinfo is None:
        raise CommandError(
            f"{option}: {text!r} has no UTC offset; naive times are ambiguous ({TIME_HELP})",
            returncode=2,
        )
    return value


def parse_subject(text: str) -> Any:
    """``app_label.ModelName:pk`` -> the model instance."""
    label, sep, pk = text.partition(":")
    if not sep or "." not in label or not pk:
        raise CommandError(
            f"--subject: expected app_label.ModelName:pk (e.g. clinic.Patient:42), got {text!r}",
            returncode=2,
        )
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError) as exc:
        raise CommandError(f"--subject: {exc}", returncode=2) from exc
    try:
        return model._default_manager.get(pk=pk)
    except (model.DoesNotExist, ValueError, TypeError) as exc:
        raise CommandError(f"--subject: no {label} with pk {pk!r}", returncode=2) from exc
    except Exception as exc:  # e.g. a malformed UUID pk: ValidationError
        raise CommandError(f"--subject: {label} pk {pk!r}: {exc}", returncode=2) from exc


class _Unended:
    """Writes to a command's ``OutputWrapper`` verbatim (it would end every write with a
    newline)."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> int:
        self.wrapper.write(text, ending="")
        return len(text)


class Command(BaseCommand):
    help = (
        "Replay encounter streams for an audit: timeline with who/when/why, backdated and "
        "overtaken rows, anomalies (tamper evidence), state as of a time. Exit 1 on anomalies."
    )

    def add_arguments(self, parser: Any) -> None:
        select = parser.add_argument_group("selection")
        select.add_argument(
            "--definition", metavar="CODE", help="only encounters of this definition"
        )
        select.add_argument(
            "--encounter",
            metavar="ID",
            action="append",
            dest="encounters",
            help="only this encounter (repeat for several)",
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
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=DEFAULT_BATCH_SIZE,
            metavar="N",
            help=f"encounters per batch (default {DEFAULT_BATCH_SIZE})",
        )
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="database alias (default: 'default')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        times = {
            name: parse_time(options[name], "--" + name.replace("_", "-"))
            for name in ("since", "until", "as_of", "known_at")
            if options[name] is not None
        }
        if times.get("as_of") is None:
            from django.utils import timezone

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
            out = _Unended(self.stdout)
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
