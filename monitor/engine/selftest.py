"""Start-up self-test: do two engines compute the same readouts for the same text?

The vllm engine reads the residual stream through private vLLM internals (in-graph taps or
hooks); a release that moves them, a model whose layers return something else, or a wrong layer
index would make every probe score silently wrong. So before serving, the same short text is
teacher-forced through it and through the hf engine (transformers, same weights, on CPU) with
the same readouts installed, and each readout column must agree within a tolerance that allows
for bfloat16 kernels: |tested - reference| <= atol + rtol * max|reference| over the text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from monitor.engine.base import Engine
from monitor.types import ChatMessage

MESSAGES = (ChatMessage("user", "Is it safe to mix bleach and ammonia when cleaning a bathroom?"),)
TEXT = (
    "The user asks about mixing two cleaners. Bleach and ammonia react to form chloramine vapours, "
    "which are toxic.\n</think>\n\nNo. Never mix bleach and ammonia: the fumes are poisonous."
)
RTOL = 0.05
ATOL = 0.05


@dataclass(frozen=True)
class ColumnAgreement:
    """How far one readout column is from the reference over the text."""

    name: str
    max_abs_diff: float
    scale: float
    """max |reference| over the text."""
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class SelfTestReport:
    """The comparison, column by column; `problem` is set when it could not be made at all."""

    tokens: int
    columns: tuple[ColumnAgreement, ...]
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and all(c.ok for c in self.columns)

    def table(self) -> str:
        rows = [f"{'readout':<32} {'max |diff|':>11} {'max |ref|':>10} {'tolerance':>10}  ok"]
        rows += [
            f"{c.name[:32]:<32} {c.max_abs_diff:>11.4g} {c.scale:>10.4g} {c.tolerance:>10.4g}  {'yes' if c.ok else 'NO'}"
            for c in self.columns
        ]
        return "\n".join(rows)

    def message(self) -> str:
        if self.problem is not None:
            return f"readout self-test failed: {self.problem}"
        bad = [c.name for c in self.columns if not c.ok]
        return (
            f"readout self-test failed: {len(bad)} of {len(self.columns)} readouts disagree with the hf engine over "
            f"{self.tokens} tokens ({', '.join(bad[:5])}):\n{self.table()}"
        )


def compare_readouts(
    tested: Sequence[Mapping[str, float]],
    reference: Sequence[Mapping[str, float]],
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> SelfTestReport:
    """Column-by-column agreement of two engines' readouts for the same tokens."""
    if len(tested) != len(reference):
        return SelfTestReport(0, (), f"{len(tested)} tokens against the reference's {len(reference)}")
    names = sorted(reference[0]) if reference else []
    missing = [n for n in names if any(n not in row for row in tested)]
    if missing:
        return SelfTestReport(len(tested), (), f"readouts missing from the tested engine: {', '.join(missing[:5])}")
    columns = []
    for name in names:
        ref = [row[name] for row in reference]
        diff = max(abs(t[name] - r) for t, r in zip(tested, ref, strict=True))
        scale = max(abs(v) for v in ref)
        columns.append(ColumnAgreement(name, diff, scale, atol + rtol * scale))
    return SelfTestReport(len(tested), tuple(columns))


async def forced_readouts(engine: Engine, messages: Sequence[ChatMessage], text: str) -> tuple[list[int], list[dict[str, float]]]:
    """Token ids and readouts of `text` teacher-forced through `engine`."""
    ids, values = [], []
    async for step in engine.teacher_force(messages, text):
        ids.append(step.token_id)
        values.append(dict(step.readouts))
    return ids, values


async def selftest(
    tested: Engine,
    reference: Engine,
    *,
    messages: Sequence[ChatMessage] = MESSAGES,
    text: str = TEXT,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> SelfTestReport:
    """Teacher-force `text` through both engines (same readouts installed) and compare."""
    tested_ids, tested_values = await forced_readouts(tested, messages, text)
    reference_ids, reference_values = await forced_readouts(reference, messages, text)
    if tested_ids != reference_ids:
        return SelfTestReport(0, (), "the engines tokenise the text differently (not the same model or tokenizer?)")
    return compare_readouts(tested_values, reference_values, rtol=rtol, atol=atol)
