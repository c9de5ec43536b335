"""The model's own benign text: its reasoning and answers to benign prompts, for calibration.

A threshold is only as good as the negatives it is set on. The contrast sets' honest and benign
rows are instructed, short and unlike what a model writes when it works; a monitor runs on the
model's own reasoning. So thresholds are calibrated on text the served model generated itself
(on-policy) for bundled benign prompts (probes/data/benign_prompts.jsonl): generated here in
batches, with the same prompt the engine uses (the think block opened, for a prompted model), a
reasoning budget and then an answer, seeded. For the embedded model the result is bundled
(probes/data/benign_<model>.jsonl, made by probes/data/build_benign.py); for any other model it
is generated on first use and cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from monitor.engine.hf import HFEngine
from monitor.engine.text import THINK_CLOSE, compose_assistant_text
from monitor.types import ChatMessage
from probes.datasets import LabelledText, data_path, load_benign_prompts, model_slug


@dataclass(frozen=True)
class Sampling:
    """How benign text is generated; recorded with it."""

    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    reasoning_tokens: int = 128
    answer_tokens: int = 64
    batch: int = 32


@dataclass(frozen=True)
class BenignText:
    """One on-policy benign transcript: the prompt, and what the model reasoned and answered."""

    id: str
    messages: tuple[ChatMessage, ...]
    reasoning: str
    answer: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "messages": [m.to_dict() for m in self.messages]}


def generate_benign(
    engine: HFEngine,
    prompts: Sequence[tuple[str, tuple[ChatMessage, ...], str]],
    sampling: Sampling = Sampling(),
    progress: Callable[[int], None] | None = None,
) -> list[BenignText]:
    """Reasoning then an answer for each (id, messages, source), `sampling.batch` prompts at a time.

    Reasoning stops at `</think>`, at the end of the model's turn or at the budget; the think block
    is then closed (as the engine does) and the answer generated.
    """
    torch.manual_seed(sampling.seed)
    out = []
    for start in range(0, len(prompts), sampling.batch):
        batch = prompts[start : start + sampling.batch]
        heads = [engine.render_prompt(messages) for _, messages, _ in batch]
        reasoning = [_cut(t) for t in _generate(engine, heads, sampling.reasoning_tokens, sampling)]
        closed = [head + compose_assistant_text(text, "", True) for head, text in zip(heads, reasoning, strict=True)]
        answers = [t.strip() for t in _generate(engine, closed, sampling.answer_tokens, sampling)]
        for (item_id, messages, source), r, a in zip(batch, reasoning, answers, strict=True):
            out.append(BenignText(item_id, messages, r, a, source))
        if progress:
            progress(len(batch))
    return out


def _cut(text: str) -> str:
    """Reasoning without the close tag and what follows it, and without trailing whitespace."""
    return text.split(THINK_CLOSE, 1)[0].rstrip()


def _generate(engine: HFEngine, texts: list[str], max_new: int, sampling: Sampling) -> list[str]:
    """Continuations of `texts`, generated as one left-padded batch (a batch runs until its every row
    ends or reaches `max_new`, so stopping at a string early would save nothing: reasoning is cut at
    `</think>` afterwards)."""
    tokenizer, model = engine.tokenizer, engine.model
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(engine.device)
        with torch.inference_mode():
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
    finally:
        tokenizer.padding_side = side
    new = generated[:, encoded["input_ids"].shape[1] :]
    return [str(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def write_jsonl(path: Path, texts: Sequence[BenignText], model: str, revision: str) -> None:
    """The texts, one per line, each with the model id and revision that wrote it (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for text in texts:
            fh.write(json.dumps({**text.to_dict(), "model": model, "revision": revision}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[BenignText]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            messages = tuple(ChatMessage(m["role"], m["content"]) for m in row["messages"])
            texts.append(BenignText(row["id"], messages, row["reasoning"], row["answer"], row["source"]))
    return texts


def revision_of(path: Path) -> str | None:
    """The revision of the model that wrote a benign-text file (its first row's)."""
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    return str(json.loads(first).get("revision")) if first.strip() else None


SPLITS = ("train", "calibration", "heldapart")
Session = tuple[tuple[ChatMessage, ...], str]
"""A prompt and the assistant text to teacher-force after it."""


@dataclass(frozen=True)
class BenignSet:
    """Benign sessions, split: `train` are negatives for probe training, `calibration` sets
    thresholds, `heldapart` measures them."""

    calibration: list[Session]
    heldapart: list[Session]
    source: str
    """Where the texts come from (a bundled file, generated and cached, or a control file)."""
    train: list[Session] = field(default_factory=list)

    def negatives(self) -> list[LabelledText]:
        """The `train` sessions as label-0 training items (each its own group)."""
        return [LabelledText(f"benign:{i}", messages, text, 0, f"benign:{i}") for i, (messages, text) in enumerate(self.train)]


def control_set(items: Sequence[LabelledText], source: str, seed: int = 0) -> BenignSet:
    """A user's benign texts (each the assistant text after its messages), split half and half, seeded."""
    order = np.random.default_rng(seed).permutation(len(items))
    half = set(order[: len(items) // 2].tolist())
    sessions = [(it.messages, it.text) for it in items]
    return BenignSet(
        [s for i, s in enumerate(sessions) if i in half], [s for i, s in enumerate(sessions) if i not in half], source
    )


def benign_set(
    engine: HFEngine,
    cache_dir: Path,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    limit: int | None = None,
) -> BenignSet:
    """The engine's model's benign text for the bundled prompts: the bundled file for the embedded
    model when it was written by this very revision, else generated once and cached in `cache_dir`.

    `progress(description, total)` gives an advance callback for the generation; `limit` takes that
    many sessions, a third from each split, spread over the file (quick runs: fewer sessions,
    coarser thresholds); only those are generated where nothing is bundled.
    """
    prompts = load_benign_prompts()
    split = {p.id: p.split for p in prompts}
    slug = model_slug(engine.info.model_id)
    bundled = data_path(f"benign_{slug}.jsonl")
    if bundled.is_file() and revision_of(bundled) == engine.info.revision:
        path, source = bundled, f"probes/data/{bundled.name}"
    else:
        path = cache_dir / f"{slug}@{engine.info.revision}{'' if limit is None else f'-limit{limit}'}.jsonl"
        source = f"generated by {engine.info.model_id} (cached in {path})"
        if not path.is_file():
            wanted = _spread(prompts, lambda p: p.split, limit)
            advance = progress(f"generating benign reasoning with {engine.info.model_id}", len(wanted)) if progress else None
            texts = generate_benign(engine, [(p.id, p.messages, p.source) for p in wanted], progress=advance)
            write_jsonl(path, texts, engine.info.model_id, engine.info.revision)
    texts = _spread([t for t in read_jsonl(path) if t.id in split], lambda t: split[t.id], limit)

    def sessions(part: str) -> list[Session]:
        return [
            (t.messages, compose_assistant_text(t.reasoning, t.answer, engine.prompt_opens_reasoning(t.messages)))
            for t in texts
            if split[t.id] == part
        ]

    return BenignSet(sessions("calibration"), sessions("heldapart"), source, sessions("train"))


T = TypeVar("T")


def _spread(items: list[T], part_of: Callable[[T], str], limit: int | None) -> list[T]:
    """`limit` of `items`, a third from each split, evenly spread over the list (all without a limit)."""
    if limit is None or limit >= len(items):
        return items
    out = []
    for rank, part in enumerate(SPLITS):
        n = limit * (rank + 1) // len(SPLITS) - limit * rank // len(SPLITS)
        members = [item for item in items if part_of(item) == part]
        out += members[:: max(1, len(members) // max(1, n))][:n]
    return out
