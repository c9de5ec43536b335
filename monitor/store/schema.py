"""The store's tables (SQLAlchemy Core). Alembic migrations in `migrations/` create and evolve them.

`sessions` holds one row per session with what lists and filters need; `flags` one row per
fired rule (filters by rule and category); `session_data` the per-token payload as packed blobs
(`monitor.store.packed`), read only when a whole transcript (or, for a policy-only replay, its
detections) is wanted.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(128), primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("stored_at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("model_id", String(512), nullable=False),
    Column("model_revision", String(256), nullable=False),
    Column("model", JSON, nullable=False),
    Column("flagged", Boolean, nullable=False),
    Column("severity", String(16), nullable=True),
    Column("n_tokens", Integer, nullable=False),
    Column("n_reasoning", Integer, nullable=False),
    Column("preview", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("policy_name", String(256), nullable=False),
    Column("max_scores", JSON, nullable=False),
    Column("messages", JSON, nullable=False),
    Column("request", JSON, nullable=False),
    Column("policy", JSON, nullable=False),
    Column("detector_specs", JSON, nullable=False),
    Column("thresholds", JSON, nullable=False),
    Column("label", String(128), nullable=True),
    Index("ix_sessions_started_at", "started_at"),
    Index("ix_sessions_flagged_started_at", "flagged", "started_at"),
    Index("ix_sessions_label", "label"),
)

flags = Table(
    "flags",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(128), ForeignKey("sessions.session_id", ondelete="CASCADE"), nullable=False),
    Column("rule", String(256), nullable=False),
    Column("category", String(128), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("actions", JSON, nullable=False),
    Column("token_index", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Index("ix_flags_session_id", "session_id"),
    Index("ix_flags_rule", "rule"),
    Index("ix_flags_category", "category"),
)

session_data = Table(
    "session_data",
    metadata,
    Column("session_id", String(128), ForeignKey("sessions.session_id", ondelete="CASCADE"), primary_key=True),
    Column("steps", LargeBinary, nullable=False),
    Column("readouts", LargeBinary, nullable=False),
    Column("detections", LargeBinary, nullable=False),
)
