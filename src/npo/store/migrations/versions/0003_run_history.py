"""Run history and run info in the DB: pods of a cluster share no disk.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

- ``metric_rows``: one row per logged global step of a run (its metrics as JSON), unique
  per (run_id, step); what a run folder's metrics.jsonl used to hold.
- ``runs.mlflow_run_id``, ``runs.started_at``: what a run folder's run.json used to hold.

Frozen copy of the models at this revision (migrations must not import the live models).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "metric_rows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("policy_step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_rows")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_metric_rows_run_id_runs"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("run_id", "step", name=op.f("uq_metric_rows_run_id_step")),
    )
    # Plain ADD COLUMN (nullable, no default) works in place on SQLite too; batch mode would
    # recreate `runs`, and dropping it would cascade-delete every row that references it.
    op.add_column("runs", sa.Column("mlflow_run_id", sa.String(64), nullable=True))
    op.add_column("runs", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "started_at")  # SQLite >= 3.35 drops columns in place
    op.drop_column("runs", "mlflow_run_id")
    op.drop_table("metric_rows")
