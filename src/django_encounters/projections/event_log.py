"""Event logs for process-mining tools: the encounters' logs as XES (IEEE 1849-2016) or as CSV,
the Python API behind ``manage.py export_encounter_log``.

* One **trace** (case) per encounter: ``concept:name`` is the encounter id; the definition's
  code, the subject (``app_label.model`` and primary key) and whether the encounter is
  soft-deleted are trace attributes.
* One **event** per row of its log, in business-time order (``effective_at``, then
  ``sequence``; what the audit calls the timeline): ``concept:name`` is the state entered
  (``to_state``), ``time:timestamp`` the row's ``effective_at``, ``org:resource`` the username of
  ``transitioned_by`` (left out when no user was recorded), ``lifecycle:transition``
  ``complete``; ``sequence``, ``from_state``, ``transitioned_at`` (system time), ``reason`` and
  the audit's ``backdated`` / ``overtaken`` marks (:class:`.audit.AuditRow`) are event
  attributes.
* With ``lifecycle=True`` (:func:`with_lifecycle`), each *stay* in a state is a pair instead:
  ``start`` when the state was entered, ``complete`` when it was left (by the next event), so
  the time spent in each state is in the log; the last stay, not left, has a ``start`` only.
* Before them, the **creation** as an event in the origin state (``sequence`` 0, no
  ``from_state``, ``transitioned_at`` = ``created_at``), timestamped ``created_at`` — or the first
  row's ``effective_at`` when that row is effective earlier (a row backdated before the
  creation), so that the creation stays the trace's first event in time order too. A mining
  tool therefore sees the edge origin → first state like every other edge.

Selection: ``definition`` (a code), ``since`` / ``until`` (the encounters with at least one row
*effective* in ``[since, until)``, :func:`.selection.effective_between`; their traces are
exported whole — cutting events out of a trace would make a miner invent edges that no row
took), ``known_at`` (the log as it was known at that system time: only rows recorded by then,
backdated/overtaken marks as they stood then, no encounter created after it; with a period,
the encounters with a row effective in it among the rows known then). Soft-deleted
encounters are exported (their history is part of the record), marked ``deleted``, unless
``exclude_deleted`` leaves them out.

Streaming: encounters are read in keyset batches (:func:`.audit.iter_audit`) and written as
they come; memory holds one batch, whatever the size of the log. :func:`export_event_log`
writes a file under a temporary name and moves it into place when complete: the file never
holds half a log. The formats are documented in ``docs/guides/event-log.md``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import IO, Any
from uuid import UUID

from asgiref.sync import sync_to_async

from .. import arguments
from ..exceptions import EventLogWriteError
from .audit import DEFAULT_BATCH_SIZE, iter_audit
from .output import get_format, register_format, utc_iso, write_atomically
from .rendering import csv_cell

#: The ``lifecycle:transition`` of every event: a row records a state change that happened.
LIFECYCLE = "complete"

#: The CSV's columns. The first four are those pm4py's ``format_dataframe`` expects by default
#: (case id, activity, timestamp) plus the resource; ``case:`` columns repeat the trace's
#: attributes on each line.
CSV_COLUMNS = (
    "case:concept:name",
    "concept:name",
    "time:timestamp",
    "org:resource",
    "lifecycle:transition",
    "case:definition",
    "case:subject_type",
    "case:subject_id",
    "case:deleted",
    "sequence",
    "from_state",
    "transitioned_at",
    "reason",
    "backdated",
    "overtaken",
    "overtaken_by",
)

#: The XES standard extensions the log declares: (name, prefix, URI).
XES_EXTENSIONS = (
    ("Concept", "concept", "http://www.xes-standard.org/concept.xesext"),
    ("Time", "time", "http://www.xes-standard.org/time.xesext"),
    ("Organizational", "org", "http://www.xes-standard.org/org.xesext"),
    ("Lifecycle", "lifecycle", "http://www.xes-standard.org/lifecycle.xesext"),
)

#: XES classifiers: (name, keys). Their keys are declared global (every event has them).
XES_CLASSIFIERS = (
    ("Activity", "concept:name"),
    ("ActivityLifecycle", "concept:name lifecycle:transition"),
)

_EPOCH = "1970-01-01T00:00:00.000000+00:00"

# Characters XML 1.0 does not allow in a document, even escaped: C0 controls other than tab,
# line feed and carriage return, surrogates, U+FFFE and U+FFFF.
_NOT_XML = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0xD800, 0xE000), 0xFFFE, 0xFFFF],
    "\ufffd",
)
# An attribute value between double quotes, in one pass: markup escaped, and tab, line feed and
# carriage return as character references (a parser would normalise them to spaces otherwise).
_ATTRIBUTE_VALUE = str.maketrans(
    {
        **_NOT_XML,
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "\t": "&#9;",
        "\n": "&#10;",
        "\r": "&#13;",
    }
)


@dataclass(frozen=True)
class Event:
    """One event of a trace: a row of the encounter's log, or its creation (``sequence`` 0)."""

    activity: str  # concept:name: the state entered (the origin state for the creation)
    timestamp: datetime  # time:timestamp: effective_at (business time)
    resource: str | None  # org:resource: the username of transitioned_by; None when nobody
    sequence: int  # 0 for the creation
    from_state: str | None  # None for the creation
    transitioned_at: datetime  # system time (created_at for the creation)
    reason: str
    backdated: bool = False
    overtaken: bool = False
    overtaken_by: int | None = None
    #: the definition version it was decided under (the creation: the one it was created under)
    definition_version: int | None = None
    #: lifecycle:transition — ``complete`` (the state change), or with :func:`with_lifecycle`
    #: ``start`` (entering the state) / ``complete`` (leaving it)
    lifecycle: str = LIFECYCLE


