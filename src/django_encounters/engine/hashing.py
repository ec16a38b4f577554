"""Tamper evidence: each row's hash covers its content and the previous row's hash; row 1's
previous hash is the encounter's *genesis hash*, over the facts it was created with.

Every stored hash names its format: ``<name>:`` then the digest (``"v2:" + SHA-256 hex``). Each
format is one :class:`HashFormat` in a registry (:data:`HASH_FORMATS`,
:func:`register_hash_format`): its name and the functions that build its row payload head, its
row hash and its genesis hash. New hashes are written in :data:`HASH_FORMAT` (``CURRENT``);
the verifier recomputes each stored hash in the format its prefix names, so rows hashed in an
older registered format keep verifying after the current format changes, and a hash whose
prefix names no registered format is reported. Adding a format is one entry here.

Format ``v3`` (the current one) hashes the UTF-8 bytes of one line of text with a fixed
layout, built with one string format per row (no JSON encoder per row, one ``hashlib`` call)::

    row:     v3|row|<encounter id>|<sequence>|<from_state>|<to_state>|<effective_at>|
             <transitioned_at>|<transitioned_by>|<transitioned_by_name>|<reason>|<metadata>|
             <definition version>|<version hash>|<previous hash>
    genesis: v3|genesis|<encounter id>|<definition id>|<definition version>|<version hash>|
             <subject type>|<subject id>|<origin state>|<created_at>
    version: v3|version|<definition id>|<number>|<machine>|<previous version hash>

where ``<transitioned_by_name>`` is the user's name recorded with the row (text, ``""`` for
nobody), ``<version hash>`` the content hash (text, ``"v3:…"``) of the definition version the
row was decided under (the genesis: the encounter was created under), ``<machine>`` the
version's state machine as canonical JSON (text: the object ``{"final_states", "initial_state",
"states", "transitions", "validators"}`` through :func:`canonical_json`, ``sort_keys``, compact
separators, ``ensure_ascii=False``) and ``<previous version hash>`` the content hash of version
``number - 1`` of the same definition (text, ``""`` for version 1): versions are chained per
definition, and every row commits to the version it was judged by. The verifier looks a
version's hash up by number (a callable per stream, :data:`VersionHashes`), recomputed from
the versions table, so a changed version breaks the hash of every row decided under it.

Format ``v2`` (the previous one; its hashes keep verifying) has the same rules without the
name and the version hashes::

    row:     v2|row|<encounter id>|<sequence>|<from_state>|<to_state>|<effective_at>|
             <transitioned_at>|<transitioned_by>|<reason>|<metadata>|<definition version>|
             <previous hash>
    genesis: v2|genesis|<encounter id>|<definition id>|<definition version>|<subject type>|
             <subject id>|<origin state>|<created_at>

(one line, no line breaks; ``|`` separates the fields) where

* a *text* field is written ``<length>:<text>``, its length in code points as a decimal
  number: ids as text (``str(id)``; a UUID in its canonical hyphenated lower-case form),
  states, the subject type (``app_label.model``), ``transitioned_by`` as text (``""`` for
  nobody), the reason (``""`` for none), the previous hash (as stored, ``"v2:…"``) and the
  metadata as canonical JSON (:func:`canonical_json`, then ``sort_keys``, compact separators,
  ``ensure_ascii=False``; ``{}`` for none);
* an *integer* field (sequence, definition version) is its decimal form;
* a *time* is the integer number of microseconds since 1970-01-01T00:00:00 UTC (negative
  before), in decimal.

Every text field carries its length and no integer contains ``|``, so the layout is
unambiguous: two different rows never have the same payload. A row or genesis whose version
has no content hash yet (versions written before ``v3``, until ``seal_encounters`` hashes them)
is written in ``v2``. Format ``v1`` (canonical JSON of
a list per row, ISO-8601 times) was replaced by ``v2`` before the first release and is not
registered: a ``v1:`` hash is reported as a hash in no known format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import partial
from hashlib import sha256
from typing import Any

from .rows import Genesis, StreamRow

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def epoch_microseconds(value: datetime) -> int:
    """``value`` (timezone-aware) as whole microseconds since the epoch, in UTC."""
    return (value - _EPOCH) // _MICROSECOND


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


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def metadata_text(metadata: Any) -> str:
    """The metadata as the hash covers it: its canonical JSON text (``{}`` for none)."""
    if metadata is None or (type(metadata) is dict and not metadata):
        return "{}"  # the usual metadata: no encoder
    return _JSON.encode(canonical_json(metadata))


#: ``definition version number -> its content hash`` ("" or None when it has none) for the
#: definition of one stream: what a format that commits rows to their version looks up.
VersionHashes = Callable[[int], "str | None"]


def no_version_hashes(number: int) -> str | None:
    """The :data:`VersionHashes` of a caller that knows no version's hash."""
    return None


