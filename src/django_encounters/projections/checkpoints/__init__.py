"""Checkpoints: what the log said, kept where the database's administrators cannot edit it.

Anyone who can write to the database can rewrite a row *and* recompute every later hash and the
projection: the chain then verifies, and the plain audit is clean. A checkpoint defeats that. It
lists, for every encounter (soft-deleted ones included; optionally those of one definition), its
stream version and the hash of its head, and one *root* digest over all of them. Publish the
root somewhere else (a ticket, a mail, a notary, a transparency log). Later,
:func:`verify_checkpoint` — and ``audit_encounters --against FILE``, which also verifies every
chain — report every encounter whose log no longer extends its checkpointed prefix:

* ``rewritten``: the row at the checkpointed version (for version 0: the genesis hash) now has
  another hash;
* ``truncated``: the log now ends before the checkpointed version;
* ``missing``: the encounter is gone.

File format ``django-encounters-checkpoint/1`` (UTF-8 JSON, one entry per line)::

    {
      "format": "django-encounters-checkpoint/1",
      "created_at": "2026-11-22T03:35:14.627000+00:00",
      "definition": null,
      "encounters": [
        {"id": "<uuid>", "version": 3, "head_hash": "v2:<64 hex>"},
        ...
      ],
      "count": 1234,
      "root": "<64 hex>"
    }

``encounters`` is in ascending ``id`` order (ids as lower-case hyphenated UUIDs, each once);
``definition`` is the code the checkpoint was restricted to, or null. The root is

    SHA-256 (hex) of the UTF-8 text
        "django-encounters-checkpoint/1\\n"
        + "".join(f"{id} {version} {head_hash}\\n" for each entry, in file order)

so anyone can recompute it without this library::

    ( echo django-encounters-checkpoint/1
      jq -r '.encounters[] | "\\(.id) \\(.version) \\(.head_hash)"' checkpoint.json ) | sha256sum

Writing and verifying both stream: memory is one batch of encounters, whatever their number.

The package: :mod:`.entries` (the format, an entry, the root), :mod:`.reading` (the streaming
reader and its checks), :mod:`.building` (writing one), :mod:`.verifying` (comparing one with
the log), :mod:`.heads` (the log's hashes they both read).
"""

from ...exceptions import CheckpointError
from .building import WrittenCheckpoint, iter_heads, write_checkpoint
from .entries import (
    CHECKPOINT_FORMAT,
    DEFAULT_BATCH_SIZE,
    CheckpointCheck,
    CheckpointEntry,
    root_digest,
)
from .reading import read_checkpoint
from .verifying import verify_checkpoint

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_BATCH_SIZE",
    "CheckpointCheck",
    "CheckpointEntry",
    "CheckpointError",
    "WrittenCheckpoint",
    "iter_heads",
    "read_checkpoint",
    "root_digest",
    "verify_checkpoint",
    "write_checkpoint",
]
