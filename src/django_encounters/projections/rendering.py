"""Rendering an audit (:func:`.audit.iter_audit`) for people and tools: a readable table, CSV
(one line per timeline row, with a header) or one JSON object, each streamed one encounter at
a time; every writer returns the number of anomalies it wrote."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import datetime
from typing import IO

from ..engine import READABLE_FIELDS
from .audit import EncounterAudit, isoformat

CSV_HEADER = [
    "encounter_id",
    "definition",
    "state_as_of",
    *READABLE_FIELDS,
    "backdated",
    "overtaken",
    "anomalies",
]


def write_json(audits: Iterable[EncounterAudit], out: IO[str]) -> int:
    """Stream the audit as one JSON object (indented, one encounter at a time; the shape is in
    docs/operations.md); returns the
    anomaly count."""
    count = 0
    out.write('{\n  "encounters": [')
    for index, audit in enumerate(audits):
        count += len(audit.anomalies)
        text = json.dumps(audit.as_dict(), ensure_ascii=False, indent=2)
        out.write(("," if index else "") + "\n    " + text.replace("\n", "\n    "))
    out.write(f'\n  ],\n  "anomaly_count": {count}\n}}\n')
    return count


def write_csv(audits: Iterable[EncounterAudit], out: IO[str]) -> int:
    """One line per timeline row, with a header; returns the anomaly count."""
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    count = 0
    for audit in audits:
        count += len(audit.anomalies)
        by_sequence: dict[int, list[str]] = {}
        for anomaly in audit.anomalies:
            by_sequence.setdefault(anomaly.sequence, []).append(f"{anomaly.kind}: {anomaly.detail}")
        for row in audit.timeline:
            writer.writerow(
                [
                    str(audit.id),
                    audit.definition,
                    audit.state_as_of,
                    row.sequence,
                    row.from_state,
                    row.to_state,
                    isoformat(row.effective_at),
                    isoformat(row.transitioned_at),
                    row.transitioned_by or "",
                    row.reason,
                    "true" if row.backdated else "false",
                    "true" if row.overtaken else "false",
                    "; ".join(by_sequence.get(row.sequence, [])),
                ]
            )
    return count


def write_table(
    audits: Iterable[EncounterAudit],
    out: IO[str],
    *,
    as_of: datetime,
    known_at: datetime | None = None,
) -> int:
    """A readable report, one block per encounter; returns the anomaly count."""
    when = f"as of {isoformat(as_of)}"
    if known_at is not None:
        when += f", as known at {isoformat(known_at)}"
    encounters = rows = count = 0
    for audit in audits:
        encounters += 1
        rows += len(audit.timeline)
        count += len(audit.anomalies)
        flags = " (soft-deleted)" if audit.deleted else ""
        out.write(
            f"Encounter {audit.id}  [{audit.definition}]{flags}\n"
            f"  state {when}: {audit.state_as_of}\n"
        )
        if audit.timeline:
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
                        isoformat(row.effective_at) or "",
                        isoformat(row.transitioned_at) or "",
                        f"{row.from_state} -> {row.to_state}",
                        row.transitioned_by or "-",
                        _one_line(row.reason),
                        ", ".join(notes),
                    ]
                )
            widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
            for line in table:
                cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
                out.write("  " + "  ".join(cells).rstrip() + "\n")
        else:
            out.write("  (no transitions)\n")
        if audit.anomalies:
            out.write(f"  ANOMALIES ({len(audit.anomalies)}):\n")
            for anomaly in audit.anomalies:
                out.write(f"    sequence {anomaly.sequence}: {anomaly.kind}: {anomaly.detail}\n")
        out.write("\n")
    out.write(
        f"{encounters} encounter(s), {rows} row(s), {count} anomal{'y' if count == 1 else 'ies'}"
        f" (states {when})\n"
    )
    return count


def _one_line(text: str, limit: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
