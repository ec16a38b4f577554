"""Reading a checkpoint: a streaming reader of its one JSON object (memory per entry, not per
file) and the checks of every field, the entries' order and the root."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import IO, Any

from django.utils.dateparse import parse_datetime

from ...arguments import encounter_id as as_encounter_id
from ...exceptions import CheckpointError
from .entries import CHECKPOINT_FORMAT, HASH_TEXT, CheckpointCheck, CheckpointEntry, RootDigest

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: The name of a checkpoint given as parsed data (in messages).
_DATA = "<data>"
_FIELDS = ("format", "created_at", "definition", "encounters", "count", "root")

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
    """One checkpoint being read: :meth:`entries` streams its entries, checked one by one
    (well-formed, ascending ids) and hashed into the root; :meth:`finish` then checks the rest
    (format, count, root)."""

    def __init__(self, name: Any) -> None:
        self.name = name
        self.fields: dict[str, Any] = {}
        self.root = RootDigest()
        self._last: str | None = None

    def error(self, reason: str) -> CheckpointError:
        return CheckpointError(self.name, reason)

    def entry(self, index: int, value: Any) -> CheckpointEntry:
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
        self.root.add(entry)
        return entry

    def set(self, key: Any, value: Any) -> None:
        if key not in _FIELDS or key == "encounters":
            raise self.error(f"unexpected key {key!r}")
        if key in self.fields:
            raise self.error(f"the key {key!r} appears twice")
        self.fields[key] = value
        if key == "format":
            self._check_format()

    def _check_format(self) -> None:
        found = self.fields.get("format")
        if found != CHECKPOINT_FORMAT:
            raise self.error(
                f"not a django-encounters checkpoint (format {found!r}; expected "
                f"{CHECKPOINT_FORMAT!r})"
            )

    def finish(self, expected_root: str | None) -> CheckpointCheck:
        missing = [k for k in _FIELDS if k != "encounters" and k not in self.fields]
        if missing:
            raise self.error(f"not a valid checkpoint: {', '.join(missing)} missing")
        self._check_format()
        created_text = self.fields["created_at"]
        created_at = parse_datetime(created_text) if isinstance(created_text, str) else None
        if created_at is None or created_at.tzinfo is None:
            raise self.error(f"created_at {created_text!r} is not an ISO-8601 time with offset")
        definition = self.fields["definition"]
        if definition is not None and not isinstance(definition, str):
            raise self.error(f"definition {definition!r} is neither null nor a code")
        count = self.fields["count"]
        if count != self.root.count or isinstance(count, bool):
            raise self.error(
                f"count {count!r} does not match its {self.root.count} entries: the file was "
                "altered"
            )
        stated, computed = self.fields["root"], self.root.hexdigest()
        if not isinstance(stated, str) or not _HEX64.fullmatch(stated):
            raise self.error(f"root {stated!r} is not 64 lower-case hex digits")
        if stated != computed:
            raise self.error(
                f"the root {stated} does not match its entries (they hash to {computed}): the "
                "file was altered"
            )
        if expected_root is not None and expected_root.strip().lower() != stated:
            raise self.error(
                f"its root {stated} is not the published root {expected_root.strip()}: this is "
                "not the checkpoint that was published"
            )
        return CheckpointCheck(
            path=None if self.name == _DATA else self.name,
            created_at=created_at,
            definition=definition,
            root=stated,
            count=count,
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
    for key, value in data.items():
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
    source: str | os.PathLike[str] | dict[str, Any], *, root: str | None = None
) -> tuple[CheckpointCheck, list[CheckpointEntry]]:
    """Read and check a whole checkpoint into memory (for small checkpoints and tests; the
    verification streams instead): ``(its description, its entries)``.

    Raises:
        CheckpointError: unreadable, malformed, or a root that does not match (or is not
            ``root``).
    """
    _, checkpoint, entries, handle = open_checkpoint(source)
    try:
        found = list(entries)
    finally:
        if handle is not None:
            handle.close()
    return checkpoint.finish(root), found
