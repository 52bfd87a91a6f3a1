"""findings per image and model version; job dedup keys (one SR job per study content)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("model_version_pk", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("class_name", sa.String(length=64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("best_frame", sa.Integer(), nullable=False),
        sa.Column("aggregation", sa.String(length=16), nullable=True),
        sa.Column("heatmap_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"], ["instances.id"], name=op.f("fk_findings_instance_pk_instances")
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"], ["studies.id"], name=op.f("fk_findings_study_pk_studies")
        ),
        sa.ForeignKeyConstraint(
            ["model_version_pk"],
            ["model_versions.id"],
            name=op.f("fk_findings_model_version_pk_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
        sa.UniqueConstraint("instance_pk", "model_version_pk", name="uq_findings_instance_version"),
    )
    op.create_index("ix_findings_study_version", "findings", ["study_pk", "model_version_pk"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dedup_key", sa.String(length=255), nullable=True))
        batch.create_unique_constraint(op.f("uq_jobs_dedup_key"), ["dedup_key"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("uq_jobs_dedup_key"), type_="unique")
        batch.drop_column("dedup_key")
    op.drop_index("ix_findings_study_version", table_name="findings")
    op.drop_table("findings")
