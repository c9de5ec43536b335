"""The judge's LangGraph workflow: window -> triage -> (escalate?) -> LLM judge -> verify -> detections.

START -> triage --(cheap signals point here and an LLM is configured)--> judge -> verify -> END
                \\--(otherwise)--> triage_detections -> END
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from detectors.judge.nodes import JudgeNodes
from detectors.judge.state import JudgeState


def build_graph(nodes: JudgeNodes) -> Any:
    """The compiled graph; `await graph.ainvoke({"window": w, "white_box": {...}})` returns the final state."""
    g = StateGraph(JudgeState)
    g.add_node("triage", nodes.triage)
    g.add_node("judge", nodes.judge)
    g.add_node("verify", nodes.verify)
    g.add_node("triage_detections", nodes.triage_detections)
    g.add_edge(START, "triage")
    g.add_conditional_edges("triage", nodes.route, {"judge": "judge", "done": "triage_detections"})
    g.add_edge("judge", "verify")
    g.add_edge("verify", END)
    g.add_edge("triage_detections", END)
    return g.compile()
