"""Diagrams: a definition drawn as Mermaid, DOT and SVG (initial state, final states, greyed
unreachable states, older versions, names that need escaping), and the process map mined from
the rows (counts, medians, backdated rows, untaken edges dashed, anomalies red, the
``--since/--until`` window), through ``manage.py encounter_graph`` and the Python API, with
every error path's exit status. DOT is checked by running Graphviz on it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import timedelta
from pathlib import Path

import django
import pytest
from django.utils import timezone

from django_encounters.engine import Rules, stored_precision
from django_encounters.engine.graphs import (
    EdgeTally,
    Taking,
    definition_graph,
    edge_takings,
    format_duration,
    to_dot,
    to_mermaid,
)
from django_encounters.engine.timeline import Entry
from django_encounters.models import Encounter, EncounterDefinition
from django_encounters.projections.diagrams import (
    DefinitionNotFoundError,
    DefinitionVersionNotFoundError,
    GraphvizNotFoundError,
    definition_diagram,
    draw,
    process_map,
    render,
    render_svg,
)
from django_encounters.services import create_encounter, transition
from tests.helpers import child_env, insert_row_raw, run_command

ROOT = Path(__file__).resolve().parent.parent
DOT = shutil.which("dot")
needs_graphviz = pytest.mark.skipif(
    DOT is None, reason="Graphviz's dot is not installed (.ci/run installs Debian's graphviz)"
)
SVG = "{http://www.w3.org/2000/svg}"

VISIT_MERMAID = """\
flowchart LR
    %% definition 'VISIT' v1
    start((" "))
    s0("scheduled")
    s1("checked_in")
    s2("in_progress")
    s3((("completed")))
    s4((("cancelled")))
    start --> s0
    s0 --> s1
    s0 --> s4
    s1 --> s2
    s1 --> s4
    s2 --> s3
    s2 --> s4
    classDef initial fill:#000000,stroke:#000000
    class start initial
"""

VISIT_DOT = """\
digraph "'VISIT' v1" {
    // definition 'VISIT' v1
    rankdir=LR;
    node [shape=box, style="rounded"];
    start [shape=point, width=0.15, label=""];
    s0 [label="scheduled"];
    s1 [label="checked_in"];
    s2 [label="in_progress"];
    s3 [label="completed", shape=doublecircle];
    s4 [label="cancelled", shape=doublecircle];
    start -> s0;
    s0 -> s1;
    s0 -> s4;
    s1 -> s2;
    s1 -> s4;
    s2 -> s3;
    s2 -> s4;
}
"""

# The process map of visit_log (below): 8 rows of 3 encounters.
VISIT_LOG_MERMAID = """\
flowchart LR
    %% process map of 'VISIT': 8 transitions of 3 encounters, compared with 'VISIT' v1
    start((" "))
    s0("scheduled")
    s1("checked_in")
    s2("in_progress")
    s3((("completed")))
    s4((("cancelled")))
    start --> s0
    s0 -->|"3×"| s1
    s0 -.-> s4
    s1 -->|"2×, median 2h"| s2
    s1 -->|"1×, median 30m"| s4
    s2 -->|"1×, median 3h"| s3
    s2 -->|"1×, median 1h"| s4
    classDef initial fill:#000000,stroke:#000000
    class start initial
"""

# The same with a row written below the library that the definition does not allow.
VISIT_LOG_ANOMALY_MERMAID = VISIT_LOG_MERMAID.replace("8 transitions", "9 transitions").replace(
    '    s2 -->|"1×, median 1h"| s4\n',
    '    s2 -->|"1×, median 1h"| s4\n'
    '    s4 -->|"1×, median 30m"| s1\n'
    "    linkStyle 7 stroke:red,stroke-width:2px\n",
)


def graphviz(dot_text: str) -> ET.Element:
    """Lay ``dot_text`` out with the real Graphviz; the SVG it writes, parsed."""
    done = subprocess.run(
        [DOT, "-Tsvg"], input=dot_text.encode(), capture_output=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b"", done.stderr.decode()  # not even a warning
    return ET.fromstring(done.stdout)


def svg_texts(root: ET.Element) -> list[str]:
    return ["".join(text.itertext()) for text in root.iter(f"{SVG}text")]


def svg_groups(root: ET.Element, kind: str) -> dict[str, ET.Element]:
    """``title -> <g>`` of the SVG's nodes or edges (``kind``: "node" or "edge")."""
    return {
        "".join(group.find(f"{SVG}title").itertext()): group
        for group in root.iter(f"{SVG}g")
        if group.get("class") == kind
    }


