"""Small SQL building blocks shared by the index, the queue and the outbox."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite


def insert_ignore(conn: Connection, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT that yields to a concurrent writer of the same unique key; True if it inserted."""
    dialect = conn.dialect.name
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - only the two supported backends exist
        raise NotImplementedError(dialect)
    # RETURNING, not rowcount: the driver-level rowcount of ON CONFLICT DO NOTHING is not
    # reported consistently across backends and SQLAlchemy execution paths.
    return conn.execute(stmt.returning(model.id)).first() is not None
