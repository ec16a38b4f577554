"""The Django 4.2 recipe of docs/guides/databases.md ("SQLite on Django 4.2"), as a project would
keep it: a database backend whose transactions begin with ``BEGIN IMMEDIATE``."""
