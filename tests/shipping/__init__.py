"""A project's migrations that ship a definition (docs/guides/definitions.md shows the same
files): applied and reversed by tests/test_shipping_definitions.py. Not an installed app."""
