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
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Sealer:
    """The configured keys (``key id -> secret``) and the id of the one new seals are made
    with (None: new records are not sealed; seals still verify with ``keys``)."""

    keys: Mapping[str, bytes]
    current: str | None

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
        return f"{self.current}:{_mac(self.keys[self.current], tag, record_hash)}"

    def problem(self, tag: str, record_hash: str, stored: str) -> str | None:
        """What is wrong with the ``stored`` seal of ``record_hash`` (None: it is valid)."""
        return seal_problem(self.keys, tag, record_hash, stored)


def seal_problem(keys: Mapping[str, bytes], tag: str, record_hash: str, stored: str) -> str | None:
    """Why ``stored`` is not a valid seal of ``record_hash`` as a ``tag`` record under one of
    ``keys`` — missing, malformed, made with a key id that is not configured, or not matching —
    or None when it is valid. The comparison takes constant time."""
    if not stored:
        return "it is not sealed"
    key_id, _, digest = stored.partition(":")
    if not KEY_ID.fullmatch(key_id) or not _DIGEST.fullmatch(digest):
        return f"its seal {stored[:40]!r} is not a seal"
    secret = keys.get(key_id)
    if secret is None:
        return f"it is sealed with the key {key_id!r}, which is not configured"
    if not hmac.compare_digest(digest, _mac(secret, tag, record_hash)):
        return f"its seal (key {key_id!r}) does not match its content: it was forged or changed"
    return None