@dataclass(frozen=True)
class HashFormat:
    """One hash format: its ``name`` (a stored hash starts with ``prefix``, ``name + ":"``)
    and the functions that compute it, each returning the hash as stored (prefixed):

    * ``row_head(encounter_id_text, version_hashes)``: what every row's hash of one stream
      needs that only depends on the encounter (the head of its payload, the version lookup),
      built once per stream;
    * ``hash_row(head, row, previous_hash)``: a row's hash, chained to ``previous_hash``;
    * ``hash_genesis(genesis, encounter_id_text, version_hashes)``: the genesis hash;
    * ``hash_version(definition_id_text, number, machine, previous_hash)``: a definition
      version's content hash (None: the format does not hash versions).
    """

    name: str
    row_head: Callable[[str, VersionHashes], Any]
    hash_row: Callable[[Any, StreamRow, str], str]
    hash_genesis: Callable[[Genesis, str, VersionHashes], str]
    hash_version: Callable[[str, int, Any, str], str] | None = None
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.name or not self.name.isascii() or not self.name.isalnum():
            raise ValueError(f"a hash format's name is ASCII letters and digits: {self.name!r}")
        object.__setattr__(self, "prefix", self.name + ":")

    def genesis_hash(
        self, genesis: Genesis, version_hashes: VersionHashes = no_version_hashes
    ) -> str:
        """The hash over an encounter's creation facts, in this format."""
        return self.hash_genesis(genesis, str(genesis.encounter_id), version_hashes)

    def stream_hasher(
        self, encounter_id: Any, version_hashes: VersionHashes = no_version_hashes
    ) -> Callable[[StreamRow, str], str]:
        """``(row, previous_hash) -> hash`` in this format for the rows of one encounter, the
        encounter's part of the payload built once."""
        return partial(self.hash_row, self.row_head(str(encounter_id), version_hashes))


#: The registered formats by name: the ones a stored hash may be in.
HASH_FORMATS: dict[str, HashFormat] = {}


def register_hash_format(fmt: HashFormat) -> HashFormat:
    """Add ``fmt`` to the formats stored hashes are verified in; returns it.

    Raises:
        ValueError: a format with the same name (so the same prefix) is registered.
    """
    for known in HASH_FORMATS.values():
        if fmt.name == known.name or fmt.prefix == known.prefix:
            raise ValueError(
                f"a hash format named {fmt.name!r} (prefix {fmt.prefix!r}) is already registered"
            )
    HASH_FORMATS[fmt.name] = fmt
    return fmt


def unregister_hash_format(name: str) -> HashFormat:
    """Remove the format ``name`` (hashes in it are then reported as in no known format);
    returns it. The format new hashes are written in cannot be removed (``ValueError``)."""
    if name == HASH_FORMAT:
        raise ValueError(f"{name!r} is the format new hashes are written in")
    return HASH_FORMATS.pop(name)


def find_hash_format(stored: str) -> HashFormat | None:
    """The registered format a stored hash is in (by its prefix), or None."""
    if stored and stored.startswith(CURRENT.prefix):  # the usual answer, without a split
        return CURRENT
    named = hash_format(stored)
    return None if named is None else HASH_FORMATS.get(named)


def hash_format(stored: str) -> str | None:
    """The format a stored hash names (``"v2"``), or None when it names none."""
    found, colon, _ = (stored or "").partition(":")
    return found if colon else None


def writing_format(version_hash: str | None) -> HashFormat:
    """The format a new row or genesis is hashed in: the current one, or ``v2`` when the
    definition version it is decided under has no content hash yet (a version written before
    ``v3``, until ``seal_encounters`` hashes it): a ``v3`` hash would commit to ``""``."""
    return CURRENT if version_hash else HASH_FORMATS[_V2]


