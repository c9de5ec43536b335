"""Token ids to text deltas and channels, independent of any model."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from monitor.engine.text import ChannelTracker, IncrementalDecoder, opens_reasoning


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with all 256 bytes and no merges: multi-byte characters span several tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)  # type: ignore[no-untyped-call]


def test_incremental_decoding_holds_back_incomplete_characters() -> None:
    tokenizer = _byte_level_tokenizer()
    text = "naïve café — 日本語 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # some characters take several tokens
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a token that only starts a character adds no text yet


def _channels(tracker: ChannelTracker, deltas: list[str]) -> list[str]:
    return [tracker.push(d) for d in deltas]


def test_reasoning_ends_with_the_token_that_completes_think_close() -> None:
    deltas = ["I will", " hide it.", "</", "think", ">", "\n\n", "All good."]
    assert _channels(ChannelTracker(True), deltas) == ["reasoning"] * 5 + ["answer"] * 2


def test_a_stream_outside_a_think_block_enters_one_only_at_its_start() -> None:
    assert _channels(ChannelTracker(False), ["<think>", "plan", "</think>", "answer"]) == [
        "reasoning",
        "reasoning",
        "reasoning",
        "answer",
    ]
    assert _channels(ChannelTracker(False), ["Sure.", " <think>", "x"]) == ["answer"] * 3


def test_reasoning_tokens_are_counted_for_the_budget() -> None:
    tracker = ChannelTracker(True)
    _channels(tracker, ["a", "b", "</think>", "c"])
    assert tracker.reasoning_tokens == 3


def test_a_prompt_opens_reasoning_when_its_last_think_tag_is_open() -> None:
    assert opens_reasoning("<|Assistant|><think>\n")
    assert not opens_reasoning("<think>x</think> answer")
    assert not opens_reasoning("no tags at all")
