"""One fold: the verified replays every projection reads.

:class:`Replays` reads a :class:`~.selection.Selection` batch by batch — the encounters (keyset
pagination, in primary-key or ``(created_at, id)`` order), their streams (one query per batch),
each stream replayed and verified by the engine (``verify_stream``: genesis, gaps, hash chain,
system time, ``from_state``, edges, re-chains), with seal keys configured its seals checked
(:mod:`.seals`: rows, genesis, the definition versions it uses; the genesis seal is read with
the encounter's columns, the rows' with the stream, so no query is added), the projection's
head compared with the log's, the subjects of the encounters that are not soft-deleted looked up
(one query per batch: an encounter whose subject is gone is a ``subject_missing`` anomaly), the
acknowledgements of what was found, checked (one query per batch; without seal keys, none for a
batch without anomalies) and, when asked, the names of the users who recorded the rows.
Rebuild, audit, event log, process map, the admin's and the REST API's timelines all consume
it; nothing else replays a selection.

A consumer that writes (the rebuild) asks for each batch with :meth:`Replays.next_batch`
inside its own transaction, ``lock=True``: the batch's encounter rows are then locked before
their streams are read, so the replay and what the consumer writes from it are consistent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import connections
from django.db.models import Q

from .. import conf, store
from ..arguments import encounter_id as as_encounter_id
from ..engine import (
    TIMELINE_ORDER,
    Anomaly,
    Genesis,
    Replay,
    StreamRow,
    known_prefix,
    verify_stream,
)
from ..engine.errors import AnomalyKind
from ..engine.seals import Sealer
from ..store import sharding
from ..subjects import absent_subjects
from .acknowledgements import Acknowledged, MarkKey, check_acknowledgements, key_of, mark_key
from .seals import SealCheck
from .selection import GENESIS_COLUMNS, RulesCache, Selection, genesis_of

__all__ = [
    "ENCOUNTER_COLUMNS",
    "Replays",
    "Usernames",
    "Verified",
    "mark_acknowledged",
    "timeline_order",
]

#: The encounter columns every replay reads: the genesis facts and hash, then the projection.
ENCOUNTER_COLUMNS = (*GENESIS_COLUMNS, *store.PROJECTION_FIELDS)
_PROJECTION = slice(len(GENESIS_COLUMNS), len(ENCOUNTER_COLUMNS))
_EXTRA = len(ENCOUNTER_COLUMNS)
_CREATED = GENESIS_COLUMNS.index("created_at")
_VERSION = len(GENESIS_COLUMNS) + store.PROJECTION_FIELDS.index("version")
_HEAD = len(GENESIS_COLUMNS) + store.PROJECTION_FIELDS.index("head_hash")
_CONTENT_TYPE = GENESIS_COLUMNS.index("subject_content_type_id")
_SUBJECT = GENESIS_COLUMNS.index("subject_id")
_NO_ROWS: list[StreamRow] = []


@dataclass
class Verified:
    """One encounter's verified replay."""

    values: tuple  # ENCOUNTER_COLUMNS, then the reader's extra columns
    genesis: Genesis
    stream: list[StreamRow]  # sequence order (with known_at: the rows recorded by then)
    replay: Replay
    #: what is wrong: the replay's anomalies, the head's (``evidence``), then any the reader
    #: was given for this encounter (a checkpoint's)
    anomalies: list[Anomaly]
    #: the head check's anomalies: the projection's head is evidence (a deleted tail, a
    #: replaced head), which a rebuild keeps as it is
    evidence: list[Anomaly] = field(default_factory=list)
    #: (sequence, kind, evidence) -> how that anomaly was acknowledged (``mark_key``)
    acknowledged: dict[MarkKey, Acknowledged] = field(default_factory=dict)

    @property
    def id(self) -> UUID:
        return self.genesis.encounter_id

    @property
    def projection(self) -> tuple:
        """The stored projection (``store.PROJECTION_FIELDS``)."""
        return self.values[_PROJECTION]

    @property
    def extra(self) -> tuple:
        """The extra columns the reader was asked for, in their order."""
        return self.values[_EXTRA:]


