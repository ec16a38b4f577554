"""Diagrams of a state machine, and of the process mined from an encounter log, as plain data
and as text (Mermaid, Graphviz DOT).

Two kinds of :class:`Graph`:

* the *definition* (:func:`definition_graph`): every state of a machine and every edge its
  rules allow; the initial state marked by an arrow from a small filled circle, final states
  double-circled, states nothing reaches from the initial state greyed;
* the *process map* (:func:`process_map_graph`): the edges the rows actually took (read off
  the business-time timelines, :func:`edge_takings`), each labelled with how many times it was
  taken and the median time spent in its source state before it; edges the machine allows but
  nobody took are dashed, edges taken that the machine does not allow (anomalies) are red,
  states no counted row enters or leaves are greyed, and states the machine does not declare
  (reached only by rows it does not allow) are drawn with a red dashed border.

The text renderers name nodes ``s0``, ``s1``… (in the machine's state order) and put each
state's name in a quoted label, escaped for the format, so any state name is safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from .rules import Rules
from .timeline import Entry

# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One state of a drawing."""

    name: str
    initial: bool = False
    final: bool = False
    greyed: bool = False  # nothing reaches it (definition) / no counted row touches it (map)
    declared: bool = True  # False: named by an edge or a row, not a state of the machine


@dataclass(frozen=True)
class Edge:
    """One edge of a drawing (``count`` is None in a definition drawing, which has no rows)."""

    source: str
    target: str
    allowed: bool = True  # allowed by the machine drawn
    count: int | None = None  # times taken (process map)
    median_wait: timedelta | None = None  # median time in ``source`` before it (process map)

    @property
    def untaken(self) -> bool:
        """An edge the machine allows that no counted row took (drawn dashed)."""
        return self.count == 0

    @property
    def anomalous(self) -> bool:
        """An edge taken that the machine does not allow (drawn red)."""
        return not self.allowed

    @property
    def label(self) -> str:
        """``"3×, median 1h 30m"`` for a taken edge, ``""`` otherwise."""
        if not self.count:
            return ""
        if self.median_wait is None:
            return f"{self.count}×"
        return f"{self.count}×, median {format_duration(self.median_wait)}"