def _only(number: int, version_hash: str | None) -> VersionHashes:
    return {number: version_hash}.get


def genesis_hash(genesis: Genesis, version_hash: str | None = None) -> str:
    """The hash over an encounter's creation facts: the head of a stream with no rows
    (``version_hash``: the content hash of the version it is created under; in ``v2``
    without one)."""
    fmt = writing_format(version_hash)
    return fmt.genesis_hash(genesis, _only(genesis.definition_version, version_hash))


def stream_hashes(
    genesis: Genesis, version_hashes: VersionHashes = no_version_hashes
) -> tuple[str, Callable[[StreamRow, str], str]]:
    """``(genesis hash, row hasher)`` of one stream in the current format, the encounter id
    formatted once for both."""
    text = str(genesis.encounter_id)
    return (
        CURRENT.hash_genesis(genesis, text, version_hashes),
        partial(CURRENT.hash_row, CURRENT.row_head(text, version_hashes)),
    )


def row_hash(
    encounter_id: Any, row: StreamRow, previous_hash: str, version_hash: str | None = None
) -> str:
    """The hash of ``row`` (of the encounter ``encounter_id``) chained to ``previous_hash``
    (``version_hash``: the content hash of the version it is decided under; in ``v2``
    without one)."""
    fmt = writing_format(version_hash)
    head = fmt.row_head(str(encounter_id), _only(row.definition_version, version_hash))
    return fmt.hash_row(head, row, previous_hash)


def definition_version_hash(
    definition_id: Any, number: int, machine: Any, previous_hash: str
) -> str:
    """The content hash of version ``number`` of a definition, its state machine ``machine``
    (a mapping of ``states``, ``initial_state``, ``final_states``, ``transitions``,
    ``validators``), chained to ``previous_hash`` (version ``number - 1``'s, "" for 1)."""
    assert CURRENT.hash_version is not None
    return CURRENT.hash_version(str(definition_id), int(number), machine, previous_hash or "")


def version_chain(definition_id: Any, machines: Iterable[tuple[int, Any]]) -> dict[int, str]:
    """``number -> content hash`` of a definition's versions ``(number, machine)``, in number
    order, each chained to the one before it (a missing number chains to "")."""
    chain: dict[int, str] = {}
    for number, machine in sorted(machines, key=lambda item: item[0]):
        chain[number] = definition_version_hash(
            definition_id, number, machine, chain.get(number - 1, "")
        )
    return chain


def stream_hasher(
    encounter_id: Any, version_hashes: VersionHashes = no_version_hashes
) -> Callable[[StreamRow, str], str]:
    """``(row, previous_hash) -> hash`` for the rows of one encounter in the current format,
    with the encounter's part of the payload formatted once per stream."""
    return CURRENT.stream_hasher(encounter_id, version_hashes)


# -- format v2 ----------------------------------------------------------------------------

_V2 = "v2"
_V2_PREFIX = _V2 + ":"


def _v2_row_head(encounter_id: str, version_hashes: VersionHashes = no_version_hashes) -> str:
    return f"{_V2}|row|{len(encounter_id)}:{encounter_id}|"


def _v2_genesis(
    genesis: Genesis, encounter_id: str, version_hashes: VersionHashes = no_version_hashes
) -> str:
    definition_id = str(genesis.definition_id)
    subject_type, subject_id = genesis.subject_type, str(genesis.subject_id)
    origin = genesis.origin_state
    payload = (
        f"{_V2}|genesis|{len(encounter_id)}:{encounter_id}|"
        f"{len(definition_id)}:{definition_id}|"
        f"{int(genesis.definition_version)}|{len(subject_type)}:{subject_type}|"
        f"{len(subject_id)}:{subject_id}|{len(origin)}:{origin}|"
        f"{(genesis.created_at - _EPOCH) // _MICROSECOND}"
    )
    return _V2_PREFIX + sha256(payload.encode()).hexdigest()


