"""An encounter's timeline as the admin shows it (page and "History"): one page of rows at a
time, each with the audit's marks, the from-state the timeline replays to beside the one
recorded, and a "late entry" mark; the backdates a page can offer; "state at … as known at …"
in words."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from .. import conf
from ..engine import Entry
from ..engine.timeline import EARLIEST_EFFECTIVE_AT, violations
from ..models import (
    Encounter,
)
from ..projections.audit import AuditRow, EncounterAudit
from ..projections.audit import encounter_timeline as audited_timeline
from .common import local_time

# ---------------------------------------------------------------------------------------------
# Encounters: the timeline shown on the page and in "History"
# ---------------------------------------------------------------------------------------------

#: The query parameters of the timeline's pages: the page number (or "all") and the order.
PAGE_PARAMETER = "timeline_page"
ORDER_PARAMETER = "timeline_order"


@dataclass(frozen=True)
class TimelineRow:
    sequence: int
    #: the state the timeline is in just before this row (the previous row's ``to_state`` in
    #: business-time order, or the origin state): what the row moved the encounter *from*
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
    #: the ``from_state`` recorded with the row when it differs from :attr:`from_state` (a
    #: row overtaken by a backdated one), else None
    recorded_from_state: str | None = None
    #: recorded more than ``ENCOUNTERS_LATE_ENTRY_TOLERANCE`` after its effective time
    late: bool = False
    #: how long after its effective time it was recorded, in words ("" when not late)
    late_by: str = ""

    def html(self) -> SafeString:
        """The row as the timeline's table shows it (``<tr>``, escaped): built here rather
        than in the template, whose per-variable lookups were a tenth of the page's time."""
        classes = "timeline-row" + "".join(
            f" {name}"
            for name, on in (
                ("backdated", self.backdated),
                ("overtaken", self.overtaken),
                ("late", self.late),
            )
            if on
        )
        recorded = (
            format_html(
                ' <span class="recorded-from-state" title="the from-state recorded with the '
                "row; a row recorded later was inserted before it, so the timeline now reaches "
                "this row from '{}'\">(recorded: {})</span>",
                self.from_state,
                self.recorded_from_state,
            )
            if self.recorded_from_state
            else ""
        )
        marks = [
            mark_safe(
                '<span class="timeline-mark" title="inserted before a row that was already '
                'recorded">backdated</span>'
            )
            if self.backdated
            else "",
            format_html(
                '<span class="timeline-mark" title="a row recorded later was inserted before '
                'it">overtaken by #{}</span>',
                self.overtaken_by,
            )
            if self.overtaken
            else "",
            format_html(
                '<span class="timeline-mark late-entry" title="recorded {} after its effective '
                'time">late entry: {}</span>',
                self.late_by,
                self.late_by,
            )
            if self.late
            else "",
        ]
        return format_html(
            '<tr class="{}" data-sequence="{}">\n'
            "      <td>{}</td>\n"
            '      <td><span class="from-state">{}</span>{} → <strong>{}</strong></td>\n'
            '      <td class="timeline-time">{}</td>\n'
            '      <td class="timeline-time">{}</td>\n'
            "      <td>{}</td>\n"
            "      <td>{}</td>\n"
            "      <td><code>{}</code></td>\n"
            "      <td>\n        {}\n        {}\n        {}\n      </td>\n"
            "    </tr>",
            classes,
            self.sequence,
            self.sequence,
            self.from_state,
            recorded,
            self.to_state,
            self.effective_at,
            self.transitioned_at,
            self.transitioned_by or "—",
            self.reason,
            self.context,
            *marks,
        )


