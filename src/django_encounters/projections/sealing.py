"""Adopting seals and rotating their key: :func:`seal_encounters` (``manage.py
seal_encounters``).

A log written before ``ENCOUNTERS_SEAL_KEYS`` was configured (or by the previous release) is
verified first — every stream by the one fold (:class:`~.replay.Replays`: genesis, hash chain,
versions, rules, head) and every definition's chain of versions — and only then sealed under
the current key: the rows, each encounter's genesis, the definition versions (a version with
no content hash gets its chain's, in number order, first) and the acknowledgements that have a
hash. Nothing is written while an anomaly nobody acknowledged stands: a seal says "this was
verified when it was sealed", and sealing a forged row would launder it.

``rekey`` also re-seals what is sealed under another configured key with the current one
(after a rotation: the old key can then be retired). A seal that does not verify under any
configured key is an anomaly, never re-sealed.

Writes go in batches, one transaction per batch (each batch's encounters locked while their
streams are re-read and sealed); the seal columns are the only ones the append-only triggers
let change. Running it again seals nothing new: it is idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, transaction

from .. import conf
from ..engine.seals import Sealer
from ..exceptions import EncounterConfigurationError, SealingRefusedError
from ..models import (
    AnomalyAcknowledgement,
    Encounter,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from ..store.schema import field as model_field
from .acknowledgements import mark_key
from .audit import definition_audits
from .replay import Replays, Verified
from .selection import RulesCache, Selection, chained_rules, write_alias

__all__ = ["SealSummary", "seal_encounters"]

DEFAULT_BATCH_SIZE = 500
#: The kind the audit reports a missing, wrong or unknown-key seal with: examined here, by
#: the seals themselves (an unsealed record is what this seals; a wrong seal refuses).
_SEAL_KIND = "seal"


@dataclass
class SealSummary:
    """What :func:`seal_encounters` did."""

    key_id: str
    rows: int = 0
    genesis: int = 0
    versions: int = 0
    version_hashes: int = 0  # versions given their content hash
    acknowledgements: int = 0
    encounters: int = 0  # encounters verified
    skipped: list[Any] = field(default_factory=list)  # encounters with new anomalies

    @property
    def sealed(self) -> int:
        return self.rows + self.genesis + self.versions + self.acknowledgements

    def __str__(self) -> str:
        text = (
            f"{self.encounters} encounter(s) verified; sealed under key {self.key_id!r}: "
            f"{self.rows} row(s), {self.genesis} genesis, {self.versions} version(s) "
            f"({self.version_hashes} given their content hash), "
            f"{self.acknowledgements} acknowledgement(s)"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} encounter(s) left unsealed (anomalies found meanwhile)"
        return text


def _sealer() -> Sealer:
    sealer = conf.sealer()
    if sealer is None or sealer.current is None:
        raise EncounterConfigurationError(
            "no seal key is configured: set ENCOUNTERS_SEAL_KEYS (and ENCOUNTERS_SEAL_KEY_ID "
            "when there are several keys) in the settings before sealing"
        )
    return sealer


def _needs_seal(sealer: Sealer, tag: str, record_hash: str, stored: str, rekey: bool) -> bool:
    """Whether a record is to be (re-)sealed now: unsealed; or, with ``rekey``, validly sealed
    under another key than the current one. A seal that does not verify is an anomaly
    (:func:`_bad_seal`), never replaced."""
    if not stored:
        return True
    if rekey and stored.partition(":")[0] != sealer.current:
        return sealer.problem(tag, record_hash, stored) is None
    return False


def _bad_seal(sealer: Sealer, tag: str, record_hash: str, stored: str) -> str | None:
    return None if not stored else sealer.problem(tag, record_hash, stored)


def _standing(verified: Verified, sealer: Sealer) -> list[str]:
    """The anomalies of one verified encounter nobody acknowledged (seal anomalies aside:
    the seals are examined here), and any stored seal that does not verify."""
    found = [
        str(anomaly)
        for anomaly in verified.anomalies
        if anomaly.kind != _SEAL_KIND and mark_key(anomaly) not in verified.acknowledged
    ]
    (genesis_seal,) = verified.extra
    genesis_hash = verified.replay.hashes[0]  # the stored genesis hash
    problem = _bad_seal(sealer, "genesis", genesis_hash, genesis_seal)
    if problem:
        found.append(f"encounter {verified.id} genesis: {problem}")
    for row in verified.stream:
        problem = _bad_seal(sealer, "row", row.hash, row.seal)
        if problem:
            found.append(f"encounter {verified.id} sequence {row.sequence}: {problem}")
    return found


def _replays(using: str, batch_size: int, rules: RulesCache) -> Replays:
    selection = Selection.of(batch_size=batch_size, using=using, for_write=True)
    # A subject that is gone says nothing about the records a seal vouches for.
    return Replays(selection, extra=("genesis_seal",), rules=rules, subjects=False)


def _version_problems(rules: RulesCache, sealer: Sealer, using: str) -> list[str]:
    # A definition version's own finding stands until it is acknowledged, like any other.
    found = [
        f"definition {entry.definition}: {anomaly.detail}"
        for entry in definition_audits(rules, using, None, sealer)
        for anomaly in entry.unacknowledged
    ]
    for version in EncounterDefinitionVersion.objects.using(using).exclude(seal=""):
        problem = _bad_seal(sealer, "version", version.content_hash, version.seal)
        if problem:
            found.append(f"{version}: {problem}")
    for ack in AnomalyAcknowledgement.objects.using(using).exclude(seal=""):
        problem = _bad_seal(sealer, "acknowledgement", ack.hash, ack.seal)
        if problem:
            found.append(f"acknowledgement {ack.pk}: {problem}")
    return found


def seal_encounters(
    *, rekey: bool = False, batch_size: int = DEFAULT_BATCH_SIZE, using: str | None = None
) -> SealSummary:
    """Verify the whole log, then seal what is unsealed under the current key (with
    ``rekey``: also re-seal what is validly sealed under another configured key).

    Raises:
        EncounterConfigurationError: no seal key is configured (nothing written).
        SealingRefusedError: anomalies nobody acknowledged stand (nothing written); its
            ``anomalies`` lists them.
    """
    sealer = _sealer()
    using = write_alias(using)
    rules = RulesCache(using)
    # 1. Verify everything, writing nothing.
    standing = _version_problems(rules, sealer, using)
    encounters = 0
    for verified in _replays(using, batch_size, rules):
        encounters += 1
        standing.extend(_standing(verified, sealer))
    if standing:
        raise SealingRefusedError(standing)
    assert sealer.current is not None
    summary = SealSummary(sealer.current, encounters=encounters)
    # 2. The versions (their content hash first, in chain order), then the streams, batch by
    #    batch, then the acknowledgements.
    _seal_versions(sealer, rules, using, rekey, summary)
    replays = _replays(using, batch_size, RulesCache(using))
    while True:
        with transaction.atomic(using=using):
            batch = replays.next_batch(lock=True)
            if batch is None:
                break
            _seal_batch(sealer, batch, using, rekey, summary)
    _seal_acknowledgements(sealer, using, rekey, batch_size, summary)
    return summary


def _seal_versions(
    sealer: Sealer, rules: RulesCache, using: str, rekey: bool, summary: SealSummary
) -> None:
    versions = list(
        EncounterDefinitionVersion.objects.using(using)
        .select_related("definition")
        .order_by("definition_id", "number")
    )
    by_definition: dict[Any, list[EncounterDefinitionVersion]] = {}
    for version in versions:
        by_definition.setdefault(version.definition_id, []).append(version)
    table = EncounterDefinitionVersion._meta.db_table
    with transaction.atomic(using=using):
        for definition_id, machines in by_definition.items():
            chain = chained_rules(definition_id, rules.code(definition_id), machines)
            for version, chained in zip(machines, chain, strict=True):
                if not version.content_hash:
                    version.content_hash = chained.content_hash
                    _update(using, table, "content_hash", [(chained.content_hash, version.pk)])
                    summary.version_hashes += 1
                tag = "version"
                if _needs_seal(sealer, tag, version.content_hash, version.seal, rekey):
                    seal = sealer.seal(tag, version.content_hash)
                    _update(using, table, "seal", [(seal, version.pk)])
                    summary.versions += 1


def _seal_batch(
    sealer: Sealer, batch: list[Verified], using: str, rekey: bool, summary: SealSummary
) -> None:
    rows: list[tuple[str, Any, int]] = []
    genesis: list[tuple[str, Any]] = []
    for verified in batch:
        if _standing(verified, sealer):
            summary.skipped.append(verified.id)
            continue
        (genesis_seal,) = verified.extra
        genesis_hash = verified.replay.hashes[0]
        if _needs_seal(sealer, "genesis", genesis_hash, genesis_seal, rekey):
            genesis.append((sealer.seal("genesis", genesis_hash), verified.id))
        for row in verified.stream:
            if _needs_seal(sealer, "row", row.hash, row.seal, rekey):
                rows.append((sealer.seal("row", row.hash), verified.id, row.sequence))
    connection = connections[using]
    qn = connection.ops.quote_name
    if genesis:
        _update(using, Encounter._meta.db_table, "genesis_seal", genesis)
        summary.genesis += len(genesis)
    if rows:
        meta = EncounterTransition._meta
        encounter = model_field(EncounterTransition, "encounter").column
        sequence = model_field(EncounterTransition, "sequence").column
        with connection.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {qn(meta.db_table)} SET {qn('seal')} = %s "
                f"WHERE {qn(encounter)} = %s AND {qn(sequence)} = %s",
                [(seal, _pk(connection, pk), number) for seal, pk, number in rows],
            )
        summary.rows += len(rows)


def _seal_acknowledgements(
    sealer: Sealer, using: str, rekey: bool, batch_size: int, summary: SealSummary
) -> None:
    table = AnomalyAcknowledgement._meta.db_table
    pending = [
        (ack.pk, ack.hash, ack.seal)
        for ack in AnomalyAcknowledgement.objects.using(using).exclude(hash="").order_by("pk")
        if _needs_seal(sealer, "acknowledgement", ack.hash, ack.seal, rekey)
    ]
    for start in range(0, len(pending), batch_size):
        with transaction.atomic(using=using):
            _update(
                using,
                table,
                "seal",
                [
                    (sealer.seal("acknowledgement", record_hash), pk)
                    for pk, record_hash, _ in pending[start : start + batch_size]
                ],
            )
    summary.acknowledgements += len(pending)


def _pk(connection: Any, pk: Any) -> Any:
    """A UUID primary key as the backend stores it (SQLite: 32 hex digits)."""
    return Encounter._meta.pk.get_db_prep_value(pk, connection)


def _update(using: str, table: str, column: str, values: Iterable[tuple[str, Any]]) -> None:
    """``UPDATE table SET column = value WHERE id = pk`` for each ``(value, pk)``."""
    connection = connections[using]
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {qn(table)} SET {qn(column)} = %s WHERE {qn('id')} = %s",
            [(value, _pk(connection, pk)) for value, pk in values],
        )