def mermaid_line(text: str, start: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith(start))


# ---------------------------------------------------------------------------------------------
# The definition
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_visit_definition_as_mermaid_is_exactly_this(visit_definition):
    code, out, err = run_command("encounter_graph", "VISIT")
    assert (code, err) == (0, "")
    assert out == VISIT_MERMAID
    assert out == draw("VISIT", "mermaid") == to_mermaid(definition_diagram("VISIT"))


@pytest.mark.django_db
def test_the_visit_definition_as_dot_is_exactly_this(visit_definition):
    code, out, err = run_command("encounter_graph", "VISIT", "--format", "dot")
    assert (code, err) == (0, "")
    assert out == VISIT_DOT


@needs_graphviz
@pytest.mark.django_db
def test_the_visit_definition_lays_out_with_graphviz(visit_definition):
    root = graphviz(VISIT_DOT)
    nodes = svg_groups(root, "node")
    assert set(nodes) == {"start", "s0", "s1", "s2", "s3", "s4"}
    # Final states are double circles (two ellipses), the others rounded boxes (a path).
    for final in ("s3", "s4"):
        assert len(nodes[final].findall(f"{SVG}ellipse")) == 2
    assert nodes["s0"].findall(f"{SVG}ellipse") == []
    assert set(svg_groups(root, "edge")) == {
        "start->s0",
        "s0->s1",
        "s0->s4",
        "s1->s2",
        "s1->s4",
        "s2->s3",
        "s2->s4",
    }


@pytest.mark.django_db
def test_the_initial_state_is_marked_and_final_states_double_circled(make_definition):
    make_definition(
        code="LOOP",
        states=["open", "done", "dropped"],
        initial_state="open",
        final_states=["done", "dropped"],
        transitions={"open": ["done", "dropped"]},
    )
    mermaid = draw("LOOP", "mermaid")
    assert 'start((" "))' in mermaid
    assert "start --> s0" in mermaid
    assert 's1((("done")))' in mermaid and 's2((("dropped")))' in mermaid
    assert 's0("open")' in mermaid
    dot = draw("LOOP", "dot")
    assert "start -> s0;" in dot
    assert 's1 [label="done", shape=doublecircle];' in dot
    graph = definition_diagram("LOOP")
    assert [n.name for n in graph.nodes if n.initial] == ["open"]
    assert [n.name for n in graph.nodes if n.final] == ["done", "dropped"]


@pytest.mark.django_db
def test_a_state_nothing_reaches_is_greyed(make_definition):
    make_definition(
        code="GREY",
        states=["scheduled", "done", "archived", "purged"],
        initial_state="scheduled",
        final_states=["done", "purged"],
        transitions={"scheduled": ["done"], "archived": ["purged"]},
    )
    graph = definition_diagram("GREY")
    assert [n.name for n in graph.nodes if n.greyed] == ["archived", "purged"]
    mermaid = draw("GREY", "mermaid")
    assert "classDef greyed fill:#eeeeee,stroke:#999999,color:#999999" in mermaid
    assert mermaid_line(mermaid, "class s2") == "class s2,s3 greyed"
    dot = draw("GREY", "dot")
    assert (
        's2 [label="archived", color="#999999", fontcolor="#999999", fillcolor="#eeeeee", '
        'style="rounded,filled"];' in dot
    )
    assert (
        's3 [label="purged", shape=doublecircle, color="#999999", fontcolor="#999999", '
        'fillcolor="#eeeeee", style="rounded,filled"];' in dot
    )
    assert "s2 -> s3;" in dot  # its edges are still drawn