class Usernames:
    """user id -> username, looked up once per user (``#<id>`` for a user row that is gone)."""

    def __init__(self, using: str) -> None:
        self.model = get_user_model()
        self.using = using
        self.names: dict[Any, str | None] = {None: None}

    def load(self, ids: Iterable[Any]) -> None:
        missing = {pk for pk in ids if pk not in self.names}
        if not missing:
            return
        field_name = self.model.USERNAME_FIELD
        found = dict(
            self.model._default_manager.using(self.using)
            .filter(pk__in=missing)
            .values_list("pk", field_name)
        )
        for pk in missing:
            self.names[pk] = str(found[pk]) if pk in found else f"#{pk}"

    def name(self, pk: Any) -> str | None:
        return self.names.get(pk, f"#{pk}")


def mark_acknowledged(
    items: Iterable[tuple[Any, list[Anomaly], dict[MarkKey, Acknowledged]]],
    using: str,
    sealer: Sealer | None = None,
) -> None:
    """For each ``(encounter id, anomalies, acknowledged)``, add the broken acknowledgements
    of the encounter to its ``anomalies`` and fill in how they were acknowledged (by a valid
    acknowledgement with the same evidence): one query for all of them. Without ``sealer``
    (no seal keys) only the encounters with anomalies are read, and none when there is no
    anomaly; with it, every encounter's acknowledgements are (a forged one is reported
    wherever it is)."""
    items = list(items)
    if sealer is None:
        items = [item for item in items if item[1]]
    check = check_acknowledgements((pk for pk, _, _ in items), using, sealer)
    if not check.marks and not check.problems:
        return
    for encounter_id, anomalies, acknowledged in items:
        anomalies.extend(check.problems.get(as_encounter_id(encounter_id), ()))
        for anomaly in anomalies:
            mark = check.marks.get(key_of(anomaly))
            if mark is not None:
                acknowledged[mark_key(anomaly)] = mark


