"""Projections: the timeline aggregate (the one replay/decide engine), its mapper to and from
``EncounterTransition`` rows, rebuild, verification and audit replay."""