@pytest.mark.django_db
def test_version_n_draws_an_older_version(visit_definition):
    visit_definition.states = [*visit_definition.states, "no_show"]
    visit_definition.final_states = [*visit_definition.final_states, "no_show"]
    visit_definition.transitions = {
        **visit_definition.transitions,
        "scheduled": ["checked_in", "cancelled", "no_show"],
    }
    visit_definition.save()
    assert visit_definition.version == 2
    code, current, _ = run_command("encounter_graph", "VISIT")
    assert code == 0
    assert "%% definition 'VISIT' v2" in current
    assert 's5((("no_show")))' in current and "s0 --> s5" in current
    code, older, err = run_command("encounter_graph", "VISIT", "--definition-version", "1")
    assert (code, err) == (0, "")
    assert older == VISIT_MERMAID
    code, older_dot, _ = run_command(
        "encounter_graph", "VISIT", "--definition-version=1", "--format=dot"
    )
    assert (code, older_dot) == (0, VISIT_DOT)
    assert draw("VISIT", "mermaid", version=1) == VISIT_MERMAID


@pytest.mark.django_db
def test_a_soft_deleted_definition_can_still_be_drawn(make_definition):
    definition = make_definition(code="GONE")
    definition.delete()
    assert EncounterDefinition.objects.filter(code="GONE").count() == 0
    code, out, _ = run_command("encounter_graph", "GONE")
    assert code == 0 and "%% definition 'GONE' v1" in out


# ---------------------------------------------------------------------------------------------
# State names Mermaid or DOT treat specially
# ---------------------------------------------------------------------------------------------

ODD_STATES = [
    'on "hold"',
    "back\\slash \\n",
    "x < y > z & w",
    "#1; 100% done: yes | no",
    "[brackets] {braces} `tick`",
    "end",
    "日本 état",
]


@pytest.fixture
def odd_definition(make_definition):
    return make_definition(
        code="ODD",
        states=list(ODD_STATES),
        initial_state=ODD_STATES[0],
        final_states=[ODD_STATES[-1]],
        transitions={a: [b] for a, b in zip(ODD_STATES, ODD_STATES[1:], strict=False)},
    )


@pytest.mark.django_db
def test_state_names_are_escaped_in_mermaid(odd_definition):
    mermaid = draw("ODD", "mermaid")
    lines = [line.strip() for line in mermaid.splitlines()]
    assert lines[3:10] == [
        's0("on #34;hold#34;")',
        's1("back#92;slash #92;n")',
        's2("x #60; y #62; z #38; w")',
        's3("#35;1#59; 100#37; done#58; yes #124; no")',
        's4("#91;brackets#93; #123;braces#125; #96;tick#96;")',
        's5("end")',
        's6((("日本 état")))',
    ]
    # Each label is one quoted string: the name's own quote cannot end it.
    assert all(line.count('"') == 2 for line in lines[3:10])


@needs_graphviz
@pytest.mark.django_db
def test_state_names_are_escaped_in_dot_and_come_back_from_graphviz(odd_definition):
    dot = draw("ODD", "dot")
    assert 's0 [label="on \\"hold\\""];' in dot
    assert 's1 [label="back\\\\slash \\\\n"];' in dot
    root = graphviz(dot)
    texts = svg_texts(root)
    for state in ODD_STATES:
        assert state in texts, (state, texts)


@needs_graphviz
@pytest.mark.django_db
def test_svg_output_is_an_svg_document_with_every_state(odd_definition):
    code, out, err = run_command("encounter_graph", "ODD", "--format", "svg")
    assert (code, err) == (0, "")
    root = ET.fromstring(out.encode())
    assert root.tag == f"{SVG}svg"
    assert set(ODD_STATES) <= set(svg_texts(root))
    assert out == render_svg(draw("ODD", "dot"))


