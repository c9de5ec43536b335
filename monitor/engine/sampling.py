"""Choosing the next token from a step's logits, per request (the hf engine's sampler)."""

from __future__ import annotations

import torch

from monitor.types import GenerationRequest


class Sampler:
    """Greedy at temperature 0; otherwise temperature + nucleus sampling from a seeded generator."""

    def __init__(self, request: GenerationRequest, device: torch.device):
        self.temperature = request.temperature
        self.top_p = request.top_p
        self.generator = torch.Generator(device="cpu")
        if request.seed is not None:
            self.generator.manual_seed(request.seed % 2**64)  # any int; torch takes 64 bits
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        # Shift by the max before dividing: a tiny temperature then tends to greedy instead of overflowing.
        shifted = logits.detach().double().cpu()
        probs = torch.softmax((shifted - shifted.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.top_p
            keep[0] = True  # the most likely token always stays, however small top_p is
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
