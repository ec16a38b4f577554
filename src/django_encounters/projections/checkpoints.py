"""Checkpoints: what the log said, kept where the database's administrators cannot edit it.

Anyone who can write to the database can rewrite a row *and* recompute every later hash and the
projection: the chain then verifies, and the plain audit is clean. A checkpoint defeats that. It
lists, for every encounter (soft-deleted ones included; optionally those of one definition), its
stream version and the hash of its head, and one *root* digest over all of them. Publish the
root somewhere else (a ticket, a mail, a notary, a transparency log). Later,
:func:`verify_checkpoint` — and ``audit_encounters --against FILE``, which also verifies every
chain — report every encounter whose log no longer extends its checkpointed prefix:

* ``rewritten``: the row at the checkpointed version (for version 0: the genesis hash) now has
  another hash;
* ``truncated``: the log now ends before the checkpointed version;
* ``missing``: the encounter is gone.

File format ``django-encounters-checkpoint/1`` (UTF-8 JSON, one entry per line)::

    {
      "format": "django-encounters-checkpoint/1",
      "created_at": "2026-11-22T03:35:14.627000+00:00",
      "definition": null,
      "encounters": [
        {"id": "<uuid>", "version": 3, "head_hash": "v2:<64 hex>"},
        ...
      ],
      "count": 1234,
      "root": "<64 hex>"
    }

``encounters`` is in ascending ``id`` order (ids as lower-case hyphenated UUIDs, each once);
``definition`` is the code the checkpoint was restricted to, or null. The root is

    SHA-256 (hex) of the UTF-8 text
        "django-encounters-checkpoint/1\\n"
        + "".join(f"{id} {version} {head_hash}\\n" for each entry, in file order)

so anyone can recompute it without this library::

    ( echo django-encounters-checkpoint/1
      jq -r '.encounters[] | "\\(.id) \\(.version) \\(.head_hash)"' checkpoint.json ) | sha256sum

Writing and verifying both stream: memory is one batch of encounters, whatever their number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any
from uuid import UUID

from django.db.models import Max, Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from ..engine import Anomaly
from ..exceptions import EncounterError
from ..models import Encounter, EncounterTransition
from .selection import RulesCache, parse_encounter_ids, read_alias, select

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointCheck",
    "CheckpointEntry",
    "CheckpointError",
    "WrittenCheckpoint",
    "iter_heads",
    "read_checkpoint",
    "root_digest",
    "verify_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "django-encounters-checkpoint/1"
DEFAULT_BATCH_SIZE = 1000

#: Entries compared per OR-ed query of row hashes (SQLite parses an OR chain as a tree whose
#: depth is capped at 1000).
_OR_TERMS = 100
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: A stored hash: printable ASCII without spaces (it is one word of a root line).
_HASH_TEXT = re.compile(r"[!-~]{1,200}")
#: The name of a checkpoint given as parsed data (in messages).
_DATA = "<data>"
_FIELDS = ("format", "created_at", "definition", "encounters", "count", "root")


class CheckpointError(EncounterError, ValueError):
    """A checkpoint that cannot be used or written: unreadable, not JSON, another format, an
    entry out of order, a root that does not match its entries (``path`` names the file,
    ``reason`` says what is wrong)."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path}: {reason}")


@dataclass(frozen=True)
class CheckpointEntry:
    """One encounter's checkpointed head: its stream ``version`` and the hash at it (the
    genesis hash at version 0)."""

    id: UUID
    version: int
    head_hash: str

    def line(self) -> str:
        """The entry's line of the root text."""
        return f"{self.id} {self.version} {self.head_hash}\n"

    def as_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "version": self.version, "head_hash": self.head_hash}


