"""gatefill: guarded backfills of derived data in Postgres and SQLite."""

__version__ = "0.1.0"
