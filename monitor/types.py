"""Shared data types of cotmon: the contracts between engine, detectors, policy and sinks.

This module is a leaf: it imports nothing from the project, so every other module can use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Channel = Literal["reasoning", "answer"]
"""Which part of the generation a token belongs to: the chain of thought or the answer."""

Severity = Literal["info", "warning", "critical"]
Action = Literal["alert", "store", "halt", "hold"]
Outcome = Literal["completed", "halted", "aborted", "error", "running", "interrupted"]
"""How a session ended; `running` only in a checkpoint written while it was still going;
`interrupted`: the process died while it ran (recovered from its journal with every step it had)."""
Mode = Literal["generate", "teacher_force", "replay"]
"""Where a session's tokens came from: generated, a given text teacher-forced, or a stored session replayed."""

CHANNELS: tuple[Channel, ...] = ("reasoning", "answer")
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")
ACTIONS: tuple[Action, ...] = ("alert", "store", "halt", "hold")
OUTCOMES: tuple[Outcome, ...] = ("completed", "halted", "aborted", "error", "running", "interrupted")
STAT_SEPARATOR = ":"
"""In a thresholds mapping, `detector` is a detector's per-token threshold and `detector:mean@16` its
threshold calibrated for that statistic (`monitor.policy.calibrated_bound`)."""
MODES: tuple[Mode, ...] = ("generate", "teacher_force", "replay")
EvidenceKind = Literal["probe", "sae", "judge", "triage", "unavailable", "other"]
"""What a piece of evidence is: a probe's direction, an SAE feature, the LLM judge's verdict, the
judge's triage classifier, the judge failing to answer (`unavailable`), or anything else."""
EVIDENCE_KINDS: tuple[EvidenceKind, ...] = ("probe", "sae", "judge", "triage", "unavailable", "other")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat request."""

    role: str
    """`system`, `user`, `assistant` or `tool`."""
    content: str
    """The message text."""

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ModelInfo:
    """What detectors need to know about the model an engine runs."""

    model_id: str
    """Hub id, local path, or `tiny`."""
    revision: str
    """Commit hash or a content hash of the weights; `unknown` when neither is known."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of decoder blocks; valid readout layers are 0 .. n_layers-1."""


@dataclass(frozen=True)
class Readout:
    """One linear column the engine computes on device for every token.

    value = h @ weight + bias, where h is the residual stream after decoder block `layer`;
    with a `threshold` (JumpReLU / ReLU SAE features) values not above it become 0.
    """

    name: str
    """Unique name; the key of the value in `TraceStep.readouts`."""
    layer: int
    """Decoder block whose output is read (ARCHITECTURE.md "Layer numbering")."""
    weight: npt.NDArray[np.float32]
    """Direction, shape [d_model]."""
    bias: float = 0.0
    """Added after the dot product."""
    threshold: float | None = None
    """JumpReLU threshold applied to the value; None for a plain linear readout."""


@dataclass(frozen=True)
class DeviceReadout:
    """Several readouts computed together by a nonlinear function on the model's device.

    For what one linear column cannot express: TopK SAE features (the k-th largest
    pre-activation over all features decides), per-token input normalisation, and the top
    features of a full SAE encode kept for explanations. Only `len(names)` numbers per token
    leave the device.
    """

    names: tuple[str, ...]
    """Readout names, one per output column; keys in `TraceStep.readouts`."""
    layer: int
    """Decoder block whose output is read (ARCHITECTURE.md "Layer numbering")."""
    build: Callable[[Any], Callable[[Any], Any]]
    """Given a torch device, returns fn(hidden [..., d_model] float32) -> values [..., len(names)]."""


AnyReadout = Readout | DeviceReadout
"""What a detector may ask the engine to compute."""


@dataclass(frozen=True)
class TraceStep:
    """One generated (or teacher-forced) token with its on-device readouts."""

    session_id: str
    """Stream the step belongs to."""
    index: int
    """Position in the generated text, starting at 0."""
    token_id: int
    """Vocabulary id of the token."""
    text: str
    """Decoded text this token adds (may be empty while a multi-byte character is incomplete)."""
    channel: Channel
    """`reasoning` up to and including `</think>`, `answer` after."""
    readouts: Mapping[str, float]
    """Readout name -> value, computed on the model's device."""
    final: bool
    """True on the last step of the stream."""


@dataclass(frozen=True)
class Evidence:
    """Why a detection fired, in words a person can check."""

    label: str
    """Short description: a feature label, `probe direction`, a judge's category."""
    detail: str = ""
    """Longer text: the judge's rationale, a probe's layer and threshold."""
    quotes: tuple[str, ...] = ()
    """Spans of the CoT, each verbatim in it."""
    kind: EvidenceKind = "other"
    """What it is; the viewer and the CLI group evidence by it (never by its label)."""


