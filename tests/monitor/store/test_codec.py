"""Transcripts as plain data (`transcript_to_dict` / `transcript_from_dict`) and as packed blobs."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from monitor.store import TranscriptFormatError, transcript_from_dict, transcript_to_dict
from monitor.store.columns import detection_columns
from monitor.store.packed import pack, unpack
from monitor.types import Detection, Evidence, Transcript

Edit = Callable[[dict[str, Any]], None]


def as_json(t: Transcript) -> dict[str, Any]:
    """What `cotmon transcripts export` writes and `cotmon replay FILE` reads back."""
    data: dict[str, Any] = json.loads(json.dumps(transcript_to_dict(t)))
    return data


def test_json_round_trip_is_exact(transcript: Transcript) -> None:
    assert transcript_from_dict(as_json(transcript)) == transcript


def test_dict_round_trip_without_json_is_exact(transcript: Transcript) -> None:
    assert transcript_from_dict(transcript_to_dict(transcript)) == transcript


def test_halted_session_keeps_which_step_was_final(run_session: Callable[..., Transcript]) -> None:
    halt = {"name": "halt", "category": "harmful_planning", "severity": "critical", "when": {"detector": "q", "gte": 0.9}}
    t = run_session(rules=[{**halt, "actions": ["alert", "halt"]}])
    assert t.outcome == "halted" and not any(s.final for s in t.steps)
    assert transcript_from_dict(as_json(t)) == t


def test_empty_session_round_trips(transcript: Transcript) -> None:
    t = dataclasses.replace(transcript, steps=(), detections=(), flags=(), evaluations=(), outcome="error", error="boom")
    assert transcript_from_dict(as_json(t)) == t


def _delete_steps(d: dict[str, Any]) -> None:
    del d["steps"]


def _bad_channel(d: dict[str, Any]) -> None:
    d["steps"][0]["channel"] = "thinking"


def _string_readout(d: dict[str, Any]) -> None:
    d["steps"][2]["readouts"]["s"] = "0.5"


def _unknown_severity(d: dict[str, Any]) -> None:
    d["flags"][1]["severity"] = "urgent"


def _unknown_action(d: dict[str, Any]) -> None:
    d["flags"][0]["actions"] = ["alert", "explode"]


def _bad_evaluation(d: dict[str, Any]) -> None:
    d["evaluations"][3] = [3]


def _score_as_text(d: dict[str, Any]) -> None:
    d["detections"][4]["score"] = "high"


def _unknown_evidence_kind(d: dict[str, Any]) -> None:
    with_evidence = next(det for det in d["detections"] if det.get("evidence"))
    with_evidence["evidence"][0]["kind"] = "hunch"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_delete_steps, "transcript.steps: missing"),
        (_bad_channel, "transcript.steps[0].channel: 'thinking' is not one of reasoning, answer"),
        (_string_readout, "transcript.steps[2].readouts.s: expected a number"),
        (_unknown_severity, "transcript.flags[1].severity: 'urgent' is not one of info, warning, critical"),
        (_unknown_action, "transcript.flags[0].actions: each must be one of"),
        (_bad_evaluation, "transcript.evaluations[3]: expected [token index, detections seen]"),
        (_score_as_text, "transcript.detections[4].score: expected float, got str"),
        (_unknown_evidence_kind, "evidence[0].kind: 'hunch' is not one of probe, sae, judge, triage, unavailable, other"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_malformed_transcript_error_names_the_field(transcript: Transcript, edit: Edit, message: str) -> None:
    data = copy.deepcopy(as_json(transcript))
    edit(data)
    with pytest.raises(TranscriptFormatError, match=re.escape(message)):
        transcript_from_dict(data)


def test_not_an_object_is_a_format_error() -> None:
    with pytest.raises(TranscriptFormatError, match=r"^transcript: expected an object$"):
        transcript_from_dict([1, 2])


def test_pack_round_trips_arrays_and_metadata() -> None:
    arrays = {
        "f64": np.array([[np.pi, -0.0], [1e-310, np.inf]]),
        "i64": np.arange(5, dtype=np.int64),
        "u8": np.zeros(0, np.uint8),
    }
    unpacked, meta = unpack(pack(arrays, {"text": ["naïve", "🙂"]}))
    assert meta == {"text": ["naïve", "🙂"]}
    assert unpacked.keys() == arrays.keys()
    for name, array in arrays.items():
        assert unpacked[name].dtype == array.dtype and unpacked[name].shape == array.shape
        assert unpacked[name].tobytes() == array.tobytes()


def test_pack_round_trips_a_scalar_array() -> None:
    unpacked, _ = unpack(pack({"scalar": np.array(7, np.int32)}))
    assert unpacked["scalar"].shape == ()


def test_unpack_rejects_a_blob_without_the_header() -> None:
    with pytest.raises(TranscriptFormatError, match="no CTM1 header"):
        unpack(zlib.compress(b"JUNK" + b"\0" * 16))


# Evidence stored before it had a kind: the labels the built-in detectors gave it then, and their kinds.
LEGACY_EVIDENCE = [
    ({"label": "judge: deception", "detail": "Plans to lie.", "quotes": ["I will lie"]}, "judge"),
    ({"label": "triage: deception", "detail": "triage only (tfidf text classifier)", "quotes": []}, "triage"),
    ({"label": "judge unavailable", "detail": "LLM judge failed: timeout", "quotes": []}, "unavailable"),
    ({"label": "secrecy", "detail": "SAE feature 6 activation 0.7 >= 0.5", "quotes": ["hide"]}, "sae"),
    ({"label": "SAE feature 12: secrecy", "detail": "sae top feature over tokens 0..5", "quotes": []}, "sae"),
    ({"label": "linear probe", "detail": "layer 2, threshold 0.500 at 1% FPR", "quotes": []}, "probe"),
    ({"label": "s direction", "detail": "tokens 0..3", "quotes": []}, "other"),
]


def test_json_evidence_without_a_kind_gets_the_kind_its_label_gave_it(transcript: Transcript) -> None:
    data = copy.deepcopy(as_json(transcript))
    data["detections"][0]["evidence"] = [stored for stored, _ in LEGACY_EVIDENCE]
    loaded = transcript_from_dict(data).detections[0].evidence
    assert [e.kind for e in loaded] == [kind for _, kind in LEGACY_EVIDENCE]
    assert [e.label for e in loaded] == [stored["label"] for stored, _ in LEGACY_EVIDENCE]


def test_packed_evidence_without_a_kind_gets_the_kind_its_label_gave_it() -> None:
    evidence = tuple(Evidence(stored["label"], stored["detail"], tuple(stored["quotes"])) for stored, _ in LEGACY_EVIDENCE)
    columns = detection_columns([Detection("p", "deception", 0.9, 0, 1, evidence)], [(0, 1)])
    groups = json.loads(columns.evidence_json)
    old = dataclasses.replace(
        columns, evidence_json=json.dumps([[{k: v for k, v in e.items() if k != "kind"} for e in g] for g in groups]).encode()
    )
    assert [e.kind for e in old.detections()[0].evidence] == [kind for _, kind in LEGACY_EVIDENCE]


def test_an_explicit_evidence_kind_round_trips_whatever_the_label_says(transcript: Transcript) -> None:
    odd = Evidence("judge: not really", "a probe that names itself oddly", kind="probe")
    detections = (dataclasses.replace(transcript.detections[0], evidence=(odd,)), *transcript.detections[1:])
    t = dataclasses.replace(transcript, detections=detections)
    assert transcript_from_dict(as_json(t)) == t
    assert detection_columns(t.detections, t.evaluations).detections()[0].evidence == (odd,)