# ---------------------------------------------------------------------------------------------
# The process map
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def t0():
    """Ten days ago, at the stored precision: the start of the rows' business time."""
    return stored_precision(timezone.now() - timedelta(days=10))


@pytest.fixture
def visit_log(visit_definition, patient, t0):
    """Three visits moved through the definition ten days ago (rows effective before the
    encounters were created: the first stay's length is unknown), and one never moved."""
    hours = [
        [("checked_in", 1), ("in_progress", 2), ("completed", 5)],
        [("checked_in", 1), ("in_progress", 4), ("cancelled", 5)],
        [("checked_in", 2), ("cancelled", 2.5)],
        [],
    ]
    encounters = []
    for path in hours:
        encounter = create_encounter(visit_definition, patient)
        for state, at in path:
            transition(encounter, state, effective_at=t0 + timedelta(hours=at))
        encounters.append(encounter)
    return encounters


@pytest.mark.django_db
def test_process_map_counts_and_medians(visit_log):
    code, out, err = run_command("encounter_graph", "VISIT", "--from-log")
    assert (code, err) == (0, "")
    assert out == VISIT_LOG_MERMAID
    graph = process_map("VISIT")
    checked_in = graph.edge("checked_in", "in_progress")
    assert (checked_in.count, checked_in.median_wait) == (2, timedelta(hours=2))  # 1h and 3h
    first = graph.edge("scheduled", "checked_in")
    assert (first.count, first.median_wait) == (3, None)  # effective before creation
    assert graph.edge("scheduled", "cancelled").untaken
    assert not any(edge.anomalous for edge in graph.edges)


@pytest.mark.django_db
def test_soft_deleted_encounters_still_count(visit_log):
    visit_log[0].delete()
    assert Encounter.objects.count() == 3
    assert draw("VISIT", "mermaid", from_log=True) == VISIT_LOG_MERMAID


@pytest.mark.django_db
def test_a_percent_sign_in_a_code_cannot_start_a_mermaid_directive(make_definition):
    make_definition(code='X%%{init: {"theme": "dark"}}%%')
    mermaid = draw('X%%{init: {"theme": "dark"}}%%', "mermaid")
    assert "%%{" not in mermaid
    assert mermaid.splitlines()[1].startswith("    %% definition 'X#37;#37;{init")


@pytest.mark.django_db
def test_process_map_as_dot_dashes_untaken_edges(visit_log):
    dot = draw("VISIT", "dot", from_log=True)
    assert "s0 -> s4 [style=dashed];" in dot
    assert 's0 -> s1 [label="3×"];' in dot
    assert 's1 -> s2 [label="2×, median 2h"];' in dot
    assert "// process map of 'VISIT': 8 transitions of 3 encounters" in dot


@pytest.mark.django_db
def test_the_first_stay_is_measured_from_the_encounters_creation(visit_definition, patient):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    row = encounter.transitions.get(sequence=1)
    created = Encounter.objects.get(pk=encounter.pk).created_at
    edge = process_map("VISIT").edge("scheduled", "checked_in")
    assert edge.count == 1
    assert edge.median_wait == row.effective_at - created
    assert edge.median_wait >= timedelta(0)


