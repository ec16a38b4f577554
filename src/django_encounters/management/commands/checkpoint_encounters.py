"""``manage.py checkpoint_encounters``: write a checkpoint of every encounter's head (id,
version, head hash) and print its root digest as the last line, to be published or notarised
where the database's administrators cannot change it; with ``--signing-key KEY.pem`` (an
Ed25519 private key, PKCS#8 PEM) the root is signed and the signature stored in the file.
``audit_encounters --against FILE [--verify-key PUB.pem]`` later reports every encounter whose
log no longer extends the checkpoint, and what claims to have been recorded before it but is
not in it.

Exit status: 0 when the checkpoint was written (warnings on stderr name the encounters whose
projection disagreed with their log: their log's head was written); 2 for invalid options (an
unknown definition code, an existing or unwritable ``--output``, a signing key that cannot be
used): nothing is written; 141 when
standard output was closed early. See ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from django_encounters.exceptions import EncounterError
from django_encounters.projections.checkpoints import (
    CHECKPOINT_FORMAT,
    DEFAULT_BATCH_SIZE,
    write_checkpoint,
)

from ..helpers import EncounterCommand, add_run_arguments, plain, quiet_broken_pipe


class Command(EncounterCommand):
    help = (
        "Write a checkpoint (every encounter's id, version and head hash) to FILE and print "
        "its root digest as the last line: publish it (optionally sign it with --signing-key), "
        "then audit_encounters --against FILE."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--output", metavar="FILE", required=True, help="the checkpoint file to write"
        )
        parser.add_argument(
            "--definition", metavar="CODE", help="only the encounters of this definition"
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace FILE if it exists (by default an existing file is kept: it is evidence)",
        )
        parser.add_argument(
            "--signing-key",
            metavar="KEY.pem",
            help=(
                "sign the checkpoint's root with this Ed25519 private key (PKCS#8 PEM, "
                "unencrypted; keep it off the database's hosts): audit_encounters --verify-key "
                "then checks the signature with its public key"
            ),
        )
        add_run_arguments(
            parser, batch_size=DEFAULT_BATCH_SIZE, batch_help="encounters read per batch"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            written = write_checkpoint(
                options["output"],
                definition=options["definition"],
                using=options["database"],
                batch_size=options["batch_size"],
                overwrite=options["overwrite"],
                signing_key=options["signing_key"],
            )
        except (ValueError, EncounterError) as exc:
            raise CommandError(str(exc), returncode=2) from exc
        for anomaly in written.corrected:
            self.stderr.write(
                f"warning: {anomaly} (run audit_encounters --encounter {anomaly.encounter_id})",
                style_func=plain,
            )
        with quiet_broken_pipe(self):
            if options["verbosity"] >= 1:
                scope = f" of definition {written.definition}" if written.definition else ""
                signed = f", signed with the key {written.signed_by}" if written.signed_by else ""
                self.stdout.write(
                    f"checkpoint of {written.count} encounter(s){scope} written to "
                    f"{written.path} ({CHECKPOINT_FORMAT}, created "
                    f"{written.created_at.isoformat()}{signed}); its root:"
                )
            self.stdout.write(written.root)
