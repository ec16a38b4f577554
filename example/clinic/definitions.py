"""The example clinic's encounter definitions, as plain data (no Django import), so that the
seed command, and the benchmarks (``benchmarks/definitions.py``), use the one source."""

from __future__ import annotations

#: The definition of the README's usage example (and of ``example/demo.py``).
VISIT = {
    "name": "Patient Visit",
    "code": "VISIT",
    "description": "An outpatient visit: booked, the patient arrives, is seen, leaves.",
    "states": ["scheduled", "checked_in", "in_progress", "completed", "cancelled"],
    "initial_state": "scheduled",
    "final_states": ["completed", "cancelled"],
    "transitions": {
        "scheduled": ["checked_in", "cancelled"],
        "checked_in": ["in_progress", "cancelled"],
        "in_progress": ["completed", "cancelled"],
    },
    "validators": [
        "django_encounters.validators.FinalStateValidator",
        {
            "path": "django_encounters.validators.RequiredFieldsValidator",
            "params": {
                "state_requirements": {"completed": ["ended_at"], "in_progress": ["started_at"]}
            },
        },
    ],
}
