"""Signing a checkpoint's root with an Ed25519 key, and checking a signature.

The signature is stored in the file (``"signature"``, the last field)::

    "signature": {"algorithm": "ed25519", "key": "sha256:<64 hex>", "value": "<base64>"}

or ``null`` for an unsigned checkpoint. ``key`` is the public key's fingerprint: SHA-256 (hex)
of its DER ``SubjectPublicKeyInfo`` (``openssl pkey -pubin -in PUB.pem -outform DER |
sha256sum``). ``value`` is the 64-byte Ed25519 signature, base64, over the UTF-8 text::

    "django-encounters-checkpoint/2 <root> <key>\\n"

so the signature covers the root — which covers every other field — and names its key; it is
checked with no library code by::

    printf 'django-encounters-checkpoint/2 %s %s\\n' "$(jq -r .root F)" \\
        "$(jq -r .signature.key F)" > signed.txt
    jq -r .signature.value F | base64 -d > signature.bin
    openssl pkeyutl -verify -pubin -inkey PUB.pem -rawin -in signed.txt -sigfile signature.bin

Keys are PEM files: the private key in PKCS#8 (``openssl genpkey -algorithm ed25519 -out
KEY.pem``), unencrypted (the Python API also takes a key object, loaded as the caller
chooses), the public key as ``SubjectPublicKeyInfo`` (``openssl pkey -in KEY.pem -pubout -out
PUB.pem``). This needs the ``cryptography`` package (``pip install
'django-encounters[signing]'``), imported only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from typing import Any

from ...exceptions import CheckpointError
from .entries import CHECKPOINT_FORMAT

ALGORITHM = "ed25519"
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_SIGNATURE_FIELDS = {"algorithm", "key", "value"}


def signed_text(root: str, key: str) -> bytes:
    """The bytes a checkpoint's signature is made over: its format, root and key."""
    return f"{CHECKPOINT_FORMAT} {root} {key}\n".encode()


def _crypto(name: Any) -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise CheckpointError(
            name,
            "signing and verifying checkpoints need the cryptography package: pip install "
            "'django-encounters[signing]'",
        ) from exc
    return serialization, ed25519


def _pem(source: Any, name: Any, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    path = os.fspath(source)
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 16)
    except OSError as exc:
        raise CheckpointError(name, f"{what} {path}: cannot read: {exc.strerror or exc}") from exc


def _key_name(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "(given)"


def load_signing_key(source: Any, *, name: Any) -> Any:
    """An Ed25519 private key from ``source``: a PEM file's path, its bytes (PKCS#8,
    unencrypted), or an ``Ed25519PrivateKey``. ``name`` (the checkpoint) is in messages.

    Raises:
        CheckpointError: unreadable, encrypted, or not an Ed25519 private key.
    """
    serialization, ed25519 = _crypto(name)
    if isinstance(source, ed25519.Ed25519PrivateKey):
        return source
    what = f"the signing key {_key_name(source)}"
    try:
        key = serialization.load_pem_private_key(_pem(source, name, "the signing key"), None)
    except TypeError as exc:  # encrypted
        raise CheckpointError(
            name, f"{what} is encrypted: give an unencrypted PKCS#8 PEM file (or the key object)"
        ) from exc
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError(name, f"{what} is not a PKCS#8 PEM private key ({exc})") from exc
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and the like
        raise CheckpointError(name, f"{what} cannot be used: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CheckpointError(name, f"{what} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_verify_key(source: Any, *, name: Any) -> Any:
    """An Ed25519 public key from ``source``: a PEM file's path, its bytes
    (``SubjectPublicKeyInfo``), or an ``Ed25519PublicKey``.

    Raises:
        CheckpointError: unreadable, a private key, or not an Ed25519 public key.
    """
    serialization, ed25519 = _crypto(name)
    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    what = f"the verify key {_key_name(source)}"
    pem = _pem(source, name, "the verify key")
    if b"PRIVATE KEY-----" in pem:
        raise CheckpointError(
            name,
            f"{what} is a private key: give its public key (openssl pkey -in KEY.pem -pubout)"
            " and keep the private key where it is",
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError(name, f"{what} is not a PEM public key ({exc})") from exc
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and the like
        raise CheckpointError(name, f"{what} cannot be used: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CheckpointError(name, f"{what} is a {type(key).__name__}, not an Ed25519 key")
    return key


def fingerprint(public_key: Any) -> str:
    """``sha256:`` and the SHA-256 (hex) of the key's DER ``SubjectPublicKeyInfo``."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def sign(private_key: Any, root: str) -> dict[str, str]:
    """The ``signature`` field of a checkpoint whose root is ``root``."""
    key = fingerprint(private_key.public_key())
    value = private_key.sign(signed_text(root, key))
    return {"algorithm": ALGORITHM, "key": key, "value": base64.b64encode(value).decode()}


def check_signature_field(value: Any) -> str | None:
    """Why ``value`` is not a well-formed ``signature`` field (None when it is one, or null)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != _SIGNATURE_FIELDS:
        return "signature must be null or an object with algorithm, key and value"
    if value["algorithm"] != ALGORITHM:
        return f"signature algorithm {value['algorithm']!r} is not {ALGORITHM!r}"
    if not isinstance(value["key"], str) or not _FINGERPRINT.fullmatch(value["key"]):
        return f"signature key {value['key']!r} is not sha256: and 64 lower-case hex digits"
    if not isinstance(value["value"], str) or len(_decoded(value["value"]) or b"") != 64:
        return "signature value is not 64 bytes in base64"
    return None


def _decoded(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def verify_signature(signature: Any, root: str, verify_key: Any, *, name: Any) -> str:
    """Check the ``signature`` field (well-formed, see :func:`check_signature_field`) of a
    checkpoint whose root is ``root`` with ``verify_key``; returns the key's fingerprint.

    Raises:
        CheckpointError: unsigned, signed with another key, or a signature that does not
            verify — the file cannot be trusted, nothing is reported.
    """
    key = load_verify_key(verify_key, name=name)
    expected = fingerprint(key)
    if signature is None:
        raise CheckpointError(
            name, f"it is not signed, and a verify key ({expected}) was given: refused"
        )
    if signature["key"] != expected:
        raise CheckpointError(
            name,
            f"it is signed with the key {signature['key']}, not with the verify key "
            f"{expected}: refused",
        )
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(_decoded(signature["value"]), signed_text(root, expected))
    except InvalidSignature:
        raise CheckpointError(
            name,
            f"its signature does not verify with the key {expected}: the file was altered "
            "after it was signed, refused",
        ) from None
    return expected
