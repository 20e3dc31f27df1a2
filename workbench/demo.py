"""The demo chain: two LLM hops and a Python hop on the offline tiny model."""

from __future__ import annotations

DEMO_SPEC = """\
name: qa
description: Plan, answer, then measure the answer.
hops:
  - name: plan
    model: tiny
    prompt: "Question: {{ question }}\\nPlan:"
    max_new_tokens: 24
  - name: answer
    model: tiny
    prompt: "{{ plan }}\\nQuestion: {{ question }}\\nAnswer:"
    max_new_tokens: 32
  - name: stats
    call: workbench.demo:answer_stats
output: answer
"""

DEMO_QUESTION = "What is the capital of France?"


def answer_stats(plan: str, answer: str) -> dict[str, int]:
    """A Python hop: word counts of the plan and the answer."""
    return {"plan_words": len(plan.split()), "answer_words": len(answer.split())}


def canned_answer(question: str) -> str:
    """A Python hop for degraded answers: a fixed reply that names the question, for a fallback when models fail."""
    return f"(no model could answer {question!r} just now)"
