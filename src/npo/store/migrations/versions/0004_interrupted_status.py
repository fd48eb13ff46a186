"""Run status `interrupted`: a run stopped by Ctrl-C or SIGTERM is not a failed one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

Only the CHECK constraint on ``runs.status`` changes. PostgreSQL swaps it in place; SQLite
cannot alter a constraint, so batch mode rebuilds ``runs``: ``MetadataDB.migrate`` runs
SQLite migrations with foreign keys off (SQLite's own procedure for such changes), else
dropping the old table would cascade-delete every row that references it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = "status IN ('created', 'running', 'completed', 'failed')"
_AFTER = "status IN ('created', 'running', 'completed', 'failed', 'interrupted')"


def _set_check(condition: str) -> None:
    with op.batch_alter_table("runs", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), condition)


def upgrade() -> None:
    _set_check(_AFTER)


def downgrade() -> None:
    op.execute("UPDATE runs SET status = 'failed' WHERE status = 'interrupted'")
    _set_check(_BEFORE)
