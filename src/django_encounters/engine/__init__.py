"""The domain of django-encounters, with no Django import: the timeline aggregate (decide and
replay), its rules, the verifying replay and the anomaly kinds it reports, row hashing (a
registry of hash formats), time in state and the errors they raise. Usable and testable
without a database or settings."""

from .errors import (
    ANOMALY_KINDS,
    AnomalyKind,
    ConcurrentTransitionError,
    EffectiveAtOutOfRangeError,
    EncounterError,
    EncounterNotFoundError,
    InvalidStateError,
    InvalidTransitionError,
    ProjectionDriftError,
    StreamGapError,
    StreamNeeded,
    ValidationError,
)
from .hashing import (
    HASH_FORMAT,
    HASH_FORMATS,
    HashFormat,
    canonical_json,
    definition_version_hash,
    genesis_hash,
    hash_format,
    register_hash_format,
    row_hash,
)
from .intervals import intervals, time_in_states
from .rows import READABLE_FIELDS, ROW_FIELDS, Genesis, StreamRow, stored_precision
from .rules import Rules
from .timeline import (
    EARLIEST_EFFECTIVE_AT,
    TIMELINE_ORDER,
    TIMELINE_ORDER_DESC,
    EncounterTimeline,
    Entry,
    known_prefix,
)
from .verify import Anomaly, Replay, evidence_of, verify_stream

__all__ = [
    "ANOMALY_KINDS",
    "HASH_FORMAT",
    "HASH_FORMATS",
    "AnomalyKind",
    "HashFormat",
    "register_hash_format",
    "Genesis",
    "genesis_hash",
    "hash_format",
    "known_prefix",
    "stored_precision",
    "READABLE_FIELDS",
    "ROW_FIELDS",
    "EARLIEST_EFFECTIVE_AT",
    "TIMELINE_ORDER",
    "TIMELINE_ORDER_DESC",
    "Anomaly",
    "ConcurrentTransitionError",
    "EffectiveAtOutOfRangeError",
    "EncounterError",
    "EncounterNotFoundError",
    "EncounterTimeline",
    "Entry",
    "InvalidStateError",
    "InvalidTransitionError",
    "ProjectionDriftError",
    "Replay",
    "Rules",
    "StreamGapError",
    "StreamNeeded",
    "StreamRow",
    "ValidationError",
    "canonical_json",
    "definition_version_hash",
    "evidence_of",
    "intervals",
    "row_hash",
    "time_in_states",
    "verify_stream",
]
