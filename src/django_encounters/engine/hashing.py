"""Tamper evidence: each row's hash covers its content and the previous row's hash.

The hash of a row is the SHA-256 (hex) of the JSON array

    [encounter id, sequence, from_state, to_state, effective_at, transitioned_at,
     transitioned_by, reason, metadata, previous hash]

written with ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)``;
times as UTC ISO-8601 with microseconds, ``transitioned_by`` as text ("" for nobody), the
metadata in its canonical JSON form (:func:`canonical_json`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from .rows import StreamRow

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


def row_hash(encounter_id: Any, row: StreamRow, previous_hash: str) -> str:
    """The hash of ``row`` (of the encounter ``encounter_id``) chained to ``previous_hash``."""
    sequence, from_state, to_state, reason = row.sequence, row.from_state, row.to_state, row.reason
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
    ):
        payload = "".join(
            (
                "[",
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
                _json_string(previous_hash),
                "]",
            )
        )
    else:
        payload = json.dumps(
            [
                str(encounter_id),
                sequence,
                from_state,
                to_state,
                _utc_iso(row.effective_at),
                _utc_iso(row.transitioned_at),
                by,
                reason,
                canonical_json(metadata),
                previous_hash,
            ],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
