"""NPO tables: guidance caches and entries, the mistake pool, interventions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-10

Frozen copy of the models at this revision (migrations must not import the live models).
Every table has a unique key that the MetadataDB upserts on, so writes are idempotent.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _unit_interval(column: str) -> str:
    return f"{column} >= 0 AND {column} <= 1"


def upgrade() -> None:
    op.create_table(
        "guidance_caches",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("guide_run_id", sa.String(128), nullable=False),
        sa.Column("guide_step", sa.Integer(), nullable=False),
        sa.Column("policy_step", sa.Integer(), nullable=False),
        sa.Column("prompts_total", sa.Integer(), nullable=False),
        sa.Column("prompts_attempted", sa.Integer(), nullable=False),
        sa.Column("prompts_solved", sa.Integer(), nullable=False),
        sa.Column("tries_per_prompt", sa.Integer(), nullable=False),
        sa.Column("q_hat", sa.Double(), nullable=False),
        sa.Column("guide_accuracy", sa.Double(), nullable=True),
        sa.Column("current_accuracy", sa.Double(), nullable=True),
        sa.Column("sampled_tokens", sa.BigInteger(), nullable=False),
        sa.Column("payload_uri", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guidance_caches")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_guidance_caches_run_id_runs"), ondelete="CASCADE"
        ),
        sa.CheckConstraint(_unit_interval("q_hat"), name=op.f("ck_guidance_caches_q_hat")),
        sa.CheckConstraint(
            _unit_interval("guide_accuracy"), name=op.f("ck_guidance_caches_guide_accuracy")
        ),
        sa.CheckConstraint(
            _unit_interval("current_accuracy"), name=op.f("ck_guidance_caches_current_accuracy")
        ),
    )
    op.create_index(op.f("ix_guidance_caches_run_id"), "guidance_caches", ["run_id"])
    op.create_table(
        "guidance_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cache_id", sa.String(128), nullable=False),
        sa.Column("prompt_id", sa.String(256), nullable=False),
        sa.Column("reward", sa.Double(), nullable=False),
        sa.Column("response_tokens", sa.Integer(), nullable=False),
        sa.Column("guide_logprob_sum", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guidance_entries")),
        sa.ForeignKeyConstraint(
            ["cache_id"],
            ["guidance_caches.id"],
            name=op.f("fk_guidance_entries_cache_id_guidance_caches"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "cache_id", "prompt_id", name=op.f("uq_guidance_entries_cache_id_prompt_id")
        ),
    )
    op.create_table(
        "mistake_pool",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("prompt_id", sa.String(256), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("pass_rate", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mistake_pool")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_mistake_pool_run_id_runs"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint(
            "run_id", "step", "prompt_id", name=op.f("uq_mistake_pool_run_id_step_prompt_id")
        ),
        sa.CheckConstraint(_unit_interval("pass_rate"), name=op.f("ck_mistake_pool_pass_rate")),
    )
    op.create_table(
        "interventions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("at_step", sa.Integer(), nullable=False),
        sa.Column("delta", sa.Integer(), nullable=False),
        sa.Column("rollback_to", sa.Integer(), nullable=False),
        sa.Column("guide_step", sa.Integer(), nullable=False),
        sa.Column("signals", sa.JSON(), nullable=False),
        sa.Column("s_table", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_interventions")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_interventions_run_id_runs"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint(
            "run_id", "kind", "at_step", name=op.f("uq_interventions_run_id_kind_at_step")
        ),
        sa.CheckConstraint(
            "kind IN ('early', 'late', 'rolling', 'auto')", name=op.f("ck_interventions_kind")
        ),
    )


def downgrade() -> None:
    op.drop_table("interventions")
    op.drop_table("mistake_pool")
    op.drop_table("guidance_entries")
    op.drop_index(op.f("ix_guidance_caches_run_id"), table_name="guidance_caches")
    op.drop_table("guidance_caches")
