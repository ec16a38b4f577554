"""A definition as a Petri net (``encounter_graph CODE --format pnml``): pm4py reads it
(``read_pnml``) and its token-based replay of the exported event log gives fitness 1.0 for
traces the definition allows, and less for a log with moves it does not allow."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest

from django_encounters.engine.graphs import definition_graph, to_pnml
from django_encounters.models import EncounterDefinition
from django_encounters.projections.diagrams import draw
from django_encounters.projections.event_log import export_event_log
from django_encounters.services import create_encounter, transition
from tests.helpers import run_command
from tests.testapp.models import Patient

pm4py = pytest.importorskip("pm4py")

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:Install the optional requirement:UserWarning"),
]

START = datetime(2024, 5, 1, 8, tzinfo=dt_timezone.utc)


def _definition(code: str, transitions: dict[str, list[str]]) -> EncounterDefinition:
    return EncounterDefinition.objects.create(
        name=code,
        code=code,
        states=["booked", "arrived", "seen", "left"],
        initial_state="booked",
        final_states=["seen", "left"],
        transitions=transitions,
    )


def _walk(definition: EncounterDefinition, *states: str) -> None:
    encounter = create_encounter(definition, Patient.objects.create(name="p"))
    for hours, state in enumerate(states, 1):
        transition(encounter, state, effective_at=START + timedelta(hours=hours))


@pytest.fixture
def clinic(db: Any) -> EncounterDefinition:
    clinic = _definition("CLINIC", {"booked": ["arrived", "left"], "arrived": ["seen", "left"]})
    _walk(clinic, "arrived", "seen")
    _walk(clinic, "left")
    _walk(clinic, "arrived", "left")
    return clinic


def _net(tmp_path: Path, code: str) -> tuple[Any, Any, Any]:
    path = tmp_path / f"{code}.pnml"
    code_, _, err = run_command("encounter_graph", code, "--format", "pnml", "--output", str(path))
    assert code_ == 0, err
    return pm4py.read_pnml(str(path))


def _log(tmp_path: Path, code: str) -> Any:
    path = tmp_path / f"{code}.xes"
    export_event_log("xes", path, definition=code)
    return pm4py.read_xes(str(path))


def test_pm4py_reads_the_net_of_a_definition(clinic: EncounterDefinition, tmp_path: Path):
    net, initial, final = _net(tmp_path, "CLINIC")

    labels = sorted(t.label for t in net.transitions if t.label is not None)
    # The creation (into the initial state) and one transition per allowed move, labelled
    # with the state entered like the event log's activities; a silent end per final state.
    assert labels == ["arrived", "booked", "left", "left", "seen"]
    assert sum(t.label is None for t in net.transitions) == 2
    assert len(net.places) == 4 + 2  # the states, a source and a sink
    assert [p.name for p in initial] == ["source"] and [p.name for p in final] == ["sink"]


def test_token_replay_of_the_definition_s_own_log_fits_perfectly(
    clinic: EncounterDefinition, tmp_path: Path
):
    net, initial, final = _net(tmp_path, "CLINIC")

    fitness = pm4py.fitness_token_based_replay(_log(tmp_path, "CLINIC"), net, initial, final)

    assert fitness["log_fitness"] == 1.0
    assert fitness["perc_fit_traces"] == 100.0


def test_a_log_with_moves_the_definition_forbids_does_not_fit(
    clinic: EncounterDefinition, tmp_path: Path
):
    # A second definition with the same states lets "seen" come straight after "booked".
    walk_in = _definition("WALKIN", {"booked": ["seen"], "seen": ["left"]})
    _walk(walk_in, "seen")
    _walk(walk_in, "seen", "left")
    net, initial, final = _net(tmp_path, "CLINIC")

    fitness = pm4py.fitness_token_based_replay(_log(tmp_path, "WALKIN"), net, initial, final)

    assert fitness["log_fitness"] < 1.0
    assert fitness["perc_fit_traces"] == 0.0
    # Its own net fits its own log.
    own = _net(tmp_path, "WALKIN")
    assert pm4py.fitness_token_based_replay(_log(tmp_path, "WALKIN"), *own)["log_fitness"] == 1.0


def test_names_are_escaped_and_the_text_is_what_draw_gives(db: Any):
    odd = EncounterDefinition.objects.create(
        name="odd",
        code="ODD",
        states=['a<&>"', "b"],
        initial_state='a<&>"',
        final_states=["b"],
        transitions={'a<&>"': ["b"]},
    )
    text = draw("ODD", "pnml")
    assert text == to_pnml(definition_graph(odd.latest_version().rules(code="ODD")))
    assert "<text>a&lt;&amp;&gt;&quot;</text>" in text


def test_pnml_of_a_process_map_is_refused(clinic: EncounterDefinition):
    code, out, err = run_command("encounter_graph", "CLINIC", "--from-log", "--format", "pnml")
    assert (code, out) == (2, "")
    assert "pnml draws a definition" in err
