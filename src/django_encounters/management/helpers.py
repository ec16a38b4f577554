"""What the package's management commands share: their base class (a database the package's
migrations were not applied to is a one-line "run migrate first", not a traceback), argument
parsing, the selection options, output helpers (a report file written whole or not at all; a
reader that closes the pipe early) and the progress display. Every command exits through
``CommandError`` with its documented status (1: a problem found, 2: invalid options), or with
141 when its standard output was closed early."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.migrations.loader import MigrationLoader
from django.utils.dateparse import parse_datetime

from ..projections.output import write_atomically
from ..projections.rebuild import RebuildResult

#: The exit status of a command run on a database without the package's tables.
EXIT_NOT_MIGRATED = 2


class EncounterCommand(BaseCommand):
    """The base of the package's commands. A database error raised while the database
    (``--database``, else ``default``) lacks migrations of the package — the tables or columns
    the command reads do not exist yet — becomes a one-line ``CommandError`` (exit status 2)
    naming them and saying to run ``migrate`` first. Any other error passes unchanged."""

    def execute(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute(*args, **options)
        except DatabaseError as exc:
            alias = options.get("database") or DEFAULT_DB_ALIAS
            missing = unapplied_migrations(alias)
            if not missing:
                raise
            raise CommandError(
                f"database {alias!r} lacks django_encounters' migrations "
                f"({', '.join(missing)}): run `python manage.py migrate"
                f"{'' if alias == DEFAULT_DB_ALIAS else f' --database {alias}'}` first "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''})",
                returncode=EXIT_NOT_MIGRATED,
            ) from exc


def unapplied_migrations(alias: str) -> list[str]:
    """The package's migrations not applied to database ``alias`` ([] when all are, or when
    that cannot be read: the error it met was not about migrations then)."""
    connection = connections[alias]
    try:
        if connection.in_atomic_block and connection.needs_rollback:
            return []  # a broken transaction cannot be asked; the caller's error stands
        loader = MigrationLoader(connection)
    except DatabaseError:
        return []
    label = apps.get_app_config("django_encounters").label
    return sorted(
        name
        for app_label, name in loader.disk_migrations
        if app_label == label and (app_label, name) not in loader.applied_migrations
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def plain(text: str) -> str:
    return text  # not the red ERROR style Django gives stderr on a terminal


def plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


class Progress:
    """A one-line progress display on a terminal (stderr), redrawn at most 5 times a second."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.drawn = 0.0
        self.width = 0

    def __call__(self, result: RebuildResult, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.drawn < 0.2:
            return
        self.drawn = now
        total = result.encounters_total
        done = f"{result.encounters_scanned:,}" + (f"/{total:,}" if total is not None else "")
        percent = f" {100 * result.encounters_scanned / total:5.1f}%" if total else ""
        fixed = "drifted" if result.check else "fixed"
        line = (
            f"{done} encounters{percent}  {result.rows_replayed:,} rows  "
            f"{result.projections_drifted if result.check else result.projections_fixed:,} "
            f"{fixed}  {result.anomaly_count:,} anomalies  {result.rows_per_second:,.0f} rows/s"
        )
        padding = " " * max(0, self.width - len(line))
        self.width = len(line)
        self.stream.write("\r" + line + padding, style_func=plain, ending="")
        self.stream.flush()

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r", style_func=plain, ending="")
            self.stream.flush()


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


def parse_times(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, datetime]:
    """The time options among ``names`` that were given, parsed (:func:`parse_time`), with
    ``--since`` checked to be before ``--until`` when both are."""
    times = {
        name: parse_time(options[name], "--" + name.replace("_", "-"))
        for name in names
        if options[name] is not None
    }
    if "since" in times and "until" in times and times["since"] >= times["until"]:
        raise CommandError("--since must be before --until", returncode=2)
    return times


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


class Unended:
    """Writes to a command's ``OutputWrapper`` verbatim (it would end every write with a
    newline)."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> int:
        self.wrapper.write(text, ending="")
        return len(text)


def add_selection_arguments(parser: Any, *, batch_size: int, batch_help: str) -> Any:
    """``--definition``, ``--encounter`` (repeatable), ``--batch-size`` and ``--database``;
    returns the argument group of the first two, for a command's further selection options."""
    select = parser.add_argument_group("selection")
    select.add_argument("--definition", metavar="CODE", help="only encounters of this definition")
    select.add_argument(
        "--encounter",
        metavar="ID",
        action="append",
        dest="encounters",
        help="only this encounter (repeat for several)",
    )
    add_run_arguments(parser, batch_size=batch_size, batch_help=batch_help)
    return select


def add_run_arguments(parser: Any, *, batch_size: int, batch_help: str) -> None:
    """``--batch-size`` and ``--database``."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        metavar="N",
        help=f"{batch_help} (default {batch_size})",
    )
    parser.add_argument(
        "--database", default=DEFAULT_DB_ALIAS, help="database alias (default: 'default')"
    )


#: The exit status when standard output was closed before the command finished (``| head``):
#: that of a Unix tool killed by SIGPIPE (128 + 13), so ``set -o pipefail`` still tells it
#: from a complete run.
EXIT_BROKEN_PIPE = 141


@contextmanager
def quiet_broken_pipe(command: Any) -> Iterator[None]:
    """Run the block, then flush the command's stdout. If the reader of the process's standard
    output went away (``… | head``), exit quietly with :data:`EXIT_BROKEN_PIPE`: no traceback,
    and no "Exception ignored" message at interpreter exit (what is left to flush goes to
    ``/dev/null``, Python's documented recipe). A closed stream other than the process's
    stdout is an ordinary error."""
    try:
        yield
        command.stdout.flush()
    except BrokenPipeError:
        stream = getattr(command.stdout, "_out", None)
        if stream is None or stream not in (sys.stdout, sys.__stdout__):
            raise
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # no file descriptor to redirect: nothing will flush
            pass
        raise SystemExit(EXIT_BROKEN_PIPE) from None


@contextmanager
def report_file(
    path: str, option: str = "--output", *, newline: str | None = None
) -> Iterator[IO[str]]:
    """``--output FILE``: a text stream whose content replaces ``FILE`` only when the block
    ends without an exception (:func:`~django_encounters.projections.output.write_atomically`),
    so ``FILE`` never holds half a report; a file that cannot be written is a usage error."""
    try:
        with write_atomically(path, newline=newline) as out:
            yield out
    except OSError as exc:
        raise CommandError(f"{option}: cannot write {path}: {exc}", returncode=2) from exc