@dataclass(frozen=True)
class Trace:
    """One encounter as a trace: its id, definition code, subject and events in order."""

    id: UUID
    definition: str
    subject_type: str  # "app_label.model"
    subject_id: str
    deleted: bool
    events: list[Event]
    #: anomalies of its log nobody acknowledged (``audit_encounters`` reports them)
    anomalies: int = 0


@dataclass(frozen=True)
class EventLogCounts:
    """What was exported: ``traces`` (encounters) and ``events`` (rows plus one creation event
    per trace); ``anomalous``: how many of the traces have unacknowledged anomalies in their
    logs (exported as the rows are — the export verifies every stream as the audit does, and
    ``manage.py audit_encounters`` says what is wrong)."""

    traces: int
    events: int
    anomalous: int = 0


def iter_traces(
    *,
    definition: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    known_at: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    using: str | None = None,
    exclude_deleted: bool = False,
) -> Iterator[Trace]:
    """The selected encounters as :class:`Trace` objects, in ``(created_at, id)`` order, read
    in batches of ``batch_size`` encounters.

    Args:
        definition: only encounters of the definition with this code.
        since: only encounters with at least one row *effective* at or after ``since``.
        until: only encounters with at least one row *effective* before ``until``.
        known_at: the log as it was known at this system time: rows recorded by then, and no
            encounter created after it.
        batch_size: encounters per batch.
        using: the database alias (default: the router's choice for reading encounters).
        exclude_deleted: leave soft-deleted encounters out (by default they are exported,
            marked ``deleted``: their history is part of the record).

    The arguments are checked when this is called; the traces are read lazily.

    Raises:
        ValueError / TypeError: naive or non-datetime times, ``since >= until``, a bad
            ``batch_size``.
        DefinitionNotFoundError: no definition has the code ``definition``.
    """
    audits = iter_audit(
        definition=definition,
        since=since,
        until=until,
        known_at=known_at,
        batch_size=batch_size,
        using=using,
    )
    arguments.require_bool(exclude_deleted, "exclude_deleted")
    selected: Iterable[Any] = audits
    if exclude_deleted:
        selected = (audit for audit in audits if not audit.deleted)
    return _traces(selected, known_at, since, until)


def _in_period(row: Any, since: datetime | None, until: datetime | None) -> bool:
    return (since is None or row.effective_at >= since) and (
        until is None or row.effective_at < until
    )


