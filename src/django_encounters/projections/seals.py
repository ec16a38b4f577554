"""Checking seals in the fold: with ``ENCOUNTERS_SEAL_KEYS`` configured, every record the audit
trusts must carry a valid seal (:mod:`..engine.seals`). :class:`SealCheck` checks, per
encounter, each row's seal (tag ``row``, over its stored ``hash``), the genesis seal (tag
``genesis``, over ``genesis_hash``) and the seals of the definition versions the encounter uses
(tag ``version``, over ``content_hash``; each version checked once per run), and reports what
is wrong as anomalies of kind ``seal``, naming the record.

A version's seal anomaly is reported on each encounter that uses the version: at sequence 0
for the version it was created under, and at the first row decided under any other. So an
audit narrowed to some encounters reports the versions they depend on, and a reviewer
acknowledges it per encounter, as any other anomaly.

Without keys nothing is checked, and the reports say so on their first line
(:func:`seal_status`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .. import conf
from ..engine import Anomaly, AnomalyKind, Genesis, StreamRow, evidence_of
from ..engine.seals import Sealer
from ..models import EncounterDefinitionVersion

__all__ = ["NOT_CHECKED", "SealCheck", "seal_status"]

#: What the reports say when no seal key is configured.
NOT_CHECKED = "not checked (ENCOUNTERS_SEAL_KEYS is not set)"
#: The evidence part of a record that has no seal.
UNSEALED = "unsealed"


def seal_status(sealer: Sealer | None = None) -> str:
    """``"checked"`` when seal keys are configured (``sealer``, default: the settings'), else
    :data:`NOT_CHECKED`."""
    if sealer is None:
        sealer = conf.sealer()
    return "checked" if sealer is not None else NOT_CHECKED


class SealCheck:
    """The seal checks of one run under ``sealer``; the definition versions' seals are read
    once (one query) and checked once each, versions created during the run looked up when
    first met."""

    def __init__(self, sealer: Sealer, using: str, code: Callable[[Any], str]) -> None:
        self.sealer = sealer
        self.using = using
        self.code = code
        #: (definition id, number) -> (problem or None, evidence); None: no such version
        self._versions: dict[tuple[Any, int], tuple[str | None, str] | None] = {}
        self._load(EncounterDefinitionVersion.objects.using(using))

    def _load(self, versions: Any) -> None:
        problem = self.sealer.problem
        for definition_id, number, content_hash, seal in versions.values_list(
            "definition_id", "number", "content_hash", "seal"
        ):
            if not content_hash and not seal:
                found: str | None = "it is not sealed (and has no content hash)"
            else:
                found = problem("version", content_hash, seal)
            self._versions[(definition_id, number)] = (
                found,
                evidence_of(content_hash or "-", seal or UNSEALED),
            )

    def _version(self, definition_id: Any, number: int) -> tuple[str | None, str] | None:
        key = (definition_id, number)
        if key not in self._versions:
            self._load(
                EncounterDefinitionVersion.objects.using(self.using).filter(
                    definition_id=definition_id, number=number
                )
            )
            # Looked up once; marked absent only after the lookup, so a rebuild's other
            # thread never reads "no such version" for one still being loaded.
            self._versions.setdefault(key, None)
        return self._versions[key]

    def anomalies(
        self, genesis: Genesis, genesis_hash: str, genesis_seal: str, stream: Iterable[StreamRow]
    ) -> list[Anomaly]:
        """What is wrong with the seals of one encounter's genesis, rows (``stream``, in
        sequence order) and the definition versions they name."""
        encounter_id = genesis.encounter_id
        problem = self.sealer.problem
        found: list[Anomaly] = []
        wrong = problem("genesis", genesis_hash, genesis_seal)
        if wrong is not None:
            found.append(
                Anomaly(
                    encounter_id,
                    0,
                    AnomalyKind.SEAL,
                    f"the genesis: {wrong}",
                    evidence_of(genesis_hash, genesis_seal or UNSEALED),
                )
            )
        definition_id = genesis.definition_id
        seen = {genesis.definition_version}
        self._add_version(found, encounter_id, 0, definition_id, genesis.definition_version)
        for row in stream:
            wrong = problem("row", row.hash, row.seal)
            if wrong is not None:
                found.append(
                    Anomaly(
                        encounter_id,
                        row.sequence,
                        AnomalyKind.SEAL,
                        f"row {row.sequence}: {wrong}",
                        evidence_of(row.hash, row.seal or UNSEALED),
                    )
                )
            if row.definition_version not in seen:
                seen.add(row.definition_version)
                self._add_version(
                    found, encounter_id, row.sequence, definition_id, row.definition_version
                )
        return found

    def _add_version(
        self,
        found: list[Anomaly],
        encounter_id: Any,
        sequence: int,
        definition_id: Any,
        number: int,
    ) -> None:
        version = self._version(definition_id, number)
        if version is None or version[0] is None:  # no such version (the verifier reports
            return  # it: `version`), or its seal is valid
        wrong, evidence = version
        found.append(
            Anomaly(
                encounter_id,
                sequence,
                AnomalyKind.SEAL,
                f"definition {self.code(definition_id)} version {number}: {wrong}",
                evidence,
            )
        )