class _Root:
    """The root digest, fed one entry at a time."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256(f"{CHECKPOINT_FORMAT}\n".encode())
        self.count = 0

    def add(self, entry: CheckpointEntry) -> None:
        self._sha.update(entry.line().encode("utf-8"))
        self.count += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def root_digest(entries: Iterable[CheckpointEntry]) -> str:
    """The root of ``entries`` (which must be in ascending id order, as in a file)."""
    root = _Root()
    for entry in entries:
        root.add(entry)
    return root.hexdigest()


def _isoformat(value: datetime) -> str:
    return timezone.localtime(value, timezone.get_fixed_timezone(0)).isoformat()


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")


# ---------------------------------------------------------------------------------------------
# The log's hashes at given versions (shared by writing and verifying)
# ---------------------------------------------------------------------------------------------


def _row_hashes(using: str, wanted: list[tuple[UUID, int]]) -> dict[tuple[UUID, int], str]:
    """``{(encounter id, sequence): stored hash}`` of the rows that exist among ``wanted``
    (sequences > 0): one query per ``_OR_TERMS`` distinct sequences, usually one."""
    by_sequence: dict[int, list[UUID]] = {}
    for encounter_id, sequence in wanted:
        by_sequence.setdefault(sequence, []).append(encounter_id)
    groups = sorted(by_sequence.items())
    found: dict[tuple[UUID, int], str] = {}
    rows = EncounterTransition.objects.using(using)
    for start in range(0, len(groups), _OR_TERMS):
        where = Q()
        for sequence, ids in groups[start : start + _OR_TERMS]:
            where |= Q(sequence=sequence, encounter_id__in=ids)
        for encounter_id, sequence, stored in rows.filter(where).values_list(
            "encounter_id", "sequence", "hash"
        ):
            found[(encounter_id, sequence)] = stored
    return found


def _log_ends(using: str, ids: list[UUID]) -> dict[UUID, int]:
    """The last sequence of each encounter's log (0 when it has no rows)."""
    if not ids:
        return {}
    ends = dict(
        EncounterTransition.objects.using(using)
        .filter(encounter_id__in=ids)
        .values("encounter_id")
        .annotate(end=Max("sequence"))
        .values_list("encounter_id", "end")
    )
    return {pk: ends.get(pk, 0) for pk in ids}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def iter_heads(
    *,
    definition: str | None = None,
    using: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[tuple[CheckpointEntry, Anomaly | None]]:
    """Every selected encounter's head as its log confirms it, in ascending id order, with
    ``None`` — or, when the stored projection disagrees with the log, the anomaly (``head`` or
    ``truncated``) and the log's own head instead.

    The projection's ``(version, head_hash)`` is taken when the row at ``version`` has that
    hash (for version 0: when it is the stored genesis hash); otherwise the log's last row.

    Raises:
        EncounterError: no definition has the code ``definition``.
        ValueError: a bad ``batch_size``.
    """
    using = read_alias(using)
    _check_batch_size(batch_size)
    selected, _ = select(using, RulesCache(using), definition, None)
    page = selected.order_by("pk").values_list("pk", "version", "head_hash", "genesis_hash")
    return _heads(page, using, batch_size)


def _heads(
    page: QuerySet, using: str, batch_size: int
) -> Iterator[tuple[CheckpointEntry, Anomaly | None]]:
    last: UUID | None = None
    while True:
        batch = list((page if last is None else page.filter(pk__gt=last))[:batch_size])
        if not batch:
            return
        if last is not None and str(batch[0][0]) <= str(last):
            raise EncounterError("the database returned encounter ids out of order")
        last = batch[-1][0]
        hashes = _row_hashes(using, [(pk, version) for pk, version, _, _ in batch if version])
        gone = [pk for pk, version, _, _ in batch if version and (pk, version) not in hashes]
        ends = _log_ends(using, gone)
        end_hashes = _row_hashes(using, [(pk, end) for pk, end in ends.items() if end])
        for pk, version, head, genesis in batch:
            at_version = hashes.get((pk, version)) if version else genesis
            if at_version == head:
                entry, anomaly = CheckpointEntry(pk, version, head), None
            elif at_version is not None:
                entry = CheckpointEntry(pk, version, at_version)
                anomaly = Anomaly(
                    pk,
                    version,
                    "head",
                    "the projection's head hash is not the hash of "
                    f"{f'row {version}' if version else 'the genesis'}: the log's was "
                    "checkpointed",
                )
            else:
                end = ends[pk]
                entry = CheckpointEntry(pk, end, end_hashes[(pk, end)] if end else genesis)
                anomaly = Anomaly(
                    pk,
                    version,
                    "truncated" if version > end else "head",
                    f"the projection is at version {version} but the log has no row {version} "
                    f"(it ends at {end}): the log's head, version {end}, was checkpointed",
                )
            if not _HASH_TEXT.fullmatch(entry.head_hash):
                raise EncounterError(
                    f"encounter {pk}: its head hash {entry.head_hash!r} cannot be checkpointed "
                    "(run audit_encounters --encounter to see why)"
                )
            yield entry, anomaly
        if len(batch) < batch_size:
            return


@dataclass
class WrittenCheckpoint:
    """What :func:`write_checkpoint` wrote."""

    path: str
    root: str  # publish this
    count: int
    created_at: datetime
    definition: str | None
    #: Encounters whose projection disagreed with their log (their log's head was written).
    corrected: list[Anomaly] = field(default_factory=list)


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    definition: str | None = None,
    using: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
) -> WrittenCheckpoint:
    """Write a checkpoint of every encounter (or those of ``definition``) to ``path``; returns
    its root (``.root``) and counts.

    The file is written under a temporary name in the same directory and moved into place when
    complete: ``path`` never holds half a checkpoint. An existing ``path`` is refused unless
    ``overwrite`` (a checkpoint is evidence).

    Raises:
        CheckpointError: ``path`` exists (without ``overwrite``) or cannot be written.
        EncounterError: no definition has the code ``definition``.
        ValueError: a bad ``batch_size``.
    """
    using = read_alias(using)
    target = os.fspath(path)
    heads = iter_heads(definition=definition, using=using, batch_size=batch_size)
    if not overwrite and os.path.lexists(target):
        raise CheckpointError(
            target, "the file exists; a checkpoint is evidence: choose a new name (or overwrite)"
        )
    created_at = timezone.now()
    directory = os.path.dirname(os.path.abspath(target))
    try:
        handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointError(target, f"cannot write: {exc}") from exc
    result = WrittenCheckpoint(target, "", 0, created_at, definition)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)  # as open(path, "w") would (mkstemp: 0600)
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            result.root, result.count = _write(out, heads, created_at, definition, result.corrected)
            out.flush()
            os.fsync(out.fileno())
        _move_into_place(temporary, target, overwrite)
    except OSError as exc:
        raise CheckpointError(target, f"cannot write: {exc}") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return result


