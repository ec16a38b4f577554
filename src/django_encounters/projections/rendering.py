"""Rendering an audit (:func:`.audit.iter_audit`) for people and tools: a readable table, CSV
(one line per timeline row, with a header) or one JSON object, each streamed one encounter at
a time; every writer returns the number of anomalies nobody acknowledged (what fails the exit
status). Acknowledged anomalies are written too, marked with who, when and why.

* CSV cells that a spreadsheet would run as a formula — starting with ``=``, ``+``, ``-``,
  ``@``, a tab or a carriage return — and cells starting with an apostrophe get a leading
  apostrophe (:func:`csv_cell`): spreadsheets then show the text as text, and a program gets
  the original back by removing one leading apostrophe from any cell that starts with one.
* Table cells show control and format characters (escape sequences, carriage returns,
  bidirectional overrides) escaped (:func:`printable`), so stored text cannot rewrite what a
  terminal shows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import datetime
from typing import IO, Any

from ..engine import READABLE_FIELDS, Anomaly
from .audit import EncounterAudit
from .checkpoints import CheckpointCheck
from .output import local_iso, register_format
from .seals import seal_status

CSV_HEADER = [
    "encounter_id",
    "definition",
    "state_as_of",
    *READABLE_FIELDS,
    "backdated",
    "overtaken",
    "transitioned_by_now",
    "anomalies",
]

#: First characters that make a spreadsheet read a cell as a formula (and the apostrophe,
#: so that the escape can be undone).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value: Any) -> Any:
    """``value`` as written in a CSV cell: text that a spreadsheet would run as a formula gets
    a leading apostrophe; other values are left to the csv module."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control and format characters,
    line and paragraph separators, spaces other than ``" "``) escaped as ``\\x1b`` or
    ``\\u202e``, for a terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@register_format("audit", "table", content_type="text/plain; charset=utf-8", newline=None)
def write_table(
    audits: Iterable[EncounterAudit],
    out: IO[str],
    *,
    as_of: datetime,
    known_at: datetime | None = None,
    checkpoint: CheckpointCheck | None = None,
) -> int:
    """A readable report, one block per encounter, after a first line saying whether seals
    were checked; returns the count of anomalies nobody acknowledged."""
    out.write(f"Seals: {seal_status()}\n")
    when = f"as of {local_iso(as_of)}"
    if known_at is not None:
        when += f", as known at {local_iso(known_at)}"
    if checkpoint is not None:
        out.write(checkpoint_header(checkpoint))
    encounters = rows = count = acknowledged = 0
    for audit in audits:
        encounters += 1
        rows += len(audit.timeline)
        count += audit.anomaly_count
        acknowledged += audit.acknowledged_count
        _write_encounter(audit, out, when)
    summary = (
        f"{encounters} encounter(s), {rows} row(s), {count} anomal{'y' if count == 1 else 'ies'}"
    )
    if acknowledged:
        summary += f", {acknowledged} acknowledged"
    out.write(f"{summary} (states {when})\n")
    return count


@register_format("audit", "csv", content_type="text/csv; charset=utf-8", newline="")
def write_csv(
    audits: Iterable[EncounterAudit],
    out: IO[str],
    *,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
    checkpoint: CheckpointCheck | None = None,
) -> int:
    """One line per timeline row, with a header; an anomaly whose sequence is no row listed
    (the genesis, a row gone from the log, a missing encounter) is written on a line of its
    own holding only the encounter, the sequence and the anomalies. Returns the count of
    anomalies nobody acknowledged. (Each line carries its encounter's state; ``as_of``,
    ``known_at`` and ``checkpoint`` are the table's header and the JSON's.)"""
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    count = 0
    blank = [""] * (len(READABLE_FIELDS) - 1)
    for audit in audits:
        count += audit.anomaly_count
        by_sequence: dict[int, list[str]] = {}
        for anomaly in audit.anomalies:
            by_sequence.setdefault(anomaly.sequence, []).append(_anomaly_text(audit, anomaly))
        encounter = [str(audit.id), audit.definition, audit.state_as_of]
        for row in audit.timeline:
            cells = [
                *encounter,
                row.sequence,
                row.from_state,
                row.to_state,
                local_iso(row.effective_at),
                local_iso(row.transitioned_at),
                row.transitioned_by or "",
                row.reason,
                "true" if row.backdated else "false",
                "true" if row.overtaken else "false",
                row.transitioned_by_now or "",
                "; ".join(by_sequence.pop(row.sequence, [])),
            ]
            writer.writerow([csv_cell(cell) for cell in cells])
        for sequence, texts in sorted(by_sequence.items()):
            cells = [*encounter, sequence, *blank, "", "", "", "; ".join(texts)]
            writer.writerow([csv_cell(cell) for cell in cells])
    return count


