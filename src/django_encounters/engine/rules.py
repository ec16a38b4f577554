"""A definition's state machine as plain data, and every question asked of it.

``EncounterDefinition`` stores the machine as JSON; its predicates (``is_valid_transition``,
``get_allowed_transitions``, ``get_warnings``, …) and the timeline's decisions all answer
through :class:`Rules`, so there is one answer to "may ``a`` go to ``b``".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rules:
    """The state machine of one definition."""

    code: str
    states: tuple[str, ...]
    transitions: Mapping[str, tuple[str, ...]]
    final_states: frozenset[str] = frozenset()
    initial_state: str = ""
    version: int = 1
    #: The version's content hash as the chain of its definition's versions says it is
    #: (:func:`~.hashing.version_chain`; "" when unknown): what a row decided under it commits
    #: to.
    content_hash: str = ""
    #: Why the stored version cannot be trusted ("" when it can): its stored content hash is
    #: not its chain's (changed or inserted after the fact).
    problem: str = ""

    @classmethod
    def from_config(
        cls,
        code: str,
        states: Iterable[str] | Any,
        transitions: Mapping[str, Iterable[str]] | Any,
        final_states: Iterable[str] | Any = (),
        initial_state: str = "",
        version: int = 1,
        content_hash: str = "",
    ) -> Rules:
        """Rules from a definition's stored JSON. Malformed parts (a definition written behind
        ``save()``'s checks) are read as empty rather than crash a question asked of them."""
        return cls(
            code=code,
            states=tuple(_strings(states)),
            transitions={
                source: tuple(_strings(targets))
                for source, targets in (
                    transitions if isinstance(transitions, dict) else {}
                ).items()
            },
            final_states=frozenset(_strings(final_states)),
            initial_state=initial_state,
            version=version,
            content_hash=content_hash,
        )

    @property
    def name(self) -> str:
        """How messages name this machine: ``'CODE' v2``."""
        return f"'{self.code}' v{self.version}"

    def is_state(self, state: Any) -> bool:
        return state in self.states

    def is_final(self, state: Any) -> bool:
        return state in self.final_states

    def allowed(self, from_state: Any) -> list[str]:
        return list(self.transitions.get(from_state, ()))

    def is_allowed(self, from_state: Any, to_state: Any) -> bool:
        return to_state in self.transitions.get(from_state, ())

    def reachable(self) -> frozenset[str]:
        """The states reachable from the initial state by allowed edges (itself included)."""
        reachable = {self.initial_state}
        queue = deque([self.initial_state])
        while queue:
            for target in self.transitions.get(queue.popleft(), ()):
                if target not in reachable:
                    reachable.add(target)
                    queue.append(target)
        return frozenset(reachable)

    def warnings(self) -> list[str]:
        """Structural smells that are legal, each naming the states concerned: states
        unreachable from the initial state, exits from final states, non-final dead ends."""
        reachable = self.reachable()
        found: list[str] = []
        unreachable = [s for s in self.states if s not in reachable]
        if unreachable:
            found.append(
                f"states unreachable from initial state '{self.initial_state}': {unreachable}"
            )
        for state in self.states:
            if state in self.final_states and self.transitions.get(state):
                found.append(f"final state '{state}' has exits: {list(self.transitions[state])}")
        dead_ends = [
            s for s in self.states if s not in self.final_states and not self.transitions.get(s)
        ]
        if dead_ends:
            found.append(f"non-final states with no way out (dead ends): {dead_ends}")
        return found


def _strings(values: Any) -> list[str]:
    if not isinstance(values, (list, tuple, set, frozenset)):
        return []
    return [value for value in values if isinstance(value, str)]