@pytest.mark.django_db
def test_process_map_follows_the_business_time_timeline_of_a_backdated_row(
    employment_definition, patient, t0
):
    employment = create_encounter(employment_definition, patient)
    transition(employment, "working", effective_at=t0 + timedelta(hours=1))
    transition(employment, "finished", effective_at=t0 + timedelta(hours=10))
    # Backdated between the two: the 'finished' row is now preceded by 'onleave' on the
    # timeline (its recorded from_state stays 'working').
    transition(employment, "onleave", effective_at=t0 + timedelta(hours=5))
    finished = employment.transitions.get(sequence=2)
    assert finished.from_state == "working"
    graph = process_map("EMPLOYMENT")
    taken = {(e.source, e.target): (e.count, e.median_wait) for e in graph.edges}
    assert taken == {
        ("hired", "working"): (1, None),
        ("working", "onleave"): (1, timedelta(hours=4)),
        ("working", "finished"): (0, None),
        ("onleave", "working"): (0, None),
        ("onleave", "finished"): (1, timedelta(hours=5)),
    }
    mermaid = draw("EMPLOYMENT", "mermaid", from_log=True)
    assert 's1 -->|"1×, median 4h"| s2' in mermaid
    assert "s1 -.-> s3" in mermaid
    assert 's2 -->|"1×, median 5h"| s3' in mermaid


@pytest.mark.django_db
def test_an_edge_the_definition_does_not_allow_is_red(visit_log, t0):
    cancelled = visit_log[2]  # checked_in at 2h, cancelled at 2h30
    insert_row_raw(
        cancelled,
        sequence=3,
        from_state="cancelled",
        to_state="checked_in",
        effective_at=t0 + timedelta(hours=3),
    )
    code, out, _ = run_command("encounter_graph", "VISIT", "--from-log")
    assert code == 0  # an anomaly is drawn, not a failure of the command
    assert out == VISIT_LOG_ANOMALY_MERMAID
    # Links: the start arrow is link 0, then the machine's six edges, then the anomaly.
    assert mermaid_line(out, "linkStyle") == "linkStyle 7 stroke:red,stroke-width:2px"
    assert "9 transitions of 3 encounters" in out
    edge = process_map("VISIT").edge("cancelled", "checked_in")
    assert edge.anomalous and edge.count == 1
    dot = draw("VISIT", "dot", from_log=True)
    assert 's4 -> s1 [label="1×, median 30m", color=red, fontcolor=red, penwidth=2];' in dot


@pytest.mark.django_db
def test_a_state_the_definition_does_not_declare_is_drawn_as_undeclared(visit_log, t0):
    untouched = visit_log[3]
    insert_row_raw(
        untouched,
        sequence=1,
        from_state="scheduled",
        to_state="lost",
        effective_at=t0 + timedelta(hours=1),
    )
    graph = process_map("VISIT")
    assert graph.node("lost").declared is False
    assert graph.edge("scheduled", "lost").anomalous
    mermaid = draw("VISIT", "mermaid", from_log=True)
    assert 's5("lost")' in mermaid
    assert "classDef undeclared stroke:red,stroke-dasharray:5 5" in mermaid
    assert "class s5 undeclared" in mermaid
    assert 's5 [label="lost", color=red, style="rounded,dashed"];' in draw(
        "VISIT", "dot", from_log=True
    )


@needs_graphviz
@pytest.mark.django_db
def test_process_map_svg_draws_dashed_and_red_edges(visit_log, t0):
    insert_row_raw(
        visit_log[2],
        sequence=3,
        from_state="cancelled",
        to_state="checked_in",
        effective_at=t0 + timedelta(hours=3),
    )
    code, out, err = run_command("encounter_graph", "VISIT", "--from-log", "--format", "svg")
    assert (code, err) == (0, "")
    root = ET.fromstring(out.encode())
    texts = svg_texts(root)
    assert "2×, median 2h" in texts and "1×, median 30m" in texts
    edges = svg_groups(root, "edge")
    red = edges["s4->s1"].find(f"{SVG}path")
    assert red.get("stroke") == "red"
    dashed = edges["s0->s4"].find(f"{SVG}path")
    assert dashed.get("stroke-dasharray")
    assert edges["s0->s1"].find(f"{SVG}path").get("stroke-dasharray") is None


