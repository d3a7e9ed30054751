"""Turning a user's prompt into the text a model expects.

Rendering happens here rather than through each runtime's chat template so that every
backend (llama.cpp in-process, or a remote /v1/completions server) sees the same tokens,
and prompt-prefix caching works across the k samples of the quality check.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = (
    "You are a precise assistant. Reply with only the final answer: a number, a word, "
    "a short phrase, or an option letter such as (B). Do not explain."
)

# Base models have no chat template: a few-shot preamble teaches the answer format.
# The examples cover the answer types crecli grades (numbers, option letters, short text).
FEW_SHOT = """Q: What is 3 plus 4?
A: 7

Q: What is the capital of Italy?
A: Rome

Q: Which of these is a fruit?
(A) stone
(B) apple
(C) chair
A: (B)

Q: What is the opposite of "hot"?
A: cold

Q: {prompt}
A:"""


@dataclass(frozen=True)
class Rendered:
    text: str
    stop: tuple[str, ...]


def render(prompt_format: str, prompt: str, system: str = SYSTEM) -> Rendered:
    prompt = prompt.strip()
    if prompt_format == "completion":
        # One line per answer: a base model that is not stopped at the newline writes the
        # next question itself.
        return Rendered(FEW_SHOT.format(prompt=prompt), ("\n",))
    if prompt_format == "chatml":
        text = (
            f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        return Rendered(text, ("<|im_end|>", "<|endoftext|>"))
    if prompt_format == "chat":
        # Remote chat servers apply their own template; the openai backend sends messages.
        return Rendered(prompt, ())
    raise ValueError(f"unknown prompt format {prompt_format!r}")


# Two prompts unlike each other: what their renderings share is the head every prompt in
# that format starts with (the system turn and the start of the user turn, or a base model's
# few-shot preamble). llama.cpp keeps a model's last prompt in its KV cache and reuses the
# longest common prefix, so in steady use the head is processed once per load, not per prompt;
# `cre models bench` counts its tokens (`bench.cached_head_tokens`) and costs leave them out.
HEAD_PROBES = ("What is 2 plus 2?", "(A) yes (B) no")