def legacy_evidence_kind(label: str, detail: str) -> EvidenceKind:
    """The kind of evidence stored before evidence had one, read from the labels the built-in
    detectors gave it then."""
    if label.startswith("judge:"):
        return "judge"
    if label.startswith("triage:"):
        return "triage"
    if label == "judge unavailable":
        return "unavailable"
    if label.startswith("SAE feature") or detail.startswith("SAE feature"):
        return "sae"
    if label == "linear probe":
        return "probe"
    return "other"


@dataclass(frozen=True)
class Detection:
    """A detector's score for a span of tokens."""

    detector: str
    """Name of the detector instance (DetectorSpec.name)."""
    category: str
    """What is detected: `deception`, `harmful_planning`, ... (open set)."""
    score: float
    """Calibrated score in [0, 1]."""
    start: int
    """First token index of the span."""
    end: int
    """One past the last token index of the span."""
    evidence: tuple[Evidence, ...] = ()
    """Optional explanation."""


def max_scores(detections: Sequence[Detection]) -> dict[str, float]:
    """Highest score per detector."""
    best: dict[str, float] = {}
    for det in detections:
        if det.score > best.get(det.detector, -1.0):
            best[det.detector] = det.score
    return best


@dataclass(frozen=True)
class Flag:
    """A policy rule that fired in a session."""

    rule: str
    """Rule name from the policy."""
    category: str
    """Rule category."""
    severity: Severity
    """info | warning | critical."""
    actions: tuple[Action, ...]
    """What the pipeline does about it."""
    index: int
    """Token index at which the rule fired."""
    reason: str
    """The conditions that held, with their values, e.g. `deception_probe max@32=0.97 >= 0.9`."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "category": self.category,
            "severity": self.severity,
            "actions": list(self.actions),
            "index": self.index,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class DetectorSpec:
    """How to build one detector: a registered kind, an instance name and its arguments.

    Round-trips through YAML/JSON so that a stored transcript can rebuild its exact pipeline.
    """

    kind: str
    """Registered detector kind, e.g. `linear_probe`."""
    name: str
    """Instance name; policies refer to detectors by it."""
    args: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific arguments (artifact path, category, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "args": dict(self.args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorSpec:
        return cls(kind=str(data["kind"]), name=str(data["name"]), args=dict(data.get("args") or {}))


@dataclass(frozen=True)
class GenerationRequest:
    """What an engine is asked to generate."""

    messages: Sequence[ChatMessage]
    """The chat so far; the engine applies the model's chat template."""
    max_tokens: int = 256
    """Upper bound on generated tokens (reasoning and answer together)."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 disables it."""
    seed: int | None = None
    """Seed for sampling; None draws one."""
    max_reasoning_tokens: int | None = None
    """Reasoning budget: when reached, the engine closes the reasoning with `</think>`."""
    session_id: str = ""
    """Stream id; the pipeline fills it in when empty."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks decode a fixed count)."""


@dataclass(frozen=True)
class Transcript:
    """Everything a session produced, as handed to sinks."""

    session_id: str
    model: ModelInfo
    messages: tuple[ChatMessage, ...]
    steps: tuple[TraceStep, ...]
    detections: tuple[Detection, ...]
    flags: tuple[Flag, ...]
    outcome: Outcome
    detector_specs: tuple[DetectorSpec, ...]
    policy: Mapping[str, Any]
    """The validated policy as plain data."""
    started_at: float
    """Unix time of the first token request."""
    ended_at: float
    error: str | None = None
    mode: Mode = "generate"
    """How the tokens were produced; a replay forces them the same way."""
    request: Mapping[str, Any] = field(default_factory=dict)
    """Generation parameters (max_tokens, temperature, top_p, seed, ...) when generated."""
    thresholds: Mapping[str, float | None] = field(default_factory=dict)
    """Each detector's calibrated threshold when the session ran (what `calibrated` bounds meant)."""
    evaluations: tuple[tuple[int, int], ...] = ()
    """The policy's evaluations in order: (token index, number of `detections` seen by then).

    Re-running a policy over the stored detections in these steps gives exactly the flags it
    would have raised live (`cotmon replay --all`).
    """

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def reasoning(self) -> str:
        return "".join(s.text for s in self.steps if s.channel == "reasoning")

    @property
    def answer(self) -> str:
        return "".join(s.text for s in self.steps if s.channel == "answer")

    @property
    def halted(self) -> bool:
        return self.outcome == "halted"
