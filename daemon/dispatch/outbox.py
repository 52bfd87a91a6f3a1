"""The outbox: one row per (object, destination), sent by association slots holding a lease.

Claiming follows :mod:`daemon.db.queue`: one conditional ``UPDATE ... WHERE id IN (SELECT ...
LIMIT n) RETURNING``, the inner SELECT taking ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, and every
later write conditional on still holding the lease. Added here is a limit per destination that
holds across processes and hosts: each association claims under its own owner token, so the
distinct owners of live leases are the associations open to that destination, and a claim is
refused while they number ``max_associations``. Claims for one destination are serialised so the
count cannot be raced: PostgreSQL takes a transaction-scoped advisory lock on the destination;
SQLite has one writer, and the claim's first statement is a write, so the whole claim holds the
write lock from its start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, distinct, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from daemon.config import DispatchSettings
from daemon.db.engine import Database
from daemon.db.models import Instance, OutboxItem, OutboxState
from daemon.db.queue import backoff_seconds
from daemon.db.sql import lease_rows, update_where
from daemon.errors import UsfmdError

#: States an association may claim from (FAILED waits for its back-off in ``not_before``).
CLAIMABLE = (OutboxState.PENDING, OutboxState.FAILED)
#: States an operator may retry; SENT too: a forced re-dispatch sends the same archived file
#: (same SOP Instance UID) again.
RETRYABLE = (OutboxState.FAILED, OutboxState.DEAD, OutboxState.CANCELLED, OutboxState.SENT)
CANCELLABLE = (OutboxState.PENDING, OutboxState.FAILED, OutboxState.SENDING)
#: What ``outbox retry --destination`` selects unless states are named.
RETRY_BY_DEFAULT = (OutboxState.FAILED, OutboxState.DEAD, OutboxState.CANCELLED)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff_base: float
    backoff_max: float

    @classmethod
    def from_settings(cls, dispatch: DispatchSettings) -> RetryPolicy:
        return cls(
            dispatch.max_attempts, dispatch.backoff_base_seconds, dispatch.backoff_max_seconds
        )


@dataclass(frozen=True, slots=True)
class ClaimedItem:
    """An object leased to one association, with what is needed to send its archived file."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    #: Relative to the archive root.
    path: str
    #: Including this attempt.
    attempts: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one C-STORE attempt ended."""

    item: ClaimedItem
    accepted: bool
    #: The DIMSE Status the destination answered; None when it answered nothing.
    status: int | None
    #: Why it was not accepted (statuses and network errors only, never patient data).
    error: str | None = None


def enqueue(
    session: Session,
    instance_pk: int,
    sop_instance_uid: str,
    destinations: Sequence[str],
    now: datetime,
) -> list[str]:
    """Queue an archived object for each destination; return those newly queued.

    Idempotent: a (SOP Instance UID, destination) pair already queued, in whatever state, is
    left alone, so producing or enqueueing a result twice never sends it twice.
    """
    if not destinations:
        return []
    rows = [
        {
            "sop_instance_uid": sop_instance_uid,
            "destination": name,
            "instance_pk": instance_pk,
            "state": OutboxState.PENDING.value,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "not_before": now,
        }
        for name in dict.fromkeys(destinations)
    ]
    conn = session.connection()
    stmt: postgresql.Insert | sqlite.Insert
    if conn.dialect.name == "postgresql":
        stmt = postgresql.insert(OutboxItem).values(rows).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(OutboxItem).values(rows).on_conflict_do_nothing()
    return [str(name) for name in conn.execute(stmt.returning(OutboxItem.destination)).scalars()]


def _due(destination: str, now: datetime) -> Any:
    return and_(
        OutboxItem.destination == destination,
        or_(
            and_(OutboxItem.state.in_(CLAIMABLE), OutboxItem.not_before <= now),
            # An association that died (host crash, kill -9) frees its objects at lease expiry.
            and_(OutboxItem.state == OutboxState.SENDING, OutboxItem.lease_expires_at < now),
        ),
    )


def has_due(db: Database, destination: str, now: datetime) -> bool:
    """A read-only check, so that an idle dispatcher polls without write transactions."""
    with db.read() as session:
        return (
            session.scalar(select(OutboxItem.id).where(_due(destination, now)).limit(1)) is not None
        )


def _advisory_key(destination: str) -> int:
    digest = hashlib.blake2b(f"usfmd.outbox:{destination}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _dead_letter_expired(
    session: Session, destination: str, now: datetime, max_attempts: int
) -> None:
    """Objects whose lease expired on their last allowed attempt go to DEAD, not back in line."""
    session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.destination == destination,
            OutboxItem.state == OutboxState.SENDING,
            OutboxItem.lease_expires_at < now,
            OutboxItem.attempts >= max_attempts,
        )
        .values(
            state=OutboxState.DEAD,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            last_error="association lost (lease expired) on the last allowed attempt",
        )
    )


def claim(
    db: Database,
    destination: str,
    owner: str,
    now: datetime,
    *,
    lease_seconds: float,
    max_associations: int,
    limit: int,
    policy: RetryPolicy,
) -> list[ClaimedItem]:
    """Lease up to ``limit`` due objects of ``destination`` to ``owner`` (one association).

    Returns nothing when none is due or when ``max_associations`` other owners already hold
    live leases on this destination.
    """
    with db.write() as session:
        # First statement a write: on SQLite the claim holds the write lock from here on.
        _dead_letter_expired(session, destination, now, policy.max_attempts)
        if not db.is_sqlite:
            session.execute(select(func.pg_advisory_xact_lock(_advisory_key(destination))))
        busy = session.scalar(
            select(func.count(distinct(OutboxItem.lease_owner))).where(
                OutboxItem.destination == destination,
                OutboxItem.state == OutboxState.SENDING,
                OutboxItem.lease_expires_at >= now,
                OutboxItem.lease_owner != owner,
            )
        )
        if int(busy or 0) >= max_associations:
            return []
        candidates = select(OutboxItem.id).where(_due(destination, now)).order_by(OutboxItem.id)
        claim = lease_rows(
            OutboxItem,
            candidates.limit(limit),
            state=OutboxState.SENDING,
            owner=owner,
            lease_seconds=lease_seconds,
            now=now,
        )
        ids = session.scalars(claim.returning(OutboxItem.id)).all()
        if not ids:
            return []
        rows = session.execute(
            select(
                OutboxItem.id,
                OutboxItem.sop_instance_uid,
                OutboxItem.attempts,
                Instance.sop_class_uid,
                Instance.transfer_syntax_uid,
                Instance.path,
            )
            .join(Instance, Instance.id == OutboxItem.instance_pk)
            .where(OutboxItem.id.in_(list(ids)))
            .order_by(OutboxItem.id)
        ).all()
    return [
        ClaimedItem(
            r.id,
            destination,
            r.sop_instance_uid,
            r.sop_class_uid,
            r.transfer_syntax_uid,
            r.path,
            r.attempts,
        )  # fmt: skip
        for r in rows
    ]


def _owned(item_id: int, owner: str) -> Any:
    return and_(
        OutboxItem.id == item_id,
        OutboxItem.lease_owner == owner,
        OutboxItem.state == OutboxState.SENDING,
    )


def record(
    db: Database,
    owner: str,
    deliveries: Sequence[Delivery],
    now: datetime,
    policy: RetryPolicy,
    lease_seconds: float,
) -> int:
    """Record attempts and renew the lease on the owner's objects still to send.

    Returns how many deliveries were recorded; one is skipped when its lease was lost (the
    association outlived the lease and another took the object over; it may then arrive twice,
    which a Storage SCP absorbs, since it is the same SOP Instance).
    """
    recorded = 0
    with db.write() as session:
        for d in deliveries:
            values: dict[str, Any] = {
                "lease_owner": None,
                "lease_expires_at": None,
                "updated_at": now,
                "last_status": d.status,
            }
            if d.accepted:
                values |= {"state": OutboxState.SENT, "sent_at": now, "last_error": None}
            else:
                dead = d.item.attempts >= policy.max_attempts
                delay = backoff_seconds(d.item.attempts, policy.backoff_base, policy.backoff_max)
                values |= {
                    "state": OutboxState.DEAD if dead else OutboxState.FAILED,
                    "not_before": now if dead else now + timedelta(seconds=delay),
                    "last_error": (d.error or "not accepted")[:4000],
                }
            result = session.execute(
                update(OutboxItem).where(_owned(d.item.id, owner)).values(values)
            )
            recorded += int(result.rowcount)  # type: ignore[attr-defined]
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.lease_owner == owner, OutboxItem.state == OutboxState.SENDING)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        )
    return recorded


def release(db: Database, owner: str, item_ids: Sequence[int], now: datetime) -> int:
    """Give unsent objects back at shutdown: claimable at once, the attempt not counted."""
    if not item_ids:
        return 0
    with db.write() as session:
        result = session.execute(
            update(OutboxItem)
            .where(
                OutboxItem.id.in_(list(item_ids)),
                OutboxItem.lease_owner == owner,
                OutboxItem.state == OutboxState.SENDING,
            )
            .values(
                state=OutboxState.PENDING,
                lease_owner=None,
                lease_expires_at=None,
                attempts=OutboxItem.attempts - 1,
                not_before=now,
                updated_at=now,
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def _selection(
    ids: Sequence[int] | None,
    destination: str | None,
    states: Sequence[OutboxState],
) -> Any:
    if not ids and not destination:
        raise UsfmdError("name outbox ids or a destination (refusing to act on every row)")
    clause: Any = OutboxItem.state.in_(list(states))
    if ids:
        clause = and_(clause, OutboxItem.id.in_(list(ids)))
    if destination:
        clause = and_(clause, OutboxItem.destination == destination)
    return clause


def retry(
    db: Database,
    now: datetime,
    ids: Sequence[int] | None = None,
    destination: str | None = None,
    states: Sequence[OutboxState] | None = None,
) -> int:
    """Operator retry (or forced re-dispatch of SENT rows): back in line with fresh attempts.

    By ids any retryable state qualifies; by destination only ``states`` (default failed, dead
    and cancelled), so re-sending everything already delivered has to be asked for.
    """
    chosen = states or (RETRYABLE if ids else RETRY_BY_DEFAULT)
    bad = [s.value for s in chosen if s not in RETRYABLE]
    if bad:
        raise UsfmdError(
            f"cannot retry rows in state(s) {bad}; retryable: {[s.value for s in RETRYABLE]}"
        )
    return update_where(
        db,
        OutboxItem,
        _selection(ids, destination, chosen),
        state=OutboxState.PENDING,
        attempts=0,
        not_before=now,
        updated_at=now,
        lease_owner=None,
        lease_expires_at=None,
        last_error=None,
    )


def cancel(
    db: Database, now: datetime, ids: Sequence[int] | None = None, destination: str | None = None
) -> int:
    """Operator cancel; an association sending the object then fails to record it."""
    return update_where(
        db,
        OutboxItem,
        _selection(ids, destination, CANCELLABLE),
        state=OutboxState.CANCELLED,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=now,
    )


def list_items(
    session: Session,
    states: Sequence[OutboxState] | None = None,
    destination: str | None = None,
    limit: int = 100,
) -> list[OutboxItem]:
    query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
    if states:
        query = query.where(OutboxItem.state.in_(list(states)))
    if destination:
        query = query.where(OutboxItem.destination == destination)
    return list(session.scalars(query))


def counts(session: Session) -> dict[str, int]:
    """Rows by state, for ``usfmd status``."""
    rows = session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all()
    return {str(getattr(state, "value", state)): int(n) for state, n in rows}