def _traces(
    audits: Iterable[Any],
    known_at: datetime | None,
    since: datetime | None,
    until: datetime | None,
) -> Iterator[Trace]:
    period = since is not None or until is not None
    for audit in audits:
        genesis = audit.genesis
        if genesis is None:  # only an audit against a checkpoint reports one (not done here)
            continue
        if known_at is not None:
            if genesis.created_at > known_at:
                continue  # not created yet at known_at
            if period and not any(_in_period(row, since, until) for row in audit.timeline):
                continue  # its rows in the period were recorded after known_at
        created = genesis.created_at
        first = audit.timeline[0].effective_at if audit.timeline else created
        events = [
            Event(
                activity=genesis.origin_state,
                timestamp=min(created, first),
                resource=None,
                sequence=0,
                from_state=None,
                transitioned_at=created,
                reason="",
                definition_version=genesis.definition_version,
            )
        ]
        events.extend(
            Event(
                activity=row.to_state,
                timestamp=row.effective_at,
                resource=row.transitioned_by,
                sequence=row.sequence,
                from_state=row.from_state,
                transitioned_at=row.transitioned_at,
                reason=row.reason,
                backdated=row.backdated,
                overtaken=row.overtaken,
                overtaken_by=row.overtaken_by,
                definition_version=row.definition_version,
            )
            for row in audit.timeline
        )
        yield Trace(
            id=audit.id,
            definition=audit.definition,
            subject_type=genesis.subject_type,
            subject_id=genesis.subject_id,
            deleted=audit.deleted,
            events=events,
            anomalies=audit.anomaly_count,
        )


def with_lifecycle(trace: Trace) -> Trace:
    """``trace`` with each stay in a state as a ``start`` event (when it was entered: the event
    that entered it, as it is) and a ``complete`` event (when it was left: at the next event's
    time, with the next event's resource, sequence, recorded time and reason — who and what
    ended the stay), in time order (a stay's ``complete`` before the next one's ``start``). The
    last stay, which nothing ended, has a ``start`` only."""
    events: list[Event] = []
    entered = trace.events
    for number, event in enumerate(entered):
        if number:
            before = entered[number - 1]
            events.append(
                Event(
                    activity=before.activity,
                    timestamp=event.timestamp,
                    resource=event.resource,
                    sequence=event.sequence,
                    from_state=None,
                    transitioned_at=event.transitioned_at,
                    reason=event.reason,
                    backdated=event.backdated,
                    overtaken=event.overtaken,
                    overtaken_by=event.overtaken_by,
                    definition_version=event.definition_version,
                    lifecycle="complete",
                )
            )
        events.append(replace(event, lifecycle="start"))
    return replace(trace, events=events)


def timestamp(value: datetime) -> str:
    """A time as both formats write it: ISO-8601 (``xs:dateTime``) in UTC, to the
    microsecond, e.g. ``2024-03-31T13:59:59.250000+00:00``."""
    return utc_iso(value, "microseconds")


# ---------------------------------------------------------------------------------------------
# XES
# ---------------------------------------------------------------------------------------------


def xml_text(value: str) -> str:
    """``value`` with every character XML 1.0 forbids (even as a character reference: C0
    controls but tab, line feed and carriage return; lone surrogates; U+FFFE, U+FFFF) replaced
    by U+FFFD."""
    return value.translate(_NOT_XML)


def _quoted(value: str) -> str:
    """``value`` as a double-quoted XML attribute value (:func:`xml_text`, then escaped)."""
    return '"' + value.translate(_ATTRIBUTE_VALUE) + '"'


def _attribute(kind: str, key: str, value: str) -> str:
    return f"<{kind} key={_quoted(key)} value={_quoted(value)}/>"


def _start(kind: str, key: str) -> str:
    """The constant start of an attribute element, up to its value."""
    return f"<{kind} key={_quoted(key)} value="


_EVENT_NAME = "\t\t<event>\n\t\t\t" + _start("string", "concept:name")
_EVENT_TIME = "/>\n\t\t\t" + _start("date", "time:timestamp")
_EVENT_LIFECYCLE = {
    name: "/>\n\t\t\t" + _attribute("string", "lifecycle:transition", name)
    for name in ("start", "complete")
}
_EVENT_RESOURCE = "\n\t\t\t" + _start("string", "org:resource")
_EVENT_SEQUENCE = "\n\t\t\t" + _start("int", "sequence")
_EVENT_FROM = "/>\n\t\t\t" + _start("string", "from_state")
_EVENT_RECORDED = "/>\n\t\t\t" + _start("date", "transitioned_at")
_EVENT_REASON = "/>\n\t\t\t" + _start("string", "reason")
_EVENT_MARKS = {
    (backdated, overtaken): (
        "/>\n\t\t\t"
        + _attribute("boolean", "backdated", "true" if backdated else "false")
        + "\n\t\t\t"
        + _attribute("boolean", "overtaken", "true" if overtaken else "false")
    )
    for backdated in (False, True)
    for overtaken in (False, True)
}
_EVENT_OVERTAKEN_BY = "\n\t\t\t" + _start("int", "overtaken_by")
_EVENT_END = "\n\t\t</event>\n"


