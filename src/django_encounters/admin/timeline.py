"""An encounter's timeline as the admin shows it (page and "History")."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..models import (
    Encounter,
)
from ..projections.audit import encounter_timeline as audited_timeline
from .common import local_time

# ---------------------------------------------------------------------------------------------
# Encounters: the timeline shown on the page and in "History"
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineRow:
    sequence: int
    from_state: str
    to_state: str
    effective_at: str
    transitioned_at: str
    transitioned_by: str
    reason: str
    context: str
    backdated: bool
    overtaken: bool
    overtaken_by: int | None


def encounter_timeline(encounter: Encounter) -> tuple[list[TimelineRow], list[str]]:
    """The encounter's rows as the page shows them (:func:`~.projections.audit.
    encounter_timeline`: business-time order, the audit's marks, each row's context) and the
    anomalies the audit finds in its stream (a damaged log is shown, never hidden)."""
    audit = audited_timeline(encounter)
    rows = [
        TimelineRow(
            sequence=row.sequence,
            from_state=row.from_state,
            to_state=row.to_state,
            effective_at=local_time(row.effective_at),
            transitioned_at=local_time(row.transitioned_at),
            transitioned_by=row.who or "",
            reason=row.reason,
            context=json.dumps(row.context, sort_keys=True) if row.context else "",
            backdated=row.backdated,
            overtaken=row.overtaken,
            overtaken_by=row.overtaken_by,
        )
        for row in audit.timeline
    ]
    anomalies = [
        f"sequence {a.sequence}: {a.kind}: {a.detail}"
        + (" (acknowledged)" if audit.acknowledgement(a) is not None else "")
        for a in audit.anomalies
    ]
    return rows, anomalies
