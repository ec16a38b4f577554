"""Time in state: the business-time intervals of a timeline and the hours spent in each state."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from .timeline import Entry

_HOUR = Decimal(3600)


def _hours(delta: timedelta) -> Decimal:
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return Decimal(micros) / Decimal(1_000_000) / _HOUR


def intervals(
    origin_state: str,
    created_at: datetime | None,
    entries: Sequence[Entry],
    until: datetime,
) -> list[tuple[str, datetime, datetime]]:
    """The business-time intervals ``(state, start, end)`` of a timeline, clipped at ``until``.

    The origin state's interval starts at ``created_at`` when that precedes the first row
    (otherwise it is not counted); the last interval is open and ends at ``until``.
    """
    spans: list[tuple[str, datetime, datetime]] = []
    if created_at is not None:
        first = entries[0].effective_at if entries else until
        if created_at < first:
            spans.append((origin_state, created_at, first))
    for index, entry in enumerate(entries):
        end = entries[index + 1].effective_at if index + 1 < len(entries) else until
        spans.append((entry.to_state, entry.effective_at, end))
    clipped = []
    for state, start, end in spans:
        end = min(end, until)
        if end > start:
            clipped.append((state, start, end))
    return clipped


def time_in_states(
    origin_state: str,
    created_at: datetime | None,
    entries: Sequence[Entry],
    until: datetime,
) -> dict[str, Decimal]:
    """Hours spent in each state entered (several visits add up)."""
    totals: dict[str, Decimal] = {}
    for state, start, end in intervals(origin_state, created_at, entries, until):
        totals[state] = totals.get(state, Decimal(0)) + _hours(end - start)
    return totals