def _write(
    out: IO[str],
    heads: Iterable[tuple[CheckpointEntry, Anomaly | None]],
    created_at: datetime,
    definition: str | None,
    corrected: list[Anomaly],
) -> tuple[str, int]:
    header: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "created_at": _isoformat(created_at),
        "definition": definition,
    }
    out.write("{\n")
    for key, value in header.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},\n")
    out.write('  "encounters": [')
    root = _Root()
    for entry, anomaly in heads:
        out.write(("," if root.count else "") + "\n    " + json.dumps(entry.as_dict()))
        root.add(entry)
        if anomaly is not None:
            corrected.append(anomaly)
    digest = root.hexdigest()
    out.write(f'\n  ],\n  "count": {root.count},\n  "root": "{digest}"\n}}\n')
    return digest, root.count


def _move_into_place(temporary: str, target: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)  # atomic, and refuses an existing target
    except FileExistsError:
        raise CheckpointError(
            target, "the file exists; a checkpoint is evidence: choose a new name (or overwrite)"
        ) from None
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise CheckpointError(target, "the file exists") from None
        os.replace(temporary, target)


# ---------------------------------------------------------------------------------------------
# Reading: a streaming reader of the one JSON object (memory per entry, not per file)
# ---------------------------------------------------------------------------------------------

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
        self.root = _Root()
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
            encounter_id = UUID(raw_id)
        except ValueError:
            raise self.error(f"{where}: id {raw_id!r} is not a UUID") from None
        if str(encounter_id) != raw_id:
            raise self.error(f"{where}: id {raw_id!r} is not a lower-case hyphenated UUID")
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**63:
            raise self.error(f"{where}: version {version!r} is not a non-negative integer")
        if not isinstance(head, str) or not _HASH_TEXT.fullmatch(head):
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


def _open(source: Any) -> tuple[Any, _Checkpoint, Iterator[CheckpointEntry], Any]:
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
    _, checkpoint, entries, handle = _open(source)
    try:
        found = list(entries)
    finally:
        if handle is not None:
            handle.close()
    return checkpoint.finish(root), found


