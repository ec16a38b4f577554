"""The anomaly kinds are one enumeration (``engine.AnomalyKind``): its members are their text
wherever a kind is printed, encoded or compared, and the text of a kind is written in one
module of the package."""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path
from uuid import uuid4

import pytest

import django_encounters
from django_encounters.engine import ANOMALY_KINDS, Anomaly, AnomalyKind

PACKAGE = Path(django_encounters.__file__).resolve().parent


def test_a_kind_is_its_text_wherever_it_is_shown():
    kind = AnomalyKind.REWRITTEN
    assert kind == "rewritten" and "rewritten" == kind
    assert hash(kind) == hash("rewritten")
    assert {"rewritten": 1}[kind] == 1 and {kind: 1}["rewritten"] == 1
    assert str(kind) == f"{kind}" == format(kind, "") == "rewritten"
    assert "%s" % kind == "rewritten"  # noqa: UP031 - as logging formats it
    assert f"[{kind:>10}]" == "[ rewritten]"
    assert (
        json.dumps({"kind": kind, kind: [kind]})
        == '{"kind": "rewritten", "rewritten": ["rewritten"]}'
    )
    out = io.StringIO()
    csv.writer(out).writerow([kind, AnomalyKind.GAP])
    assert out.getvalue() == "rewritten,gap\r\n"
    assert AnomalyKind("missing") is AnomalyKind.MISSING
    with pytest.raises(ValueError):
        AnomalyKind("forged")


def test_every_kind_has_a_meaning_and_the_checkpoint_kinds_are_marked():
    assert len({kind.value for kind in AnomalyKind}) == len(AnomalyKind)
    assert all(kind.meaning and (kind.stream or kind.checkpoint) for kind in AnomalyKind)
    assert AnomalyKind.checkpoint_kinds() == (
        "truncated",
        "rewritten",
        "missing",
        "unrecorded",
        "uncheckpointed",
    )
    assert [k for k in AnomalyKind.checkpoint_kinds() if not k.stream] == [
        "rewritten",
        "missing",
        "unrecorded",
        "uncheckpointed",
    ]
    # The stream's kinds, by their text, as ANOMALY_KINDS always listed them.
    assert list(ANOMALY_KINDS) == [
        "genesis",
        "gap",
        "hash",
        "from_state",
        "edge",
        "rechain",
        "version",
        "upgrade",
        "clock",
        "truncated",
        "head",
        "definition",
        "seal",
        "acknowledgement",
        "subject_missing",
    ]
    assert all(type(text) is str for text in ANOMALY_KINDS)
    assert list(ANOMALY_KINDS) == list(AnomalyKind.stream_kinds())
    assert ANOMALY_KINDS["gap"] == AnomalyKind.GAP.meaning == "a sequence number is missing"


def test_an_anomaly_holds_its_kind_as_a_member_and_prints_its_text():
    encounter_id = uuid4()
    given_as_text = Anomaly(encounter_id, 2, "hash", "content or chain does not match")
    assert type(given_as_text.kind) is AnomalyKind and given_as_text.kind is AnomalyKind.HASH
    assert given_as_text == Anomaly(
        encounter_id, 2, AnomalyKind.HASH, "content or chain does not match"
    )
    assert str(given_as_text) == (
        f"encounter {encounter_id} sequence 2: hash: content or chain does not match"
    )
    with pytest.raises(ValueError):
        Anomaly(encounter_id, 2, "forged", "not a kind")


# ---------------------------------------------------------------------------------------------
# Each kind's text written once
# ---------------------------------------------------------------------------------------------


def _is_kind_expression(node: ast.AST) -> bool:
    """``kind``, ``x.kind``, ``x["kind"]``: an expression that holds an anomaly kind."""
    if isinstance(node, ast.Name):
        return node.id == "kind" or node.id.endswith("_kind")
    if isinstance(node, ast.Attribute):
        return node.attr == "kind"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "kind"
    return False


def _is_prose(node: ast.AST) -> bool:
    """An f-string or a text with a space: a detail, not a name."""
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value


def _texts(node: ast.AST | None) -> list[ast.Constant]:
    return [] if node is None else [n for n in ast.walk(node) if isinstance(n, ast.Constant)]


def kind_literals(tree: ast.AST, kinds: set[str]) -> list[tuple[int, str]]:
    """``(line, text)`` of each string literal in ``tree`` that is written as an anomaly kind
    (docstrings never are): the kind given to ``Anomaly(…)`` or as ``kind=``, compared with a
    kind, listed in a ``…KINDS`` constant, paired with a detail (``("gap", f"…")``), or a
    member of the ``AnomalyKind`` enumeration. A kind's text used for something else (the
    ``version`` column, the ``hash`` field) is not one."""
    found: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name == "Anomaly" and len(node.args) >= 3:
                found += _texts(node.args[2])
            found += [c for kw in node.keywords if kw.arg == "kind" for c in _texts(kw.value)]
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_kind_expression(operand) for operand in operands):
                found += [c for operand in operands for c in _texts(operand)]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id.endswith("KINDS") for t in targets):
                found += _texts(node.value)
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2:
            first, second = node.elts
            if isinstance(first, ast.Constant) and _is_prose(second):
                found.append(first)
        elif isinstance(node, ast.ClassDef) and node.name == "AnomalyKind":
            for statement in node.body:
                if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Tuple):
                    found += _texts(statement.value.elts[0])
    return sorted({(c.lineno, c.value) for c in found if c.value in kinds})


def test_the_kind_literal_scan_finds_kinds_and_only_kinds():
    source = '''
def f(rows, anomalies, options):
    """Reports a "gap"."""
    Anomaly(pk, 0, "missing", "gone")
    Anomaly(pk, 0, "truncated" if late else "head", f"{pk}")
    report(kind="rechain")
    gone = [a for a in anomalies if a.kind == "rewritten"]
    if options["kind"] in (*OTHER, "clock"):
        pass
    found = [("hash", f"no match at {pk}"), ("gap", "expected 2")]
    values_list("pk", "version")
    row["from_state"] = "edge"
    columns = ("version", "head_hash")
CHECKPOINT_KINDS = ("upgrade",)
'''
    assert kind_literals(ast.parse(source), {kind.value for kind in AnomalyKind}) == [
        (4, "missing"),
        (5, "head"),
        (5, "truncated"),
        (6, "rechain"),
        (7, "rewritten"),
        (8, "clock"),
        (10, "gap"),
        (10, "hash"),
        (14, "upgrade"),
    ]


def test_anomaly_kind_literals_live_in_one_module():
    """Each kind's text is written where ``AnomalyKind`` defines it and nowhere else: every
    other module names the member."""
    kinds = {kind.value for kind in AnomalyKind}
    modules_of: dict[str, set[str]] = {kind: set() for kind in kinds}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for _, text in kind_literals(ast.parse(path.read_text(encoding="utf-8")), kinds):
            modules_of[text].add(relative)
    assert {kind: sorted(modules) for kind, modules in modules_of.items()} == {
        kind: ["engine/errors.py"] for kind in kinds
    }