@pytest.mark.django_db
def test_since_and_until_count_only_the_rows_effective_in_the_window(visit_log, t0):
    since = (t0 + timedelta(hours=1.5)).isoformat()
    until = (t0 + timedelta(hours=4.5)).isoformat()
    code, out, err = run_command(
        "encounter_graph", "VISIT", "--from-log", "--since", since, "--until", until
    )
    assert (code, err) == (0, "")
    assert f"4 transitions of 3 encounters effective from {since} until {until}" in out
    assert 's0 -->|"1×"| s1' in out  # only the third visit checked in inside it
    assert 's1 -->|"2×, median 2h"| s2' in out  # the stays began before the window
    assert 's1 -->|"1×, median 30m"| s4' in out
    assert "s2 -.-> s3" in out and "s2 -.-> s4" in out  # both happened at 5h
    assert mermaid_line(out, "class s3") == "class s3 greyed"  # no counted row touches it
    # Only the lower bound: the rows from 4h30 on.
    code, out, _ = run_command("encounter_graph", "VISIT", "--from-log", "--since", until)
    assert code == 0
    assert "2 transitions of 2 encounters" in out
    assert 's2 -->|"1×, median 3h"| s3' in out and 's2 -->|"1×, median 1h"| s4' in out


@pytest.mark.django_db
def test_process_map_counts_rows_of_every_version_against_the_chosen_one(
    visit_definition, patient, t0
):
    early = create_encounter(visit_definition, patient)
    transition(early, "checked_in", effective_at=t0)
    visit_definition.states = [*visit_definition.states, "no_show"]
    visit_definition.final_states = [*visit_definition.final_states, "no_show"]
    visit_definition.transitions = {
        **visit_definition.transitions,
        "scheduled": ["checked_in", "cancelled", "no_show"],
    }
    visit_definition.save()
    late = create_encounter(visit_definition, patient)  # pinned to version 2
    transition(late, "no_show", effective_at=t0 + timedelta(hours=1))
    current = process_map("VISIT")
    assert current.edge("scheduled", "no_show").allowed
    assert current.edge("scheduled", "checked_in").count == 1
    older = process_map("VISIT", version=1)
    assert older.edge("scheduled", "no_show").anomalous
    assert older.node("no_show").declared is False
    code, out, _ = run_command(
        "encounter_graph", "VISIT", "--from-log", "--definition-version", "1"
    )
    assert code == 0
    assert "compared with 'VISIT' v1" in out
    assert mermaid_line(out, "linkStyle") == "linkStyle 7 stroke:red,stroke-width:2px"


@pytest.mark.django_db
def test_a_definition_without_rows_maps_every_edge_dashed(visit_definition):
    graph = process_map("VISIT")
    assert all(edge.untaken for edge in graph.edges)
    assert all(node.greyed for node in graph.nodes)
    assert "0 transitions of 0 encounters" in draw("VISIT", "mermaid", from_log=True)


@needs_graphviz
@pytest.mark.django_db
def test_process_map_dot_lays_out_with_graphviz(visit_log, t0):
    insert_row_raw(
        visit_log[3], sequence=1, from_state="scheduled", to_state='on "hold"', effective_at=t0
    )
    root = graphviz(draw("VISIT", "dot", from_log=True))
    assert 'on "hold"' in svg_texts(root)


# ---------------------------------------------------------------------------------------------
# Output and errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_output_writes_the_diagram_to_a_file(visit_definition, tmp_path):
    target = tmp_path / "visit.mmd"
    code, out, err = run_command("encounter_graph", "VISIT", "--output", str(target))
    assert (code, out) == (0, "")
    assert err == f"diagram written to {target}\n"
    assert target.read_text(encoding="utf-8") == VISIT_MERMAID
    assert [p.name for p in tmp_path.iterdir()] == ["visit.mmd"]  # no temporary file left


