"""Checkpoints: what the log said, kept where the database's administrators cannot edit it.

Anyone who can write to the database can rewrite a row *and* recompute every later hash and the
projection: the chain then verifies, and the plain audit is clean. A checkpoint defeats that. It
lists, for every encounter (soft-deleted ones included; optionally those of one definition), its
stream version and the hash of its head, and one *root* digest over every field of the file.
Publish the root somewhere else (a ticket, a mail, a notary, a transparency log), and sign it
(``signing_key``: Ed25519, :mod:`.signing`). Later, :func:`verify_checkpoint` — and
``audit_encounters --against FILE``, which also verifies every chain — report

* ``rewritten``: the row at the checkpointed version (for version 0: the genesis hash) now has
  another hash;
* ``truncated``: the log now ends before the checkpointed version;
* ``missing``: the encounter is gone;
* ``unrecorded``: a row the checkpoint does not have claims to have been recorded before it
  (``transitioned_at`` before ``created_at`` less the clock tolerance,
  ``ENCOUNTERS_FUTURE_TOLERANCE``);
* ``uncheckpointed``: an encounter of its scope claims to have been created before it, and is
  not in it.

File format ``django-encounters-checkpoint/2`` (UTF-8 JSON, one entry per line)::

    {
      "format": "django-encounters-checkpoint/2",
      "created_at": "2026-11-22T03:35:14.627000+00:00",
      "definition": null,
      "encounters": [
        {"id": "<uuid>", "version": 3, "head_hash": "v2:<64 hex>"},
        ...
      ],
      "count": 1234,
      "root": "<64 hex>",
      "signature": null
    }

``format``, ``created_at`` and ``definition`` come first, in this order (the root starts with
them); ``encounters`` is in ascending ``id`` order (ids as lower-case hyphenated UUIDs, each
once); ``definition`` is the code the checkpoint was restricted to (printable text), or null;
``signature`` is null or the signature of the root (:mod:`.signing`). The root is

    SHA-256 (hex) of the UTF-8 text
        "django-encounters-checkpoint/2\\n"
        + f"created_at {created_at}\\n"          # the text as in the file
        + f"definition {json(definition)}\\n"    # null, or the code in double quotes
        + "".join(f"{id} {version} {head_hash}\\n" for each entry, in file order)
        + f"count {count}\\n"

so it covers every field but itself and the signature, and anyone can recompute it without
this library::

    jq -r '.format, "created_at \\(.created_at)", "definition \\(.definition | tojson)",
           (.encounters[] | "\\(.id) \\(.version) \\(.head_hash)"), "count \\(.count)"' \\
        checkpoint.json | sha256sum

Format ``django-encounters-checkpoint/1`` (the first; still read and verified) has no
``signature`` and a root over the entries only — ``created_at`` and ``definition`` are not
covered::

    ( echo django-encounters-checkpoint/1
      jq -r '.encounters[] | "\\(.id) \\(.version) \\(.head_hash)"' checkpoint.json ) | sha256sum

Writing and verifying both stream: memory is one batch of encounters, whatever their number.

The package: :mod:`.entries` (the formats, an entry, the root), :mod:`.reading` (the streaming
reader and its checks), :mod:`.building` (writing one), :mod:`.signing` (Ed25519 signatures),
:mod:`.verifying` (comparing one with the log), :mod:`.heads` (the log's hashes they both
read).
"""

from ...exceptions import CheckpointError
from .building import WrittenCheckpoint, iter_heads, write_checkpoint
from .entries import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_1,
    DEFAULT_BATCH_SIZE,
    CheckpointCheck,
    CheckpointEntry,
    root_digest,
)
from .reading import read_checkpoint
from .signing import fingerprint, load_signing_key, load_verify_key
from .verifying import verify_checkpoint

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_1",
    "DEFAULT_BATCH_SIZE",
    "CheckpointCheck",
    "CheckpointEntry",
    "CheckpointError",
    "WrittenCheckpoint",
    "fingerprint",
    "iter_heads",
    "load_signing_key",
    "load_verify_key",
    "read_checkpoint",
    "root_digest",
    "verify_checkpoint",
    "write_checkpoint",
]
