"""Sessions get `label`: the caller's own name for a watch-mode transcript (session ids are the server's).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("label", sa.String(128), nullable=True))
    op.create_index("ix_sessions_label", "sessions", ["label"])


def downgrade() -> None:
    op.drop_index("ix_sessions_label", "sessions")
    op.drop_column("sessions", "label")