@pytest.mark.django_db
def test_output_into_a_directory_is_refused(visit_definition, tmp_path):
    code, _, err = run_command("encounter_graph", "VISIT", "--output", str(tmp_path))
    assert code == 2
    assert f"--output: cannot write {tmp_path}" in err


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["NOPE"], "no encounter definition has the code 'NOPE'"),
        (
            ["VISIT", "--definition-version", "9"],
            "definition 'VISIT' has no version 9 (its versions: 1..1)",
        ),
        (
            ["VISIT", "--definition-version", "0"],
            "--definition-version: a definition version is a positive integer",
        ),
        (
            ["VISIT", "--definition-version", "two"],
            "--definition-version: a definition version is a positive integer",
        ),
        (
            ["VISIT", "--from-log", "--since", "2026-01-01T00:00:00"],
            "--since: '2026-01-01T00:00:00' has no UTC offset",
        ),
        (
            ["VISIT", "--from-log", "--until", "yesterday"],
            "--until: not an ISO-8601 date-time: 'yesterday'",
        ),
        (
            ["VISIT", "--from-log", "--since", "2026-01-02T00:00Z", "--until", "2026-01-01T00:00Z"],
            "--since must be before --until",
        ),
        (
            ["VISIT", "--from-log", "--since", "2026-01-01T00:00Z", "--until", "2026-01-01T00:00Z"],
            "--since must be before --until",
        ),
        (
            ["VISIT", "--since", "2026-01-01T00:00Z"],
            "--since/--until select the rows of a process map: give --from-log too",
        ),
    ],
)
def test_invalid_options_exit_2(visit_definition, args, message):
    code, out, err = run_command("encounter_graph", *args)
    assert code == 2
    assert out == ""
    assert message in err


