"""Transcripts that outlive the process: SQLite by default, PostgreSQL at scale (`COTMON_STORE_URL`)."""

from monitor.store.codec import TranscriptFormatError, transcript_from_dict, transcript_to_dict
from monitor.store.query import SessionQuery, SessionSummary, parse_time
from monitor.store.store import RETENTIONS, Retention, StoreError, TranscriptStore

__all__ = [
    "RETENTIONS",
    "Retention",
    "SessionQuery",
    "SessionSummary",
    "StoreError",
    "TranscriptFormatError",
    "TranscriptStore",
    "parse_time",
    "transcript_from_dict",
    "transcript_to_dict",
]
