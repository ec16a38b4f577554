"""The log's hashes at given versions, as writing and verifying a checkpoint read them, and the
rows after given versions."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.db.models import Max, Q

from ...models import EncounterTransition

#: Entries compared per OR-ed query of row hashes (SQLite parses an OR chain as a tree whose
#: depth is capped at 1000).
_OR_TERMS = 100


def row_hashes(using: str, wanted: list[tuple[UUID, int]]) -> dict[tuple[UUID, int], str]:
    """``{(encounter id, sequence): stored hash}`` of the rows that exist among ``wanted``
    (sequences > 0): one query per ``_OR_TERMS`` distinct sequences, usually one."""
    by_sequence: dict[int, list[UUID]] = {}
    for encounter_id, sequence in wanted:
        by_sequence.setdefault(sequence, []).append(encounter_id)
    groups = sorted(by_sequence.items())
    found: dict[tuple[UUID, int], str] = {}
    rows = EncounterTransition.objects.using(using)
    for start in range(0, len(groups), _OR_TERMS):
        where = Q()
        for sequence, ids in groups[start : start + _OR_TERMS]:
            where |= Q(sequence=sequence, encounter_id__in=ids)
        for encounter_id, sequence, stored in rows.filter(where).values_list(
            "encounter_id", "sequence", "hash"
        ):
            found[(encounter_id, sequence)] = stored
    return found


def log_ends(using: str, ids: list[UUID]) -> dict[UUID, int]:
    """The last sequence of each encounter's log (0 when it has no rows)."""
    if not ids:
        return {}
    ends = dict(
        EncounterTransition.objects.using(using)
        .filter(encounter_id__in=ids)
        .values("encounter_id")
        .annotate(end=Max("sequence"))
        .values_list("encounter_id", "end")
    )
    return {pk: ends.get(pk, 0) for pk in ids}


def rows_after(
    using: str, versions: dict[UUID, int], before: datetime
) -> list[tuple[UUID, int, datetime]]:
    """``(encounter id, sequence, transitioned_at)`` of the rows after ``versions`` (each
    encounter's checkpointed version) recorded before ``before``, in encounter and sequence
    order: one query per ``_OR_TERMS`` distinct versions."""
    by_version: dict[int, list[UUID]] = {}
    for encounter_id, version in versions.items():
        by_version.setdefault(version, []).append(encounter_id)
    groups = sorted(by_version.items())
    rows = EncounterTransition.objects.using(using).filter(transitioned_at__lt=before)
    found: list[tuple[UUID, int, datetime]] = []
    for start in range(0, len(groups), _OR_TERMS):
        where = Q()
        for version, ids in groups[start : start + _OR_TERMS]:
            where |= Q(encounter_id__in=ids, sequence__gt=version)
        found.extend(rows.filter(where).values_list("encounter_id", "sequence", "transitioned_at"))
    return sorted(found, key=lambda row: (str(row[0]), row[1]))
