"""Mining a definition's log: which edges its encounters took, how often, and how long they
stayed in a state before each.

Every encounter of the definition (soft-deleted ones included: their history is part of the
record; rows decided under any of its versions) is replayed by the one fold
(:class:`.replay.Replays`, without its checks: a damaged stream is folded, not refused) into
its business-time timeline; :func:`~django_encounters.engine.graphs.edge_takings` reads the edges
off the timeline and an :class:`~django_encounters.engine.graphs.EdgeTally` counts them. Memory
holds one batch of streams, plus one wait per row counted (for the medians).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.graphs import EdgeStats, EdgeTally, edge_takings
from .replay import Replays
from .selection import Selection

DEFAULT_BATCH_SIZE = 500


@dataclass(frozen=True)
class MinedEdges:
    """What the rows of a definition say: ``stats`` (``(source, target) -> EdgeStats``, every
    edge taken), how many rows were counted and of how many encounters."""

    stats: dict[tuple[str, str], EdgeStats]
    rows: int
    encounters: int


def mine_edges(selection: Selection) -> MinedEdges:
    """Count the edges taken by the selected encounters, counting only the rows *effective*
    in the selection's ``[since, until)`` (either bound may be None); the time before each is
    measured on the whole timeline, so a stay that began before ``since`` counts in full.
    Upgrade rows (the state kept, the definition version moved) are not edges."""
    since, until = selection.since, selection.until
    tally = EdgeTally()
    encounters = 0
    for verified in Replays(selection, verify=False):
        genesis = verified.genesis
        counted = tally.takings
        tally.add_all(
            taking
            for taking in edge_takings(
                genesis.origin_state, genesis.created_at, verified.replay.timeline.entries or []
            )
            if (since is None or taking.effective_at >= since)
            and (until is None or taking.effective_at < until)
        )
        encounters += tally.takings > counted
    return MinedEdges(tally.stats(), tally.takings, encounters)
