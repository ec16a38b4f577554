"""Verifying a checkpoint: its entries, streamed from the file, compared with the log — and
the log compared with the checkpoint: what claims to have been recorded before it must be in
it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from ... import conf
from ...arguments import require_positive_int
from ...engine import Anomaly, AnomalyKind, evidence_of
from ...models import Encounter, EncounterDefinition, EncounterTransition
from ..output import utc_iso
from ..selection import read_alias
from .entries import DEFAULT_BATCH_SIZE, CheckpointCheck, CheckpointEntry
from .heads import log_ends, row_hashes, rows_after
from .reading import open_checkpoint
from .signing import load_verify_key


def verify_checkpoint(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    using: str | None = None,
    root: str | None = None,
    verify_key: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> CheckpointCheck:
    """Compare a checkpoint (a file path, or its parsed JSON) with the log, whole; the
    result's ``anomalies`` name

    * every encounter of the checkpoint whose log no longer extends its checkpointed prefix:
      ``rewritten`` (the row at the checkpointed version — the genesis hash at version 0 — has
      another hash), ``truncated`` (the log ends before it), ``missing`` (the encounter is
      gone; sequence 0);
    * every row outside the checkpoint (after its version of the encounter, or of an
      encounter of its scope it does not have) that claims to have been recorded before it:
      ``transitioned_at`` earlier than the checkpoint's ``created_at`` less the clock
      tolerance (``ENCOUNTERS_FUTURE_TOLERANCE``, 5 minutes by default): ``unrecorded``;
    * every encounter of its scope (every encounter, or those of its definition by code)
      created before that time and absent from it: ``uncheckpointed`` (sequence 0).

    This compares stored hashes: it proves the prefix together with the verification of each
    chain up to that row, which ``audit_encounters(against=...)`` runs (a row edited without
    recomputing its hash is a ``hash`` anomaly there, not here). It covers the whole
    checkpoint: a selection cannot leave an encounter out of it.

    Args:
        root: the root that was published: the checkpoint's must be this one.
        verify_key: an Ed25519 public key (a PEM file's path, its bytes, or the key object):
            the checkpoint must be signed with it.

    Raises:
        CheckpointError: unreadable, not JSON, another format, malformed entries, a root that
            does not match the entries (or is not ``root``); with ``verify_key``, unsigned or
            a signature that does not verify. Nothing is reported then.
    """
    using = read_alias(using)
    require_positive_int(batch_size, "batch_size")
    tolerance = conf.future_tolerance()
    name, checkpoint, entries, handle = open_checkpoint(source)
    try:
        key = None if verify_key is None else load_verify_key(verify_key, name=name)
        anomalies: list[Anomaly] = []
        checked = 0
        scope: _Scope | None = None
        after: UUID | None = None
        batch: list[CheckpointEntry] = []
        for entry in _then_end(entries):
            if entry is not None:
                batch.append(entry)
                if len(batch) < batch_size:
                    continue
            if scope is None:
                checkpoint.begin()  # the header (a checkpoint without entries: read now)
                assert checkpoint.created_at is not None
                scope = _Scope(
                    using, checkpoint.created_at, tolerance, checkpoint.fields["definition"]
                )
            if batch:
                checked += _compare(batch, using, anomalies)
                scope.outside(after, batch, anomalies)
                after = batch[-1].id
                batch = []
    finally:
        if handle is not None:
            handle.close()
    result = checkpoint.finish(root, key)  # the root proves the entries compared above
    assert scope is not None
    scope.after_last(after, batch_size, anomalies)
    result.checked = checked
    result.tolerance = tolerance
    # Each finding's evidence: the root it was found against, then what was found (an
    # acknowledgement given against one checkpoint covers nothing found against another).
    result.anomalies = [
        replace(a, evidence=evidence_of(result.root, a.evidence)) for a in anomalies
    ]
    return result


def _then_end(entries: Iterator[CheckpointEntry]) -> Iterator[CheckpointEntry | None]:
    yield from entries
    yield None


@dataclass
class _Scope:
    """What a checkpoint vouches for — every encounter, or those of its definition — and the
    time before which everything recorded must be in it (``cutoff``: its time less the
    clock tolerance)."""

    using: str
    created_at: datetime
    tolerance: timedelta
    definition: str | None

    def __post_init__(self) -> None:
        self.cutoff = self.created_at - self.tolerance
        self.definition_ids: list[Any] | None = None
        if self.definition is not None:
            self.definition_ids = list(
                EncounterDefinition.all_objects.using(self.using)
                .filter(code=self.definition)
                .values_list("pk", flat=True)
            )

    def _encounters(self) -> Any:
        encounters = Encounter.all_objects.using(self.using)
        if self.definition_ids is not None:
            encounters = encounters.filter(definition_id__in=self.definition_ids)
        return encounters

    def outside(
        self, after: UUID | None, batch: list[CheckpointEntry], found: list[Anomaly]
    ) -> None:
        """The rows after the batch's checkpointed versions, and the encounters of the scope
        between ``after`` and the batch's last id that it does not have, recorded before the
        cutoff."""
        versions = {entry.id: entry.version for entry in batch}
        for encounter_id, sequence, recorded in rows_after(self.using, versions, self.cutoff):
            found.append(self._unrecorded(encounter_id, sequence, recorded, versions[encounter_id]))
        in_range = self._encounters().filter(pk__lte=batch[-1].id)
        if after is not None:
            in_range = in_range.filter(pk__gt=after)
        absent = in_range.exclude(pk__in=list(versions)).order_by("pk")
        self._absent(list(absent.values_list("pk", "created_at")), found)

    def after_last(self, after: UUID | None, batch_size: int, found: list[Anomaly]) -> None:
        """The encounters of the scope after the checkpoint's last id."""
        page = self._encounters().order_by("pk")
        while True:
            query = page if after is None else page.filter(pk__gt=after)
            absent = list(query.values_list("pk", "created_at")[:batch_size])
            if not absent:
                return
            self._absent(absent, found)
            after = absent[-1][0]

    def _absent(self, absent: list[tuple[UUID, datetime]], found: list[Anomaly]) -> None:
        """Encounters of the scope the checkpoint does not have: those created before the
        cutoff, and their rows recorded before it."""
        if not absent:
            return
        rows: dict[UUID, list[tuple[int, datetime]]] = {}
        for encounter_id, sequence, recorded in (
            EncounterTransition.objects.using(self.using)
            .filter(encounter_id__in=[pk for pk, _ in absent], transitioned_at__lt=self.cutoff)
            .order_by("encounter_id", "sequence")
            .values_list("encounter_id", "sequence", "transitioned_at")
        ):
            rows.setdefault(encounter_id, []).append((sequence, recorded))
        for pk, created_at in absent:
            if created_at < self.cutoff:
                found.append(
                    Anomaly(
                        pk,
                        0,
                        AnomalyKind.UNCHECKPOINTED,
                        f"the encounter claims to have been created at {utc_iso(created_at)}, "
                        f"{self._before()}, which does not have it: it was added afterwards "
                        "with an earlier time",
                    )
                )
            for sequence, recorded in rows.get(pk, []):
                found.append(self._unrecorded(pk, sequence, recorded, None))

    def _before(self) -> str:
        scope = "" if self.definition is None else f" of definition {self.definition}"
        return (
            f"more than {self.tolerance.total_seconds():g} s (the clock tolerance) before the "
            f"checkpoint{scope} of {utc_iso(self.created_at)}"
        )

    def _unrecorded(
        self, pk: UUID, sequence: int, recorded: datetime, version: int | None
    ) -> Anomaly:
        has = (
            "which does not have the encounter"
            if version is None
            else f"which has the stream at version {version}"
        )
        return Anomaly(
            pk,
            sequence,
            AnomalyKind.UNRECORDED,
            f"row {sequence} claims to have been recorded at {utc_iso(recorded)}, "
            f"{self._before()}, {has}: it was appended afterwards with an earlier recording "
            "time",
        )


def _compare(batch: list[CheckpointEntry], using: str, found: list[Anomaly]) -> int:
    """Compare one batch of entries with the log; returns how many were compared."""
    ids = [entry.id for entry in batch]
    genesis = dict(
        Encounter.all_objects.using(using).filter(pk__in=ids).values_list("pk", "genesis_hash")
    )
    compared = [entry for entry in batch if entry.id in genesis]
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
