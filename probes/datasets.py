"""Bundled contrast data and example transcripts (see probes/data/ATTRIBUTION.md)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from monitor.engine.text import compose_assistant_text
from monitor.types import ChatMessage

ExampleLabel = Literal["honest", "deceptive", "harmful_planning"]


NO_PROMPT = (ChatMessage("user", ""),)
"""The chat a text is scored after when its file gives none (chat templates need one message)."""


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class LabelledText:
    """One training text: the assistant `text` after `messages`, labelled 1 (positive) or 0."""

    id: str
    messages: tuple[ChatMessage, ...]
    text: str
    label: int
    group: str
    """Items sharing a group go to the same split (the two halves of a contrast pair)."""


@dataclass(frozen=True)
class Example:
    """A bundled example agent transcript: messages, reasoning (the CoT) and the answer."""

    id: str
    label: ExampleLabel
    split: Literal["train", "test"]
    messages: tuple[ChatMessage, ...]
    reasoning: str
    answer: str

    def assistant_text(self, prompt_opens_reasoning: bool = True) -> str:
        """The generated text as an R1-style model would write it after the prompt."""
        return compose_assistant_text(self.reasoning, self.answer, prompt_opens_reasoning)


def model_slug(model_id: str) -> str:
    """A model id as part of a file name (`org/name` -> `org_name`)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)


def data_path(name: str) -> Path:
    return Path(str(files("probes").joinpath("data", name)))


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc})") from None


def _messages(raw: Any, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in raw):
        raise DatasetError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
    return tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in raw)


def load_contrast(name: Literal["deception", "harmful"], limit_per_label: int | None = None) -> list[LabelledText]:
    """A bundled contrast set: label 1 deceptive / harmful, 0 honest / benign."""
    path = data_path(f"{name}_contrast.jsonl")
    items: list[LabelledText] = []
    counts = {0: 0, 1: 0}
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            label, text = int(row["label"]), str(row["text"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: missing or bad field {exc}") from None
        if label not in counts:
            raise DatasetError(f"{where}: field 'label' must be 0 or 1")
        if limit_per_label is not None and counts[label] >= limit_per_label:
            continue
        counts[label] += 1
        items.append(LabelledText(str(row.get("id", lineno)), _messages(row.get("messages"), where), text, label, text))
    return items


def load_examples() -> list[Example]:
    """The bundled example agent transcripts (written for this project, labelled as examples)."""
    path = data_path("examples.jsonl")
    examples = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if row.get("label") not in ("honest", "deceptive", "harmful_planning") or row.get("split") not in ("train", "test"):
            raise DatasetError(f"{where}: fields 'label' and 'split' must be a known label and train/test")
        examples.append(
            Example(
                str(row["id"]),
                row["label"],
                row["split"],
                _messages(row.get("messages"), where),
                str(row["reasoning"]),
                str(row["answer"]),
            )
        )
    return examples


def examples_as_training(examples: Sequence[Example], positive: ExampleLabel) -> list[LabelledText]:
    """Train-split examples as probe training items: `positive` vs honest, on their reasoning."""
    return [
        LabelledText(e.id, e.messages, e.reasoning, int(e.label == positive), e.id)
        for e in examples
        if e.split == "train" and e.label in (positive, "honest")
    ]


def _field(row: Mapping[str, Any], path: str, where: str) -> Any:
    """A possibly dotted field (`player.identity`) of a row."""
    if path in row:  # a flat key that contains dots (CSV headers)
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise DatasetError(f"{where}: missing field {path!r}")
        value = value[part]
    return value


def _rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(location, row) for every record of a JSONL, JSON (a list, or an object holding one) or CSV file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), 2):
                yield f"{path}:{lineno}", row
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, Mapping):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DatasetError(f"{path}: expected a JSON list of records, or an object holding exactly one list")
            data = lists[0]
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of records")
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise DatasetError(f"{path}: record {i} is not an object")
            yield f"{path}: record {i}", row
    else:  # .jsonl and anything else: one JSON object per line
        for lineno, row in _read_jsonl(path):
            if not isinstance(row, Mapping):
                raise DatasetError(f"{path}:{lineno}: not a JSON object")
            yield f"{path}:{lineno}", row


def load_labelled_file(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    positive: str | None = None,
    messages_field: str | None = "messages",
    limit: int | None = None,
) -> list[LabelledText]:
    """Any user file as labelled texts, read in place (nothing is copied).

    `text_field` is the assistant text (the CoT) to score; a row is positive when its
    `label_field` equals `positive` (compared as text), or, without `positive`, when the label is
    1/true. Dotted field names reach into nested objects. Rows with a `messages_field` list use it
    as the prompt; others are scored after an empty user message.
    """
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"{source}: dataset file not found")
    items = []
    for where, row in _rows(source):
        text = _text(row, text_field, where)
        raw_label = _field(row, label_field, where)
        if positive is not None:
            label = int(str(raw_label) == positive)
        elif str(raw_label).strip().lower() in ("1", "true", "1.0"):
            label = 1
        elif str(raw_label).strip().lower() in ("0", "false", "0.0"):
            label = 0
        else:
            raise DatasetError(
                f"{where}: field {label_field!r} is {raw_label!r}; pass --positive VALUE to say which value is positive"
            )
        raw_messages = row.get(messages_field) if messages_field else None
        messages = _messages(raw_messages, where) if raw_messages is not None else NO_PROMPT
        items.append(LabelledText(where, messages, text, label, where))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DatasetError(f"{source}: no records")
    return items


def _text(row: Mapping[str, Any], field: str, where: str) -> str:
    text = _field(row, field, where)
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: field {field!r} must be non-empty text")
    return text


def load_texts(path: str | Path, *, text_field: str = "text", limit: int | None = None) -> list[LabelledText]:
    """A file of benign texts (a calibration control set): every row is a negative."""
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"{source}: dataset file not found")
    items = []
    for where, row in _rows(source):
        items.append(LabelledText(where, NO_PROMPT, _text(row, text_field, where), 0, where))
        if limit is not None and len(items) >= limit:
            break
    return items


@dataclass(frozen=True)
class BenignPrompt:
    """A bundled benign prompt (probes/data/benign_prompts.jsonl) to calibrate thresholds on."""

    id: str
    messages: tuple[ChatMessage, ...]
    source: str
    split: Literal["train", "calibration", "heldapart"]
    """The model's text for a `train` prompt is a negative when probes train; `calibration` texts set
    thresholds; `heldapart` texts only measure them."""


def load_benign_prompts() -> list[BenignPrompt]:
    path = data_path("benign_prompts.jsonl")
    prompts = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if row.get("split") not in ("train", "calibration", "heldapart"):
            raise DatasetError(f"{where}: field 'split' must be train, calibration or heldapart")
        prompts.append(BenignPrompt(str(row["id"]), _messages(row.get("messages"), where), str(row["source"]), row["split"]))
    return prompts
