"""Mining a definition's log: which edges its encounters took, how often, and how long they
stayed in a state before each.

Every encounter of the definition (soft-deleted ones included: their history is part of the
record; rows decided under any of its versions) is replayed with the engine's verifying replay
(``verify_stream``, which also folds a damaged stream instead of stopping at it) into its
business-time timeline; :func:`~django_encounters.engine.graphs.edge_takings` reads the edges
off the timeline and an :class:`~django_encounters.engine.graphs.EdgeTally` counts them. Memory
holds one batch of streams, plus one wait per row counted (for the medians).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import store
from ..engine import verify_stream
from ..engine.graphs import EdgeStats, EdgeTally, edge_takings
from ..models import Encounter, EncounterTransition
from .selection import GENESIS_COLUMNS, effective_between, genesis_of

DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class MinedEdges:
    """What the rows of a definition say: ``stats`` (``(source, target) -> EdgeStats``, every
    edge taken), how many rows were counted and of how many encounters."""

    stats: dict[tuple[str, str], EdgeStats]
    rows: int
    encounters: int


def mine_edges(
    definition_ids: Iterable[Any],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    using: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> MinedEdges:
    """Count the edges taken by the encounters of ``definition_ids``, counting only the rows
    *effective* in ``[since, until)`` (either bound may be None); the time before each is
    measured on the whole timeline, so a stay that began before ``since`` counts in full.
    Upgrade rows (the state kept, the definition version moved) are not edges. Arguments are
    the caller's to check (aware times, ``since < until``)."""
    selected = Encounter.all_objects.using(using).filter(definition_id__in=list(definition_ids))
    selected = effective_between(selected, since, until, using)
    page = selected.order_by("pk").values_list(*GENESIS_COLUMNS)
    tally = EdgeTally()
    encounters = 0
    last = None
    while True:
        batch = list((page if last is None else page.filter(pk__gt=last))[:batch_size])
        if not batch:
            break
        last = batch[-1][0]
        streams = dict(
            store.iter_streams(
                EncounterTransition.objects.using(using).filter(
                    encounter_id__in=[values[0] for values in batch]
                )
            )
        )
        for values in batch:
            genesis, stored_genesis = genesis_of(values, using)
            rows = streams.get(genesis.encounter_id, [])
            replay = verify_stream(genesis, stored_genesis, rows, check_hashes=False)
            counted = tally.takings
            tally.add_all(
                taking
                for taking in edge_takings(
                    genesis.origin_state, genesis.created_at, replay.timeline.entries or []
                )
                if (since is None or taking.effective_at >= since)
                and (until is None or taking.effective_at < until)
            )
            encounters += tally.takings > counted
        if len(batch) < batch_size:
            break
    return MinedEdges(tally.stats(), tally.takings, encounters)
