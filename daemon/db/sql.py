"""Small SQL building blocks shared by the index, the queue and the outbox."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Update, update
from sqlalchemy.dialects import postgresql, sqlite

from daemon.db.engine import Database


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


def lease_rows(
    model: type[Any],
    candidates: Select[Any],
    *,
    state: Any,
    owner: str,
    lease_seconds: float,
    now: datetime,
) -> Update:
    """UPDATE that leases the rows ``candidates`` selects (ids) to ``owner``, counting an attempt.

    On PostgreSQL the candidates are read ``FOR UPDATE SKIP LOCKED``: rows another claimer has
    locked are passed over, so concurrent claimers on many hosts take different rows instead of
    waiting for each other. SQLAlchemy renders no such clause for SQLite, which has one writer
    at a time and no row locks. The caller adds RETURNING.
    """
    return (
        update(model)
        .where(model.id.in_(candidates.with_for_update(skip_locked=True).scalar_subquery()))
        .values(
            state=state,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=model.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


def update_where(db: Database, model: type[Any], where: ColumnElement[bool], **values: Any) -> int:
    """Set ``values`` on the rows of ``model`` that ``where`` selects, in one write transaction;
    how many rows changed (an operator's retry or cancel)."""
    with db.write() as session:
        result = session.execute(update(model).where(where).values(**values))
        return int(result.rowcount)  # type: ignore[attr-defined]