def _xes_event(event: Event) -> str:
    parts = [
        _EVENT_NAME,
        _quoted(event.activity),
        _EVENT_TIME,
        '"',
        timestamp(event.timestamp),
        '"',
        _EVENT_LIFECYCLE[event.lifecycle],
    ]
    if event.resource is not None:
        parts += [_EVENT_RESOURCE, _quoted(event.resource), "/>"]
    parts += [_EVENT_SEQUENCE, f'"{event.sequence}"']
    if event.from_state is not None:
        parts += [_EVENT_FROM, _quoted(event.from_state)]
    parts += [
        _EVENT_RECORDED,
        '"',
        timestamp(event.transitioned_at),
        '"',
        _EVENT_REASON,
        _quoted(event.reason),
        _EVENT_MARKS[event.backdated, event.overtaken],
    ]
    if event.overtaken_by is not None:
        parts += [_EVENT_OVERTAKEN_BY, f'"{event.overtaken_by}"/>']
    parts.append(_EVENT_END)
    return "".join(parts)


def _xes_trace(trace: Trace) -> str:
    head = [
        _attribute("string", "concept:name", str(trace.id)),
        _attribute("string", "definition", trace.definition),
        _attribute("string", "subject_type", trace.subject_type),
        _attribute("string", "subject_id", trace.subject_id),
        _attribute("boolean", "deleted", "true" if trace.deleted else "false"),
    ]
    return (
        "\t<trace>\n"
        + "".join(f"\t\t{part}\n" for part in head)
        + "".join(_xes_event(event) for event in trace.events)
        + "\t</trace>\n"
    )


def _xes_header(name: str) -> str:
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<log xes.version="1.0">',
    ]
    lines += [
        f"\t<extension name={_quoted(n)} prefix={_quoted(p)} uri={_quoted(u)}/>"
        for n, p, u in XES_EXTENSIONS
    ]
    lines += [
        '\t<global scope="trace">',
        "\t\t" + _attribute("string", "concept:name", "UNKNOWN"),
        "\t</global>",
        '\t<global scope="event">',
        "\t\t" + _attribute("string", "concept:name", "UNKNOWN"),
        "\t\t" + _attribute("date", "time:timestamp", _EPOCH),
        "\t\t" + _attribute("string", "lifecycle:transition", LIFECYCLE),
        "\t</global>",
    ]
    lines += [
        f'\t<classifier name={_quoted(n)} scope="event" keys={_quoted(k)}/>'
        for n, k in XES_CLASSIFIERS
    ]
    lines += [
        "\t" + _attribute("string", "concept:name", name),
        "\t" + _attribute("string", "lifecycle:model", "standard"),
    ]
    return "\n".join(lines) + "\n"


def _log_name(definition: str | None) -> str:
    return "django-encounters" + (f" {definition}" if definition is not None else "")


#: The name of a log of a definition (or of every definition): XES's ``concept:name``.
log_name = _log_name


@register_format("event-log", "xes", content_type="application/xml", newline="\n")
def write_xes_traces(
    traces: Iterable[Trace], out: IO[str], *, name: str = "django-encounters"
) -> EventLogCounts:
    """Write ``traces`` to ``out`` as one XES log named ``name``, one trace at a time."""
    out.write(_xes_header(name))
    count = events = anomalous = 0
    for trace in traces:
        out.write(_xes_trace(trace))
        count += 1
        events += len(trace.events)
        anomalous += trace.anomalies > 0
    out.write("</log>\n")
    return EventLogCounts(count, events, anomalous)


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def _flag(value: bool) -> str:
    return "true" if value else "false"


