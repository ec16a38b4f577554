"""Signals sent by :func:`django_encounters.services.transition`.

``pre_transition``  sent inside the transaction, after the decision and validators, before the
                    row is inserted (a receiver that raises aborts the transition).
``post_transition`` sent after the transaction commits.

Both are sent with ``sender=Encounter`` and keyword arguments ``encounter``, ``transition``
(the ``EncounterTransition`` row), ``from_state`` and ``to_state``.
"""

from django.dispatch import Signal

pre_transition = Signal()
post_transition = Signal()
