"""Raw residual-stream activations of teacher-forced texts: what probe training reads.

`capture_many` reads several texts per forward (`TextBatch`) and stops after the highest wanted
layer; `capture` is one plain full forward, the reference it is checked against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from monitor.engine.forcing import TextBatch
from monitor.engine.readout import ActivationCapture, CaptureDone
from monitor.types import ChatMessage

if TYPE_CHECKING:
    from monitor.engine.hf import HFEngine


def capture_many(
    engine: HFEngine, items: Sequence[tuple[Sequence[ChatMessage], str]], layers: Sequence[int]
) -> list[dict[int, torch.Tensor]]:
    """`capture` for several (messages, assistant text) at once: one forward for all of them.

    The prompts' common start is computed once and its KV cache repeated over the batch; the
    rest of each sequence is right-padded, which no real token attends to (attention is causal),
    so each text's activations are its own (equal to `capture`'s to float rounding).
    """
    if not items:
        return []
    prompts = [engine.encode(engine.render_prompt(messages)) for messages, _ in items]
    batch = TextBatch.of(prompts, [engine.encode(text) for _, text in items], engine.pad_id, engine.device)

    def forward(ids: torch.Tensor, cache: DynamicCache) -> None:
        with contextlib.suppress(CaptureDone):
            engine.run_model(ids, cache)

    # Both forwards stop after the highest wanted layer (CaptureDone): nothing above it is needed,
    # not even in the prefix's KV cache, since the batch's forward stops there too.
    with ActivationCapture(engine.blocks, layers, stop=True) as cap, engine.lock, torch.inference_mode():
        batch.run(forward)
    per_layer = {layer: batch.texts_of(acts) for layer, acts in cap.activations.items()}
    return [{layer: texts[i] for layer, texts in per_layer.items()} for i in range(len(items))]


def capture(
    engine: HFEngine, messages: Sequence[ChatMessage], assistant_text: str, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Raw residual-stream activations [tokens, d_model] of `assistant_text`'s tokens per layer:
    one plain forward, the reference `capture_many` (what training uses) is checked against."""
    prompt_ids = engine.encode(engine.render_prompt(messages))
    text_ids = engine.encode(assistant_text)
    with ActivationCapture(engine.blocks, layers) as cap, engine.lock, torch.inference_mode():
        engine.model(input_ids=torch.tensor([prompt_ids + text_ids], device=engine.device), use_cache=False, logits_to_keep=1)
    return {layer: acts[0, len(prompt_ids) :] for layer, acts in cap.activations.items()}