@register_format("event-log", "csv", content_type="text/csv", newline="")
def write_csv_traces(
    traces: Iterable[Trace], out: IO[str], *, name: str = "django-encounters"
) -> EventLogCounts:
    """Write ``traces`` to ``out`` as CSV (:data:`CSV_COLUMNS`, one line per event), with
    every cell a spreadsheet would run as a formula neutralised (:func:`.rendering.csv_cell`).
    Open ``out`` with ``newline=""``. (``name``, the log's title in XES, has no place in a
    CSV file.)"""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = events = anomalous = 0
    for trace in traces:
        anomalous += trace.anomalies > 0
        case = [str(trace.id), trace.definition, trace.subject_type, trace.subject_id]
        for event in trace.events:
            cells = [
                case[0],
                event.activity,
                timestamp(event.timestamp),
                event.resource or "",
                event.lifecycle,
                *case[1:],
                _flag(trace.deleted),
                event.sequence,
                event.from_state or "",
                timestamp(event.transitioned_at),
                event.reason,
                _flag(event.backdated),
                _flag(event.overtaken),
                "" if event.overtaken_by is None else event.overtaken_by,
            ]
            writer.writerow([csv_cell(cell) for cell in cells])
        count += 1
        events += len(trace.events)
    return EventLogCounts(count, events, anomalous)


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def write_xes(out: IO[str], **selection: Any) -> EventLogCounts:
    """Write the selected encounters' log to the text stream ``out`` as XES; returns the
    numbers of traces and events written. ``selection``: the keyword arguments of
    :func:`iter_traces` (checked before anything is written; same errors)."""
    return export_event_log("xes", out, **selection)


def write_csv(out: IO[str], **selection: Any) -> EventLogCounts:
    """Write the selected encounters' log to the text stream ``out`` as CSV (open it with
    ``newline=""``); returns the numbers of traces and events written. ``selection``: the
    keyword arguments of :func:`iter_traces` (checked before anything is written; same
    errors)."""
    return export_event_log("csv", out, **selection)


#: The formats that can write lifecycle start/complete pairs (``lifecycle=True``).
LIFECYCLE_FORMATS = ("xes", "csv")


def export_event_log(
    format: str,
    out: str | os.PathLike[str] | IO[str],
    *,
    lifecycle: bool = False,
    **selection: Any,
) -> EventLogCounts:
    """Export the selected encounters' log as ``format`` (``"xes"`` or ``"csv"``, or any
    format registered for the ``"event-log"`` report) to ``out``: a file path, or a text
    stream. A file is written under a temporary name beside it and moved into place when
    complete (replacing an earlier file only then): it never holds half a log.

    Args:
        format: ``"xes"`` or ``"csv"``.
        out: a path, or a text stream (for CSV, opened with ``newline=""``).
        lifecycle: each stay in a state as a ``start``/``complete`` pair
            (:func:`with_lifecycle`; XES and CSV only).
        selection: the keyword arguments of :func:`iter_traces` (``definition``, ``since``,
            ``until``, ``known_at``, ``batch_size``, ``using``, ``exclude_deleted``).

    Returns:
        The numbers of traces (encounters) and events written.

    Raises:
        UnknownFormatError: ``format`` is neither.
        ValueError / TypeError: naive or non-datetime times, ``since >= until``.
        DefinitionNotFoundError: no definition has the code ``definition``.
        EventLogWriteError: the file cannot be written (nothing is left at ``out``).
    """
    writer = get_format("event-log", format)
    if not isinstance(lifecycle, bool):
        raise TypeError(f"lifecycle must be True or False, not {lifecycle!r}")
    if lifecycle and format not in LIFECYCLE_FORMATS:
        raise ValueError(
            f"lifecycle start/complete pairs are written in {' and '.join(LIFECYCLE_FORMATS)} "
            f"only, not in {format!r} (whose events are the state changes)"
        )
    traces: Iterable[Trace] = iter_traces(**selection)  # arguments checked before any file opens
    if lifecycle:
        traces = map(with_lifecycle, traces)
    name = _log_name(selection.get("definition"))
    if not isinstance(out, (str, os.PathLike)):
        return writer.write(traces, out, name=name)
    try:
        with write_atomically(out, newline=writer.newline) as stream:
            return writer.write(traces, stream, name=name)
    except OSError as exc:
        # The file named (through a symbolic link: the one linked to), not the temporary.
        raise EventLogWriteError(os.path.realpath(out), exc.strerror or str(exc)) from exc


async def aexport_event_log(
    format: str,
    out: str | os.PathLike[str] | IO[str],
    *,
    lifecycle: bool = False,
    **selection: Any,
) -> EventLogCounts:
    """:func:`export_event_log` for async code: the same arguments, result and errors; the
    whole export (reading the log and writing ``out``) runs in one thread-sensitive call, off
    the event loop, which goes on serving other tasks meanwhile."""
    return await sync_to_async(export_event_log, thread_sensitive=True)(
        format, out, lifecycle=lifecycle, **selection
    )