@dataclass(frozen=True)
class TimelinePage:
    """One page of an encounter's timeline and what the page says around it."""

    rows: list[TimelineRow]
    anomalies: list[str]
    number: int  # 1-based; 0 when every row is shown
    pages: int
    total: int  # rows in the whole timeline
    newest_first: bool
    first_shown: int  # 1-based position of the first row shown in the order shown (0: none)
    audit: EncounterAudit

    @property
    def show_all(self) -> bool:
        return self.number == 0

    @property
    def paginated(self) -> bool:
        return self.pages > 1

    @property
    def last_shown(self) -> int:
        return self.first_shown + len(self.rows) - 1 if self.rows else 0


def page_request(query: Any) -> tuple[int, bool]:
    """``(page number, newest first)`` asked for by ``query`` (a ``QueryDict``): the page
    (``timeline_page``: a number from 1, or ``all``: 0) and the order (``timeline_order``:
    ``newest`` or ``oldest``; default ``ENCOUNTERS_ADMIN_TIMELINE_ORDER``). A value that
    cannot be read is the default (page 1)."""
    raw = query.get(PAGE_PARAMETER, "1")
    if raw == "all":
        number = 0
    else:
        try:
            number = max(1, int(raw))
        except (TypeError, ValueError):
            number = 1
    order = query.get(ORDER_PARAMETER) or conf.admin_timeline_order()
    return number, order != "oldest"


