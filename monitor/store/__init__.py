"""Transcripts that outlive the process: SQLite by default, PostgreSQL at scale (`COTMON_STORE_URL`)."""

from monitor.store.codec import TranscriptFormatError, transcript_from_dict, transcript_to_dict
from monitor.store.query import QueryError, SessionQuery, SessionSummary, parse_query, parse_time
from monitor.store.store import RETENTIONS, Retention, StoreError, TranscriptStore

__all__ = [
    "RETENTIONS",
    "QueryError",
    "Retention",
    "SessionQuery",
    "SessionSummary",
    "StoreError",
    "TranscriptFormatError",
    "TranscriptStore",
    "parse_query",
    "parse_time",
    "transcript_from_dict",
    "transcript_to_dict",
]
