"""The benchmark's prompts: one-turn ChatML prompts that all tokenize to the same length.

Every system gets exactly these token ids. Equal lengths mean onnxruntime-genai's static batch needs no
padding (its pad id is the EOS id), so its batch decodes the same sequences as everyone else. Each question
asks for a long answer: greedy decoding of every one runs past 128 tokens without an end-of-turn, so all
systems generate the same number of tokens even though lmesh stops on EOS.
"""

from __future__ import annotations

from pathlib import Path

QUESTIONS: tuple[str, ...] = (
    "Write a detailed essay about the history of the Roman Empire.",
    "Explain the causes and consequences of the French Revolution in detail.",
    "List twenty interesting facts about the ocean and explain each one.",
    "Explain how the internet works, from cables to web pages.",
    "Write a detailed recipe for homemade bread and explain each step.",
    "Write a long essay on the importance of bees for agriculture.",
    "Write a long story about a lighthouse keeper during a storm.",
    "Describe how airplanes fly, explaining lift, thrust and drag.",
    "Describe how the stock market works and why prices change daily.",
    "Explain how computers store and process information, in great depth.",
    "Explain in detail how volcanoes form and why they sometimes erupt.",
    "Explain the theory of evolution by natural selection in great detail.",
    "Write a detailed essay about the causes of World War One.",
    "Write a long letter to a friend about a mountain trip.",
    "Write a long story about a dragon who bakes bread.",
    "Write a long story about a robot who wants to paint.",
)
# Used only to warm systems up, so no measured prompt is in a prefix cache before it is measured.
WARM_UP_QUESTION = "Describe in detail how a car engine works, step by step."


def prompt_ids(model_dir: Path, questions: tuple[str, ...] = QUESTIONS) -> list[list[int]]:
    """Token ids of each question in the model's chat template (default system prompt)."""
    from services.model.reference import chat_prompt_ids

    return [chat_prompt_ids(model_dir, q) for q in questions]


def warm_up_ids(model_dir: Path) -> list[int]:
    return prompt_ids(model_dir, (WARM_UP_QUESTION,))[0]
