"""The first schema: sessions, flags, session_data.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(128), primary_key=True),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Column("stored_at", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("model_id", sa.String(512), nullable=False),
        sa.Column("model_revision", sa.String(256), nullable=False),
        sa.Column("model", sa.JSON, nullable=False),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("severity", sa.String(16), nullable=True),
        sa.Column("n_tokens", sa.Integer, nullable=False),
        sa.Column("n_reasoning", sa.Integer, nullable=False),
        sa.Column("preview", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("policy_name", sa.String(256), nullable=False),
        sa.Column("max_scores", sa.JSON, nullable=False),
        sa.Column("messages", sa.JSON, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("detector_specs", sa.JSON, nullable=False),
        sa.Column("thresholds", sa.JSON, nullable=False),
    )
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"])
    op.create_index("ix_sessions_flagged_started_at", "sessions", ["flagged", "started_at"])
    op.create_table(
        "flags",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(128), sa.ForeignKey("sessions.session_id", ondelete="CASCADE"), nullable=False),
        sa.Column("rule", sa.String(256), nullable=False),
        sa.Column("category", sa.String(128), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("actions", sa.JSON, nullable=False),
        sa.Column("token_index", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_flags_session_id", "flags", ["session_id"])
    op.create_index("ix_flags_rule", "flags", ["rule"])
    op.create_index("ix_flags_category", "flags", ["category"])
    op.create_table(
        "session_data",
        sa.Column("session_id", sa.String(128), sa.ForeignKey("sessions.session_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("steps", sa.LargeBinary, nullable=False),
        sa.Column("readouts", sa.LargeBinary, nullable=False),
        sa.Column("detections", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("session_data")
    op.drop_table("flags")
    op.drop_table("sessions")
