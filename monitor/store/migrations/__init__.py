"""Alembic migrations of the transcript store; `monitor.store.migrate` runs them."""
