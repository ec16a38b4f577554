"""``ENGINE: "tests.sqlite_immediate"``: Django's SQLite backend whose transactions take the
write lock at ``BEGIN`` (``BEGIN IMMEDIATE``), so that writers wait for each other (up to
``OPTIONS["timeout"]``) instead of failing with "database is locked". What Django 5.1's
``OPTIONS["transaction_mode"] = "IMMEDIATE"`` does, for Django 4.2 (docs/guides/databases.md)."""

from django.db.backends.sqlite3 import base


class DatabaseWrapper(base.DatabaseWrapper):
    begins_immediate = True  # django-encounters' check W002 looks for it

    def _start_transaction_under_autocommit(self) -> None:
        self.cursor().execute("BEGIN IMMEDIATE")