def _v2_row(head: str, row: StreamRow, previous_hash: str) -> str:
    from_state, to_state = row.from_state, row.to_state
    by = row.transitioned_by
    by = "" if by is None else str(by)
    reason = row.reason or ""
    metadata = row.metadata
    metadata = "{}" if metadata is None or metadata == {} else metadata_text(metadata)
    previous_hash = previous_hash or ""
    # Integers through ``int()`` and plain ``{}`` (the same text as ``:d``, a format spec
    # costs a call per field; the two time differences are ints already).
    payload = (
        f"{head}{int(row.sequence)}|{len(from_state)}:{from_state}|{len(to_state)}:{to_state}|"
        f"{(row.effective_at - _EPOCH) // _MICROSECOND}|"
        f"{(row.transitioned_at - _EPOCH) // _MICROSECOND}|"
        f"{len(by)}:{by}|{len(reason)}:{reason}|{len(metadata)}:{metadata}|"
        f"{int(row.definition_version)}|{len(previous_hash)}:{previous_hash}"
    )
    return _V2_PREFIX + sha256(payload.encode()).hexdigest()


register_hash_format(HashFormat(_V2, _v2_row_head, _v2_row, _v2_genesis))


# -- format v3 ----------------------------------------------------------------------------

_V3 = "v3"
_V3_PREFIX = _V3 + ":"


def _v3_row_head(encounter_id: str, version_hashes: VersionHashes) -> tuple[str, VersionHashes]:
    return f"{_V3}|row|{len(encounter_id)}:{encounter_id}|", version_hashes


def _v3_genesis(genesis: Genesis, encounter_id: str, version_hashes: VersionHashes) -> str:
    definition_id = str(genesis.definition_id)
    subject_type, subject_id = genesis.subject_type, str(genesis.subject_id)
    origin = genesis.origin_state
    number = int(genesis.definition_version)
    version = version_hashes(number) or ""
    payload = (
        f"{_V3}|genesis|{len(encounter_id)}:{encounter_id}|"
        f"{len(definition_id)}:{definition_id}|{number}|{len(version)}:{version}|"
        f"{len(subject_type)}:{subject_type}|"
        f"{len(subject_id)}:{subject_id}|{len(origin)}:{origin}|"
        f"{(genesis.created_at - _EPOCH) // _MICROSECOND}"
    )
    return _V3_PREFIX + sha256(payload.encode()).hexdigest()


def _v3_row(head: tuple[str, VersionHashes], row: StreamRow, previous_hash: str) -> str:
    text, version_hashes = head
    from_state, to_state = row.from_state, row.to_state
    by = row.transitioned_by
    by = "" if by is None else str(by)
    name = row.transitioned_by_name or ""
    reason = row.reason or ""
    metadata = row.metadata
    metadata = "{}" if metadata is None or metadata == {} else metadata_text(metadata)
    number = int(row.definition_version)
    version = version_hashes(number) or ""
    previous_hash = previous_hash or ""
    payload = (
        f"{text}{int(row.sequence)}|{len(from_state)}:{from_state}|{len(to_state)}:{to_state}|"
        f"{(row.effective_at - _EPOCH) // _MICROSECOND}|"
        f"{(row.transitioned_at - _EPOCH) // _MICROSECOND}|"
        f"{len(by)}:{by}|{len(name)}:{name}|{len(reason)}:{reason}|"
        f"{len(metadata)}:{metadata}|{number}|{len(version)}:{version}|"
        f"{len(previous_hash)}:{previous_hash}"
    )
    return _V3_PREFIX + sha256(payload.encode()).hexdigest()


def machine_text(machine: Any) -> str:
    """A version's state machine as its hash covers it: canonical JSON of the five fields."""
    names = ("states", "initial_state", "final_states", "transitions", "validators")
    get = machine.get if hasattr(machine, "get") else lambda name: getattr(machine, name)
    return _JSON.encode(canonical_json({name: get(name) for name in names}))


def _v3_version(definition_id: str, number: int, machine: Any, previous_hash: str) -> str:
    content = machine_text(machine)
    payload = (
        f"{_V3}|version|{len(definition_id)}:{definition_id}|{int(number)}|"
        f"{len(content)}:{content}|{len(previous_hash)}:{previous_hash}"
    )
    return _V3_PREFIX + sha256(payload.encode()).hexdigest()


register_hash_format(HashFormat(_V3, _v3_row_head, _v3_row, _v3_genesis, _v3_version))

#: The name of the format new hashes are written in.
HASH_FORMAT = _V3
#: The format new hashes are written in.
CURRENT = HASH_FORMATS[HASH_FORMAT]
