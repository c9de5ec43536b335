"""Text overlap with held-out data: does a bundled row repeat anything a detector is evaluated on?

The held-out data (`../shared/holdout` in the development workspace) exists to measure detectors
honestly, so no training, calibration or triage row may repeat it. A row *repeats* held-out text
when, after normalising (lower case, punctuation and whitespace runs to one space), one of its texts
equals a held-out text, or shares a run of `SHINGLE` words with one. The data builders drop such rows
(`HeldOutIndex.find`), and a test checks every bundled row the same way.

Standard library only: the builders import it without the model stack.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

SHINGLE = 8
"""Words in a run that two texts may not share."""
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".gz")
NOT_TEXT_KEYS = frozenset({"id", "label", "source", "category", "role", "split"})
"""Row fields that carry labels and provenance, not text (a held-out "user" is no repeat)."""
RowT = TypeVar("RowT", bound=Mapping[str, object])
_WORDS = re.compile(r"[a-z0-9]+")
_NON_SPACE = re.compile(r"\S")


def words(text: str) -> list[str]:
    """The normalised words of `text`: lower case, anything but letters and digits a separator."""
    return _WORDS.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def shingles(tokens: list[str], size: int = SHINGLE) -> Iterator[str]:
    for start in range(len(tokens) - size + 1):
        yield " ".join(tokens[start : start + size])


def strings(value: object) -> Iterator[str]:
    """Every string in a JSON value, depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def row_texts(row: Mapping[str, object]) -> Iterator[str]:
    """The texts of a bundled row: every string value (messages included) but labels and provenance."""
    for key, value in row.items():
        if key not in NOT_TEXT_KEYS:
            if isinstance(value, list):  # chat messages: their content, not their role
                for item in value:
                    yield from row_texts(item) if isinstance(item, dict) else strings(item)
            else:
                yield from strings(value)


def file_texts(path: Path) -> Iterator[str]:
    """Every string of a JSON, JSONL (concatenated values too; gzipped too) or CSV file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        raw = fh.read()
    if path.suffix == ".csv" or path.name.endswith(".csv.gz"):
        for record in csv.reader(io.StringIO(raw)):
            yield from record
        return
    decoder, index = json.JSONDecoder(), 0
    while match := _NON_SPACE.search(raw, index):
        value, index = decoder.raw_decode(raw, match.start())
        yield from strings(value)


@dataclass(frozen=True)
class Repeat:
    """Why a text counts as a repeat of held-out text."""

    text: str
    """The row's text that repeats."""
    shared: str
    """The normalised held-out text it equals, or the word run it shares."""

    def __str__(self) -> str:
        return f"shares {self.shared!r}"


@dataclass
class HeldOutIndex:
    """The normalised texts and word runs of a held-out folder, to look bundled rows up in."""

    texts: set[str] = field(default_factory=set)
    runs: set[str] = field(default_factory=set)
    files: int = 0

    @classmethod
    def of_folder(cls, root: Path) -> HeldOutIndex:
        """Index every data file under `root` (.json, .jsonl, .csv, gzipped or not; docs are skipped)."""
        if not root.is_dir():
            raise FileNotFoundError(f"held-out data folder not found: {root}")
        index = cls()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES):
            index.add(file_texts(path))
            index.files += 1
        return index

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            tokens = words(text)
            if tokens:
                self.texts.add(" ".join(tokens))
                self.runs.update(shingles(tokens))

    def find(self, texts: Iterable[str]) -> Repeat | None:
        """The first of `texts` that repeats held-out text, or None."""
        for text in texts:
            tokens = words(text)
            if not tokens:
                continue
            whole = " ".join(tokens)
            if whole in self.texts:
                return Repeat(text, whole)
            for run in shingles(tokens):
                if run in self.runs:
                    return Repeat(text, run)
        return None

    def find_in_row(self, row: Mapping[str, object]) -> Repeat | None:
        return self.find(row_texts(row))

    def without_repeats(self, rows: Iterable[RowT], dropped: Counter[str]) -> Iterator[RowT]:
        """`rows` less those that repeat held-out text; `dropped` counts those per row["source"]."""
        for row in rows:
            if self.find_in_row(row) is None:
                yield row
            else:
                dropped[str(row.get("source", "?"))] += 1
