"""A REST API for encounters on Django REST framework (the ``rest`` extra:
``pip install django-encounters[rest]``).

Wire it with ``path("api/", include("django_encounters.contrib.rest_framework.urls"))``, or
register :class:`~.views.EncounterViewSet` on a router of your own. Concurrency is HTTP's:
every response about one encounter carries ``ETag: "<version>"`` (its stream version), and an
``If-Match`` on ``POST …/transition/`` is the ``expected_version`` of ``transition()`` (a stale
one answers ``412 Precondition Failed``). Errors are Problem Details (RFC 9457,
``application/problem+json``).
"""
