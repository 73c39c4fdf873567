"""clusterings and cluster_members: the results of `cluster` jobs

Revision ID: 0004_clusterings
Revises: 0003_index_recall
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_clusterings"
down_revision = "0003_index_recall"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clusterings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "gallery_id",
            sa.Integer(),
            sa.ForeignKey("galleries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("silhouette", sa.Float(), nullable=True),
        sa.Column("k_scores", sa.JSON(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_clusterings_gallery_id", "clusterings", ["gallery_id"])
    op.create_table(
        "cluster_members",
        sa.Column(
            "clustering_id",
            sa.Integer(),
            sa.ForeignKey("clusterings.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "image_id",
            sa.Integer(),
            sa.ForeignKey("images.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("cluster", sa.Integer(), nullable=False),
        sa.Column("centre_score", sa.Float(), nullable=False),
    )
    op.create_index("ix_cluster_members_cluster", "cluster_members", ["clustering_id", "cluster"])
    op.create_index("ix_cluster_members_image_id", "cluster_members", ["image_id"])


def downgrade() -> None:
    op.drop_table("cluster_members")
    op.drop_table("clusterings")
