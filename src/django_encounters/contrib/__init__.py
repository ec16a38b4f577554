"""Optional integrations with other frameworks; each needs its own extra and is imported only by
projects that use it (importing ``django_encounters`` imports none of them)."""
