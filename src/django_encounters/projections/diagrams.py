"""Diagrams of a definition and of the process mined from its log: the Python API behind
``manage.py encounter_graph``.

* :func:`definition_diagram` — the graph of a definition version (default: the current one):
  the initial state marked, final states double-circled, states unreachable from the initial
  state greyed.
* :func:`process_map` — the edges the rows took (of every version), each with its count and the
  median time spent in its source state before it, compared with the chosen version's machine:
  allowed edges nobody took dashed, edges it does not allow red.
* :func:`render` — a graph as Mermaid or DOT text (no dependency) or as SVG, which runs
  Graphviz's ``dot`` (an optional, external program: :func:`render_svg`); a definition also
  as a Petri net in PNML (:func:`~django_encounters.engine.graphs.to_pnml`), for conformance
  checking of the event log with pm4py, ProM and others.

See ``docs/diagrams.md`` for what each mark means and the exact syntax written.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..engine import Rules
from ..engine.graphs import (
    Graph,
    definition_graph,
    process_map_graph,
    to_dot,
    to_mermaid,
    to_pnml,
)
from ..exceptions import (
    DefinitionNotFoundError,
    DefinitionVersionNotFoundError,
    GraphvizError,
    GraphvizNotFoundError,
)
from ..models import EncounterDefinition, EncounterDefinitionVersion
from .process_map import DEFAULT_BATCH_SIZE, mine_edges
from .selection import Selection, read_alias

#: The formats :func:`render` writes.
FORMATS = ("mermaid", "dot", "svg", "pnml")
#: The formats that draw a definition only (not a process map).
DEFINITION_ONLY_FORMATS = ("pnml",)
#: Graphviz's layout program, looked up on ``PATH``.
GRAPHVIZ_PROGRAM = "dot"
#: How long :func:`render_svg` waits for Graphviz.
GRAPHVIZ_TIMEOUT = 60.0


def machine(
    code: str, version: int | None = None, *, using: str | None = None
) -> tuple[EncounterDefinition, Rules]:
    """The definition with ``code`` (soft-deleted ones included) and the rules of its version
    ``version`` (default: its current, latest version).

    Raises:
        TypeError: ``code`` is not text, ``version`` not an integer.
        DefinitionNotFoundError: no definition has the code.
        DefinitionVersionNotFoundError: it has no such version.
    """
    using = read_alias(using)
    if not isinstance(code, str):
        raise TypeError(f"code must be text, not {type(code).__name__} {code!r}")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise TypeError(f"version must be an integer, not {type(version).__name__} {version!r}")
    try:
        definition = EncounterDefinition.all_objects.using(using).get(code=code)
    except EncounterDefinition.DoesNotExist:
        raise DefinitionNotFoundError(code) from None
    number = definition.version if version is None else version
    found = EncounterDefinitionVersion.objects.using(using).filter(
        definition=definition, number=number
    )
    chosen = found.first()
    if chosen is None:
        versions = list(
            EncounterDefinitionVersion.objects.using(using)
            .filter(definition=definition)
            .order_by("number")
            .values_list("number", flat=True)
        )
        raise DefinitionVersionNotFoundError(code, number, versions)
    return definition, chosen.rules(code=definition.code)


def definition_diagram(code: str, *, version: int | None = None, using: str | None = None) -> Graph:
    """The graph of the definition ``code`` at version ``version`` (default: the current one).
    Raises as :func:`machine`."""
    _, rules = machine(code, version, using=using)
    return definition_graph(rules)


def process_map(
    code: str,
    *,
    version: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    using: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Graph:
    """The process map of the definition ``code``: the edges its encounters' rows took — rows
    decided under any of its versions, soft-deleted encounters included — read off their
    business-time timelines; with ``since``/``until`` only the rows *effective* in
    ``[since, until)`` count. Each edge carries how often it was taken and the median time
    spent in its source state before it. The *allowed* comparison (dashed untaken edges, red
    anomalies) uses the machine of version ``version`` (default: the current one).

    Raises:
        TypeError / ValueError: a bad ``code``/``version``, naive or non-datetime times,
            ``since >= until``, a ``batch_size`` below 1.
        DefinitionNotFoundError, DefinitionVersionNotFoundError: as :func:`machine`.
    """
    selection = Selection.of(
        definition=code, since=since, until=until, batch_size=batch_size, using=using
    )
    definition, rules = machine(code, version, using=selection.using)
    mined = mine_edges(selection)
    window = ""
    if since is not None or until is not None:
        start = since.isoformat() if since is not None else "the beginning"
        end = until.isoformat() if until is not None else "now"
        window = f" effective from {start} until {end}"
    summary = (
        f"process map of {definition.code!r}: {_count(mined.rows, 'transition')} of "
        f"{_count(mined.encounters, 'encounter')}{window}, compared with {rules.name}"
    )
    return process_map_graph(rules, mined.stats, summary=summary)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def graphviz_program() -> str:
    """The path of Graphviz's ``dot``; ``GraphvizNotFoundError`` when it is not on ``PATH``."""
    found = shutil.which(GRAPHVIZ_PROGRAM)
    if found is None:
        raise GraphvizNotFoundError(GRAPHVIZ_PROGRAM)
    return found


def render_svg(dot_source: str, *, timeout: float = GRAPHVIZ_TIMEOUT) -> str:
    """``dot_source`` (DOT text) laid out by Graphviz (``dot -Tsvg``) as an SVG document.

    Raises:
        GraphvizNotFoundError: Graphviz is not installed.
        GraphvizError: it failed, or did not finish within ``timeout`` seconds.
    """
    program = graphviz_program()
    try:
        done = subprocess.run(
            [program, "-Tsvg"],
            input=dot_source.encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GraphvizError(program, None, f"no answer within {timeout:g} seconds") from None
    except OSError as exc:
        raise GraphvizError(program, None, str(exc)) from exc
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", errors="replace").strip()
        raise GraphvizError(program, done.returncode, detail)
    return done.stdout.decode("utf-8")


_RENDERERS: dict[str, Callable[[Graph], str]] = {
    "mermaid": to_mermaid,
    "dot": to_dot,
    "svg": lambda graph: render_svg(to_dot(graph)),
    "pnml": to_pnml,
}


def render(graph: Graph, format: str = "mermaid") -> str:
    """``graph`` as text in ``format``: ``"mermaid"`` (a Mermaid flowchart), ``"dot"``
    (Graphviz DOT), ``"svg"`` (DOT laid out by Graphviz, :func:`render_svg`) or ``"pnml"`` (a
    definition's Petri net; a process map's anomalous edges are left out).

    Raises:
        ValueError: an unknown format.
        GraphvizNotFoundError, GraphvizError: for ``"svg"``, as :func:`render_svg`.
    """
    renderer = _RENDERERS.get(format) if isinstance(format, str) else None
    if renderer is None:
        raise ValueError(f"format must be one of {list(FORMATS)}, not {format!r}")
    return renderer(graph)


def draw(code: str, format: str = "mermaid", *, from_log: bool = False, **options: Any) -> str:
    """The definition's diagram (or with ``from_log`` its process map, ``options`` as
    :func:`process_map`'s) rendered in ``format`` — what ``manage.py encounter_graph`` prints.
    An unknown format is refused before anything is read."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, not {format!r}")
    if from_log and format in DEFINITION_ONLY_FORMATS:
        raise ValueError(
            f"{format} draws a definition (its Petri net, to check the event log against), "
            "not a process map: leave out --from-log"
        )
    if from_log:
        graph = process_map(code, **options)
    else:
        graph = definition_diagram(code, **options)
    return render(graph, format)
