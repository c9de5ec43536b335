"""Control tokens of the common chat templates, by family: what the judge's neutraliser defuses.

A CoT that contains a judge model's own turn markers (``<|im_start|>system``, ``[INST]``,
``<start_of_turn>``) can open a fake system or assistant turn inside the data block: the judge's
tokenizer may read the text as the real special token. `neutralise` (detectors.judge.prompts)
rewrites every token listed here, in any case, to `inert`'s spelling; covering a new template is
one more row of data, and the tests are parametrised over the table.
"""

from __future__ import annotations

CHAT_TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "qwen": ("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    "llama2": ("<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    "llama3": (
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
        "<|eom_id|>", "<|python_tag|>",
    ),
    "mistral": (
        "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]",
        "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[THINK]", "[/THINK]",
    ),
    "gemma": ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
    "deepseek": (  # fullwidth bars (U+FF5C) and U+2581 for the spaces, as in DeepSeek's tokenizer
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
        "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
        "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    ),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
}  # fmt: skip
"""Family -> its control tokens, spelled exactly as the template writes them."""

_BRACKETS = "<>[]|｜"


def inert(token: str) -> str:
    """The neutralised spelling of a control token: its name between single guillemets.

    ``<|im_start|>`` -> ``‹im_start›``, ``[/INST]`` -> ``‹/INST›``, ``<<SYS>>`` -> ``‹SYS›``: still
    readable to the judge, visibly not the token, and, having no ASCII bracket or bar, no
    family's token either.
    """
    return f"‹{token.strip(_BRACKETS)}›"