# ---------------------------------------------------------------------------------------------
# Verifying
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointCheck:
    """A checkpoint (its file, time, scope and root) and what comparing it with the log found."""

    path: str | None
    created_at: datetime
    definition: str | None
    root: str
    count: int  # entries in the checkpoint
    checked: int = 0  # entries compared with the log (the selected encounters that exist)
    anomalies: list[Anomaly] = field(default_factory=list)  # rewritten, truncated, missing

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint's description in the audit's JSON."""
        return {
            "file": self.path,
            "format": CHECKPOINT_FORMAT,
            "created_at": _isoformat(self.created_at),
            "definition": self.definition,
            "root": self.root,
            "entries": self.count,
            "checked": self.checked,
        }


def verify_checkpoint(
    source: str | os.PathLike[str] | dict[str, Any],
    *,
    using: str | None = None,
    root: str | None = None,
    selected: QuerySet | None = None,
    encounters: Iterable[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> CheckpointCheck:
    """Compare a checkpoint (a file path, or its parsed JSON) with the log; the result's
    ``anomalies`` name every encounter whose log no longer extends its checkpointed prefix:
    ``rewritten`` (the row at the checkpointed version — the genesis hash at version 0 — has
    another hash), ``truncated`` (the log ends before it), ``missing`` (the encounter is gone;
    sequence 0).

    This compares stored hashes: it proves the prefix together with the verification of each
    chain up to that row, which ``audit_encounters(against=...)`` runs on the same encounters
    (a row edited without recomputing its hash is a ``hash`` anomaly there, not here).

    Args:
        root: the root that was published: the checkpoint's must be this one.
        selected: compare only the entries of these encounters (an ``Encounter`` queryset);
            an encounter that no longer exists is reported whatever the selection (nothing is
            left to select it by).
        encounters: compare only these ids (missing ones included).

    Raises:
        CheckpointError: unreadable, not JSON, another format, malformed entries, a root that
            does not match the entries (or is not ``root``). Nothing is reported then.
    """
    using = read_alias(using)
    _check_batch_size(batch_size)
    only = None if encounters is None else set(parse_encounter_ids(encounters))
    _, checkpoint, entries, handle = _open(source)
    anomalies: list[Anomaly] = []
    checked = 0
    try:
        batch: list[CheckpointEntry] = []
        for entry in entries:
            if only is None or entry.id in only:
                batch.append(entry)
            if len(batch) >= batch_size:
                checked += _compare(batch, using, selected, anomalies)
                batch = []
        if batch:
            checked += _compare(batch, using, selected, anomalies)
    finally:
        if handle is not None:
            handle.close()
    result = checkpoint.finish(root)  # the root proves the entries compared above
    result.checked = checked
    result.anomalies = anomalies
    return result


def _compare(
    batch: list[CheckpointEntry], using: str, selected: QuerySet | None, found: list[Anomaly]
) -> int:
    """Compare one batch of entries with the log; returns how many were compared."""
    ids = [entry.id for entry in batch]
    genesis = dict(
        Encounter.all_objects.using(using).filter(pk__in=ids).values_list("pk", "genesis_hash")
    )
    if selected is None:
        chosen = set(genesis)
    else:
        chosen = set(selected.filter(pk__in=list(genesis)).values_list("pk", flat=True))
    compared = [entry for entry in batch if entry.id in chosen]
    hashes = _row_hashes(using, [(e.id, e.version) for e in compared if e.version])
    ends = _log_ends(
        using, [e.id for e in compared if e.version and (e.id, e.version) not in hashes]
    )
    for entry in batch:
        pk, version, expected = entry.id, entry.version, entry.head_hash
        if pk not in genesis:
            found.append(
                Anomaly(
                    pk,
                    0,
                    "missing",
                    f"the encounter is gone: the checkpoint has it at version {version} "
                    f"(head {expected[:15]}…)",
                )
            )
        elif pk not in chosen:
            continue
        elif version == 0:
            if genesis[pk] != expected:
                found.append(
                    Anomaly(
                        pk,
                        0,
                        "rewritten",
                        f"the genesis hash is {genesis[pk][:15]}…, the checkpoint has "
                        f"{expected[:15]}…: the creation facts were rewritten",
                    )
                )
        elif (pk, version) in hashes:
            if hashes[(pk, version)] != expected:
                found.append(
                    Anomaly(
                        pk,
                        version,
                        "rewritten",
                        f"row {version} has the hash {hashes[(pk, version)][:15]}…, the "
                        f"checkpoint has {expected[:15]}…: the stream was rewritten at or "
                        f"before row {version}",
                    )
                )
        elif ends[pk] < version:
            found.append(
                Anomaly(
                    pk,
                    version,
                    "truncated",
                    f"the log ends at row {ends[pk]} but the checkpoint has it at version "
                    f"{version}: rows {ends[pk] + 1}..{version} are gone",
                )
            )
        else:
            found.append(
                Anomaly(
                    pk,
                    version,
                    "rewritten",
                    f"row {version}, checkpointed with the hash {expected[:15]}…, is gone "
                    f"(the log goes on to row {ends[pk]})",
                )
            )
    return len(compared)
