"""Writing a checkpoint: every selected encounter's head as its log confirms it, streamed into
the file and the root."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any
from uuid import UUID

from django.db.models import QuerySet
from django.utils import timezone

from ...engine import Anomaly, AnomalyKind
from ...exceptions import CheckpointError, EncounterError
from ..output import get_format, register_format, utc_iso, write_atomically
from ..selection import Selection
from .entries import (
    CHECKPOINT_FORMAT,
    DEFAULT_BATCH_SIZE,
    HASH_TEXT,
    CheckpointEntry,
    RootDigest,
    check_definition,
)
from .heads import log_ends, row_hashes
from .signing import load_signing_key, sign


def iter_heads(
    *,
    definition: str | None = None,
    using: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[tuple[CheckpointEntry, Anomaly | None]]:
    """Every selected encounter's head as its log confirms it, in ascending id order, with
    ``None`` — or, when the stored projection disagrees with the log, the anomaly (``head`` or
    ``truncated``) and the log's own head instead.

    The projection's ``(version, head_hash)`` is taken when the row at ``version`` has that
    hash (for version 0: when it is the stored genesis hash); otherwise the log's last row.

    Raises:
        DefinitionNotFoundError: no definition has the code ``definition``.
        ValueError: a bad ``batch_size``.
    """
    selection = Selection.of(definition=definition, batch_size=batch_size, using=using)
    page = (
        selection.queryset()
        .order_by("pk")
        .values_list("pk", "version", "head_hash", "genesis_hash")
    )
    return _heads(page, selection.using, batch_size)


def _heads(
    page: QuerySet, using: str, batch_size: int
) -> Iterator[tuple[CheckpointEntry, Anomaly | None]]:
    last: UUID | None = None
    while True:
        batch = list((page if last is None else page.filter(pk__gt=last))[:batch_size])
        if not batch:
            return
        if last is not None and str(batch[0][0]) <= str(last):
            raise EncounterError("the database returned encounter ids out of order")
        last = batch[-1][0]
        hashes = row_hashes(using, [(pk, version) for pk, version, _, _ in batch if version])
        gone = [pk for pk, version, _, _ in batch if version and (pk, version) not in hashes]
        ends = log_ends(using, gone)
        end_hashes = row_hashes(using, [(pk, end) for pk, end in ends.items() if end])
        for pk, version, head, genesis in batch:
            at_version = hashes.get((pk, version)) if version else genesis
            if at_version == head:
                entry, anomaly = CheckpointEntry(pk, version, head), None
            elif at_version is not None:
                entry = CheckpointEntry(pk, version, at_version)
                anomaly = Anomaly(
                    pk,
                    version,
                    AnomalyKind.HEAD,
                    "the projection's head hash is not the hash of "
                    f"{f'row {version}' if version else 'the genesis'}: the log's was "
                    "checkpointed",
                )
            else:
                end = ends[pk]
                entry = CheckpointEntry(pk, end, end_hashes[(pk, end)] if end else genesis)
                anomaly = Anomaly(
                    pk,
                    version,
                    AnomalyKind.TRUNCATED if version > end else AnomalyKind.HEAD,
                    f"the projection is at version {version} but the log has no row {version} "
                    f"(it ends at {end}): the log's head, version {end}, was checkpointed",
                )
            if not HASH_TEXT.fullmatch(entry.head_hash):
                raise EncounterError(
                    f"encounter {pk}: its head hash {entry.head_hash!r} cannot be checkpointed "
                    "(run audit_encounters --encounter to see why)"
                )
            yield entry, anomaly
        if len(batch) < batch_size:
            return


@dataclass
class WrittenCheckpoint:
    """What :func:`write_checkpoint` wrote."""

    path: str
    root: str  # publish this
    count: int
    created_at: datetime
    definition: str | None
    #: Encounters whose projection disagreed with their log (their log's head was written).
    corrected: list[Anomaly] = field(default_factory=list)
    #: The signing key's fingerprint ("sha256:<hex>"), None when unsigned.
    signed_by: str | None = None
    format: str = CHECKPOINT_FORMAT


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    definition: str | None = None,
    using: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    signing_key: Any = None,
) -> WrittenCheckpoint:
    """Write a checkpoint (format ``django-encounters-checkpoint/2``) of every encounter (or
    those of ``definition``) to ``path``; returns its root (``.root``) and counts.

    With ``signing_key`` — an Ed25519 private key: a PKCS#8 PEM file's path, its bytes, or a
    ``cryptography`` ``Ed25519PrivateKey`` — the root is signed and the signature stored in
    the file (:mod:`.signing`).

    The file is written under a temporary name in the same directory and moved into place when
    complete: ``path`` never holds half a checkpoint. An existing ``path`` is refused unless
    ``overwrite`` (a checkpoint is evidence).

    Raises:
        CheckpointError: ``path`` exists (without ``overwrite``) or cannot be written; a
            signing key that cannot be used (nothing is written then).
        DefinitionNotFoundError: no definition has the code ``definition``.
        ValueError: a bad ``batch_size``.
    """
    target = os.fspath(path)
    problem = check_definition(definition)
    if problem is not None:
        raise CheckpointError(target, problem)
    key = None if signing_key is None else load_signing_key(signing_key, name=target)
    heads = iter_heads(definition=definition, using=using, batch_size=batch_size)
    # Taken before the first encounter is read: every row and encounter recorded before it
    # (less the clock tolerance) is in the checkpoint.
    created_at = timezone.now()
    result = WrittenCheckpoint(target, "", 0, created_at, definition)
    writer = get_format("checkpoint", "json")
    try:
        with write_atomically(target, newline=writer.newline, overwrite=overwrite) as out:
            result.root, result.count, result.signed_by = writer.write(
                out, heads, created_at, definition, result.corrected, key
            )
    except FileExistsError as exc:
        raise CheckpointError(
            target,
            "the file exists and a checkpoint is evidence, so it is kept: choose a new name, or "
            "replace it on purpose with --overwrite (overwrite=True in Python)",
        ) from exc
    except OSError as exc:
        raise CheckpointError(target, f"cannot write: {exc}") from exc
    return result


@register_format("checkpoint", "json", content_type="application/json", newline="\n")
def write_checkpoint_json(
    out: IO[str],
    heads: Iterable[tuple[CheckpointEntry, Anomaly | None]],
    created_at: datetime,
    definition: str | None,
    corrected: list[Anomaly],
    signing_key: Any = None,
) -> tuple[str, int, str | None]:
    """The checkpoint as JSON, one entry per line; returns ``(root, count, signing key's
    fingerprint or None)``."""
    header: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "created_at": utc_iso(created_at),
        "definition": definition,
    }
    out.write("{\n")
    for name, value in header.items():
        out.write(f"  {json.dumps(name)}: {json.dumps(value, ensure_ascii=False)},\n")
    out.write('  "encounters": [')
    root = RootDigest(CHECKPOINT_FORMAT, header["created_at"], definition)
    for entry, anomaly in heads:
        out.write(("," if root.count else "") + "\n    " + json.dumps(entry.as_dict()))
        root.add(entry)
        if anomaly is not None:
            corrected.append(anomaly)
    digest = root.hexdigest()
    signature = None if signing_key is None else sign(signing_key, digest)
    out.write(
        f'\n  ],\n  "count": {root.count},\n  "root": "{digest}",\n'
        f'  "signature": {json.dumps(signature)}\n}}\n'
    )
    return digest, root.count, None if signature is None else signature["key"]
