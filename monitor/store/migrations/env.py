"""Alembic environment: migrations run on the connection `monitor.store.migrate` hands over.

To add a revision after changing `monitor/store/schema.py`, write it next to 0001 (script.py.mako
is the template); tests/monitor/store compare a freshly migrated database with the schema.
"""

from __future__ import annotations

from alembic import context

from monitor.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
