"""The peer a Django user would pick instead of django-encounters, set up as its documentation
says: a model with a django-fsm-2 ``FSMField`` and ``@transition`` methods, logged by
django-fsm-log. Used only by ``benchmarks/peers.py`` (the ``bench`` extra installs both)."""