@pytest.mark.django_db
def test_svg_without_graphviz_exits_2(visit_definition, tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no dot on it
    target = tmp_path_factory.mktemp("out") / "visit.svg"
    code, out, err = run_command(
        "encounter_graph", "VISIT", "--format", "svg", "--output", str(target)
    )
    assert code == 2
    assert out == ""
    assert "SVG needs Graphviz: the program 'dot' was not found on PATH" in err
    assert not target.exists()
    with pytest.raises(GraphvizNotFoundError) as caught:
        render(definition_diagram("VISIT"), "svg")
    assert caught.value.program == "dot"
    # Text formats need nothing.
    assert run_command("encounter_graph", "VISIT", "--format", "dot")[0] == 0


@pytest.mark.django_db
def test_graphviz_failing_exits_1(visit_definition, tmp_path, monkeypatch):
    fake = tmp_path / "dot"
    fake.write_text("#!/bin/sh\necho 'Error: syntax error in line 1' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, err = run_command("encounter_graph", "VISIT", "--format", "svg")
    assert code == 1
    assert out == ""
    assert "exited with status 3: Error: syntax error in line 1" in err


@pytest.mark.django_db
def test_the_python_api_refuses_bad_arguments(visit_definition):
    with pytest.raises(DefinitionNotFoundError) as missing:
        process_map("NOPE")
    assert missing.value.code == "NOPE"
    with pytest.raises(DefinitionVersionNotFoundError) as version:
        definition_diagram("VISIT", version=3)
    assert (version.value.code, version.value.version, version.value.versions) == (
        "VISIT",
        3,
        [1],
    )
    with pytest.raises(TypeError, match="version must be an integer"):
        definition_diagram("VISIT", version="1")
    with pytest.raises(ValueError, match="since must be timezone-aware"):
        process_map("VISIT", since=timezone.now().replace(tzinfo=None))
    now = timezone.now()
    with pytest.raises(ValueError, match="must be before until"):
        process_map("VISIT", since=now, until=now)
    with pytest.raises(ValueError, match="format must be one of"):
        render(definition_diagram("VISIT"), "png")
    with pytest.raises(ValueError, match="format must be one of"):
        draw("NOPE", "png")  # the format is refused before anything is read


def test_the_command_line_refuses_an_unknown_format_and_the_old_version_spelling(tmp_path):
    """As a shell runs it: argparse's own usage errors exit 2; ``--version`` prints Django's
    version as for every command, and ``--version N`` (the definition version before 0.2) is a
    usage error naming ``--definition-version N``."""
    env = child_env(tmp_path / "unused.sqlite3")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "django", "encounter_graph", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    done = run("VISIT", "--format", "png")
    assert done.returncode == 2
    assert "invalid choice: 'png'" in done.stderr
    shown = run("--help")
    assert shown.returncode == 0
    assert "--definition-version N" in shown.stdout
    assert "draw (or compare with) this definition version" in shown.stdout
    version = run("VISIT", "--version")
    assert (version.returncode, version.stdout) == (0, django.get_version() + "\n")
    old = run("VISIT", "--version", "2")
    assert old.returncode == 2 and old.stdout == ""
    assert "the definition version to draw is --definition-version 2" in old.stderr


# ---------------------------------------------------------------------------------------------
# The engine's part, without a database
# ---------------------------------------------------------------------------------------------


def test_medians_of_odd_and_even_counts():
    tally = EdgeTally()
    base = timezone.now()
    for minutes in (30, 10, 20):
        tally.add(Taking("a", "b", base, timedelta(minutes=minutes)))
    for minutes in (1, 4):
        tally.add(Taking("b", "c", base, timedelta(minutes=minutes)))
    tally.add(Taking("b", "c", base, None))  # counted, no wait
    stats = tally.stats()
    assert (stats[("a", "b")].count, stats[("a", "b")].median_wait) == (3, timedelta(minutes=20))
    assert (stats[("b", "c")].count, stats[("b", "c")].median_wait) == (
        3,
        timedelta(minutes=2, seconds=30),
    )


def test_upgrade_rows_are_not_edges_and_do_not_end_a_stay():
    base = timezone.now() - timedelta(days=1)
    entries = [
        Entry(base + timedelta(hours=1), 1, "a", "b"),
        Entry(base + timedelta(hours=2), 2, "b", "b", upgrade=True),
        Entry(base + timedelta(hours=4), 3, "b", "c"),
    ]
    assert list(edge_takings("a", base, entries)) == [
        Taking("a", "b", base + timedelta(hours=1), timedelta(hours=1)),
        Taking("b", "c", base + timedelta(hours=4), timedelta(hours=3)),
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (timedelta(0), "0s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(seconds=42, milliseconds=500), "42.5s"),
        (timedelta(minutes=90), "1h 30m"),
        (timedelta(hours=2), "2h"),
        (timedelta(days=1, hours=4, minutes=3), "1d 4h"),
        (timedelta(days=3, minutes=5), "3d"),
        (timedelta(minutes=2, seconds=30), "2m 30s"),
    ],
)
def test_durations_on_edges(value, shown):
    assert format_duration(value) == shown


def test_a_machine_written_behind_the_checks_still_draws():
    rules = Rules.from_config(
        "RAW", ["a"], {"a": ["b"], "c": ["a"]}, ["b"], initial_state="a", version=4
    )
    graph = definition_graph(rules)
    assert [(n.name, n.declared, n.greyed) for n in graph.nodes] == [
        ("a", True, False),
        ("b", False, False),
        ("c", False, True),
    ]
    assert "digraph \"'RAW' v4\" {" in to_dot(graph)


def test_the_engine_graphs_module_imports_no_django():
    script = (
        "import sys, django_encounters.engine.graphs\n"
        "print([m for m in sys.modules if m == 'django' or m.startswith('django.')])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.stdout.strip() == "[]"


def test_the_docs_show_what_the_command_writes():
    docs = (ROOT / "docs" / "diagrams.md").read_text(encoding="utf-8")
    blocks = docs.split("```")
    assert f"\n{VISIT_MERMAID}" in blocks
    assert f"mermaid\n{VISIT_MERMAID}" in blocks
    assert f"dot\n{VISIT_DOT}" in blocks
    assert f"\n{VISIT_LOG_ANOMALY_MERMAID}" in blocks
    assert f"mermaid\n{VISIT_LOG_ANOMALY_MERMAID}" in blocks