class Replays:
    """The verified replays of a selection's encounters, batch by batch.

    Args:
        selection: what to read.
        order: ``"pk"`` (primary key; streams read by id range) or ``"created"``
            (``(created_at, id)``; streams read by id list).
        extra: encounter columns to read besides :data:`ENCOUNTER_COLUMNS`
            (``Verified.extra``).
        verify: check hashes, rules and the head, and look up acknowledgements; False folds
            the streams only (what a process map needs).
        users: look up the usernames of the rows' users (``self.users``).
        rules: the definitions' rules (default: loaded here).
        added: anomalies found elsewhere (a checkpoint's), by encounter id; each is added to
            its encounter's and removed from the mapping when that encounter is read.
        subjects: with ``verify``, report the encounters (not soft-deleted) whose subject no
            longer exists (``subject_missing``; one query per batch).
        after: with ``order="pk"``, only encounters with ``after < pk``.
        upto: with ``order="pk"``, only encounters with ``pk <= upto``.
    """

    def __init__(
        self,
        selection: Selection,
        *,
        order: str = "pk",
        extra: tuple[str, ...] = (),
        verify: bool = True,
        users: bool = False,
        rules: RulesCache | None = None,
        added: dict[Any, list[Anomaly]] | None = None,
        subjects: bool = True,
        after: Any = None,
        upto: Any = None,
    ) -> None:
        if order not in ("pk", "created"):
            raise ValueError(f"order must be 'pk' or 'created', not {order!r}")
        self.selection = selection
        self.using = using = selection.using
        self.order = order
        self.verify = verify
        if rules is None and verify:
            rules = RulesCache(using)
        self.rules = rules
        self.users = Usernames(using) if users else None
        self.added = added if added is not None else {}
        #: the seal keys the seals are checked with (None: seals are not checked)
        self.sealer = conf.sealer() if verify else None
        self.seals: SealCheck | None = None
        if self.sealer is not None:
            assert self.rules is not None
            self.seals = SealCheck(self.sealer, using, self.rules.code)
        selected = selection.queryset()
        if upto is not None:
            selected = selected.filter(pk__lte=upto)
        ordering = ("pk",) if order == "pk" else ("created_at", "pk")
        # With seal keys, the genesis seal is read last, and taken off before the consumer
        # sees the values.
        sealed = ("genesis_seal",) if self.seals is not None else ()
        # The subjects are looked up for the encounters that are not soft-deleted: their
        # deleted_at is read among the extra columns (added last when the reader did not ask).
        self._subjects = subjects and verify
        extra = tuple(extra)
        if self._subjects and "deleted_at" not in extra:
            self._extra = (*extra, "deleted_at")
        else:
            self._extra = extra
        self._dropped = len(self._extra) - len(extra)
        self._deleted_at = _EXTRA + self._extra.index("deleted_at") if self._subjects else 0
        self._page = selected.order_by(*ordering).values_list(
            *ENCOUNTER_COLUMNS, *self._extra, *sealed
        )
        self._transitions = selection.transitions()
        sharded = sharding.is_sharded(connections[using])
        # On a sharded store (Citus) a locked batch is claimed shard by shard.
        self._claims = (
            sharding.Claims(self._page, selection.batch_size) if sharded and order == "pk" else None
        )
        # In primary-key order, a batch selected by definition or ids only is (nearly) every
        # row of the transitions queryset in its id range.
        self._dense = (
            order == "pk"
            and selection.subject is None
            and (selection.since is None and selection.until is None)
        )
        self._subject_types: dict[Any, str] = {}
        self._after: Any = after  # the last encounter read: its pk, or (created_at, pk)
        self._done = False

    @property
    def exhausted(self) -> bool:
        """Whether the last batch was read (:meth:`next_batch` then returns None at once)."""
        return self._done

    def __iter__(self) -> Iterator[Verified]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> Iterator[list[Verified]]:
        """Every batch, unlocked."""
        while (batch := self.next_batch()) is not None:
            yield batch

    def next_batch(self, *, lock: bool = False) -> list[Verified] | None:
        """The next batch's verified replays, None after the last. With ``lock`` (call it in a
        transaction; ``order="pk"`` only) the batch's encounter rows are locked first."""
        batch = self.claim(lock=lock)
        return None if batch is None else self.fold(batch)

    def claim(self, *, lock: bool = False) -> list[tuple] | None:
        """The next batch's encounter rows (locked with ``lock``, as :meth:`next_batch`), not
        yet replayed: :meth:`fold` replays them. Claims are taken in order, one at a time (a
        caller that claims from several threads serializes its calls); the folds of claimed
        batches may run concurrently, each on the connection of the thread that claimed it."""
        if self._done:
            return None
        batch = self._read(lock)
        if len(batch) < self.selection.batch_size:
            self._done = True
        if not batch:
            return None
        self._after = batch[-1][0] if self.order == "pk" else (batch[-1][_CREATED], batch[-1][0])
        return batch

    def fold(self, batch: list[tuple]) -> list[Verified]:
        """The verified replays of a batch :meth:`claim` returned (its streams read, in the
        calling thread's transaction)."""
        return self._fold(batch)

    # -----------------------------------------------------------------------------------------

    def _read(self, lock: bool) -> list[tuple]:
        query = self._page
        if self._after is not None:
            if self.order == "pk":
                query = query.filter(pk__gt=self._after)
            else:
                created, pk = self._after
                query = query.filter(Q(created_at__gt=created) | Q(created_at=created, pk__gt=pk))
        size = self.selection.batch_size
        if not lock:
            return store.values_rows(query[:size])
        if self.order != "pk":
            raise ValueError("a locked read is in primary-key order")
        if self._claims is not None:  # a sharded store (Citus): sharding.Claims
            return self._claims.claim(self._after)
        return store.values_rows(query.select_for_update()[:size])

    def _streams(self, batch: list[tuple]) -> Iterator[tuple[UUID, list[StreamRow]]]:
        if self._dense:  # the batch is every encounter in its id range: a range, cheaper to
            # plan than a list of ids
            rows = self._transitions.filter(
                encounter_id__gte=batch[0][0], encounter_id__lte=batch[-1][0]
            )
        else:
            rows = self._transitions.filter(encounter_id__in=[values[0] for values in batch])
        return store.iter_streams(rows)

    def _fold(self, batch: list[tuple]) -> list[Verified]:
        missing: dict[Any, str] = {}
        if self._subjects:
            missing = self._missing_subjects(batch)
            if self._dropped:  # the deleted_at the reader did not ask for
                at = self._deleted_at
                batch = [(*values[:at], *values[at + 1 :]) for values in batch]
        by_id = {values[0]: values for values in batch}
        folded: dict[Any, Verified] = {}
        for encounter_id, stream in self._streams(batch):
            values = by_id.get(encounter_id)
            if values is not None:  # in the id range but not selected: skipped
                folded[encounter_id] = self._one(values, stream)
        result = [folded.get(values[0]) or self._one(values, _NO_ROWS) for values in batch]
        for verified in result if missing else ():
            why = missing.get(verified.id)
            if why is not None:
                verified.anomalies.append(_subject_missing(verified.genesis, why))
        if self.users is not None:
            self.users.load(row.transitioned_by for v in result for row in v.stream)
        if self.verify:
            mark_acknowledged(
                ((v.id, v.anomalies, v.acknowledged) for v in result), self.using, self.sealer
            )
        return result

    def _missing_subjects(self, batch: list[tuple]) -> dict[Any, str]:
        """encounter id -> why its subject is gone, for the batch's encounters that are not
        soft-deleted and whose subject no longer exists (one query)."""
        live = [values for values in batch if values[self._deleted_at] is None]
        gone = absent_subjects(
            ((values[_CONTENT_TYPE], str(values[_SUBJECT])) for values in live), self.using
        )
        if not gone:
            return {}
        found = {}
        for values in live:
            why = gone.get((values[_CONTENT_TYPE], str(values[_SUBJECT])))
            if why is not None:
                found[values[0]] = why
        return found

    def _one(self, values: tuple, stream: list[StreamRow]) -> Verified:
        genesis_seal = ""
        if self.seals is not None:
            genesis_seal, values = values[-1], values[:-1]
        genesis, stored_genesis = genesis_of(
            values[: len(GENESIS_COLUMNS)], self.using, self._subject_types
        )
        known_at = self.selection.known_at
        if known_at is not None:
            stream = list(known_prefix(stream, known_at))
        if not self.verify:
            replay = verify_stream(genesis, stored_genesis, stream, check_hashes=False)
            return Verified(values, genesis, stream, replay, [])
        assert self.rules is not None
        replay = verify_stream(
            genesis, stored_genesis, stream, self.rules.rules_of(genesis.definition_id)
        )
        # The projection is today's: it is compared with the whole log only.
        evidence = replay.check_head(values[_VERSION], values[_HEAD]) if known_at is None else []
        sealing = (
            []
            if self.seals is None
            else self.seals.anomalies(genesis, stored_genesis, genesis_seal, stream)
        )
        anomalies = [
            *replay.anomalies,
            *sealing,
            *evidence,
            *self.added.pop(genesis.encounter_id, []),
        ]
        return Verified(values, genesis, stream, replay, anomalies, evidence)


def _subject_missing(genesis: Genesis, why: str) -> Anomaly:
    """The ``subject_missing`` anomaly of an encounter (sequence 0; evidence: the subject's
    reference, so an acknowledgement covers that subject only)."""
    reference = f"{genesis.subject_type}:{genesis.subject_id}"
    return Anomaly(
        genesis.encounter_id,
        0,
        AnomalyKind.SUBJECT_MISSING,
        f"its subject {reference} no longer exists ({why}); the encounter and its log are "
        "kept. Soft-delete the encounter (encounter.delete()) if it should go too, or "
        "acknowledge this finding; guard the subject model with protect_subjects() so that "
        "it cannot happen again",
        reference,
    )


def timeline_order(rows: Iterable[StreamRow]) -> list[StreamRow]:
    """``rows`` in business-time order (the engine's ``TIMELINE_ORDER``)."""
    return sorted(rows, key=attrgetter(*TIMELINE_ORDER))