def encounter_timeline(
    encounter: Encounter,
    *,
    page: int = 1,
    newest_first: bool | None = None,
    page_size: int | None = None,
) -> TimelinePage:
    """Page ``page`` (1-based; 0 for every row) of the encounter's timeline, ``page_size`` rows
    (default ``ENCOUNTERS_ADMIN_TIMELINE_PAGE_SIZE``) in business-time order, newest first by
    default (``ENCOUNTERS_ADMIN_TIMELINE_ORDER``), with the anomalies the audit finds in its
    stream (a damaged log is shown, never hidden).

    The stream is read and replayed whole (one query; the audit's verifying replay,
    :func:`~.projections.audit.encounter_timeline`): the backdated and overtaken marks and the
    replayed from-states depend on rows of other pages, and the anomalies on every row. Only the
    page's rows are turned into what the page shows (times in the admin's zone, names, context).
    A page past the last is the last."""
    if newest_first is None:
        newest_first = conf.admin_timeline_order() != "oldest"
    size = conf.admin_timeline_page_size() if page_size is None else page_size
    audit = audited_timeline(encounter)
    ordered = audit.timeline  # business-time order
    total = len(ordered)
    pages = max(1, -(-total // size))
    if page == 0:
        start, stop = 0, total
    else:
        page = min(page, pages)
        start, stop = (page - 1) * size, min(page * size, total)
    # The page's positions in business-time order (ascending), whatever the order shown.
    if newest_first:
        lo, hi = total - stop, total - start
    else:
        lo, hi = start, stop
    tolerance = conf.late_entry_tolerance()
    rows = [
        _shown(row, ordered[i - 1].to_state if i else _origin(audit, encounter), tolerance)
        for i, row in ((i, ordered[i]) for i in range(lo, hi))
    ]
    if newest_first:
        rows.reverse()
    anomalies = [
        f"sequence {a.sequence}: {a.kind}: {a.detail}"
        + (" (acknowledged)" if audit.acknowledgement(a) is not None else "")
        for a in audit.anomalies
    ]
    return TimelinePage(
        rows=rows,
        anomalies=anomalies,
        number=page,
        pages=pages,
        total=total,
        newest_first=newest_first,
        first_shown=start + 1 if rows else 0,
        audit=audit,
    )


def _origin(audit: EncounterAudit, encounter: Encounter) -> str:
    return audit.genesis.origin_state if audit.genesis is not None else encounter.origin_state


def _shown(row: AuditRow, replayed_from: str, tolerance: timedelta) -> TimelineRow:
    lateness = row.transitioned_at - row.effective_at
    late = lateness > tolerance
    return TimelineRow(
        sequence=row.sequence,
        from_state=replayed_from,
        recorded_from_state=row.from_state if row.from_state != replayed_from else None,
        to_state=row.to_state,
        effective_at=local_time(row.effective_at),
        transitioned_at=local_time(row.transitioned_at),
        transitioned_by=row.who or "",
        reason=row.reason,
        context=json.dumps(row.context, sort_keys=True) if row.context else "",
        backdated=row.backdated,
        overtaken=row.overtaken,
        overtaken_by=row.overtaken_by,
        late=late,
        late_by=duration_words(lateness) if late else "",
    )


def duration_words(span: timedelta) -> str:
    """``span`` as a person says it, to the two largest units: "3 days 4 hours", "2 hours 5
    minutes", "40 minutes", "12 seconds"."""
    seconds = int(span.total_seconds())
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount} {unit}" + ("" if amount == 1 else "s"))
    return " ".join(parts[:2]) or "0 seconds"


# ---------------------------------------------------------------------------------------------
# Backdates the page offers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackdateOption:
    """A state that may be recorded before the end of the timeline, and the business-time
    windows ``[after, before)`` where it may go (in the admin's zone, as text)."""

    state: str
    windows: list[tuple[str, str]]


def backdate_options(encounter: Encounter, audit: EncounterAudit) -> list[BackdateOption]:
    """The states a backdated transition could record *between* the timeline's rows — where
    the state then allows the edge and the row that follows may still follow it, under the
    machine of the version the encounter is pinned to (``transition()``'s own rule,
    :func:`~.engine.timeline.violations`; its validators still run when it is recorded). What
    a final encounter can still be given; none before the first row is recorded."""
    rules = encounter.machine.rules()
    timeline = audit.timeline
    if not timeline:
        return []
    entries = []
    version: int | None = encounter.origin_version
    for row in sorted(timeline, key=lambda r: r.sequence):  # recording order: upgrades
        upgrade = row.definition_version != version
        version = row.definition_version
        entries.append(
            (row, Entry(row.effective_at, row.sequence, row.from_state, row.to_state, upgrade))
        )
    by_sequence = {row.sequence: entry for row, entry in entries}
    ordered = [by_sequence[row.sequence] for row in timeline]
    found: dict[str, list[tuple[str, str]]] = {}
    state = _origin(audit, encounter)
    after: datetime = EARLIEST_EFFECTIVE_AT
    for successor in ordered:
        if successor.effective_at > after:
            for target in rules.states:
                if not violations(rules, state, target, after, successor):
                    found.setdefault(target, []).append(
                        (local_time(after), local_time(successor.effective_at))
                    )
        state, after = successor.to_state, max(after, successor.effective_at)
    return [BackdateOption(state, windows) for state, windows in found.items()]


# ---------------------------------------------------------------------------------------------
# "State at … as known at …" in words
# ---------------------------------------------------------------------------------------------


def existed_at(
    audit: EncounterAudit, encounter: Encounter, when: datetime, known_at: datetime | None
) -> str | None:
    """Why the encounter cannot have had a state at business time ``when`` as known at
    ``known_at`` — it did not exist yet — or None when it can. As known at a time before it
    was created (recorded), nothing was known about it; at a business time before both its
    creation and its timeline's first row (rows may be dated before the creation: an imported
    history), it did not exist yet."""
    created = audit.genesis.created_at if audit.genesis is not None else encounter.created_at
    if known_at is not None and known_at < created:
        return (
            f"As known at {local_time(known_at)}, the encounter did not exist yet: it was "
            f"created (recorded) at {local_time(created)}."
        )
    rows = [
        row.effective_at
        for row in audit.timeline
        if known_at is None or row.transitioned_at <= known_at
    ]
    start = min([created, *rows])
    if when < start:
        return (
            f"At {local_time(when)} the encounter did not exist yet: it was created at "
            f"{local_time(created)}"
            + (
                f" and its timeline starts at {local_time(min(rows))}."
                if rows and min(rows) < created
                else "."
            )
        )
    return None
