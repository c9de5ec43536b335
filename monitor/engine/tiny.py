"""The tiny model: a small Qwen2-style causal LM and tokenizer built entirely in code.

Same seed -> the same weights and the same greedy output on any machine, with no file to
download. It exercises the real code paths (transformers model, chat template, hooks,
save_pretrained / from_pretrained) so tests and the demo run on a real model. Its weights are
random: it tests the plumbing, not the detection of deception.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from monitor.engine.text import THINK_CLOSE, THINK_OPEN

TINY_ID = "tiny"
EOS = "<|eos|>"

# R1-style: the generation prompt opens the reasoning block, the model closes it with </think>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)

# Printable ASCII, newline and tab, spelled as byte-level BPE symbols (GPT-2's byte-to-unicode
# map: space -> U+0120, newline -> U+010A, tab -> U+0109) so that loading the saved tokenizer
# through Qwen2's own byte-level pipeline encodes exactly as the one built here.
_BYTES = [*range(32, 127), 10, 9]


def _byte_symbol(b: int) -> str:
    return chr(b) if 33 <= b <= 126 else chr(256 + b)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer over printable ASCII with no merges, plus R1-style think tags.

    One token per character; non-ASCII characters become `<unk>` (or are dropped once the
    saved tokenizer is loaded back as a Qwen2 tokenizer): the tiny model speaks ASCII only.
    `<think>`/`</think>` are ordinary added
    tokens (not special), as in DeepSeek-R1's tokenizer, so they survive skip_special_tokens.
    """
    vocab = {"<unk>": 0}
    for b in _BYTES:
        vocab[_byte_symbol(b)] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="<unk>", eos_token=EOS, pad_token="<|pad|>"
    )
    tokenizer.add_tokens([THINK_OPEN, THINK_CLOSE])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, **overrides: int) -> Qwen2Config:
    """Qwen2 architecture at toy size; `overrides` set e.g. hidden_size for benchmark models."""
    fields: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    fields.update(overrides)
    return Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, rms_norm_eps=1e-6, **fields)


def build_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    """A Qwen2 model whose every weight is drawn from a seeded generator, parameter by parameter.

    Not relying on transformers' own initialisation keeps the weights identical across
    transformers versions.
    """
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)  # derived buffers (rotary frequencies) come from here
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                std = 0.1 if "embed_tokens" in name else param.shape[-1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def build_tiny(seed: int = 0) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """The tiny model and its tokenizer for `seed`."""
    tokenizer = build_tiny_tokenizer()
    model = build_model(tiny_config(len(tokenizer)), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def weights_digest(model: torch.nn.Module) -> str:
    """A short content hash of the weights: the tiny model's `revision`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
