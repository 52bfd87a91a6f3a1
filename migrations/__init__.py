"""Alembic environment and revisions: the only way the usfmd schema changes."""