@dataclass(frozen=True)
class Graph:
    """A drawing: ``nodes`` in the machine's state order (undeclared states after them, by
    name), ``edges`` in the machine's order (anomalous edges after them). ``title`` names the
    machine (``'VISIT' v2``); ``summary`` says what was drawn (a comment in the text)."""

    title: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    summary: str = ""

    def node(self, name: str) -> Node:
        """The node of state ``name`` (``KeyError`` when it is not drawn)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def edge(self, source: str, target: str) -> Edge:
        """The edge ``source -> target`` (``KeyError`` when it is not drawn)."""
        for edge in self.edges:
            if (edge.source, edge.target) == (source, target):
                return edge
        raise KeyError((source, target))


@dataclass(frozen=True)
class EdgeStats:
    """How often one edge was taken, and the median time spent in its source state before it
    (over the takings whose wait is known; None when none is)."""

    count: int
    median_wait: timedelta | None


@dataclass(frozen=True, slots=True)
class Taking:
    """One row of a timeline read as an edge taken: from the state the timeline was in just
    before it to the row's ``to_state``, effective at ``effective_at``, after ``wait`` in the
    source state (None when unknown: the first row effective before the encounter's
    creation)."""

    source: str
    target: str
    effective_at: datetime
    wait: timedelta | None


# ---------------------------------------------------------------------------------------------
# Building graphs
# ---------------------------------------------------------------------------------------------


def _machine_states(rules: Rules) -> list[str]:
    """The machine's states, then any state its initial state or edges name that it does not
    declare (a definition written behind ``save()``'s checks), in order of appearance."""
    names = list(dict.fromkeys(rules.states))
    extra = [rules.initial_state] if rules.initial_state else []
    for source, targets in rules.transitions.items():
        extra.append(source)
        extra.extend(targets)
    for name in extra:
        if name not in names:
            names.append(name)
    return names


def _machine_edges(rules: Rules, names: Sequence[str]) -> list[tuple[str, str]]:
    edges: list[tuple[str, str]] = []
    for source in names:
        for target in dict.fromkeys(rules.transitions.get(source, ())):
            edges.append((source, target))
    return edges


def _nodes(rules: Rules, names: list[str], *, lit: set[str] | frozenset[str]) -> tuple[Node, ...]:
    """The nodes of ``names`` as ``rules`` marks them (initial, final, declared); the states
    not in ``lit`` greyed."""
    return tuple(
        Node(
            name,
            initial=name == rules.initial_state,
            final=rules.is_final(name),
            greyed=name not in lit,
            declared=rules.is_state(name),
        )
        for name in names
    )


def definition_graph(rules: Rules) -> Graph:
    """The drawing of a machine: its states, the edges it allows; the initial state marked,
    final states double-circled, states unreachable from the initial state greyed."""
    names = _machine_states(rules)
    reachable = rules.reachable()
    nodes = _nodes(rules, names, lit=reachable)
    edges = tuple(Edge(source, target) for source, target in _machine_edges(rules, names))
    return Graph(title=rules.name, nodes=nodes, edges=edges, summary=f"definition {rules.name}")


def process_map_graph(
    rules: Rules, stats: Mapping[tuple[str, str], EdgeStats], *, summary: str = ""
) -> Graph:
    """The process map of ``stats`` (``(source, target) -> EdgeStats``, the edges taken)
    against the machine ``rules``: every edge it allows, taken or not (``count`` 0), then the
    edges taken that it does not allow. States no counted row enters or leaves are greyed;
    states it does not declare come after its own, by name."""
    names = _machine_states(rules)
    undeclared = sorted({state for edge in stats for state in edge if state not in names})
    names.extend(undeclared)
    allowed = _machine_edges(rules, names)
    order = {name: index for index, name in enumerate(names)}
    anomalous = sorted(
        (edge for edge in stats if not rules.is_allowed(*edge)),
        key=lambda edge: (order[edge[0]], order[edge[1]]),
    )
    edges = []
    for source, target in allowed:
        found = stats.get((source, target))
        edges.append(
            Edge(
                source,
                target,
                allowed=True,
                count=found.count if found else 0,
                median_wait=found.median_wait if found else None,
            )
        )
    for source, target in anomalous:
        found = stats[(source, target)]
        edges.append(
            Edge(source, target, allowed=False, count=found.count, median_wait=found.median_wait)
        )
    touched = {state for edge, found in stats.items() if found.count for state in edge}
    nodes = _nodes(rules, names, lit=touched)
    return Graph(
        title=rules.name,
        nodes=nodes,
        edges=tuple(edges),
        summary=summary or f"process map against {rules.name}",
    )


# ---------------------------------------------------------------------------------------------
# Mining a timeline
# ---------------------------------------------------------------------------------------------


def edge_takings(
    origin_state: str, created_at: datetime | None, entries: Sequence[Entry]
) -> Iterator[Taking]:
    """The edges a timeline (its entries in business-time order) took, in that order.

    A row's edge runs from the state the timeline was in just before it — the previous row's
    ``to_state``, or the origin state for the first row — to its ``to_state``; for a row
    overtaken by a backdated one that is not its recorded ``from_state``, it is the path the
    encounter took in business time. The wait is the row's ``effective_at`` less the start of
    that stay: the previous row's ``effective_at``, or ``created_at`` for the first row (unknown
    when the first row is effective before the encounter was created). Upgrade rows, which
    keep the state and move the definition version, are not edges and do not end a stay.
    """
    state = origin_state
    since = created_at
    for entry in entries:
        if entry.upgrade:
            continue
        wait = None if since is None or entry.effective_at < since else entry.effective_at - since
        yield Taking(state, entry.to_state, entry.effective_at, wait)
        state, since = entry.to_state, entry.effective_at


class EdgeTally:
    """Counts takings per edge and keeps their waits (whole milliseconds, as the times are
    stored) for the median."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._waits: dict[tuple[str, str], list[int]] = {}
        self.takings = 0

    def add(self, taking: Taking) -> None:
        edge = (taking.source, taking.target)
        self._counts[edge] = self._counts.get(edge, 0) + 1
        self.takings += 1
        if taking.wait is not None:
            self._waits.setdefault(edge, []).append(taking.wait // timedelta(milliseconds=1))

    def add_all(self, takings: Iterable[Taking]) -> None:
        for taking in takings:
            self.add(taking)

    def stats(self) -> dict[tuple[str, str], EdgeStats]:
        """``(source, target) -> EdgeStats`` for every edge taken."""
        return {
            edge: EdgeStats(count, _median_ms(self._waits.get(edge, [])))
            for edge, count in self._counts.items()
        }


def _median_ms(values: list[int]) -> timedelta | None:
    if not values:
        return None
    values.sort()
    middle = len(values) // 2
    if len(values) % 2:
        return timedelta(milliseconds=values[middle])
    return timedelta(milliseconds=(values[middle - 1] + values[middle]) / 2)


def format_duration(value: timedelta) -> str:
    """A duration as a person reads it on an edge: ``0s``, ``250ms``, ``42.5s``, or its two
    largest units among days, hours, minutes and seconds (``1d 4h``, ``1h 30m``, ``2h``),
    rounded down."""
    total_ms = value // timedelta(milliseconds=1)
    if total_ms <= 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    if total_ms < 60_000:
        return f"{total_ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    seconds = total_ms // 1000
    parts: list[tuple[int, str]] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount or parts:
            parts.append((amount, unit))
    shown = parts[:2]
    return " ".join(f"{amount}{unit}" for amount, unit in shown if amount) or "0s"


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

#: How every drawing looks, one place for both formats.
GREY_FILL = "#eeeeee"
GREY_LINE = "#999999"
ANOMALY_COLOUR = "red"

# ASCII characters a Mermaid label shows as they are; every other ASCII character is written as
# an entity code (#34; for "), which Mermaid decodes, so that none of them can end the quoted
# label, start a comment or an entity, or be read as markup. Non-ASCII text is left as it is.
_MERMAID_PLAIN = frozenset(" _-.,'()/+*!?=@~")


def mermaid_text(text: str) -> str:
    """``text`` as the inside of a double-quoted Mermaid label."""
    return "".join(
        char if char.isalnum() or char in _MERMAID_PLAIN or not char.isascii() else f"#{ord(char)};"
        for char in text
    )


def dot_string(text: str) -> str:
    """``text`` as a double-quoted DOT string shown literally as a label: ``"`` escaped, and
    ``\\`` doubled so that Graphviz reads no escape sequence (``\\n``, ``\\N``, …) in it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ids(graph: Graph) -> dict[str, str]:
    return {node.name: f"s{index}" for index, node in enumerate(graph.nodes)}


def _initial(graph: Graph) -> Node | None:
    return next((node for node in graph.nodes if node.initial), None)


def to_mermaid(graph: Graph) -> str:
    """The graph as a Mermaid flowchart (``flowchart LR``): states as rounded boxes, final
    states as double circles ``((( )))``, the initial state marked by an arrow from a filled
    circle ``start``; dashed edges ``-.->``, anomalous edges red (``linkStyle``), greyed and
    undeclared states by ``classDef``."""
    ids = _ids(graph)
    lines = ["flowchart LR"]
    if graph.summary:
        # Mermaid reads a directive (%%{…}%%) anywhere, comments included: no % of a code
        # may start one.
        lines.append(f"    %% {graph.summary.replace('%', '#37;')}")
    initial = _initial(graph)
    if initial is not None:
        lines.append('    start((" "))')
    for node in graph.nodes:
        label = mermaid_text(node.name)
        shape = f'((("{label}")))' if node.final else f'("{label}")'
        lines.append(f"    {ids[node.name]}{shape}")
    links = 0
    red = []
    if initial is not None:
        lines.append(f"    start --> {ids[initial.name]}")
        links += 1
    for edge in graph.edges:
        source, target = ids[edge.source], ids[edge.target]
        if edge.untaken:
            lines.append(f"    {source} -.-> {target}")
        elif edge.label:
            lines.append(f'    {source} -->|"{mermaid_text(edge.label)}"| {target}')
        else:
            lines.append(f"    {source} --> {target}")
        if edge.anomalous:
            red.append(str(links))
        links += 1
    if red:
        lines.append(f"    linkStyle {','.join(red)} stroke:{ANOMALY_COLOUR},stroke-width:2px")
    if initial is not None:
        lines.append("    classDef initial fill:#000000,stroke:#000000")
        lines.append("    class start initial")
    greyed = [ids[node.name] for node in graph.nodes if node.greyed]
    if greyed:
        lines.append(f"    classDef greyed fill:{GREY_FILL},stroke:{GREY_LINE},color:{GREY_LINE}")
        lines.append(f"    class {','.join(greyed)} greyed")
    undeclared = [ids[node.name] for node in graph.nodes if not node.declared]
    if undeclared:
        lines.append(f"    classDef undeclared stroke:{ANOMALY_COLOUR},stroke-dasharray:5 5")
        lines.append(f"    class {','.join(undeclared)} undeclared")
    return "\n".join(lines) + "\n"


def to_dot(graph: Graph) -> str:
    """The graph as a Graphviz ``digraph`` (left to right): states as rounded boxes, final
    states ``shape=doublecircle``, the initial state marked by an arrow from a point
    ``start``; dashed edges ``style=dashed``, anomalous edges red, greyed states grey and
    filled, undeclared states with a red dashed border."""
    ids = _ids(graph)
    lines = [f"digraph {dot_string(graph.title)} {{"]
    if graph.summary:
        lines.append(f"    // {graph.summary}")
    lines.append("    rankdir=LR;")
    lines.append('    node [shape=box, style="rounded"];')
    initial = _initial(graph)
    if initial is not None:
        lines.append('    start [shape=point, width=0.15, label=""];')
    for node in graph.nodes:
        attributes = {"label": dot_string(node.name)}
        styles = ["rounded"]  # the default; Graphviz ignores it on a double circle
        if node.final:
            attributes["shape"] = "doublecircle"
        if node.greyed:
            styles.append("filled")
            attributes.update(
                color=f'"{GREY_LINE}"', fontcolor=f'"{GREY_LINE}"', fillcolor=f'"{GREY_FILL}"'
            )
        if not node.declared:
            styles.append("dashed")
            attributes["color"] = ANOMALY_COLOUR
        if styles != ["rounded"]:
            attributes["style"] = f'"{",".join(styles)}"'
        shown = ", ".join(f"{name}={value}" for name, value in attributes.items())
        lines.append(f"    {ids[node.name]} [{shown}];")
    if initial is not None:
        lines.append(f"    start -> {ids[initial.name]};")
    for edge in graph.edges:
        marks = []
        if edge.label:
            marks.append(f"label={dot_string(edge.label)}")
        if edge.untaken:
            marks.append("style=dashed")
        if edge.anomalous:
            marks.append(f"color={ANOMALY_COLOUR}, fontcolor={ANOMALY_COLOUR}, penwidth=2")
        shown = f" [{', '.join(marks)}]" if marks else ""
        lines.append(f"    {ids[edge.source]} -> {ids[edge.target]}{shown};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# PNML: a definition as a Petri net
# ---------------------------------------------------------------------------------------------

#: The PNML net type of a place/transition net.
PNML_NET_TYPE = "http://www.pnml.org/version-2009/grammar/pnmlcoremodel"


def _xml(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def to_pnml(graph: Graph) -> str:
    """A definition drawing as a Petri net in PNML (ISO/IEC 15909-2), which pm4py, ProM and
    other conformance checkers read: one *place* per state; a ``source`` place (the initial
    marking) and a transition labelled with the initial state into it — the creation, which
    the event log records as an event in the origin state; one *transition* per allowed move
    ``a -> b``, labelled ``b`` like the event log's activity (the state entered), from place
    ``a`` to place ``b``; from each final state an invisible transition into a ``sink`` place
    (the final marking). A trace of the event log that the definition allows and that ends in a
    final state replays on it with fitness 1; a move it does not allow, or an encounter not
    (yet) in a final state, lowers the fitness."""
    places = {node.name: f"p{index}" for index, node in enumerate(graph.nodes)}
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<pnml>",
        f'  <net id="net" type="{PNML_NET_TYPE}">',
        f"    <name><text>{_xml(graph.title)}</text></name>",
        '    <page id="page">',
        '      <place id="source"><name><text>source</text></name>'
        "<initialMarking><text>1</text></initialMarking></place>",
        '      <place id="sink"><name><text>sink</text></name></place>',
    ]
    lines += [
        f'      <place id="{places[node.name]}"><name><text>{_xml(node.name)}</text></name></place>'
        for node in graph.nodes
    ]
    arcs: list[tuple[str, str]] = []
    transitions: list[tuple[str, str | None]] = []
    initial = _initial(graph)
    if initial is not None:
        transitions.append(("start", initial.name))
        arcs += [("source", "start"), ("start", places[initial.name])]
    for number, edge in enumerate(e for e in graph.edges if e.allowed):
        transition = f"t{number}"
        transitions.append((transition, edge.target))
        arcs += [(places[edge.source], transition), (transition, places[edge.target])]
    for node in graph.nodes:
        if node.final:
            transition = f"end{places[node.name]}"
            transitions.append((transition, None))
            arcs += [(places[node.name], transition), (transition, "sink")]
    for transition, label in transitions:
        if label is None:
            lines.append(
                f'      <transition id="{transition}"><name><text>tau</text></name>'
                '<toolspecific tool="ProM" version="6.4" activity="$invisible$" '
                f'localNodeID="{transition}"/></transition>'
            )
        else:
            lines.append(
                f'      <transition id="{transition}"><name><text>{_xml(label)}</text></name>'
                "</transition>"
            )
    lines += [
        f'      <arc id="a{number}" source="{source}" target="{target}"/>'
        for number, (source, target) in enumerate(arcs)
    ]
    lines += [
        "    </page>",
        '    <finalmarkings><marking><place idref="sink"><text>1</text></place></marking>'
        "</finalmarkings>",
        "  </net>",
        "</pnml>",
    ]
    return "\n".join(lines) + "\n"
