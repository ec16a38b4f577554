"""Verifying a checkpoint: its entries, streamed from the file, compared with the log."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from django.db.models import QuerySet

from ...arguments import encounter_ids, require_positive_int
from ...engine import Anomaly, AnomalyKind, evidence_of
from ...models import Encounter
from ..selection import read_alias
from .entries import DEFAULT_BATCH_SIZE, CheckpointCheck, CheckpointEntry
from .heads import log_ends, row_hashes
from .reading import open_checkpoint


def verify_checkpoint(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    using: str | None = None,
    root: str | None = None,
    selected: QuerySet | None = None,
    encounters: Iterable[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> CheckpointCheck:
    """Compare a checkpoint (a file path, or its parsed JSON) with the log; the result's
    ``anomalies`` name every encounter whose log no longer extends its checkpointed prefix:
    ``rewritten`` (the row at the checkpointed version — the genesis hash at version 0 — has
    another hash), ``truncated`` (the log ends before it), ``missing`` (the encounter is gone;
    sequence 0).

    This compares stored hashes: it proves the prefix together with the verification of each
    chain up to that row, which ``audit_encounters(against=...)`` runs on the same encounters
    (a row edited without recomputing its hash is a ``hash`` anomaly there, not here).

    Args:
        root: the root that was published: the checkpoint's must be this one.
        selected: compare only the entries of these encounters (an ``Encounter`` queryset);
            an encounter that no longer exists is reported whatever the selection (nothing is
            left to select it by).
        encounters: compare only these ids (missing ones included).

    Raises:
        CheckpointError: unreadable, not JSON, another format, malformed entries, a root that
            does not match the entries (or is not ``root``). Nothing is reported then.
    """
    using = read_alias(using)
    require_positive_int(batch_size, "batch_size")
    only = None if encounters is None else set(encounter_ids(encounters))
    _, checkpoint, entries, handle = open_checkpoint(source)
    anomalies: list[Anomaly] = []
    checked = 0
    try:
        batch: list[CheckpointEntry] = []
        for entry in entries:
            if only is None or entry.id in only:
                batch.append(entry)
            if len(batch) >= batch_size:
                checked += _compare(batch, using, selected, anomalies)
                batch = []
        if batch:
            checked += _compare(batch, using, selected, anomalies)
    finally:
        if handle is not None:
            handle.close()
    result = checkpoint.finish(root)  # the root proves the entries compared above
    result.checked = checked
    # Each finding's evidence: the root it was found against, then what was found (an
    # acknowledgement given against one checkpoint covers nothing found against another).
    result.anomalies = [
        replace(a, evidence=evidence_of(result.root, a.evidence)) for a in anomalies
    ]
    return result


def _compare(
    batch: list[CheckpointEntry], using: str, selected: QuerySet | None, found: list[Anomaly]
) -> int:
    """Compare one batch of entries with the log; returns how many were compared."""
    ids = [entry.id for entry in batch]
    genesis = dict(
        Encounter.all_objects.using(using).filter(pk__in=ids).values_list("pk", "genesis_hash")
    )
    if selected is None:
        chosen = set(genesis)
    else:
        chosen = set(selected.filter(pk__in=list(genesis)).values_list("pk", flat=True))
    compared = [entry for entry in batch if entry.id in chosen]
    hashes = row_hashes(using, [(e.id, e.version) for e in compared if e.version])
    ends = log_ends(
        using, [e.id for e in compared if e.version and (e.id, e.version) not in hashes]
    )
    for entry in batch:
        pk, version, expected = entry.id, entry.version, entry.head_hash
        if pk not in genesis:
            found.append(
                Anomaly(
                    pk,
                    0,
                    AnomalyKind.MISSING,
                    f"the encounter is gone: the checkpoint has it at version {version} "
                    f"(head {expected[:15]}…)",
                    "gone",
                )
            )
        elif pk not in chosen:
            continue
        elif version == 0:
            if genesis[pk] != expected:
                found.append(
                    Anomaly(
                        pk,
                        0,
                        AnomalyKind.REWRITTEN,
                        f"the genesis hash is {genesis[pk][:15]}…, the checkpoint has "
                        f"{expected[:15]}…: the creation facts were rewritten",
                        genesis[pk],
                    )
                )
        elif (pk, version) in hashes:
            if hashes[(pk, version)] != expected:
                found.append(
                    Anomaly(
                        pk,
                        version,
                        AnomalyKind.REWRITTEN,
                        f"row {version} has the hash {hashes[(pk, version)][:15]}…, the "
                        f"checkpoint has {expected[:15]}…: the stream was rewritten at or "
                        f"before row {version}",
                        hashes[(pk, version)],
                    )
                )
        elif ends[pk] < version:
            found.append(
                Anomaly(
                    pk,
                    version,
                    AnomalyKind.TRUNCATED,
                    f"the log ends at row {ends[pk]} but the checkpoint has it at version "
                    f"{version}: rows {ends[pk] + 1}..{version} are gone",
                    f"ends at {ends[pk]}",
                )
            )
        else:
            found.append(
                Anomaly(
                    pk,
                    version,
                    AnomalyKind.REWRITTEN,
                    f"row {version}, checkpointed with the hash {expected[:15]}…, is gone "
                    f"(the log goes on to row {ends[pk]})",
                    f"gone, ends at {ends[pk]}",
                )
            )
    return len(compared)
