"""``manage.py audit_encounters``: replay encounter streams for a compliance review.

Reports per encounter its timeline (who, when, why; backdated and overtaken rows), its
anomalies (the genesis, gaps, hash chain, from_state, edges, re-chains, system time, the
projection's head; with ``ENCOUNTERS_SEAL_KEYS``: the seals of its rows, genesis, definition
versions and acknowledgements; with ``--against FILE``: whether the log still extends a
checkpoint and holds nothing that claims to be older than it, with ``--verify-key`` its
signature checked) with the acknowledgements reviewers recorded, and its state as of
``--as-of`` (as known at ``--known-at``), as a table, CSV or JSON. Without seal keys, the first
line (the JSON's first key; for CSV, stderr) says seals were not checked.

Exit status: 0 when no anomaly is left unacknowledged, 1 when one is, 2 for invalid options or
an unusable checkpoint — unreadable, altered, another root than ``--root``, unsigned or
not verifying with ``--verify-key`` — (nothing written), 141 when standard output was closed early
(``| head``). See ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Any

from django.core.management.base import CommandError
from django.utils import timezone

from django_encounters.exceptions import EncounterError, EncounterNotFoundError
from django_encounters.projections.audit import DEFAULT_BATCH_SIZE, EncounterAudit, iter_audit
from django_encounters.projections.output import formats, get_format

from ..helpers import (
    EncounterCommand,
    Unended,
    add_selection_arguments,
    parse_subject,
    parse_times,
    plural,
    quiet_broken_pipe,
    report_file,
)


class Command(EncounterCommand):
    help = (
        "Replay encounter streams for an audit: timeline with who/when/why, backdated and "
        "overtaken rows, anomalies (tamper evidence, optionally against a checkpoint), state "
        "as of a time. Exit 1 on anomalies nobody acknowledged."
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
        checkpoint = parser.add_argument_group("checkpoint")
        checkpoint.add_argument(
            "--against",
            metavar="FILE",
            help=(
                "a checkpoint written by checkpoint_encounters, compared whole whatever the "
                "selection: report every encounter whose log no longer extends it (rewritten, "
                "truncated, missing), every row and encounter it does not have that claims to "
                "have been recorded before it (unrecorded, uncheckpointed)"
            ),
        )
        checkpoint.add_argument(
            "--root",
            metavar="HEX",
            help="the root published for that checkpoint: refuse a checkpoint with another one",
        )
        checkpoint.add_argument(
            "--verify-key",
            metavar="PUB.pem",
            help=(
                "the Ed25519 public key (PEM) the checkpoint was signed with: refuse a "
                "checkpoint that is unsigned or whose signature does not verify with it"
            ),
        )
        output = parser.add_argument_group("output")
        output.add_argument("--format", choices=formats("audit"), default="table")
        output.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        times = parse_times(options, ("since", "until", "as_of", "known_at"))
        if times.get("as_of") is None:
            times["as_of"] = timezone.now()
        if options["root"] is not None and options["against"] is None:
            raise CommandError(
                "--root is the published root of a checkpoint: give --against", returncode=2
            )
        if options["verify_key"] is not None and options["against"] is None:
            raise CommandError(
                "--verify-key checks the signature of a checkpoint: give --against", returncode=2
            )
        subject = parse_subject(options["subject"]) if options["subject"] else None
        try:  # arguments, the ids and the checkpoint are checked here, before anything is written
            audits = iter_audit(
                definition=options["definition"],
                encounters=options["encounters"],
                subject=subject,
                against=options["against"],
                root=options["root"],
                verify_key=options["verify_key"],
                batch_size=options["batch_size"],
                using=options["database"],
                **times,
            )
        except EncounterNotFoundError as exc:
            raise CommandError(
                f"--encounter {exc.encounter_id}: no encounter has this id", returncode=2
            ) from exc
        except (ValueError, TypeError, EncounterError) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        writer = get_format("audit", options["format"])
        if audits.seals != "checked" and options["format"] == "csv":
            # A CSV's first line is its header: the note goes first to stderr.
            self.stderr.write(f"Seals: {audits.seals}")
        path = options["output"]
        tally = _Tally()

        def render(out: IO[str] | Unended) -> int:
            return writer.write(
                tally.count(audits),
                out,
                as_of=times["as_of"],
                known_at=times.get("known_at"),
                checkpoint=audits.checkpoint,
            )

        with quiet_broken_pipe(self):
            if path:
                with report_file(path, newline=writer.newline) as out:
                    count = render(out)
            else:
                count = render(Unended(self.stdout))
        acknowledged = (
            f" ({plural(tally.acknowledged, 'acknowledged anomaly', 'acknowledged anomalies')}"
            " not counted)"
            if tally.acknowledged
            else ""
        )
        if path and options["verbosity"] >= 1:
            self.stderr.write(f"audit written to {path} ({count} anomalies{acknowledged})")
        if count:
            raise CommandError(
                f"{count} anomal{'y' if count == 1 else 'ies'} found in the audited streams"
                f"{acknowledged}",
                returncode=1,
            )


class _Tally:
    """Counts the acknowledged anomalies of the audits passing through."""

    def __init__(self) -> None:
        self.acknowledged = 0

    def count(self, audits: Iterable[EncounterAudit]) -> Iterator[EncounterAudit]:
        for audit in audits:
            self.acknowledged += audit.acknowledged_count
            yield audit
