"""Seals: what the database alone cannot forge.

A hash chain anyone can compute proves only that rows were not changed *after someone trusted
them*: whoever can write the database can append a row with a correct hash. A seal is an HMAC
(SHA-256) under a secret key the database never holds, over a record's hash and the kind of
record it is (a *domain tag*, so a row's seal is never valid for a version with the same hash)::

    seal = "<key id>:" + HMAC-SHA256(secret, "django-encounters/seal/1|<tag>|<record hash>")

stored beside the record with the id of the key it was made with, so keys can rotate: new
records are sealed with the current key, older seals verify with any key still configured.

Tags: ``row`` (a transition row's ``hash``), ``genesis`` (an encounter's ``genesis_hash``),
``version`` (a definition version's ``content_hash``), ``acknowledgement`` (an
acknowledgement's ``hash``).

Standard library only (``hmac``, ``hashlib``); no Django import.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256

__all__ = [
    "KEY_ID",
    "MIN_SECRET_BYTES",
    "SEAL_TAGS",
    "Sealer",
    "seal_problem",
]

#: The record kinds a seal is made for.
SEAL_TAGS = ("row", "genesis", "version", "acknowledgement")
#: The shortest secret accepted (bytes; a text secret counts its UTF-8 bytes).
MIN_SECRET_BYTES = 32
#: What a key id may be: 1–32 letters, digits, ``.``, ``_`` or ``-`` (it is stored in each seal).
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FORMAT = "django-encounters/seal/1"


def _mac(secret: bytes, tag: str, record_hash: str) -> str:
    message = f"{_FORMAT}|{tag}|{record_hash}".encode()
    return hmac.new(secret, message, sha256).hexdigest()


class _Macs(dict):
    """The MAC of a record under one of a :class:`Sealer`'s keys, the same as :func:`_mac`'s:
    an HMAC keyed once per ``(secret, tag)`` over the message's fixed beginning, copied for
    each record (``hmac``'s documented way to hash messages with a common prefix), instead of
    the key schedule and the prefix computed again for every record (a rebuild checks one
    seal per row)."""

    def __missing__(self, key: tuple[bytes, str]) -> hmac.HMAC:
        secret, tag = key
        keyed = self[key] = hmac.new(secret, f"{_FORMAT}|{tag}|".encode(), sha256)
        return keyed

    def __reduce__(self) -> tuple[type, tuple]:
        return _Macs, ()  # a cache: copied or pickled empty (HMAC objects do not pickle)

    def mac(self, secret: bytes, tag: str, record_hash: str) -> str:
        found = self[secret, tag].copy()
        found.update(record_hash.encode())
        return found.hexdigest()


@dataclass(frozen=True)
class Sealer:
    """The configured keys (``key id -> secret``) and the id of the one new seals are made
    with (None: new records are not sealed; seals still verify with ``keys``)."""

    keys: Mapping[str, bytes]
    current: str | None
    _macs: _Macs = field(default_factory=_Macs, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.current is not None and self.current not in self.keys:
            raise ValueError(f"the current seal key {self.current!r} is not among the keys")

    @property
    def sealing(self) -> bool:
        return self.current is not None

    def seal(self, tag: str, record_hash: str) -> str:
        """The seal of ``record_hash`` as a ``tag`` record under the current key ("" when
        there is none)."""
        if self.current is None:
            return ""
        if tag not in SEAL_TAGS:
            raise ValueError(f"unknown seal tag {tag!r} (known: {', '.join(SEAL_TAGS)})")
        return f"{self.current}:{self._macs.mac(self.keys[self.current], tag, record_hash)}"

    def problem(self, tag: str, record_hash: str, stored: str) -> str | None:
        """What is wrong with the ``stored`` seal of ``record_hash`` (None: it is valid):
        :func:`seal_problem`, each key's HMAC keyed once."""
        return _problem(self.keys, tag, record_hash, stored, self._macs.mac)


def seal_problem(keys: Mapping[str, bytes], tag: str, record_hash: str, stored: str) -> str | None:
    """Why ``stored`` is not a valid seal of ``record_hash`` as a ``tag`` record under one of
    ``keys`` — missing, malformed, made with a key id that is not configured, or not matching —
    or None when it is valid. The comparison takes constant time."""
    return _problem(keys, tag, record_hash, stored, _mac)


def _problem(
    keys: Mapping[str, bytes],
    tag: str,
    record_hash: str,
    stored: str,
    mac: Callable[[bytes, str, str], str],
) -> str | None:
    if not stored:
        return "it is not sealed"
    key_id, _, digest = stored.partition(":")
    if not KEY_ID.fullmatch(key_id) or not _DIGEST.fullmatch(digest):
        return f"its seal {stored[:40]!r} is not a seal"
    secret = keys.get(key_id)
    if secret is None:
        return f"it is sealed with the key {key_id!r}, which is not configured"
    if not hmac.compare_digest(digest, mac(secret, tag, record_hash)):
        return f"its seal (key {key_id!r}) does not match its content: it was forged or changed"
    return None
