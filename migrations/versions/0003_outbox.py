"""outbox: the objects usfmd produced and their sending to each destination

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_STATES = ("pending", "sending", "sent", "failed", "dead", "cancelled")


def upgrade() -> None:
    op.create_table(
        "output_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("result_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instances.id"],
            name=op.f("fk_output_instances_instance_pk_instances"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_output_instances")),
        sa.UniqueConstraint("instance_pk", name=op.f("uq_output_instances_instance_pk")),
        sa.UniqueConstraint("result_key", name=op.f("uq_output_instances_result_key")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_output_instances_sop_instance_uid")),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(*_STATES, name="outboxstate", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_pk"], ["instances.id"], name=op.f("fk_outbox_instance_pk_instances")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_destination"),
    )
    op.create_index(
        "ix_outbox_destination_state_not_before",
        "outbox",
        ["destination", "state", "not_before"],
    )
    op.create_index(op.f("ix_outbox_instance_pk"), "outbox", ["instance_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_outbox_instance_pk"), table_name="outbox")
    op.drop_index("ix_outbox_destination_state_not_before", table_name="outbox")
    op.drop_table("outbox")
    op.drop_table("output_instances")
