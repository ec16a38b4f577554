"""Bulk-loading valid encounters for the admin benchmark and the admin's speed tests.

:func:`load_encounters` inserts encounters and their rows with one ``executemany`` per table
and chunk, through Django's own connection (so it works inside a test's transaction, on SQLite
and PostgreSQL): each encounter is genesis-hashed and each row hash-chained exactly as
``create_encounter()`` and ``transition()`` would (the current hash format, the definition
version's content hash), with correct projections, so the audit finds nothing wrong. It is a
fixture builder, not an API: ``transition()`` is the only way a real application writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any


def load_encounters(
    definition: Any,
    count: int,
    path: Sequence[str],
    *,
    subject_type: Any,
    subject_ids: Sequence[Any],
    first_created: datetime,
    spacing: timedelta,
    step: timedelta = timedelta(minutes=10),
    chunk: int = 2000,
    seed: int = 0,
    using: str = "default",
) -> list[uuid.UUID]:
    """Insert ``count`` encounters of ``definition`` (its latest version), the ``i``-th about
    ``subject_ids[i % len(subject_ids)]`` of the model ``subject_type`` (a ``ContentType``),
    created at ``first_created + i * spacing``, each with one row per state of ``path`` (taken
    in order from the initial state, ``step`` apart in business and system time). Returns the
    encounters' ids in creation order."""
    import random

    from django.db import connections, transaction

    from django_encounters.engine import Genesis, StreamRow
    from django_encounters.engine.hashing import genesis_hash, row_hash
    from django_encounters.models import Encounter, EncounterTransition

    connection = connections[using]
    version = definition.versions.get(number=definition.version)
    version_hash = version.content_hash
    subject_name = f"{subject_type.app_label}.{subject_type.model}"
    rng = random.Random(seed)
    enc_fields = list(Encounter._meta.concrete_fields)
    tr_fields = list(EncounterTransition._meta.concrete_fields)
    qn = connection.ops.quote_name

    def insert_sql(model: Any, fields: list[Any]) -> str:
        columns = ", ".join(qn(f.column) for f in fields)
        marks = ", ".join(["%s"] * len(fields))
        return f"INSERT INTO {qn(model._meta.db_table)} ({columns}) VALUES ({marks})"

    enc_sql, tr_sql = insert_sql(Encounter, enc_fields), insert_sql(EncounterTransition, tr_fields)

    def prepared(fields: list[Any], values: dict[str, Any]) -> list[Any]:
        return [f.get_db_prep_save(values[f.attname], connection) for f in fields]

    ids: list[uuid.UUID] = []
    for offset in range(0, count, chunk):
        encounters, rows = [], []
        for i in range(offset, min(offset + chunk, count)):
            eid = uuid.UUID(int=rng.getrandbits(128), version=4)
            ids.append(eid)
            created = first_created + i * spacing
            subject_id = str(subject_ids[i % len(subject_ids)])
            origin = definition.initial_state
            genesis = genesis_hash(
                Genesis(
                    eid, definition.pk, version.number, subject_name, subject_id, origin, created
                ),
                version_hash,
            )
            state, previous, at = origin, genesis, created
            for sequence, to_state in enumerate(path, start=1):
                at = created + sequence * step
                content = StreamRow(
                    sequence, state, to_state, at, at, None, "", {}, version.number, ""
                )
                digest = row_hash(eid, content, previous, version_hash)
                rows.append(
                    prepared(
                        tr_fields,
                        {
                            "id": uuid.UUID(int=rng.getrandbits(128), version=4),
                            "encounter_id": eid,
                            "sequence": sequence,
                            "from_state": state,
                            "to_state": to_state,
                            "transitioned_by_id": None,
                            "transitioned_at": at,
                            "effective_at": at,
                            "reason": "",
                            "metadata": {},
                            "definition_version": version.number,
                            "hash": digest,
                            "transitioned_by_name": "",
                            "seal": "",
                        },
                    )
                )
                state, previous = to_state, digest
            encounters.append(
                prepared(
                    enc_fields,
                    {
                        "id": eid,
                        "definition_id": definition.pk,
                        "subject_content_type_id": subject_type.pk,
                        "subject_id": subject_id,
                        "state": state,
                        "origin_state": origin,
                        "version": len(path),
                        "timeline_end_at": at if path else None,
                        "head_hash": previous,
                        "genesis_hash": genesis,
                        "genesis_seal": "",
                        "origin_version": version.number,
                        "definition_version": version.number,
                        "last_transitioned_at": at if path else None,
                        "scheduled_at": created,
                        "started_at": None,
                        "ended_at": None,
                        "created_by_id": None,
                        "assigned_to_id": None,
                        "notes": "",
                        "metadata": {},
                        "created_at": created,
                        "updated_at": created,
                        "deleted_at": None,
                    },
                )
            )
        with transaction.atomic(using=using), connection.cursor() as cursor:
            cursor.executemany(enc_sql, encounters)
            if rows:
                cursor.executemany(tr_sql, rows)
    return ids
