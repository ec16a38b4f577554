"""Reading a checkpoint: a streaming reader of its one JSON object (memory per entry, not per
file) and the checks of every field, the entries' order and the root."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

from django.utils.dateparse import parse_datetime

from ...arguments import encounter_id as as_encounter_id
from ...exceptions import CheckpointError
from .entries import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_1,
    CHECKPOINT_FORMATS,
    HASH_TEXT,
    CheckpointCheck,
    CheckpointEntry,
    RootDigest,
    check_definition,
)
from .signing import check_signature_field, load_verify_key, verify_signature

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: The name of a checkpoint given as parsed data (in messages).
_DATA = "<data>"
_HEADER = ("format", "created_at", "definition")
#: Each format's fields, in the order they are written.
_FIELDS = {
    CHECKPOINT_FORMAT: (*_HEADER, "encounters", "count", "root", "signature"),
    CHECKPOINT_FORMAT_1: (*_HEADER, "encounters", "count", "root"),
}

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object has a key twice")
    return result


class _Reader:
    """Tokens and values of one JSON text read in chunks: ``raw_decode`` is retried on more
    text until a value is complete (a value ending exactly at the end of the text read so far
    is retried too: a number may go on)."""

    CHUNK = 1 << 16
    MAX_VALUE = 1 << 20

    def __init__(self, stream: IO[str], name: Any) -> None:
        self.stream = stream
        self.name = name
        self.text = ""
        self.pos = 0
        self.dropped = 0  # characters consumed and discarded before self.text
        self.eof = False
        self.decoder = json.JSONDecoder(
            parse_constant=_refuse_constant, object_pairs_hook=_no_duplicate_keys
        )

    def error(self, reason: str) -> CheckpointError:
        return CheckpointError(
            self.name, f"not a valid checkpoint: {reason} (at character {self.dropped + self.pos})"
        )

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.stream.read(self.CHUNK)
        except UnicodeDecodeError as exc:
            raise CheckpointError(self.name, f"not UTF-8 text: {exc}") from exc
        except OSError as exc:
            raise CheckpointError(self.name, f"cannot read: {exc}") from exc
        if not chunk:
            self.eof = True
            return False
        if self.pos:
            self.dropped += self.pos
            self.text = self.text[self.pos :]
            self.pos = 0
        self.text += chunk
        return True

    def peek(self) -> str:
        while True:
            match = _WHITESPACE.match(self.text, self.pos)
            self.pos = match.end() if match else self.pos
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._more():
                return ""

    def expect(self, token: str) -> None:
        found = self.peek()
        if found != token:
            raise self.error(f"expected {token!r}, found {found or 'the end of the file'!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if len(self.text) - self.pos > self.MAX_VALUE:
                    raise self.error("a value longer than 1 MiB") from exc
                if self._more():
                    continue
                raise self.error(exc.msg) from exc
            except (ValueError, RecursionError) as exc:
                raise self.error(str(exc)) from exc
            if end == len(self.text) and self._more():
                continue
            self.pos = end
            return value

    def end(self) -> None:
        if self.peek():
            raise self.error("text after the checkpoint object")


class _Checkpoint:
    """One checkpoint being read: its header (format, created_at, definition: they come
    before the entries, which the root covers after them), then :meth:`entries`, checked one
    by one (well-formed, ascending ids) and hashed into the root; :meth:`finish` then checks
    the rest (count, root, signature)."""

    def __init__(self, name: Any) -> None:
        self.name = name
        self.fields: dict[str, Any] = {}
        self.root: RootDigest | None = None
        self.created_at: datetime | None = None
        self._last: str | None = None

    def error(self, reason: str) -> CheckpointError:
        return CheckpointError(self.name, reason)

    @property
    def format(self) -> str:
        return self.fields["format"]

    def begin(self) -> RootDigest:
        """The header is read: check it and start the root (at the first entry)."""
        if self.root is not None:
            return self.root
        missing = [k for k in _HEADER if k not in self.fields]
        if missing:
            raise self.error(
                f"not a valid checkpoint: {', '.join(missing)} missing (format, created_at and "
                "definition come before the encounters)"
            )
        created_text = self.fields["created_at"]
        created_at = parse_datetime(created_text) if isinstance(created_text, str) else None
        if created_at is None or created_at.tzinfo is None:
            raise self.error(f"created_at {created_text!r} is not an ISO-8601 time with offset")
        problem = check_definition(self.fields["definition"])
        if problem is not None:
            raise self.error(problem)
        self.created_at = created_at
        self.root = RootDigest(self.format, created_text, self.fields["definition"])
        return self.root

    def entry(self, index: int, value: Any) -> CheckpointEntry:
        root = self.begin()
        where = f"encounters[{index}]"
        if not isinstance(value, dict) or set(value) != {"id", "version", "head_hash"}:
            raise self.error(f"{where} must be an object with id, version and head_hash")
        raw_id, version, head = value["id"], value["version"], value["head_hash"]
        try:
            if not isinstance(raw_id, str):
                raise ValueError
            encounter_id = as_encounter_id(raw_id)
        except ValueError:
            raise self.error(f"{where}: id {raw_id!r} is not a UUID") from None
        if str(encounter_id) != raw_id:
            raise self.error(f"{where}: id {raw_id!r} is not a lower-case hyphenated UUID")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
            raise self.error(f"{where}: version {version!r} is not a non-negative integer")
        if not isinstance(head, str) or not HASH_TEXT.fullmatch(head):
            raise self.error(f"{where}: head_hash {head!r} is not a stored hash")
        if self._last is not None and raw_id <= self._last:
            raise self.error(f"{where}: id {raw_id} is not after {self._last} (ascending ids)")
        self._last = raw_id
        entry = CheckpointEntry(encounter_id, version, head)
        root.add(entry)
        return entry

    def set(self, key: Any, value: Any) -> None:
        if key not in _FIELDS[CHECKPOINT_FORMAT] or key == "encounters":
            raise self.error(f"unexpected key {key!r}")
        if key in self.fields:
            raise self.error(f"the key {key!r} appears twice")
        if self.root is not None and key in _HEADER:
            raise self.error(
                f"{key} comes after the encounters (format, created_at and definition come "
                "before them)"
            )
        self.fields[key] = value
        if key == "format":
            self._check_format()

    def _check_format(self) -> None:
        found = self.fields.get("format")
        if found not in CHECKPOINT_FORMATS:
            raise self.error(
                f"not a django-encounters checkpoint (format {found!r}; expected "
                f"{CHECKPOINT_FORMAT!r} or {CHECKPOINT_FORMAT_1!r})"
            )

    def finish(self, expected_root: str | None, verify_key: Any = None) -> CheckpointCheck:
        """Check the rest of the file (with ``verify_key``, a loaded public key: its
        signature too) and describe it."""
        root = self.begin()  # a checkpoint without entries
        assert self.created_at is not None
        fields = _FIELDS[self.format]
        unexpected = [k for k in self.fields if k not in fields]
        if unexpected:
            raise self.error(f"unexpected key {unexpected[0]!r} in a {self.format} file")
        missing = [k for k in fields if k != "encounters" and k not in self.fields]
        if missing:
            raise self.error(f"not a valid checkpoint: {', '.join(missing)} missing")
        count = self.fields["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count != root.count:
            raise self.error(
                f"count {count!r} does not match its {root.count} entries: the file was altered"
            )
        stated, computed = self.fields["root"], root.hexdigest()
        if not isinstance(stated, str) or not _HEX64.fullmatch(stated):
            raise self.error(f"root {stated!r} is not 64 lower-case hex digits")
        if stated != computed:
            covered = "its fields" if self.format == CHECKPOINT_FORMAT else "its entries"
            raise self.error(
                f"the root {stated} does not match {covered} (they hash to {computed}): the "
                "file was altered"
            )
        if expected_root is not None and expected_root.strip().lower() != stated:
            raise self.error(
                f"its root {stated} is not the published root {expected_root.strip()}: this is "
                "not the checkpoint that was published"
            )
        signature = self.fields.get("signature")
        problem = check_signature_field(signature)
        if problem is not None:
            raise self.error(problem)
        signed_by = None if signature is None else signature["key"]
        if verify_key is not None:
            signed_by = verify_signature(signature, stated, verify_key, name=self.name)
        return CheckpointCheck(
            path=None if self.name == _DATA else self.name,
            created_at=self.created_at,
            definition=self.fields["definition"],
            root=stated,
            count=count,
            format=self.format,
            signed_by=signed_by,
            signature_verified=verify_key is not None,
        )


def _stream_entries(reader: _Reader, checkpoint: _Checkpoint) -> Iterator[CheckpointEntry]:
    reader.expect("{")
    seen_encounters = False
    if reader.peek() == "}":
        reader.pos += 1
    else:
        while True:
            key = reader.value()
            reader.expect(":")
            if key == "encounters":
                if seen_encounters:
                    raise checkpoint.error("the key 'encounters' appears twice")
                seen_encounters = True
                reader.expect("[")
                index = 0
                if reader.peek() == "]":
                    reader.pos += 1
                else:
                    while True:
                        yield checkpoint.entry(index, reader.value())
                        index += 1
                        separator = reader.peek()
                        reader.expect("," if separator == "," else "]")
                        if separator != ",":
                            break
            else:
                checkpoint.set(key, reader.value())
            separator = reader.peek()
            reader.expect("," if separator == "," else "}")
            if separator != ",":
                break
    reader.end()
    if not seen_encounters:
        raise checkpoint.error("not a valid checkpoint: encounters missing")


def _data_entries(data: Any, checkpoint: _Checkpoint) -> Iterator[CheckpointEntry]:
    if not isinstance(data, dict):
        raise checkpoint.error("not a valid checkpoint: not a JSON object")
    for key, value in data.items():  # a parsed object: its header whatever the key order
        if key != "encounters":
            checkpoint.set(key, value)
    if "encounters" not in data:
        raise checkpoint.error("not a valid checkpoint: encounters missing")
    if not isinstance(data["encounters"], list):
        raise checkpoint.error("not a valid checkpoint: encounters is not a list")
    for index, value in enumerate(data["encounters"]):
        yield checkpoint.entry(index, value)


def open_checkpoint(source: Any) -> tuple[Any, _Checkpoint, Iterator[CheckpointEntry], Any]:
    """``(name, checkpoint, entries, file to close or None)`` for a path or parsed data."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            handle = open(name, encoding="utf-8", newline="")  # noqa: SIM115 - closed by caller
        except OSError as exc:
            raise CheckpointError(name, f"cannot read: {exc.strerror or exc}") from exc
        checkpoint = _Checkpoint(name)
        return name, checkpoint, _stream_entries(_Reader(handle, name), checkpoint), handle
    if isinstance(source, dict):
        checkpoint = _Checkpoint(_DATA)
        return _DATA, checkpoint, _data_entries(source, checkpoint), None
    raise TypeError(f"a checkpoint is a path or its parsed JSON (a dict), not {type(source)}")


def read_checkpoint(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    root: str | None = None,
    verify_key: Any = None,
) -> tuple[CheckpointCheck, list[CheckpointEntry]]:
    """Read and check a whole checkpoint into memory (for small checkpoints and tests; the
    verification streams instead): ``(its description, its entries)``.

    ``verify_key`` (an Ed25519 public key: a PEM file's path, its bytes or the key object):
    the checkpoint must be signed with it.

    Raises:
        CheckpointError: unreadable, malformed, a root that does not match (or is not
            ``root``); with ``verify_key``: unsigned, or a signature that does not verify
            with it.
    """
    name, checkpoint, entries, handle = open_checkpoint(source)
    key = None if verify_key is None else load_verify_key(verify_key, name=name)
    try:
        found = list(entries)
    finally:
        if handle is not None:
            handle.close()
    return checkpoint.finish(root, key), found
