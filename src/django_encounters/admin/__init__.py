"""Admin: encounters are created with ``create_encounter()`` and moved on with ``transition()``
(one button per allowed next state, refused on a stale page); their timeline is shown in
business-time order with the audit's backdated/overtaken marks; delete is a soft delete with a
restore. Definitions are editable (with their structural warnings and every version of their
machine shown); the transition log, definition versions and anomaly acknowledgements are
read-only facts."""

from . import definitions, encounters, records  # noqa: F401 - registers the admins
