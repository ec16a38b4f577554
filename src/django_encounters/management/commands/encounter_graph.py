"""``manage.py encounter_graph CODE``: draw a definition, or the process map mined from its log.

Without ``--from-log``: the definition version's machine (``--definition-version N``, default
the current one) — the initial state marked, final states double-circled, states nothing
reaches greyed. With ``--from-log``: every edge its encounters' rows took (rows effective in
``[--since, --until)``), labelled with its count and the median time spent before it, compared
with that version's machine (allowed but untaken edges dashed, anomalies red). ``--format``
mermaid or dot (text), svg (through Graphviz's ``dot``), or pnml (a definition's Petri net,
which pm4py's and ProM's conformance checking replay the event log on).

``--version`` prints Django's version, as for every command; ``--version N``, this command's
spelling of ``--definition-version N`` in 0.1.0, is refused (exit 2) with a message naming the
new option.

Exit status: 0 when drawn; 1 when Graphviz failed on the drawing; 2 for invalid options (an
unknown CODE or version, a bad time, ``--since`` not before ``--until``, ``--since``/``--until``
without ``--from-log``, svg without Graphviz), nothing written; 141 when standard output was
closed early. See ``docs/diagrams.md``.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS

from django_encounters.exceptions import EncounterError
from django_encounters.projections.diagrams import (
    FORMATS,
    GraphvizError,
    draw,
    graphviz_program,
)

from ..helpers import EncounterCommand, Unended, parse_times, quiet_broken_pipe, report_file


class Command(EncounterCommand):
    help = (
        "Draw an encounter definition (or, with --from-log, the process map mined from its "
        "rows) as Mermaid, DOT or SVG; or a definition as a Petri net (PNML)."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parse_args = parser.parse_args

        def parse_refusing_the_old_version(args: Any = None, namespace: Any = None) -> Any:
            given = list(sys.argv[2:] if args is None else args)
            old = _old_version_spelling(given)
            if old is not None:  # before Django's --version action prints and exits
                parser.error(
                    f"--version {old}: --version prints Django's version and takes no value; "
                    f"the definition version to draw is --definition-version {old}"
                )
            return parse_args(given, namespace)

        parser.parse_args = parse_refusing_the_old_version  # type: ignore[method-assign]
        return parser

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("code", metavar="CODE", help="the definition's code")
        parser.add_argument(
            "--definition-version",
            metavar="N",
            help="draw (or compare with) this definition version (default: the current one)",
        )
        parser.add_argument("--format", choices=FORMATS, default="mermaid")
        log = parser.add_argument_group("process map")
        log.add_argument(
            "--from-log",
            action="store_true",
            help="draw the edges the rows took: counts, median time before each, untaken "
            "edges dashed, edges not allowed red",
        )
        log.add_argument("--since", metavar="TIME", help="only rows effective at or after TIME")
        log.add_argument("--until", metavar="TIME", help="only rows effective before TIME")
        parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="database alias (default: 'default')"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        version = _version(options["definition_version"])
        if (options["since"] is not None or options["until"] is not None) and not options[
            "from_log"
        ]:
            raise CommandError(
                "--since/--until select the rows of a process map: give --from-log too",
                returncode=2,
            )
        times = parse_times(options, ("since", "until"))
        fmt = options["format"]
        try:
            if fmt == "svg":
                graphviz_program()  # before any reading: missing Graphviz is a usage error
            text = draw(
                options["code"],
                fmt,
                from_log=options["from_log"],
                version=version,
                using=options["database"],
                **times,
            )
        except GraphvizError as exc:
            raise CommandError(str(exc), returncode=1) from exc
        except (ValueError, TypeError, EncounterError) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        path = options["output"]
        if path:
            with report_file(path) as out:
                out.write(text)
            if options["verbosity"] >= 1:
                self.stderr.write(f"diagram written to {path}")
            return
        with quiet_broken_pipe(self):
            Unended(self.stdout).write(text)


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise CommandError(
            f"--definition-version: a definition version is a positive integer, not {text!r}",
            returncode=2,
        )
    return value


def _old_version_spelling(args: list[str]) -> str | None:
    """N when ``args`` hold ``--version N`` or ``--version=N`` with an integer N (this
    command's ``--definition-version N`` in 0.1.0), else None."""
    for index, arg in enumerate(args):
        if arg == "--":
            return None
        value = None
        if arg.startswith("--version="):
            value = arg.partition("=")[2]
        elif arg == "--version" and index + 1 < len(args):
            value = args[index + 1]
        if value is not None and value.strip().lstrip("+-").isdigit():
            return value
    return None
