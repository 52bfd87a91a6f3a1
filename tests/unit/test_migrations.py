"""Schema changes only through Alembic: up → down → up works and matches the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from daemon.db import migrate
from daemon.db.engine import Database
from daemon.db.models import Base


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    db = Database(db_url)
    try:
        migrate.upgrade(db.engine)
        assert migrate.current_revision(db.engine) == migrate.head_revision(db.engine)
        tables = set(inspect(db.engine).get_table_names())
        assert {"patients", "studies", "series", "instances", "jobs"} <= tables
        migrate.downgrade(db.engine, "base")
        assert migrate.current_revision(db.engine) is None
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(db.engine)
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
    finally:
        db.dispose()