@register_format("audit", "json", content_type="application/json", newline=None)
def write_json(
    audits: Iterable[EncounterAudit],
    out: IO[str],
    *,
    as_of: datetime | None = None,
    known_at: datetime | None = None,
    checkpoint: CheckpointCheck | None = None,
) -> int:
    """Stream the audit as one JSON object (indented, one encounter at a time, its first key
    ``seals`` saying whether seals were checked; the shape is in docs/operations.md); returns
    the count of anomalies nobody acknowledged. (``as_of`` and ``known_at`` are in each
    encounter's ``state_as_of``.)"""
    count = acknowledged = 0
    out.write('{\n  "seals": ' + json.dumps(seal_status()) + ',\n  "encounters": [')
    for index, audit in enumerate(audits):
        count += audit.anomaly_count
        acknowledged += audit.acknowledged_count
        text = json.dumps(audit.as_dict(), ensure_ascii=False, indent=2)
        out.write(("," if index else "") + "\n    " + text.replace("\n", "\n    "))
    out.write(f'\n  ],\n  "anomaly_count": {count},\n  "acknowledged_count": {acknowledged}')
    if checkpoint is not None:
        text = json.dumps(checkpoint.as_dict(), ensure_ascii=False, indent=2)
        out.write(',\n  "checkpoint": ' + text.replace("\n", "\n  "))
    out.write("\n}\n")
    return count


def checkpoint_header(checkpoint: CheckpointCheck) -> str:
    """The table's first lines against a checkpoint: the file, its time — said not covered by
    the root for a ``/1`` file —, its root, its signature, what was compared."""
    covered = "" if checkpoint.covers_created_at else " (not covered by the root)"
    if checkpoint.signed_by is None:
        signature = "unsigned"
    elif checkpoint.signature_verified:
        signature = f"signature verified with the key {checkpoint.signed_by}"
    else:
        signature = f"signed by the key {checkpoint.signed_by}, not checked (no verify key given)"
    return (
        f"Against checkpoint {printable(str(checkpoint.path or '(data)'))} "
        f"({checkpoint.format}) of {local_iso(checkpoint.created_at)}{covered}, root "
        f"{checkpoint.root}, {signature}: {checkpoint.checked} of its {checkpoint.count} "
        f"encounter(s) compared with the log, {len(checkpoint.anomalies)} finding(s)\n\n"
    )


def _anomaly_text(audit: EncounterAudit, anomaly: Anomaly) -> str:
    text = f"{anomaly.kind}: {anomaly.detail}"
    acknowledged = audit.acknowledgement(anomaly)
    if acknowledged is not None:
        text += f" ({acknowledged})"
    return text


def _write_encounter(audit: EncounterAudit, out: IO[str], when: str) -> None:
    if audit.missing:
        out.write(f"Encounter {audit.id}  (missing: in the checkpoint, not in the database)\n")
    elif audit.definition_version is not None:
        what = (
            f"version {audit.definition_version}"
            if audit.definition_version
            else "its version pointer"
        )
        out.write(f"Definition {printable(audit.definition)}, {what}  (id {audit.id})\n")
    else:
        flags = " (soft-deleted)" if audit.deleted else ""
        if audit.outside_selection:
            flags += " (outside the selection: a finding against the checkpoint)"
        out.write(
            f"Encounter {audit.id}  [{printable(audit.definition)}]{flags}\n"
            f"  state {when}: {printable(audit.state_as_of)}\n"
        )
        if audit.timeline:
            _write_timeline(audit, out)
        else:
            out.write("  (no transitions)\n")
    if audit.anomalies:
        acknowledged = audit.acknowledged_count
        counted = f"{len(audit.anomalies)}" + (
            f", {acknowledged} acknowledged" if acknowledged else ""
        )
        out.write(f"  ANOMALIES ({counted}):\n")
        for anomaly in audit.anomalies:
            out.write(
                f"    sequence {anomaly.sequence}: {anomaly.kind}: {printable(anomaly.detail)}\n"
            )
            mark = audit.acknowledgement(anomaly)
            if mark is not None:
                out.write(f"      {printable(_one_line(str(mark), 200))}\n")
    out.write("\n")


def _write_timeline(audit: EncounterAudit, out: IO[str]) -> None:
    table = [["seq", "effective_at", "recorded_at", "from -> to", "by", "reason", "notes"]]
    for row in audit.timeline:
        notes = []
        if row.backdated:
            notes.append("backdated")
        if row.overtaken:
            notes.append(f"overtaken by {row.overtaken_by}")
        table.append(
            [
                str(row.sequence),
                local_iso(row.effective_at) or "",
                local_iso(row.transitioned_at) or "",
                printable(f"{row.from_state} -> {row.to_state}"),
                printable(row.who or "-"),
                printable(_one_line(row.reason)),
                ", ".join(notes),
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        out.write("  " + "  ".join(cells).rstrip() + "\n")


def _one_line(text: str, limit: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
