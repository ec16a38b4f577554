"""Tamper evidence: each row's hash covers its content and the previous row's hash; row 1's
previous hash is the encounter's *genesis hash*, over the facts it was created with.

Every stored hash names its format: ``"v1:" + SHA-256 hex``. Format ``v1`` hashes the JSON
text (``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)``) of

    row:     ["v1", encounter id, sequence, from_state, to_state, effective_at,
              transitioned_at, transitioned_by, reason, metadata, definition_version,
              previous hash]
    genesis: ["v1-genesis", encounter id, definition id, definition version, subject type,
              subject id, origin state, created_at]

with ids as text, times as UTC ISO-8601 with microseconds, ``transitioned_by`` as text (""
for nobody) and the metadata in its canonical JSON form (:func:`canonical_json`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from .rows import Genesis, StreamRow

#: The format new hashes are written in; a stored hash starts with ``FORMAT + ":"``.
HASH_FORMAT = "v1"
_PREFIX = HASH_FORMAT + ":"

_UTC = timezone.utc


def _utc_iso(value: datetime) -> str:
    if value.tzinfo is _UTC:  # already UTC (what the databases hand back): same string
        return value.isoformat(timespec="microseconds")
    return value.astimezone(_UTC).isoformat(timespec="microseconds")


def _json_key(key: Any) -> str:
    """The object key JSON stores for ``key`` (what json.dumps writes for it)."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, float):
        return float.__repr__(key)
    return int.__repr__(key) if isinstance(key, int) else str(key)


def canonical_json(value: Any) -> Any:
    """``value`` as the databases hand a JSON column back, so a row hashes the same before the
    INSERT and after any round trip: object keys become strings; numbers take one form — an
    integral number is an ``int`` (PostgreSQL's ``jsonb`` returns ``1e16`` as
    ``10000000000000000`` and ``-0.0`` as ``0``), any other float stays as it is (its shortest
    repr survives both databases)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if value == 0:
            return 0
        if value.is_integer():
            return int(Decimal(repr(value)))
        return value
    if isinstance(value, dict):
        return {_json_key(k): canonical_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_json(v) for v in value]
    return value  # anything else: json.dumps decides (and refuses what it cannot encode)


# ``row_hash`` builds the payload text piecewise when every item is of the usual type (one
# string escaper call per string instead of a JSON encoder per row: replay, rebuild and audit
# hash every row they read); anything unusual takes the reference ``json.dumps`` path.
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_json_string = json.encoder.encode_basestring  # the escaper JSONEncoder uses for these options


def hash_format(stored: str) -> str | None:
    """The format a stored hash names (``"v1"``), or None when it names none."""
    found, colon, _ = (stored or "").partition(":")
    return found if colon else None


def _digest(payload: str) -> str:
    return _PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def genesis_hash(genesis: Genesis) -> str:
    """The hash over an encounter's creation facts: the head of a stream with no rows."""
    return _digest(
        json.dumps(
            [
                HASH_FORMAT + "-genesis",
                str(genesis.encounter_id),
                str(genesis.definition_id),
                genesis.definition_version,
                genesis.subject_type,
                str(genesis.subject_id),
                genesis.origin_state,
                _utc_iso(genesis.created_at),
            ],
            separators=(",", ":"),
            ensure_ascii=False,
        )
    )


def row_hash(encounter_id: Any, row: StreamRow, previous_hash: str) -> str:
    """The hash of ``row`` (of the encounter ``encounter_id``) chained to ``previous_hash``."""
    sequence, from_state, to_state, reason = row.sequence, row.from_state, row.to_state, row.reason
    version = row.definition_version
    by = "" if row.transitioned_by is None else str(row.transitioned_by)
    reason = reason or ""
    metadata = row.metadata if row.metadata is not None else {}
    previous_hash = previous_hash or ""
    if (
        type(sequence) is int
        and type(from_state) is str
        and type(to_state) is str
        and type(reason) is str
        and type(previous_hash) is str
        and type(version) is int
    ):
        payload = "".join(
            (
                '["v1",',
                _json_string(str(encounter_id)),
                ",",
                repr(sequence),
                ",",
                _json_string(from_state),
                ",",
                _json_string(to_state),
                ",",
                _json_string(_utc_iso(row.effective_at)),
                ",",
                _json_string(_utc_iso(row.transitioned_at)),
                ",",
                _json_string(by),
                ",",
                _json_string(reason),
                ",",
                "{}"
                if type(metadata) is dict and not metadata
                else _JSON.encode(canonical_json(metadata)),
                ",",
                repr(version),
                ",",
                _json_string(previous_hash),
                "]",
            )
        )
    else:
        payload = json.dumps(
            [
                HASH_FORMAT,
                str(encounter_id),
                sequence,
                from_state,
                to_state,
                _utc_iso(row.effective_at),
                _utc_iso(row.transitioned_at),
                by,
                reason,
                canonical_json(metadata),
                version,
                previous_hash,
            ],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
    return _digest(payload)
